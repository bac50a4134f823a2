"""What every task shares: the run context, artifact digests, and cache keys."""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.base import Candidate, DataBundle
from podium.config import PodiumConfig
from registry.mlflow_registry import ModelRegistry
from registry.store import ArtifactStore, open_store


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

    @property
    def registry(self) -> ModelRegistry:
        return _registry(self.cfg.tracking.uri, str(self.project_path / self.cfg.tracking.artifact_root))

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


@lru_cache(maxsize=8)
def _registry(uri: str, artifact_root: str) -> ModelRegistry:
    return ModelRegistry(uri, artifact_root)


def load_data(ctx: RunContext, ref: DatasetRef) -> DataBundle:
    from podium.data import load_bundle  # memoised per process: images are decoded once

    cfg = ctx.cfg.data
    return load_bundle(Path(ref.root), tuple(cfg.image_size), cfg.batch_size, ref.data_hash,
                       classes=list(ref.classes) if ref.classes else None)


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


def candidate_digest(candidate: Candidate) -> str:
    return state_digest(candidate.model, {"config": candidate.config, "input_size": candidate.input_size})


def source_digest(*objects: Any) -> str:
    """Digest of the source files defining ``objects`` (so code changes invalidate caches)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(Path(inspect.getsourcefile(obj)).read_bytes())
    return digest.hexdigest()[:16]
