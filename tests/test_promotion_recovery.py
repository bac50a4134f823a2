"""Trust boundaries of promotion and fetch (issue 22, points 2-4), on real components: SQLite MLflow,
a local folder store and the moto S3 server, the Prefect test harness for the flow tests.

* fetch never deletes what it did not write: only a folder whose marker says it is a fetch of the
  same model and device is replaced; files get ordinary permissions; killed fetches' staging
  folders are cleaned up by the next fetch;
* registry and store agree after any crash: an interrupted promotion or rollback is completed or
  abandoned deterministically by the next run (or `podium models`), and a rolled-back model is not
  promoted again;
* the promotion lock lives in the store, so promoters that share nothing else still exclude each other.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from podium.errors import BranchError, ReleaseError
from podium.methods.export import export_onnx, save_weights
from podium.methods.families import build
from podium.registry import promotion
from podium.registry.mlflow_registry import ModelRegistry
from podium.registry.release import FETCH_MARKER, fetch_release, publish_release, read_current, set_current
from podium.registry.store_lock import LockHeld, StoreLock, lock_key, promotion_lock
from podium.registry.stores import ArtifactStore, LocalStore, open_store
from tests.flow_helpers import BUCKET, REPO, one_anchor_config

torch.set_num_threads(1)
MODEL, DEVICE = "digits-classifier", "cpu-1t"
TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    """The CLI failed with exit 1 and exactly one ``error:`` line, no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def release_files(folder: Path, tag: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(f"onnx {tag}\n".encode() * 100)
    (folder / "labels.txt").write_text(f"{tag}\n")
    return {"model.onnx": folder / "model.onnx", "labels.txt": folder / "labels.txt"}


# ----------------------------------------------------------------------------- fetch (point 2)

def test_fetch_refuses_a_folder_that_merely_holds_a_manifest(tmp_path: Path) -> None:
    """A web app with its own manifest.json, or the store's own release folder, is not a previous
    fetch: `podium fetch` says so in one line, exit 1, and leaves every file as it was."""
    from podium.cli import app

    store = LocalStore(tmp_path / "store")
    publish_release(store, MODEL, DEVICE, 1, release_files(tmp_path / "src", "v1"), {})
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my pwa", "start_url": "/"}')
    (webapp / "index.html").write_text("<html>mine</html>")
    release_folder = tmp_path / "store" / MODEL / DEVICE / "v1"
    for dest in (webapp, release_folder):
        before = snapshot(dest)
        result = CliRunner().invoke(app, ["fetch", "--model", MODEL, "--device", DEVICE, "--dest", str(dest),
                                          "--store", str(tmp_path / "store")])
        assert "does not hold a previous fetch" in one_error_line(result)
        assert snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "store", "webapp"]  # no staging left


def test_fetch_replaces_only_its_own_fetch_of_the_same_model_and_device(tmp_path: Path) -> None:
    """A previous fetch of the same model/device is replaced; another model's or device's fetch, or a
    fetch the user added files to, is refused and left untouched."""
    store = LocalStore(tmp_path / "store")
    publish_release(store, MODEL, DEVICE, 1, release_files(tmp_path / "a1", "a1"), {})
    publish_release(store, MODEL, "cpu-4t", 1, release_files(tmp_path / "b1", "b1"), {})
    publish_release(store, "other-model", DEVICE, 1, release_files(tmp_path / "c1", "c1"), {})
    dest = tmp_path / "deploy"
    fetch_release(store, MODEL, DEVICE, dest)
    marker = json.loads((dest / FETCH_MARKER).read_text())
    assert (marker["model"], marker["device"], marker["version"]) == (MODEL, DEVICE, "1")
    assert marker["files"] == ["labels.txt", "manifest.json", "model.onnx"]
    publish_release(store, MODEL, DEVICE, 2, release_files(tmp_path / "a2", "a2"), {})
    assert fetch_release(store, MODEL, DEVICE, dest)["version"] == "2"  # its own fetch: replaced
    assert (dest / "labels.txt").read_text() == "a2\n"

    before = snapshot(dest)
    for model, device in (("other-model", DEVICE), (MODEL, "cpu-4t")):
        with pytest.raises(ReleaseError, match=rf"holds a fetch of {MODEL}/{DEVICE}, not {model}/{device}"):
            fetch_release(store, model, device, dest)
        assert snapshot(dest) == before
    (dest / "notes.txt").write_text("my notes")  # the user keeps something in the fetched folder
    with pytest.raises(ReleaseError, match=r"holds files its fetch did not write \(notes\.txt\)"):
        fetch_release(store, MODEL, DEVICE, dest)
    assert (dest / "notes.txt").read_text() == "my notes" and (dest / "labels.txt").read_text() == "a2\n"


