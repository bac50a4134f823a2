"""Safe deployment releases in an `ArtifactStore`, and the retrieval client that verifies them.

Layout (keys relative to the store's root/prefix)::

    {model}/{device}/v{version}/{file..., manifest.json}
    {model}/{device}/current.json

Why it is safe:

* A version folder is immutable once its manifest exists (republishing identical files is a no-op;
  different content needs ``overwrite=True``).
* `publish_release` uploads the files, reads every one back and checks size + sha256, writes the
  manifest, reads it back, and only then writes ``current.json`` -- the single object a reader
  starts from. A failure anywhere before that leaves the previous ``current.json`` untouched, and an
  object PUT is atomic, so a reader sees either the old pointer or the new one, never half of one.
* ``current.json`` carries the manifest's sha256 and the manifest carries every file's size and
  sha256, so `fetch_release` can prove that what it downloaded is exactly what was published. It
  downloads into a staging folder next to ``dest`` and moves it into place only when every check
  passed: on any mismatch ``dest`` is left exactly as it was. It replaces only a folder its own
  marker (``.podium-fetch.json``) says is a fetch of the same model and device, holding nothing else.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from podium.errors import ReleaseError, StoreError
from podium.files import parse_json, size_and_sha256
from podium.registry.stores import ArtifactStore

log = logging.getLogger("podium.release")

__all__ = ["CURRENT", "FETCH_MARKER", "MANIFEST", "ReleaseError", "check_name", "fetch_release", "list_versions",
           "publish_release", "read_current", "read_fetch_marker", "release_prefix", "set_current"]

MANIFEST = "manifest.json"
MAX_DOCUMENT_BYTES = 4 << 20  # a manifest or current.json: a few KB; anything far larger is refused unread
CURRENT = "current.json"
FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = ("format", "model", "device", "version", "created_at", "files")


def check_name(name: object, what: str = "file name") -> str:
    """A plain name usable as one key segment: no '/', no '..', not hidden, not empty."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or len(name) > 200:
        raise ReleaseError(f"unsafe {what} {name!r}: use letters, digits, '.', '_', '-' "
                           f"(starting with a letter or digit, no '..')")
    return name


def release_prefix(model: str, device: str, version: object | None = None) -> str:
    """``model/device`` or ``model/device/v{version}`` after checking each segment is a plain name."""
    base = f"{check_name(model, 'model name')}/{check_name(device, 'device name')}"
    return base if version is None else f"{base}/v{check_name(str(version), 'version')}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()


def _parse(data: bytes, what: str) -> dict:
    try:
        doc = parse_json(data, MAX_DOCUMENT_BYTES)
    except ValueError as exc:
        raise ReleaseError(f"{what} {exc}") from None
    if not isinstance(doc, dict):
        raise ReleaseError(f"{what} is not a JSON object")
    return doc


def _validate_manifest(manifest: dict, where: str, model: str | None = None, device: str | None = None,
                       version: str | None = None) -> list[dict]:
    """Check a manifest's identity and file entries before anything is downloaded."""
    for field, want in (("model", model), ("device", device), ("version", version)):
        if want is not None and str(manifest.get(field)) != want:
            raise ReleaseError(f"{where}: manifest says {field} {manifest.get(field)!r}, expected {want!r}")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ReleaseError(f"{where}: manifest lists no files")
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise ReleaseError(f"{where}: manifest file entry is not an object")
        name = check_name(entry.get("name"), f"file name in {where} manifest")
        if name in seen or name == MANIFEST:
            raise ReleaseError(f"{where}: manifest lists {name!r} twice or as a reserved name")
        seen.add(name)
        size, sha = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str) \
                or not _SHA.match(sha):
            raise ReleaseError(f"{where}: manifest entry for {name!r} has no valid size/sha256")
    return files


def _verify_object(store: ArtifactStore, key: str, size: int, sha256: str, scratch: Path) -> str | None:
    """Read an object back and compare size and sha256; returns a reason on mismatch, else None."""
    local = scratch / "readback"
    try:
        store.get_file(key, local)
    except StoreError as exc:
        if exc.kind == "missing":
            return "missing after upload"
        raise
    got_size, got_sha = size_and_sha256(local)
    local.unlink()
    if got_size != size:
        return f"size {got_size} != {size}"
    if got_sha != sha256:
        return f"sha256 {got_sha[:12]}… != {sha256[:12]}…"
    return None


# ------------------------------------------------------------------------------------- publishing

