"""Safe releases: publish (current.json last), verified fetch, idempotence, rollback, tamper detection.

Runs on a local folder store and on a real S3 endpoint (a moto server on 127.0.0.1).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from podium.registry.release import (
    ReleaseError,
    fetch_release,
    list_versions,
    publish_release,
    read_current,
    set_current,
)
from podium.registry.stores import ArtifactStore, LocalStore, StoreError

MODEL, DEVICE = "digits-classifier", "cpu-1t"


def make_files(folder: Path, tag: str) -> dict[str, Path]:
    """Three release files whose contents name their version, so mixing would be detectable."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": folder / "model.onnx", "weights.safetensors": folder / "w.st",
             "labels.txt": folder / "labels.txt"}
    files["model.onnx"].write_bytes(f"onnx {tag}\n".encode() + bytes(range(256)) * 2000)  # > 500 kB
    files["weights.safetensors"].write_bytes(f"weights {tag}\n".encode() * 1000)
    files["labels.txt"].write_text(f"{tag}\n0\n1\n")
    return files


META = {"input_spec": {"channels": 1, "height": 32, "width": 32, "mean": [0.5], "std": [0.5]},
        "metrics": {"val_acc": 0.97}, "lineage": {"data_hash": "abc", "git_sha": "deadbeef"}}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_and_fetch_roundtrip(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_files(tmp_path / "v1", "v1")
    manifest = publish_release(store, MODEL, DEVICE, 1, files, META)
    assert manifest["version"] == "1" and manifest["model"] == MODEL and manifest["device"] == DEVICE
    assert manifest["metrics"] == {"val_acc": 0.97} and manifest["lineage"]["data_hash"] == "abc"
    assert [f["name"] for f in manifest["files"]] == sorted(files)
    for entry in manifest["files"]:
        data = files[entry["name"]].read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()

    current = read_current(store, MODEL, DEVICE)
    stored_manifest = store.get_bytes(f"{MODEL}/{DEVICE}/v1/manifest.json")
    assert current["version"] == "1" and current["manifest"] == f"{MODEL}/{DEVICE}/v1/manifest.json"
    assert current["manifest_sha256"] == hashlib.sha256(stored_manifest).hexdigest()
    assert json.loads(stored_manifest) == manifest

    dest = tmp_path / "deploy" / "model"
    got = fetch_release(store, MODEL, DEVICE, dest)
    assert got == manifest
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, "manifest.json", ".podium-fetch.json"])
    for name, path in files.items():
        assert (dest / name).read_bytes() == path.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no temp folders left next to dest
    assert list_versions(store, MODEL, DEVICE) == ["1"]


def test_fetch_replaces_previous_fetch_and_specific_version(store: ArtifactStore, tmp_path: Path) -> None:
    publish_release(store, MODEL, DEVICE, 1, make_files(tmp_path / "v1", "v1"), META)
    publish_release(store, MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    dest = tmp_path / "dest"
    dest.mkdir()  # an empty folder is a valid destination
    assert fetch_release(store, MODEL, DEVICE, dest)["version"] == "2"
    assert (dest / "labels.txt").read_text().startswith("v2")
    assert fetch_release(store, MODEL, DEVICE, dest, version=1)["version"] == "1"  # replaces the v2 fetch
    assert (dest / "labels.txt").read_text().startswith("v1")
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []

    stranger = tmp_path / "user-data"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="not empty and does not hold a previous fetch"):
        fetch_release(store, MODEL, DEVICE, stranger)
    assert snapshot(stranger) == {"notes.txt": b"mine"}


