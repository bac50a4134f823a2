"""What every task shares: the run context, artifact digests, and cache keys."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from prefect.tasks import exponential_backoff
from torch import nn

from podium.config import PodiumConfig
from podium.errors import RegistryError, StoreError
from podium.files import files_digest, load_json
from podium.methods.base import Candidate
from podium.methods.checkpoint import TrainingEnv, checkpoint_file_name
from podium.methods.data import DataBundle
from podium.registry.mlflow_registry import ModelRegistry
from podium.registry.stores import ArtifactStore, open_store

log = logging.getLogger("podium.tasks")


@dataclass(frozen=True)
class DatasetRef:
    """A validated, versioned dataset: where it is and its DVC md5 (the lineage and cache key)."""

    root: str
    data_hash: str
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunContext:
    """Everything a task needs to reach the run's services, passed explicitly (no globals)."""

    cfg: PodiumConfig
    project_dir: str
    run_id: str
    git_sha: str
    tracking_uri: str = ""  # set from cfg on construction, absolute

    def __post_init__(self) -> None:
        # Resolved in the flow's process: a task on a Dask worker (another cwd, maybe another
        # machine) must open the same database, not a new one beside itself.
        object.__setattr__(self, "tracking_uri", self.tracking_uri or absolute_tracking_uri(self.cfg.tracking.uri))

    @property
    def registry(self) -> ModelRegistry:
        return _registry(self.tracking_uri, artifact_root(self.project_path, self.cfg.tracking.artifact_root))

    @property
    def project_path(self) -> Path:
        return Path(self.project_dir)

    @property
    def store_uri(self) -> str:
        """The deployment artifact store: s3://..., or a folder (relative ones resolve against the project)."""
        uri = self.cfg.store.uri
        if "://" in uri or Path(uri).is_absolute():
            return uri
        return str((self.project_path / uri).resolve())

    def open_store(self) -> ArtifactStore:
        return open_store(self.store_uri, self.cfg.store.endpoint_url)

    @property
    def cache_path(self) -> Path:
        path = Path(self.cfg.runtime.cache_dir)
        return path if path.is_absolute() else self.project_path / path


def read_cache(path: Path) -> dict:
    """A JSON cache file's entries; a missing, oversized or unparsable one (a crash, a hand edit, a
    planted file) is an empty cache with one warning: everything in it can be measured again."""
    if not path.exists():
        return {}
    try:
        entries = load_json(path)
    except ValueError as exc:
        log.warning("cache %s ignored: it %s", path, exc)
        return {}
    if not isinstance(entries, dict):
        log.warning("cache %s ignored: not a JSON object", path)
        return {}
    return entries


def absolute_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///`` path made absolute against the working directory; other URIs as they are."""
    prefix = "sqlite:///"
    path = uri[len(prefix):] if uri.startswith(prefix) else ""
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    return prefix + str(Path(path).resolve())


def artifact_root(project: Path, root: str) -> str:
    """Where a new MLflow experiment keeps artifacts: a folder resolves against the project; a URI
    (``s3://``, ``mlflow-artifacts:/``) stays as it is."""
    return root if ":/" in root else str(project / root)


@lru_cache(maxsize=8)
def _registry(uri: str, artifact_root: str) -> ModelRegistry:
    return ModelRegistry(uri, artifact_root)


def load_data(ctx: RunContext, ref: DatasetRef) -> DataBundle:
    """The run's dataset (memoised per process). Normalised with the mean/std the first pretrained timm
    anchor's weights expect (hub or checkpoint: timm's ``pretrained_cfg``), else with ``data.mean/std``
    or measured."""
    from podium.data import load_bundle
    from podium.methods.families.timm_hub import pretrained_stats

    hub = next((a for a in ctx.cfg.anchors if a.pretrained and a.arch.get("family") == "timm"), None)
    mean, std = pretrained_stats(hub.arch["name"]) if hub is not None else (None, None)
    return load_bundle(Path(ref.root), ctx.cfg.data, ref.data_hash, classes=list(ref.classes) if ref.classes else None,
                       mean=mean, std=std)


