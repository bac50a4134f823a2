"""Run-level bookkeeping of the retrain flow: the tracked MLflow run, the config digest, the last
completed run. (The promotion lock lives in the store: :mod:`podium.registry.store_lock`.)"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from podium.config import PodiumConfig, load_config
from podium.devices import load_inventory, select_devices
from podium.methods.profiling import DeviceProfile
from podium.registry.mlflow_registry import ModelRegistry
from podium.tasks.common import DatasetRef, RunContext, artifact_root

log = logging.getLogger("podium.tasks.runs")


def load_run_config(config_path: str) -> tuple[PodiumConfig, list[DeviceProfile]]:
    """The parsed config and the device profiles it selects (one-line errors for either)."""
    cfg = load_config(config_path)
    return cfg, select_devices(load_inventory(Path(cfg.devices.inventory)), cfg.devices.use, config_path)


def config_digest(cfg: PodiumConfig, devices: list[DeviceProfile]) -> str:
    """A stable digest of the parsed config and the device profiles it selects (budgets live in the
    inventory file, so a changed budget must count as a changed config)."""
    doc = {"config": cfg.model_dump(mode="json"), "devices": [d.model_dump(mode="json") for d in devices]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_sha(project_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class TrackedRun:
    """The MLflow run of one retrain: its context for the tasks, its tags, and how it ended."""

    def __init__(self, ctx: RunContext, registry: ModelRegistry, digest: str) -> None:
        self.ctx, self.registry, self.digest = ctx, registry, digest
        self.ended = False

    def tag(self, **tags: str) -> None:
        self.registry.set_run_tags(self.ctx.run_id, tags)

    def unchanged_since(self, ref: DatasetRef) -> str | None:
        """The newest run that finished every step on this data hash and config digest.

        ``completed=true`` is set only at the very end of a successful run, so a run that failed, was
        killed, or itself ended early never counts as the baseline."""
        return self.registry.latest_run(self.ctx.cfg.tracking.experiment,
                                        {"data_hash": ref.data_hash, "config_digest": self.digest, "completed": "true"})

    def skip(self, ref: DatasetRef, baseline: str) -> str:
        """End early (nothing trained or promoted); returns the message saying why."""
        self.tag(skipped="unchanged", skipped_baseline=baseline)
        self._end("FINISHED")
        return (f"data {ref.data_hash} and config {self.digest} are unchanged since run {baseline}: "
                "ending early, nothing trained or promoted")

    def complete(self) -> None:
        self.tag(completed="true")  # last: the baseline for a later unchanged_since
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if not self.ended:
            self.registry.end_run(self.ctx.run_id, status)
            self.ended = True


@contextmanager
def tracked_run(cfg: PodiumConfig, devices: list[DeviceProfile], config_path: str, project_dir: str
                ) -> Iterator[TrackedRun]:
    """Start the retrain's MLflow run after checking its services; it ends FAILED if the body raises.

    Checked before anything is trained: the tracking server answers, and the store can be listed
    (no training for a store we could not publish to)."""
    project = Path(project_dir).resolve()
    registry = ModelRegistry(cfg.tracking.uri, artifact_root(project, cfg.tracking.artifact_root))
    registry.check_reachable()
    digest = config_digest(cfg, devices)
    run_id = registry.start_run(cfg.tracking.experiment, "retrain", tags={"config": config_path, "config_digest": digest})
    run = TrackedRun(RunContext(cfg=cfg, project_dir=str(project), run_id=run_id, git_sha=git_sha(project)),
                     registry, digest)
    try:
        registry.log_params(run_id, cfg.model_dump(mode="json", exclude={"tracking"}))
        run.ctx.open_store().list(f"{cfg.model_name}/")
        yield run
    except BaseException:
        run._end("FAILED")
        raise
    run._end("FINISHED")