def test_republish_identical_is_noop_and_different_content_needs_overwrite(store: ArtifactStore,
                                                                          tmp_path: Path) -> None:
    files = make_files(tmp_path / "v1", "v1")
    first = publish_release(store, MODEL, DEVICE, 1, files, META)
    before = {k: store.get_bytes(k) for k in store.list(f"{MODEL}/{DEVICE}/v1/")}
    again = publish_release(store, MODEL, DEVICE, 1, files, META)
    assert again == first  # same manifest (same created_at): nothing was rewritten
    assert {k: store.get_bytes(k) for k in store.list(f"{MODEL}/{DEVICE}/v1/")} == before

    changed = make_files(tmp_path / "v1b", "v1-changed")
    with pytest.raises(ReleaseError, match=r"v1 already exists with different files \(.*labels\.txt.*\); "
                                           r"pass overwrite=True"):
        publish_release(store, MODEL, DEVICE, 1, changed, META)
    assert {k: store.get_bytes(k) for k in store.list(f"{MODEL}/{DEVICE}/v1/")} == before

    del changed["labels.txt"]
    replaced = publish_release(store, MODEL, DEVICE, 1, changed, META, overwrite=True)
    assert [f["name"] for f in replaced["files"]] == ["model.onnx", "weights.safetensors"]
    assert not store.exists(f"{MODEL}/{DEVICE}/v1/labels.txt")  # stale file of the old content removed
    fetched = fetch_release(store, MODEL, DEVICE, tmp_path / "out")
    assert fetched == replaced and (tmp_path / "out" / "model.onnx").read_bytes().startswith(b"onnx v1-changed")


