"""Run-level bookkeeping of the retrain flow: the tracked MLflow run (its readable name, git commit,
dataset input and params), the config digest, the last completed run. (The promotion lock lives in the
store: :mod:`podium.registry.store_lock`.)"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NOTE

from podium.config import PodiumConfig, load_config
from podium.devices import load_inventory, select_devices
from podium.methods.data import DataBundle
from podium.methods.profiling import DeviceProfile
from podium.registry.mlflow_registry import DvcDataset, DvcSource, ModelRegistry
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


def run_name(config_path: str, started: datetime, data_hash: str | None = None) -> str:
    """What ran, on what, when: ``demo data 1a2b3c4d 2026-12-02 04:50Z`` (the data part once it is known)."""
    data = f" data {data_hash[:8]}" if data_hash else ""
    return f"{Path(config_path).stem}{data} {started.astimezone(timezone.utc):%Y-%m-%d %H:%M}Z"


def record_dataset(ctx: RunContext, ref: DatasetRef, data: DataBundle | None = None) -> None:
    """The run's dataset as its MLflow input (digest: the DVC md5; profile: images per split when
    ``data`` is at hand) and in the run's name. Calling it again adds nothing."""
    cfg = ctx.cfg.data
    source = DvcSource(path=str(cfg.path), md5=ref.data_hash, git_commit=ctx.git_sha,
                       remote=cfg.dvc_remote.url if cfg.dvc_remote else None, stage=cfg.stage)
    profile = None
    if data is not None:
        profile = {"images": {split: len(images) for split, images in data.splits.items()},
                   "classes": len(data.class_names)}
    registry = ctx.registry
    registry.log_dataset(ctx.run_id, DvcDataset(source, name=Path(str(cfg.path)).name, profile=profile))
    info = registry.client.get_run(ctx.run_id)
    started = datetime.fromtimestamp(info.info.start_time / 1000, timezone.utc)
    registry.rename_run(ctx.run_id, run_name(info.data.tags.get("config", "retrain"), started, ref.data_hash))


class TrackedRun:
    """The MLflow run of one retrain: its context for the tasks, its tags, and how it ended."""

    def __init__(self, ctx: RunContext, registry: ModelRegistry, digest: str) -> None:
        self.ctx, self.registry, self.digest = ctx, registry, digest
        self.ended = False

    def tag(self, **tags: str) -> None:
        self.registry.set_run_tags(self.ctx.run_id, tags)

    def dataset_versioned(self, ref: DatasetRef) -> None:
        """Right after the dataset is versioned: its hash as a tag, the dataset as the run's input."""
        self.tag(data_hash=ref.data_hash)
        record_dataset(self.ctx, ref)

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
    digest, commit = config_digest(cfg, devices), git_sha(project)
    tags = {"config": config_path, "config_digest": digest,
            MLFLOW_RUN_NOTE: f"Retrain of {cfg.model_name} with {config_path} for {', '.join(d.name for d in devices)}"}
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    run_id = registry.start_run(cfg.tracking.experiment, run_name(config_path, datetime.now(timezone.utc)), tags=tags)
    run = TrackedRun(RunContext(cfg=cfg, project_dir=str(project), run_id=run_id, git_sha=commit), registry, digest)
    try:
        registry.log_params(run_id, cfg.model_dump(mode="json", exclude={"tracking"}))
        run.ctx.open_store().list(f"{cfg.model_name}/")
        yield run
    except BaseException:
        run._end("FAILED")
        raise
    run._end("FINISHED")