def test_fetch_gives_ordinary_permissions_and_cleans_up_after_killed_fetches(tmp_path: Path) -> None:
    """Fetched files are 0644 and the folder 0755 (umask 022), not the 0600/0700 of temp files; a
    staging folder a killed fetch left is removed by the next fetch, a live fetch's is not."""
    store = LocalStore(tmp_path / "store")
    publish_release(store, MODEL, DEVICE, 1, release_files(tmp_path / "src", "v1"), {})
    dest = tmp_path / "deploy"
    killed = tmp_path / ".deploy.podium-fetch-killed1"  # what `kill -9` during a download leaves
    killed.mkdir()
    (killed / "model.onnx").write_bytes(b"half a mod")
    retired = tmp_path / ".deploy.podium-old-killed2"  # a replaced fetch a kill left on its way out
    retired.mkdir()
    live = tmp_path / ".deploy.podium-fetch-live"  # another client downloading right now
    live.mkdir()
    for path in (killed, retired, live):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    import fcntl

    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    old_umask = os.umask(0o022)
    try:
        fetch_release(store, MODEL, DEVICE, dest)
    finally:
        os.umask(old_umask)
        os.close(held)
    assert not killed.exists() and not retired.exists() and live.exists()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {
        "labels.txt": 0o644, "manifest.json": 0o644, "model.onnx": 0o644, FETCH_MARKER: 0o644}


# ------------------------------------------------------------------------ the store lock (point 4)

def test_two_promoters_sharing_only_the_store_never_hold_the_lock_together(store: ArtifactStore) -> None:
    """Two promoters with their own store clients (other cache folders, other hosts: they share only
    the store) take turns; a third that will not wait fails with one line naming the holder."""
    inside, events, errors = threading.Semaphore(1), [], []
    first_in = threading.Event()

    def promoter(name: str) -> None:
        client = open_store(store.uri, getattr(store, "endpoint_url", None))
        try:
            with promotion_lock(client, MODEL, wait_s=60):
                assert inside.acquire(blocking=False), "two promoters inside the lock at once"
                events.append(f"{name}:in")
                first_in.set()
                time.sleep(0.5)
                events.append(f"{name}:out")
                inside.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    a = threading.Thread(target=promoter, args=("a",))
    a.start()
    assert first_in.wait(30)
    held_by_a = rf"promotion lock of {MODEL} in .* is held by .*:{os.getpid()} since"
    with pytest.raises(LockHeld, match=held_by_a), promotion_lock(store, MODEL, wait_s=0):
        pass
    b = threading.Thread(target=promoter, args=("b",))
    b.start()
    a.join(30)
    b.join(30)
    assert errors == [] and events == ["a:in", "a:out", "b:in", "b:out"]
    assert not store.exists(lock_key(MODEL))  # released
    with promotion_lock(store, "other-model", wait_s=0), promotion_lock(store, MODEL, wait_s=0):
        pass  # locks are per model


def test_a_held_lock_is_renewed_and_a_dead_or_expired_one_is_broken(store: ArtifactStore) -> None:
    """The holder's heartbeat keeps a short lease alive past its length; a lock whose holder process
    died, or whose lease ran out on another host, does not block the next promoter."""
    holder = StoreLock(store, MODEL, lease_s=1.0)
    assert holder.try_acquire() is None
    time.sleep(2.0)  # twice the lease: only the renewals keep it
    assert StoreLock(store, MODEL).try_acquire() is not None
    holder.release()
    assert not store.exists(lock_key(MODEL))

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = StoreLock(store, MODEL)
    record = json.loads(stale._record())
    store.put_bytes(lock_key(MODEL), json.dumps({**record, "pid": int(dead.stdout), "expires_at": time.time() + 600,
                                                 "token": "dead"}).encode())
    with promotion_lock(store, MODEL, wait_s=0):  # its process is gone: broken at once
        pass
    store.put_bytes(lock_key(MODEL), json.dumps({**record, "host": "elsewhere", "token": "old",
                                                 "expires_at": time.time() - 1}).encode())
    with promotion_lock(store, MODEL, wait_s=0):  # its lease ran out
        pass
    store.put_bytes(lock_key(MODEL), json.dumps({**record, "host": "elsewhere", "token": "live",
                                                 "expires_at": time.time() + 600}).encode())
    with pytest.raises(LockHeld, match="held by"), promotion_lock(store, MODEL, wait_s=0.3):
        pass  # another host's live lease is respected
    assert json.loads(store.get_bytes(lock_key(MODEL)))["token"] == "live"


# ------------------------------------------------- two-phase promotion on the registry (point 3)

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    model = build(TINY, 10, 1).eval()
    return export_onnx(model, (1, 16, 16), folder / "model.onnx"), save_weights(model, folder / "weights.safetensors")


