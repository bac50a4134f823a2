"""Method training (``train_method``, concurrent) and candidate collection (``offer_candidates``,
sequential, since a space may measure latency while searching, e.g. OFA, and must not share the
CPU with a training).

Both are cached across runs: the key holds the data hash, the method's config, the anchors'
weights, the method's source (and, for the offer, the target devices), so unchanged inputs
never retrain or re-search.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

import methods.base
import methods.train
from methods.base import Anchor, Candidate, CandidateSpace
from methods.catalog import method_class
from methods.checkpoint import training_env
from methods.profiling import DeviceProfile
from tasks.common import (TRANSIENT_RETRIES, DatasetRef, RunContext, load_data, source_digest, state_digest,
                          training_env_for)
from tasks.distributed import fit_distributed

log = logging.getLogger("podium.tasks.train")


def training_key(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor], teacher: Anchor | None) -> str:
    parts = {
        "data": ref.data_hash,
        "config": ctx.cfg.methods[method],
        "data_cfg": ctx.cfg.data.model_dump(mode="json", include={"image_size", "batch_size"}),
        "anchors": [state_digest(a.model) for a in anchors],
        "teacher": teacher.name if teacher else None,
        "code": source_digest(importlib.import_module(f"methods.{method}"), methods.train, methods.base),
    }
    return f"{method}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _train_cache_key(_context: TaskRunContext, params: dict[str, Any]) -> str:
    return "train-" + training_key(params["ctx"], params["ref"], params["method"], params["anchors"], params["teacher"])


def _offer_cache_key(_context: TaskRunContext, params: dict[str, Any]) -> str:
    devices = json.dumps([d.model_dump(mode="json") for d in params["devices"]], sort_keys=True)
    return f"offer-{params['training_key']}-" + hashlib.sha256(devices.encode()).hexdigest()[:16]


def _log_space_report(ctx: RunContext, name: str, space: Any) -> None:
    """Methods may expose ``report() -> dict`` and ``write_artifacts(dir) -> list[Path]``."""
    registry = ctx.registry
    if hasattr(space, "report"):
        report = space.report()
        registry.log_dict(ctx.run_id, report, f"methods/{name}/report.json")
        numbers = {k: v for k, v in _flat_numbers(report).items()}
        registry.log_metrics(ctx.run_id, numbers, prefix=f"{name}.")
    if hasattr(space, "write_artifacts"):
        with tempfile.TemporaryDirectory() as tmp:
            for path in space.write_artifacts(Path(tmp)):
                registry.log_artifact(ctx.run_id, path, f"methods/{name}")


def _flat_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


@task(name="train-method", cache_key_fn=_train_cache_key, persist_result=True, **TRANSIENT_RETRIES)
def train_method(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor],
                 teacher: Anchor | None) -> CandidateSpace:
    """Fit ``method`` on the data (and the anchors/teacher where it uses them); returns its space.

    Trainings checkpoint to the run's store: a re-run after a crash resumes them (``training_key``
    names the checkpoints, so only an identical training resumes)."""
    key = training_key(ctx, ref, method, anchors, teacher)
    env, checkpoints = training_env_for(ctx, key)
    if ctx.cfg.runtime.processes > 1:
        space = fit_distributed(ctx, ref, method, anchors, teacher, key)
    else:
        with training_env(env):  # every fit inside checkpoints and resumes
            space = method_class(method)(ctx.cfg.method_config(method)).fit(load_data(ctx, ref), anchors, teacher)
    _log_space_report(ctx, method, space)
    checkpoints.clear()  # from here on the task cache holds the result
    return space


@task(name="offer-candidates", cache_key_fn=_offer_cache_key, persist_result=True)
def offer_candidates(ctx: RunContext, method: str, space: CandidateSpace, devices: list[DeviceProfile],
                     training_key: str) -> dict[str, list[Candidate]]:
    """The candidates ``space`` offers each device (a space may search per device)."""
    per_device = {device.name: list(space.candidates(device)) for device in devices}
    log.info("%s: %d candidates", method, len({c.name for cands in per_device.values() for c in cands}))
    return per_device
