"""Run-level guards of the retrain flow: the config digest, the last completed run, the promotion lock."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from methods.profiling import DeviceProfile
from podium.config import PodiumConfig
from registry.mlflow_registry import ModelRegistry

log = logging.getLogger("podium.tasks.runs")


def config_digest(cfg: PodiumConfig, devices: list[DeviceProfile]) -> str:
    """A stable digest of the parsed config and the device profiles it selects (budgets live in the
    inventory file, so a changed budget must count as a changed config)."""
    doc = {"config": cfg.model_dump(mode="json"), "devices": [d.model_dump(mode="json") for d in devices]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def last_completed_run(registry: ModelRegistry, experiment: str, data_hash: str, digest: str) -> str | None:
    """The newest run of ``experiment`` that finished every step on this data hash and config digest.

    ``completed=true`` is set only at the very end of a successful run, so a run that failed, was
    killed, or itself ended early never counts as the baseline."""
    found = registry.client.search_runs(
        [registry.experiment_id(experiment)],
        filter_string=(f"tags.data_hash = '{data_hash}' and tags.config_digest = '{digest}' "
                       "and tags.completed = 'true' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


@contextmanager
def promotion_lock(cache_dir: Path, model_name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``model_name``'s promotions while the body runs.

    Read champion → decide → publish → move alias must not interleave between two runs, or both
    could compare against the same champion and the later alias move would silently win. The lock
    is an ``flock`` on a file under the cache dir: the kernel drops it when the holder dies, so a
    crashed run never blocks the next one, and it needs no server. (A Prefect global concurrency
    limit is a silent no-op until the limit is created, and with the ephemeral API a slot taken by a
    killed run stayed taken: its lease lived in that run's own server process, and the next acquire
    timed out.)
    It serializes runs sharing a cache dir: one project checkout, or a shared filesystem for workers."""
    path = cache_dir / "locks" / f"promote-{model_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:  # each open() is its own lock holder, so threads serialize too
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run's promotion of %s (%s)", model_name, path)
            start = time.monotonic()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            log.info("promotion lock for %s taken after %.1f s", model_name, time.monotonic() - start)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