def test_republish_repoints_current_and_repairs_a_damaged_object(store: ArtifactStore, tmp_path: Path) -> None:
    v1 = make_files(tmp_path / "v1", "v1")
    publish_release(store, MODEL, DEVICE, 1, v1, META)
    publish_release(store, MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    store.put_bytes(f"{MODEL}/{DEVICE}/v1/labels.txt", b"bit rot")
    publish_release(store, MODEL, DEVICE, 1, v1, META)  # e.g. the registry says v1 is the champion again
    assert read_current(store, MODEL, DEVICE)["version"] == "1"
    assert store.get_bytes(f"{MODEL}/{DEVICE}/v1/labels.txt") == v1["labels.txt"].read_bytes()


class FailOnSecondFile:
    """Our own test double of the store boundary: a store whose put_file raises on the 2nd file."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner, self.uri, self.calls = inner, inner.uri, 0

    def put_file(self, key, path) -> None:
        self.calls += 1
        if self.calls == 2:
            raise StoreError("S3 endpoint http://example.invalid is unreachable", "unreachable")
        self.inner.put_file(key, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CorruptingStore(FailOnSecondFile):
    """Stores a truncated copy of one file, as a faulty proxy would: publish must catch it on read-back."""

    def put_file(self, key, path) -> None:
        if key.endswith("weights.safetensors"):
            self.inner.put_bytes(key, Path(path).read_bytes()[:-1])
        else:
            self.inner.put_file(key, path)


@pytest.mark.parametrize("wrapper, error", [(FailOnSecondFile, StoreError), (CorruptingStore, ReleaseError)])
def test_failed_publish_leaves_previous_current(store: ArtifactStore, tmp_path: Path, wrapper, error) -> None:
    publish_release(store, MODEL, DEVICE, 1, make_files(tmp_path / "v1", "v1"), META)
    pointer = store.get_bytes(f"{MODEL}/{DEVICE}/current.json")
    with pytest.raises(error) as info:
        publish_release(wrapper(store), MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    if error is ReleaseError:
        assert "'weights.safetensors' failed verification (size" in str(info.value)
    assert store.get_bytes(f"{MODEL}/{DEVICE}/current.json") == pointer
    assert not store.exists(f"{MODEL}/{DEVICE}/v2/manifest.json")
    assert list_versions(store, MODEL, DEVICE) == ["1"]  # the half-uploaded v2 is not a version
    assert fetch_release(store, MODEL, DEVICE, tmp_path / "out")["version"] == "1"
    # and a retry with a healthy store completes the release
    publish_release(store, MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    assert read_current(store, MODEL, DEVICE)["version"] == "2"


def _prepare_dest(tmp_path: Path) -> Path:
    """A previous fetch of the same model and device (its marker lists what it installed)."""
    dest = tmp_path / "deploy"
    dest.mkdir()
    (dest / "manifest.json").write_text("{\"version\": \"old\"}")
    (dest / "model.onnx").write_bytes(b"old model")
    (dest / ".podium-fetch.json").write_text(json.dumps({"model": MODEL, "device": DEVICE, "version": "old",
                                                         "files": ["manifest.json", "model.onnx"]}))
    return dest


def test_tampered_file_fails_fetch_and_writes_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    publish_release(store, MODEL, DEVICE, 1, make_files(tmp_path / "v1", "v1"), META)
    key = f"{MODEL}/{DEVICE}/v1/weights.safetensors"
    original = store.get_bytes(key)
    dest = _prepare_dest(tmp_path)
    before = snapshot(tmp_path / "deploy")
    entries_before = sorted(p.name for p in tmp_path.iterdir())

    store.put_bytes(key, original[:-1] + b"X")  # same size, different content
    with pytest.raises(ReleaseError, match=r"file 'weights\.safetensors' sha256 .* does not match the manifest"):
        fetch_release(store, MODEL, DEVICE, dest)
    store.put_bytes(key, original + b"extra")  # different size
    with pytest.raises(ReleaseError, match=r"file 'weights\.safetensors' has \d+ bytes, manifest says"):
        fetch_release(store, MODEL, DEVICE, dest)
    store.delete(key)
    with pytest.raises(ReleaseError, match=r"file 'weights\.safetensors' is missing from the store"):
        fetch_release(store, MODEL, DEVICE, dest)
    assert snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == entries_before  # no temp folder left
    with pytest.raises(ReleaseError):
        fetch_release(store, MODEL, DEVICE, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_tampered_manifest_fails_fetch_and_writes_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_files(tmp_path / "v1", "v1")
    publish_release(store, MODEL, DEVICE, 1, files, META)
    key = f"{MODEL}/{DEVICE}/v1/manifest.json"
    manifest = json.loads(store.get_bytes(key))
    # an attacker swaps a file AND updates its checksum in the manifest: current.json still catches it
    evil = b"evil model"
    store.put_bytes(f"{MODEL}/{DEVICE}/v1/model.onnx", evil)
    for entry in manifest["files"]:
        if entry["name"] == "model.onnx":
            entry.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    store.put_bytes(key, json.dumps(manifest).encode())
    dest = _prepare_dest(tmp_path)
    before = snapshot(dest)
    with pytest.raises(ReleaseError, match=r"manifest\.json sha256 .* does not match current\.json"):
        fetch_release(store, MODEL, DEVICE, dest)
    assert snapshot(dest) == before
    assert not (tmp_path / "fresh").exists()
    store.put_bytes(key, b"{not json")
    store.delete(f"{MODEL}/{DEVICE}/current.json")  # an explicit version without a pointer to compare with
    with pytest.raises(ReleaseError, match="manifest is not valid JSON"):
        fetch_release(store, MODEL, DEVICE, tmp_path / "fresh", version=1)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "-x", "a..b", "x y", "manifest.json"])
def test_unsafe_names_rejected_on_publish(store: ArtifactStore, tmp_path: Path, name: str) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(ReleaseError, match="unsafe file name|reserved"):
        publish_release(store, MODEL, DEVICE, 1, {name: src}, META)
    assert store.list() == []
    for model, device, version in (("../m", DEVICE, 1), (MODEL, "a/b", 1), (MODEL, DEVICE, "1/../2")):
        with pytest.raises(ReleaseError, match="unsafe"):
            publish_release(store, model, device, version, {"ok.bin": src}, META)


@pytest.mark.parametrize("name", ["../../escape.txt", "/etc/passwd", "sub/x", ".bashrc"])
def test_unsafe_names_rejected_on_fetch(store: ArtifactStore, tmp_path: Path, name: str) -> None:
    """A hand-made (malicious) release whose manifest names a path outside dest: nothing is fetched."""
    data = b"payload"
    manifest = {"format": 1, "model": MODEL, "device": DEVICE, "version": "1",
                "files": [{"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
    raw = json.dumps(manifest).encode()
    store.put_bytes(f"{MODEL}/{DEVICE}/v1/manifest.json", raw)
    store.put_bytes(f"{MODEL}/{DEVICE}/current.json", json.dumps({
        "model": MODEL, "device": DEVICE, "version": "1", "manifest": f"{MODEL}/{DEVICE}/v1/manifest.json",
        "manifest_sha256": hashlib.sha256(raw).hexdigest()}).encode())
    dest = tmp_path / "work" / "dest"
    with pytest.raises(ReleaseError, match="unsafe file name"):
        fetch_release(store, MODEL, DEVICE, dest)
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_set_current_rollback(store: ArtifactStore, tmp_path: Path) -> None:
    publish_release(store, MODEL, DEVICE, 1, make_files(tmp_path / "v1", "v1"), META)
    publish_release(store, MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    publish_release(store, MODEL, DEVICE, 10, make_files(tmp_path / "v10", "v10"), META)
    assert list_versions(store, MODEL, DEVICE) == ["1", "2", "10"]  # numeric order
    assert read_current(store, MODEL, DEVICE)["version"] == "10"

    pointer = set_current(store, MODEL, DEVICE, 2)
    assert pointer["version"] == "2" and read_current(store, MODEL, DEVICE) == pointer
    assert fetch_release(store, MODEL, DEVICE, tmp_path / "out")["version"] == "2"
    assert (tmp_path / "out" / "labels.txt").read_text().startswith("v2")

    with pytest.raises(ReleaseError, match=r"release digits-classifier/cpu-1t v7 does not exist"):
        set_current(store, MODEL, DEVICE, 7)
    store.delete(f"{MODEL}/{DEVICE}/v1/model.onnx")
    with pytest.raises(ReleaseError, match="v1 is incomplete: missing model.onnx"):
        set_current(store, MODEL, DEVICE, 1)
    assert read_current(store, MODEL, DEVICE)["version"] == "2"  # failed rollbacks changed nothing


def test_nothing_published(store: ArtifactStore, tmp_path: Path) -> None:
    assert read_current(store, MODEL, DEVICE) is None
    assert list_versions(store, MODEL, DEVICE) == []
    with pytest.raises(ReleaseError, match=r"^no current release of digits-classifier/cpu-1t in "):
        fetch_release(store, MODEL, DEVICE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metadata_cannot_contradict_the_manifest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    files = make_files(tmp_path / "v1", "v1")
    publish_release(store, MODEL, DEVICE, 1, files, {**META, "model": MODEL, "device": DEVICE})  # agreeing: ok
    with pytest.raises(ReleaseError, match="metadata key 'files' is reserved"):
        publish_release(store, MODEL, DEVICE, 2, files, {"files": []})
    with pytest.raises(ReleaseError, match="metadata key 'device' is reserved"):
        publish_release(store, MODEL, DEVICE, 2, files, {"device": "gpu"})


def test_replace_previous_fetch_without_atomic_exchange(tmp_path: Path, monkeypatch) -> None:
    """Where renameat2(RENAME_EXCHANGE) is unavailable, the two-rename fallback still installs whole releases."""
    import podium.registry.release as release

    store = LocalStore(tmp_path / "store")
    publish_release(store, MODEL, DEVICE, 1, make_files(tmp_path / "v1", "v1"), META)
    dest = tmp_path / "dest"
    fetch_release(store, MODEL, DEVICE, dest)
    publish_release(store, MODEL, DEVICE, 2, make_files(tmp_path / "v2", "v2"), META)
    monkeypatch.setattr(release, "_exchange", lambda a, b: False)
    assert fetch_release(store, MODEL, DEVICE, dest)["version"] == "2"
    assert (dest / "labels.txt").read_text().startswith("v2")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
