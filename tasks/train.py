"""Method training (``train_method``, concurrent) and candidate collection (``offer_candidates``,
sequential, since a space may measure latency while searching, e.g. OFA, and must not share the
CPU with a training).

Both are cached across runs on the method's *training key* (:func:`training_keys`): the data hash,
the method's config, the anchors' weights, the teacher, and the source of the method and of the
shared training code, so unchanged inputs never retrain or re-search. The flow computes the keys
once per run and hands each task its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from podium.errors import first_line
from podium.methods import base as methods_base
from podium.methods import train as methods_train
from podium.methods.base import Anchor, Candidate, CandidateSpace
from podium.methods.catalog import get_method
from podium.methods.checkpoint import training_env
from podium.methods.families import FAMILIES
from podium.methods.profiling import DeviceProfile
from podium.methods.train import fit_method
from podium.tasks.common import (
    TRANSIENT_RETRIES,
    DatasetRef,
    RunContext,
    load_data,
    source_digest,
    state_digest,
    training_env_for,
)
from podium.tasks.distributed import fit_distributed

log = logging.getLogger("podium.tasks.train")


def training_keys(ctx: RunContext, ref: DatasetRef, anchors: list[Anchor], teacher: Anchor | None) -> dict[str, str]:
    """Each configured method's training key. Anchor weights are hashed once for all methods."""
    anchor_digests = [state_digest(a.model) for a in anchors]
    # the loop and types every method uses, and every family builder and hook (scaling's rule lives there)
    shared_code = source_digest(methods_train, methods_base,
                                *sorted({sys.modules[f.build.__module__] for f in FAMILIES.values()}, key=str))
    data_cfg = ctx.cfg.data.model_dump(mode="json", include={"image_size", "batch_size"})
    keys = {}
    for method in ctx.cfg.methods:
        parts = {"data": ref.data_hash, "config": ctx.cfg.methods[method], "data_cfg": data_cfg,
                 "anchors": anchor_digests, "teacher": state_digest(teacher.model) if teacher else None,
                 "code": get_method(method).source_digest() + shared_code}
        keys[method] = f"{method}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return keys


def _train_cache_key(_context: TaskRunContext, params: dict[str, Any]) -> str:
    return f"train-{params['key']}"


def _offer_cache_key(_context: TaskRunContext, params: dict[str, Any]) -> str:
    devices = json.dumps([d.model_dump(mode="json") for d in params["devices"]], sort_keys=True)
    return f"offer-{params['key']}-" + hashlib.sha256(devices.encode()).hexdigest()[:16]


def _flat_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


@task(name="train-method", task_run_name="train-{method}", cache_key_fn=_train_cache_key, persist_result=True,
      **TRANSIENT_RETRIES)
def train_method(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor],
                 teacher: Anchor | None, key: str) -> CandidateSpace:
    """Fit ``method`` on the data (and the anchors/teacher where it uses them); returns its space.

    Trainings checkpoint to the run's store under ``key``: a re-run after a crash resumes them, and
    only an identical training (same key) does."""
    env, checkpoints = training_env_for(ctx, key)
    if ctx.cfg.runtime.processes > 1:
        space = fit_distributed(ctx, ref, method, anchors, teacher, key)
    else:
        with training_env(env):  # every fit inside checkpoints and resumes
            space = fit_method(get_method(method).method(ctx.cfg.method_config(method)), load_data(ctx, ref), anchors,
                               teacher)
    if space.training_cost is not None:
        ctx.registry.log_metrics(ctx.run_id, space.training_cost.as_metrics(), prefix=f"{method}.")
        log.info("%s: trained on %d images in %.1f s (%.1f device-s)", method, space.training_cost.images,
                 space.training_cost.wall_s, space.training_cost.device_s)
    report = space.report()
    if report:
        ctx.registry.log_dict(ctx.run_id, report, f"methods/{method}/report.json")
        ctx.registry.log_metrics(ctx.run_id, _flat_numbers(report), prefix=f"{method}.")
    checkpoints.clear()  # from here on the task cache holds the result
    return space


@task(name="offer-candidates", task_run_name="offer-{method}", cache_key_fn=_offer_cache_key, persist_result=True)
def offer_candidates(ctx: RunContext, method: str, space: CandidateSpace, devices: list[DeviceProfile],
                     key: str) -> dict[str, list[Candidate]]:
    """The candidates ``space`` offers each device (a space may search per device)."""
    per_device = {device.name: list(space.candidates(device)) for device in devices}
    if space.training_cost is not None:  # what it cost to get them, next to each candidate's figures
        for cand in (c for cands in per_device.values() for c in cands):
            cand.metrics.update(space.training_cost.as_metrics())
    log.info("%s: %d candidates", method, len({c.name for cands in per_device.values() for c in cands}))
    return per_device


def train_methods(ctx: RunContext, ref: DatasetRef, anchors: list[Anchor], teacher: Anchor | None
                  ) -> tuple[dict[str, CandidateSpace], dict[str, str], list[str], list[str]]:
    """Every configured method trained concurrently (``.submit``); a failed one drops out.

    Returns (spaces, training keys, methods reused from the task cache, one line per failure)."""
    keys = training_keys(ctx, ref, anchors, teacher)
    results = Path(ctx.cache_path) / "results"
    futures = {m: train_method.with_options(result_storage=results).submit(ctx, ref, m, anchors, teacher, keys[m])
               for m in ctx.cfg.methods}
    spaces, failed = {}, []
    for m, future in futures.items():  # every training done before any search
        space = future.result(raise_on_failure=False)
        if isinstance(space, BaseException):
            failed.append(f"method {m}: {first_line(space)}")
        else:
            spaces[m] = space
    cached = [m for m, f in futures.items() if f.state.name == "Cached"]
    return spaces, keys, cached, failed


def collect_offers(ctx: RunContext, spaces: dict[str, CandidateSpace], keys: dict[str, str],
                   anchor_candidates: list[Candidate], devices: list[DeviceProfile]) -> dict[str, list[Candidate]]:
    """Each device is offered the anchors plus what every method offers it, one method at a time
    (a space may measure latency while searching). Names are unique: the first offer wins."""
    results = Path(ctx.cache_path) / "results"
    offers: dict[str, list[Candidate]] = {d.name: list(anchor_candidates) for d in devices}
    for method, space in spaces.items():
        offered = offer_candidates.with_options(result_storage=results)(ctx, method, space, devices, keys[method])
        for device in devices:
            offers[device.name] += offered.get(device.name, [])
    return offers