def publish_release(store: ArtifactStore, model: str, device: str, version: object, files: Mapping[str, Path],
                    metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> dict:
    """Publish ``files`` as release ``v{version}`` of ``model`` on ``device`` and make it current.

    Verification reads every uploaded object back and compares size and sha256 (not ETag/MD5:
    ETags are not MD5s for multipart uploads or SSE-KMS, and reading back proves what a reader
    will get). ``current.json`` is written last. Returns the manifest (the stored one for a no-op
    republish). ``metadata`` (input_spec, metrics, lineage, ...) is merged into the manifest; it
    may repeat ``model``/``device`` but not contradict them.
    """
    version = str(version)
    prefix = release_prefix(model, device, version)
    where = f"release {model}/{device} v{version}"
    if not files:
        raise ReleaseError(f"{where}: no files to publish")
    metadata = dict(metadata or {})
    identity = {"format": FORMAT, "model": model, "device": device, "version": version}
    for key in _RESERVED:
        if key in metadata and (key not in identity or str(metadata[key]) != str(identity[key])):
            raise ReleaseError(f"{where}: metadata key {key!r} is reserved by the manifest")
    entries = []
    for name, path in sorted(files.items()):
        check_name(name)
        if name in (MANIFEST, CURRENT):
            raise ReleaseError(f"{where}: file name {name!r} is reserved")
        path = Path(path)
        if not path.is_file():
            raise ReleaseError(f"{where}: file {name!r} ({path}) does not exist")
        size, sha = size_and_sha256(path)
        entries.append({"name": name, "size": size, "sha256": sha})

    manifest_key = f"{prefix}/{MANIFEST}"
    stale: list[str] = []
    if store.exists(manifest_key):
        old = _parse(store.get_bytes(manifest_key, MAX_DOCUMENT_BYTES), f"{where} manifest")
        old_entries = [{k: e.get(k) for k in ("name", "size", "sha256")} for e in old.get("files", [])
                       if isinstance(e, dict)]
        if sorted(old_entries, key=lambda e: str(e["name"])) == entries:
            log.info("%s already published with identical files: checking it and pointing current at it", where)
            _validate_manifest(old, where, model, device, version)
            _upload_and_verify(store, prefix, files, entries, where, only_repair=True)
            _write_current(store, model, device, version, manifest_key, store.get_bytes(manifest_key, MAX_DOCUMENT_BYTES))
            return old
        if not overwrite:
            changed = sorted({e["name"] for e in entries} ^ {str(e["name"]) for e in old_entries}
                             | {e["name"] for e in entries if e not in old_entries})
            raise ReleaseError(f"{where} already exists with different files ({', '.join(changed)}); "
                               f"pass overwrite=True to replace it")
        log.warning("%s exists with different files: overwriting it", where)
        stale = [f"{prefix}/{e['name']}" for e in old_entries if e["name"] not in {n["name"] for n in entries}]

    manifest = {**metadata, **identity, "created_at": _now(), "files": entries}
    _upload_and_verify(store, prefix, files, entries, where)
    data = _encode(manifest)
    store.put_bytes(manifest_key, data)
    if store.get_bytes(manifest_key, MAX_DOCUMENT_BYTES) != data:
        raise ReleaseError(f"{where}: manifest read back differs from what was written")
    _write_current(store, model, device, version, manifest_key, data)
    for key in stale:  # files of an overwritten version that the new manifest no longer lists
        store.delete(key)
    log.info("published %s to %s (%d files)", where, store.uri, len(entries))
    return manifest


def _upload_and_verify(store: ArtifactStore, prefix: str, files: Mapping[str, Path], entries: list[dict],
                       where: str, only_repair: bool = False) -> None:
    """Upload every file, then read each back; with ``only_repair`` upload only objects that fail the check."""
    with tempfile.TemporaryDirectory(prefix="podium-verify-") as tmp:
        scratch = Path(tmp)
        if not only_repair:
            for entry in entries:
                store.put_file(f"{prefix}/{entry['name']}", Path(files[entry["name"]]))
        for entry in entries:
            key = f"{prefix}/{entry['name']}"
            problem = _verify_object(store, key, entry["size"], entry["sha256"], scratch)
            if problem and only_repair:
                log.warning("%s: %s in the store (%s): uploading it again", where, entry["name"], problem)
                store.put_file(key, Path(files[entry["name"]]))
                problem = _verify_object(store, key, entry["size"], entry["sha256"], scratch)
            if problem:
                raise ReleaseError(f"{where}: uploaded file {entry['name']!r} failed verification ({problem})")


def _write_current(store: ArtifactStore, model: str, device: str, version: str, manifest_key: str,
                   manifest_bytes: bytes) -> dict:
    pointer = {"model": model, "device": device, "version": version, "manifest": manifest_key,
               "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "published_at": _now()}
    store.put_bytes(f"{release_prefix(model, device)}/{CURRENT}", _encode(pointer))
    return pointer


def read_current(store: ArtifactStore, model: str, device: str) -> dict | None:
    """The ``current.json`` pointer of a model/device, or None when nothing was published."""
    key = f"{release_prefix(model, device)}/{CURRENT}"
    try:
        data = store.get_bytes(key, MAX_DOCUMENT_BYTES)
    except StoreError as exc:
        if exc.kind == "missing":
            return None
        raise
    pointer = _parse(data, f"{model}/{device} {CURRENT}")
    for field in ("version", "manifest_sha256"):
        if field not in pointer:
            raise ReleaseError(f"{model}/{device} {CURRENT} has no {field!r}")
    return pointer


def set_current(store: ArtifactStore, model: str, device: str, version: object) -> dict:
    """Point ``current.json`` at an existing release (rollback); checks its manifest and files exist."""
    version = str(version)
    prefix = release_prefix(model, device, version)
    where = f"release {model}/{device} v{version}"
    manifest_key = f"{prefix}/{MANIFEST}"
    try:
        data = store.get_bytes(manifest_key, MAX_DOCUMENT_BYTES)
    except StoreError as exc:
        if exc.kind == "missing":
            raise ReleaseError(f"{where} does not exist in {store.uri}") from None
        raise
    entries = _validate_manifest(_parse(data, f"{where} manifest"), where, model, device, version)
    missing = [e["name"] for e in entries if not store.exists(f"{prefix}/{e['name']}")]
    if missing:
        raise ReleaseError(f"{where} is incomplete: missing {', '.join(missing)}")
    pointer = _write_current(store, model, device, version, manifest_key, data)
    log.info("current release of %s/%s is now v%s", model, device, version)
    return pointer


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def list_versions(store: ArtifactStore, model: str, device: str) -> list[str]:
    """Complete (manifest-bearing) versions of a model/device, oldest first (numeric order)."""
    base = release_prefix(model, device) + "/v"
    versions = {key[len(base):].split("/", 1)[0] for key in store.list(base)
                if key.endswith("/" + MANIFEST) and key.count("/") == base.count("/") + 1}
    return sorted(versions, key=_version_key)


# -------------------------------------------------------------------------------------- retrieval

FETCH_MARKER = ".podium-fetch.json"  # written into every fetched folder: only such a folder is replaced
_STAGING = ".podium-fetch-"  # ``.{dest}.podium-fetch-XXXX``: a download in progress, or one a kill left
_RETIRED = ".podium-old-"  # ``.{dest}.podium-old-XXXX``: a replaced fetch on its way out
_STAGING_GRACE_S = 10.0  # a staging folder younger than this may not hold its owner's lock yet
_MARKER_MAX_BYTES = 1 << 20


def fetch_release(store: ArtifactStore, model: str, device: str, dest: Path | str,
                  version: object | None = None) -> dict:
    """Download a release into ``dest`` (a folder), verifying every file; returns the manifest.

    ``dest`` must not exist, be an empty folder, or hold a previous fetch of the same model and
    device (its ``.podium-fetch.json`` marker lists every file it installed, and nothing else is
    there); anything else is refused and left untouched. The release is downloaded into a staging
    folder beside ``dest`` and swapped in atomically only when every check passed; staging folders of
    killed fetches are removed by the next fetch into ``dest``. A reader that must see one version
    while fetches replace ``dest`` opens ``dest`` once (``os.open``) and reads its files through that
    handle (``dir_fd=``): a swap then never mixes two versions under it.
    """
    dest = Path(dest).absolute()
    pointer = read_current(store, model, device)
    if version is None:
        if pointer is None:
            raise ReleaseError(f"no current release of {model}/{device} in {store.uri}")
        version = str(pointer["version"])
    version = str(version)
    prefix = release_prefix(model, device, version)
    where = f"release {model}/{device} v{version}"
    _check_dest(dest, model, device)

    try:
        manifest_bytes = store.get_bytes(f"{prefix}/{MANIFEST}", MAX_DOCUMENT_BYTES)
    except StoreError as exc:
        if exc.kind == "missing":
            raise ReleaseError(f"{where} does not exist in {store.uri}") from None
        raise
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if pointer is not None and str(pointer.get("version")) == version and manifest_sha != pointer["manifest_sha256"]:
        raise ReleaseError(f"{where}: manifest.json sha256 {manifest_sha[:12]}… does not match current.json "
                           f"({str(pointer['manifest_sha256'])[:12]}…)")
    manifest = _parse(manifest_bytes, f"{where} manifest")
    entries = _validate_manifest(manifest, where, model, device, version)

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{_STAGING}"))
    held = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # "a live fetch owns this": released by the kernel if we die
        for entry in entries:
            name = entry["name"]
            local = tmp / name
            try:
                store.get_file(f"{prefix}/{name}", local)
            except StoreError as exc:
                if exc.kind == "missing":
                    raise ReleaseError(f"{where}: file {name!r} is missing from the store") from None
                raise
            size, sha = size_and_sha256(local)
            if size != entry["size"]:
                raise ReleaseError(f"{where}: file {name!r} has {size} bytes, manifest says {entry['size']}")
            if sha != entry["sha256"]:
                raise ReleaseError(f"{where}: file {name!r} sha256 {sha[:12]}… does not match the manifest "
                                   f"({entry['sha256'][:12]}…)")
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        installed = sorted([*(e["name"] for e in entries), MANIFEST])
        (tmp / FETCH_MARKER).write_bytes(_encode({
            "format": FORMAT, "model": model, "device": device, "version": version, "manifest_sha256": manifest_sha,
            "files": installed, "store": store.uri, "fetched_at": _now()}))
        _ordinary_permissions(tmp, [*installed, FETCH_MARKER])
        _install(tmp, dest, model, device)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)
    log.info("fetched %s from %s into %s", where, store.uri, dest)
    return manifest


def read_fetch_marker(folder: Path) -> dict | None:
    """The marker of a Podium fetch in ``folder`` (model, device, version, files), or None."""
    marker = Path(folder) / FETCH_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    if marker.stat().st_size > _MARKER_MAX_BYTES:
        raise ReleaseError(f"{marker} is larger than {_MARKER_MAX_BYTES} bytes: not a Podium fetch marker")
    record = _parse(marker.read_bytes(), str(marker))
    if not isinstance(record.get("files"), list):
        raise ReleaseError(f"{marker} lists no files: not a Podium fetch marker")
    return record


def _check_dest(dest: Path, model: str, device: str) -> None:
    """Refuse any destination but a missing or empty folder or a previous fetch of this model/device."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ReleaseError(f"destination {dest} exists and is not a folder")
    present = sorted(p.name for p in dest.iterdir())
    if not present:
        return
    record = read_fetch_marker(dest)
    if record is None:
        raise ReleaseError(f"destination {dest} is not empty and does not hold a previous fetch (no {FETCH_MARKER}): "
                           f"refusing to replace it")
    if (record.get("model"), record.get("device")) != (model, device):
        raise ReleaseError(f"destination {dest} holds a fetch of {record.get('model')}/{record.get('device')}, "
                           f"not {model}/{device}: refusing to replace it")
    foreign = [name for name in present if name not in {*map(str, record["files"]), FETCH_MARKER}]
    if foreign:
        raise ReleaseError(f"destination {dest} holds files its fetch did not write ({', '.join(foreign[:5])}): "
                           f"refusing to replace it")


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _ordinary_permissions(folder: Path, names: list[str]) -> None:
    """Files 0644 and the folder 0755 (less the umask): temp files and folders are created private."""
    umask = _umask()
    for name in names:
        os.chmod(folder / name, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _remove_abandoned_staging(dest: Path) -> None:
    """Remove what killed fetches into ``dest`` left beside it: staging folders no live fetch holds
    locked (past a grace period), and replaced fetches still on their way out."""
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.podium-*"):
        if path.is_symlink() or not path.is_dir():
            continue
        if path.name.startswith(f".{dest.name}{_STAGING}"):
            try:
                if time.time() - path.stat().st_mtime < _STAGING_GRACE_S:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # installed or removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live fetch is downloading into it
            finally:
                os.close(fd)
        elif not path.name.startswith(f".{dest.name}{_RETIRED}"):
            continue
        log.info("removing %s, left by an interrupted fetch", path)
        shutil.rmtree(path, ignore_errors=True)


def _install(tmp: Path, dest: Path, model: str, device: str) -> None:
    """Move a verified release folder into place: a rename onto a missing or empty folder, else an
    atomic swap with the previous fetch. Fetches racing for ``dest`` each install a whole release."""
    for _attempt in range(10):
        _check_dest(dest, model, device)  # again: it may have changed while we downloaded
        if not dest.exists() or not any(dest.iterdir()):
            try:
                os.replace(tmp, dest)  # rename(2) onto a missing or empty folder is atomic
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # another fetch installed first: swap with it
        if _exchange(tmp, dest):  # Linux renameat2(RENAME_EXCHANGE): readers never see a missing dest
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous fetch
            return
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{_RETIRED}"))
        try:
            os.replace(dest, old)  # fallback: two renames; dest is briefly absent but never partial
            os.replace(tmp, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise ReleaseError(f"destination {dest} kept changing while installing the fetch: try again")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2 (Linux, glibc >= 2.28), or None."""
    try:
        func = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    func = _renameat2()
    return func is not None and func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