def state_digest(model: nn.Module, extra: Any = None) -> str:
    """sha256 over a model's tensors (names, shapes, bytes) and any JSON-able extra."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# Config keys that say where a model came from, not what it computes (an anchor trained in one run is
# loaded from the registry in the next: same weights, same export, same latency).
PROVENANCE_KEYS = frozenset({"source"})


def candidate_digest(candidate: Candidate) -> str:
    """The model's identity for exports, latency measurements and the registry's ``digest`` tag."""
    config = {k: v for k, v in candidate.config.items() if k not in PROVENANCE_KEYS}
    return state_digest(candidate.model, {"config": config, "input_size": candidate.input_size})


def source_digest(*objects: Any) -> str:
    """Digest of the source files defining ``objects`` (so code changes invalidate caches)."""
    return files_digest(inspect.getsourcefile(obj) for obj in objects)


# ---------------------------------------------------------------------------------------------
# Crash safety: checkpoints in the run's store, retries of transient service failures
# ---------------------------------------------------------------------------------------------

class StoreCheckpoints:
    """A training's checkpoints in the artifact store, under ``_checkpoints/<training key>/``.

    A store that fails while saving costs the checkpoint, not the training (a warning says so).
    """

    def __init__(self, store: ArtifactStore, training_key: str) -> None:
        self.store, self.prefix = store, f"_checkpoints/{training_key}/"  # "_": never a model name

    def _key(self, name: str) -> str:
        return f"{self.prefix}{checkpoint_file_name(name)}.pt"

    def load(self, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(self._key(name))
        except StoreError as exc:
            if exc.kind != "missing":
                log.warning("checkpoint %s not read, training from step 0: %s", name, exc)
            return None

    def save(self, name: str, data: bytes) -> None:
        try:
            self.store.put_bytes(self._key(name), data)
        except StoreError as exc:
            log.warning("checkpoint %s not saved: %s", name, exc)

    def clear(self) -> None:
        """Once the training's result is kept elsewhere (task cache, registry)."""
        try:
            for key in self.store.list(self.prefix):
                self.store.delete(key)
        except StoreError as exc:
            log.warning("checkpoints under %s not removed: %s", self.prefix, exc)


def training_env_for(ctx: RunContext, training_key: str, validation: DataBundle | None = None
                     ) -> tuple[TrainingEnv, StoreCheckpoints]:
    """Checkpoints in the run's store under ``training_key``, :class:`TrainingCurves` in the run (with
    ``validation``: also each epoch's validation accuracy, for models that are plain classifiers), and the
    training's thread budget: the cores shared out among ``runtime.max_workers`` concurrent trainings."""
    checkpoints = StoreCheckpoints(ctx.open_store(), training_key)
    curves = TrainingCurves(ctx, validation)
    env = TrainingEnv(ctx.cfg.runtime.device, checkpoints, ctx.cfg.runtime.checkpoint_every_s,
                      on_progress=curves.progress, on_epoch=curves.epoch if validation is not None else None,
                      threads=ctx.cfg.runtime.training_threads)
    return env, checkpoints


class TrainingCurves:
    """Per-step curves of every ``fit`` in the run's MLflow metrics: ``train.<fit name>.loss``,
    ``.images_per_s`` and ``.epoch`` at each progress line, and ``.val_acc`` after each epoch when a
    validation split is given. A failure to log warns once and never stops the training."""

    def __init__(self, ctx: RunContext, validation: DataBundle | None = None) -> None:
        self.ctx, self.validation, self.failed = ctx, validation, False

    @staticmethod
    def metric_name(fit_name: str) -> str:
        return "train." + "".join(c if c.isalnum() or c in "_-./" else "-" for c in fit_name)

    def progress(self, name: str, step: int, steps: int, metrics: dict[str, float]) -> None:  # noqa: ARG002
        self._log({k: v for k, v in metrics.items() if v == v}, name, step)  # a nan loss (resumed at the end): none

    def epoch(self, name: str, epoch: int, model: nn.Module) -> None:
        from podium.methods.train import evaluate

        self._log({"val_acc": evaluate(model, self.validation.val)}, name, epoch)

    def _log(self, values: dict[str, float], name: str, step: int) -> None:
        if self.failed or not values:
            return
        try:
            self.ctx.registry.log_metrics(self.ctx.run_id, values, prefix=f"{self.metric_name(name)}.", step=step)
        except Exception as exc:  # noqa: BLE001 - curves are a view of the training, not part of it
            self.failed = True
            log.warning("training curves of run %s stopped: %s", self.ctx.run_id, exc)


_TRANSIENT_TEXT = ("failed with exception", "max retries exceeded", "connection refused", "timed out",
                   "temporarily unavailable", "503", "502", "504")


def is_transient(exc: BaseException) -> bool:
    """A failure that may pass if tried again: a service down, slow or overloaded, not a wrong input."""
    if isinstance(exc, StoreError):
        return exc.transient
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (MlflowException, RegistryError)):
        text = str(exc).lower()
        return any(marker in text for marker in _TRANSIENT_TEXT)
    return False


def retry_if_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# Task options for tasks that talk to S3 or MLflow: up to 3 more tries, 2 s, 4 s, 8 s apart (±50%).
TRANSIENT_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
                                     "retry_jitter_factor": 0.5, "retry_condition_fn": retry_if_transient}