@pytest.fixture()
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts")


def register(registry: ModelRegistry, exported: tuple[Path, Path], digest: str) -> str:
    run_id = registry.start_run("recovery", "r")
    uri = registry.log_model(run_id, "winner", *exported, {"arch": TINY}, np.zeros((2, 1, 16, 16), np.float32))
    return str(registry.register(MODEL, uri, run_id, {"device": DEVICE, "digest": digest, "val_acc": 0.5}).version)


class Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` handler of the code under test runs."""


def agree(registry: ModelRegistry, store: ArtifactStore) -> str:
    """Alias and current.json name the same version, and no move is pending; returns it."""
    alias = registry.version_by_alias(MODEL, DEVICE).version
    assert str(read_current(store, MODEL, DEVICE)["version"]) == str(alias)
    assert promotion.pending_intent(registry, MODEL, DEVICE) is None
    return str(alias)


def test_kill_between_publish_and_alias_move_is_completed_next_time(registry, exported, tmp_path, monkeypatch):
    """current.json was published but the alias never moved: the next reconcile (every run does one
    before deciding) completes the promotion, since clients already run that release."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = register(registry, exported, "d1"), register(registry, exported, "d2")
    promotion.promote(registry, store, MODEL, DEVICE, v1, None, "first")
    monkeypatch.setattr(ModelRegistry, "set_alias", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        promotion.promote(registry, store, MODEL, DEVICE, v2, registry.get_version(MODEL, v1), "better")
    monkeypatch.undo()
    assert read_current(store, MODEL, DEVICE)["version"] == v2  # the divergence the issue describes
    assert str(registry.version_by_alias(MODEL, DEVICE).version) == v1

    champion, notes = promotion.reconcile(registry, store, MODEL, DEVICE)
    assert str(champion.version) == v2 and agree(registry, store) == v2
    assert notes == [(f"interrupted promote of {DEVICE} from v{v1} to v{v2} completed: its release was current, "
                      f"the alias now names it")]
    tags = registry.get_version(MODEL, v2).tags
    assert tags["promotion"] == "promoted" and tags["previous_version"] == v1
    assert promotion.reconcile(registry, store, MODEL, DEVICE)[1] == []  # nothing left to repair


def test_kill_during_publish_is_abandoned_and_a_diverged_store_repaired(registry, exported, tmp_path, monkeypatch):
    """Killed before current.json moved: the move is abandoned (the alias stays, the version says so).
    A store serving another version than the alias (no move pending) is made to serve the alias."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = register(registry, exported, "d1"), register(registry, exported, "d2")
    promotion.promote(registry, store, MODEL, DEVICE, v1, None, "first")
    monkeypatch.setattr(LocalStore, "put_file", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        promotion.promote(registry, store, MODEL, DEVICE, v2, registry.get_version(MODEL, v1), "better")
    monkeypatch.undo()
    assert promotion.pending_intent(registry, MODEL, DEVICE)["to"] == v2
    champion, notes = promotion.reconcile(registry, store, MODEL, DEVICE)
    assert str(champion.version) == v1 and agree(registry, store) == v1
    assert notes == [f"interrupted promote of {DEVICE} from v{v1} to v{v2} abandoned: its release never became current"]
    assert registry.get_version(MODEL, v2).tags["promotion"] == "abandoned"

    promotion.publish_version(registry, store, MODEL, DEVICE, v2)  # someone points the store elsewhere
    assert read_current(store, MODEL, DEVICE)["version"] == v2
    champion, notes = promotion.reconcile(registry, store, MODEL, DEVICE)
    assert agree(registry, store) == v1 and "the store served v" in notes[0]


def test_rollback_is_two_phase_and_a_rolled_back_model_is_not_promoted_again(registry, exported, tmp_path,
                                                                             monkeypatch):
    """A rollback killed after the store moved is completed by the next reconcile; afterwards the
    rolled-back model (same digest) is refused with a reason, while a new model may still win."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = register(registry, exported, "d1"), register(registry, exported, "d2")
    promotion.promote(registry, store, MODEL, DEVICE, v1, None, "first")
    promotion.promote(registry, store, MODEL, DEVICE, v2, registry.get_version(MODEL, v1), "better")
    monkeypatch.setattr(ModelRegistry, "set_alias", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        promotion.rollback(registry, store, MODEL, DEVICE)
    monkeypatch.undo()
    assert read_current(store, MODEL, DEVICE)["version"] == v1
    assert str(registry.version_by_alias(MODEL, DEVICE).version) == v2
    promotion.reconcile(registry, store, MODEL, DEVICE)
    assert agree(registry, store) == v1 and registry.get_version(MODEL, v2).tags["promotion"] == "rolled-back"

    wins = promotion.PromotionDecision(True, "challenger 0.99 beats champion")
    refused = promotion.rolled_back_guard(registry, MODEL, DEVICE, "d2", wins)
    assert not refused.promote and refused.reason == (f"not promoted: the same model (digest d2) is v{v2}, "
                                                      f"which was rolled back on {DEVICE}")
    assert promotion.rolled_back_guard(registry, MODEL, DEVICE, "d3", wins) == wins
    assert promotion.rolled_back_guard(registry, MODEL, "cpu-4t", "d2", wins) == wins  # rolled back elsewhere only


def test_failed_rollback_changes_nothing(registry, exported, tmp_path):
    """A rollback whose target release is gone from the store fails with one line; alias, store and
    the pending-move record stay as they were."""
    store = LocalStore(tmp_path / "store")
    v1, v2 = register(registry, exported, "d1"), register(registry, exported, "d2")
    promotion.promote(registry, store, MODEL, DEVICE, v1, None, "first")
    promotion.promote(registry, store, MODEL, DEVICE, v2, registry.get_version(MODEL, v1), "better")
    store.delete(f"{MODEL}/{DEVICE}/v{v1}/model.onnx")
    with pytest.raises(ReleaseError, match=rf"v{v1} is incomplete: missing model.onnx"):
        promotion.rollback(registry, store, MODEL, DEVICE)
    assert agree(registry, store) == v2


# ---------------------------------------------------------------------- through the flow (point 3)

PREFIX = f"s3://{BUCKET}/recovery"


def flow_config(services, seed: int) -> Path:
    return one_anchor_config(services, services["root"] / f"seed{seed}.yaml", seed, PREFIX, DEVICE)


def flow_state(services) -> tuple[ModelRegistry, ArtifactStore]:
    return ModelRegistry(f"sqlite:///{services['root']}/mlflow.db"), open_store(PREFIX, services["endpoint"])


@pytest.mark.integration
def test_flow_crash_at_alias_move_then_keep_then_rollback_then_retrain(prefect_harness, services, monkeypatch):
    """The issue's sequence through real runs: a run killed between current.json and the alias move;
    the next run settles it and keeps the champion, registry and store agreeing; after a rollback the
    same model comes back from a retrain and is not promoted again, saying why."""
    from podium.cli import app
    from podium.flows.retrain import run_retrain

    reg, store = flow_state(services)
    run_retrain(str(flow_config(services, 0)), str(REPO))
    v1 = agree(reg, store)
    reg.set_version_tags(MODEL, v1, {"val_acc": "0.0"})  # any challenger beats it
    challenger = flow_config(services, 1)
    set_alias = ModelRegistry.set_alias

    def killed_at_the_device_alias(self, name, alias, version):  # anchors' aliases still move
        if (name, alias) == (MODEL, DEVICE):
            raise RuntimeError("killed")
        set_alias(self, name, alias, version)

    monkeypatch.setattr(ModelRegistry, "set_alias", killed_at_the_device_alias)
    with pytest.raises(BranchError, match="killed"):
        run_retrain(str(challenger), str(REPO))
    monkeypatch.undo()
    v2 = str(read_current(store, MODEL, DEVICE)["version"])
    assert v2 != v1 and str(reg.version_by_alias(MODEL, DEVICE).version) == v1  # disagreeing after the crash

    (outcome,) = run_retrain(str(challenger), str(REPO)).outcomes  # same model again: the champion
    assert (str(outcome.version), outcome.alias_moved, outcome.reason) == (v2, False, "unchanged: the winner is the champion")
    assert agree(reg, store) == v2 and not store.exists(lock_key(MODEL))

    out = CliRunner().invoke(app, ["rollback", "--model", MODEL, "--device", DEVICE, "--config", str(challenger)])
    assert out.exit_code == 0, out.output
    assert agree(reg, store) == v1
    (outcome,) = run_retrain(str(challenger), str(REPO)).outcomes
    assert not outcome.alias_moved and outcome.reason.startswith("not promoted: the same model (digest ")
    assert f"is v{v2}, which was rolled back on {DEVICE}" in outcome.reason
    assert agree(reg, store) == v1

    models = CliRunner().invoke(app, ["models", "--config", str(challenger)])  # agreeing: nothing to note
    assert models.exit_code == 0 and "note:" not in models.output, models.output
    set_current(store, MODEL, DEVICE, v2)  # the store is pointed elsewhere behind the registry's back
    models = CliRunner().invoke(app, ["models", "--config", str(challenger)])
    assert models.exit_code == 0, models.output
    assert f"note: {DEVICE}: the store served v{v2} but the alias names v{v1}" in models.output
    assert agree(reg, store) == v1
