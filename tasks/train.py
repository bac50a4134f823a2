"""Method training: fit one method on the data and anchors, collect its candidates per device.

Cached across runs: the key holds the data hash, the method's config, the anchors' weights, the
target devices and the method's source, so unchanged inputs never retrain.
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
from methods.base import Anchor, Candidate
from methods.catalog import method_class
from methods.profiling import DeviceProfile
from tasks.common import DatasetRef, RunContext, load_data, source_digest, state_digest

log = logging.getLogger("podium.tasks.train")


def method_cache_key(_context: TaskRunContext, params: dict[str, Any]) -> str:
    ctx: RunContext = params["ctx"]
    name: str = params["method"]
    parts = {
        "data": params["ref"].data_hash,
        "config": ctx.cfg.methods[name],
        "data_cfg": ctx.cfg.data.model_dump(mode="json", include={"image_size", "batch_size"}),
        "anchors": [state_digest(a.model) for a in params["anchors"]],
        "teacher": params["teacher"].name if params["teacher"] else None,
        "devices": [d.model_dump(mode="json") for d in params["devices"]],
        "code": source_digest(importlib.import_module(f"methods.{name}"), methods.train, methods.base),
    }
    return f"{name}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


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


@task(name="train-method", cache_key_fn=method_cache_key, persist_result=True)
def train_method(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor], teacher: Anchor | None,
                 devices: list[DeviceProfile]) -> dict[str, list[Candidate]]:
    """Fit ``method``; returns the candidates it offers each device (its space may search per device)."""
    data = load_data(ctx, ref)
    space = method_class(method)(ctx.cfg.method_config(method)).fit(data, anchors, teacher)
    per_device = {device.name: list(space.candidates(device)) for device in devices}
    _log_space_report(ctx, method, space)
    count = len({c.name for cands in per_device.values() for c in cands})
    log.info("%s: %d candidates", method, count)
    return per_device
