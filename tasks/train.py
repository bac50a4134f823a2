"""Method training (``train_method``, concurrent) and candidate collection (``offer_candidates``,
sequential, since a space may measure latency while searching, e.g. OFA, and must not share the
CPU with a training).

Both are cached across runs on the method's *training key* (:func:`training_keys`): the data hash,
the method's config, the anchors' weights, the teacher, and the source of the method and of the
shared training code, so unchanged inputs never retrain or re-search. The flow computes the keys
once per run and hands each task its own.

The cache is Podium's own and holds data, never pickles (:mod:`podium.methods.space_store`): a
trained space under ``<cache_dir>/spaces/<training key>/``, its offers under ``<cache_dir>/offers/<offer
key>/``, each safetensors plus a JSON record verified before use. Prefect persists nothing of these
tasks (``persist_result=False``): a file planted in its result storage is never read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prefect import tags, task
from prefect.cache_policies import NO_CACHE

from podium.errors import first_line
from podium.files import atomic_write_text, load_json
from podium.methods import base as methods_base
from podium.methods import train as methods_train
from podium.methods.base import Anchor, Candidate, CandidateSpace
from podium.methods.catalog import get_method
from podium.methods.checkpoint import training_env
from podium.methods.families import FAMILIES
from podium.methods.profiling import DeviceProfile
from podium.methods.space_store import RECORD, UnusableRecord, load_offers, load_space, save_offers
from podium.methods.train import fit_method
from podium.tasks.artifacts import TrainingProgress
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


def offer_key(key: str, devices: list[DeviceProfile]) -> str:
    """What a space offers depends on its training and on every device it searched for."""
    described = json.dumps([d.model_dump(mode="json") for d in devices], sort_keys=True)
    return f"{key}-" + hashlib.sha256(described.encode()).hexdigest()[:16]


class TrainingTimes:
    """How long each method's last training took in this cache (``<cache_dir>/training_times.json``), so
    that the next run submits trainings longest first: with fewer workers than methods, the long ones start
    together and the short ones fill in behind them (a short one taking a worker first holds a long one
    back by its whole length). A method never timed here goes first, in config order: nothing says it is short."""

    _lock = threading.Lock()  # trainings finish in pool threads

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "training_times.json"

    def _entries(self) -> dict[str, dict]:
        try:
            times = load_json(self.path)
        except (OSError, ValueError):  # none yet, or unreadable: no history, config order
            return {}
        if not isinstance(times, dict):
            return {}
        return {m: t for m, t in times.items() if isinstance(t, dict) and isinstance(t.get("wall_s"), (int, float))}

    def load(self) -> dict[str, float]:
        """Each timed method's last training, in seconds."""
        return {m: float(t["wall_s"]) for m, t in self._entries().items()}

    def record(self, method: str, wall_s: float, key: str) -> None:
        with self._lock:
            times = self._entries()
            times[method] = {"wall_s": round(wall_s, 3), "training_key": key}
            try:
                atomic_write_text(self.path, json.dumps(times, indent=1, sort_keys=True))
            except OSError as exc:
                log.warning("training times not kept in %s: %s", self.path, exc)

    def longest_first(self, methods: list[str], known: dict[str, float] | None = None) -> list[str]:
        """``methods`` ordered by their last times (``known``: those already read with :meth:`load`)."""
        known = self.load() if known is None else known
        return sorted(methods, key=lambda m: (m in known, -known.get(m, 0.0)))  # stable: config order among ties


T = TypeVar("T")


def _reuse(what: str, folder: Path, load: Callable[[], T]) -> T | None:
    """``load()`` of a saved result when ``folder`` holds one; None (recompute) when it holds none or
    one that fails verification (one warning line)."""
    if not (folder / RECORD).exists():
        return None
    try:
        return load()
    except UnusableRecord as exc:
        log.warning("%s: cached result in %s not used, computing it again: %s", what, folder, exc)
        return None


def _keep(what: str, folder: Path, save: Callable[[], Path]) -> bool:
    """Save a result to the cache; a failure costs the reuse, not the run (one warning line)."""
    try:
        save()
    except (OSError, ValueError, NotImplementedError) as exc:
        log.warning("%s: result not cached in %s: %s", what, folder, exc)
        return False
    log.info("%s: cached in %s", what, folder)
    return True


def _flat_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


# cache_policy=NO_CACHE, persist_result=False: reuse is Podium's own (safetensors + JSON), never a pickle
@task(name="train-method", task_run_name="train-{method}", tags=["training"], cache_policy=NO_CACHE,
      persist_result=False, **TRANSIENT_RETRIES)
def train_method(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor],
                 teacher: Anchor | None, key: str) -> tuple[CandidateSpace, bool]:
    """Fit ``method`` on the data (and the anchors/teacher where it uses them); returns its space and
    whether it was reused from the cache (``<cache_dir>/spaces/<key>/``) instead.

    Trainings checkpoint to the run's store under ``key``: a re-run after a crash resumes them, and
    only an identical training (same key) does. In a Prefect run a progress artifact
    (``<model>-train-<method>``) follows the training loop's progress lines."""
    folder = ctx.cache_path / "spaces" / key
    cached = _reuse(method, folder, lambda: load_space(folder, load_data(ctx, ref), key))
    if cached is not None:
        log.info("%s: reused the trained space in %s", method, folder)
        TrainingProgress(ctx.cfg.model_name, method).finish("reused the trained space from the cache")
        return cached, True
    env, checkpoints = training_env_for(ctx, key)
    progress = TrainingProgress(ctx.cfg.model_name, method)
    progress.start()
    try:
        if ctx.cfg.runtime.processes > 1:  # torchrun processes: the bar moves when they are done
            space = fit_distributed(ctx, ref, method, anchors, teacher, key)
        else:
            curves = env.on_progress

            def both(name: str, step: int, steps: int, metrics: dict[str, float]) -> None:
                progress(name, step, steps, metrics)
                curves(name, step, steps, metrics)

            with training_env(dataclasses.replace(env, on_progress=both)):  # every fit inside checkpoints, resumes
                space = fit_method(get_method(method).method(ctx.cfg.method_config(method)), load_data(ctx, ref),
                                   anchors, teacher)
    except BaseException:
        progress.close()  # its sender thread ends after what is queued
        raise
    progress.finish(f"trained in {space.training_cost.wall_s:.0f} s" if space.training_cost else "trained")
    if space.training_cost is not None:
        TrainingTimes(ctx.cache_path).record(method, space.training_cost.wall_s, key)
        ctx.registry.log_metrics(ctx.run_id, space.training_cost.as_metrics(), prefix=f"{method}.")
        log.info("%s: trained on %d images in %.1f s (%.1f device-s)", method, space.training_cost.images,
                 space.training_cost.wall_s, space.training_cost.device_s)
    report = space.report()
    if report:
        ctx.registry.log_dict(ctx.run_id, report, f"methods/{method}/report.json")
        ctx.registry.log_metrics(ctx.run_id, _flat_numbers(report), prefix=f"{method}.")
    for stale in (ctx.cache_path / "offers").glob(f"{key}-*"):  # offered by an earlier training under this key
        shutil.rmtree(stale, ignore_errors=True)
    if _keep(method, folder, lambda: space.save(folder, key)):
        checkpoints.clear()  # from here on the cache holds the result
    return space, False


@task(name="offer-candidates", task_run_name="offer-{method}", tags=["search"], cache_policy=NO_CACHE,
      persist_result=False)
def offer_candidates(ctx: RunContext, method: str, space: CandidateSpace, devices: list[DeviceProfile],
                     key: str) -> dict[str, list[Candidate]]:
    """The candidates ``space`` offers each device (a space may search per device), reused from
    ``<cache_dir>/offers/<offer key>/`` when that training already offered to these devices."""
    folder = ctx.cache_path / "offers" / offer_key(key, devices)
    cached = _reuse(f"{method} offers", folder, lambda: load_offers(folder, space, folder.name))
    if cached is not None:
        return cached
    if space.searches_per_device:  # one search per device, measuring there (one device at a time)
        per_device = {device.name: list(space.candidates(device)) for device in devices}
    else:  # the same candidates for every device: built and evaluated once
        cands = list(space.candidates())
        per_device = {device.name: list(cands) for device in devices}
    if space.training_cost is not None:  # what it cost to get them, next to each candidate's figures
        for cand in (c for cands in per_device.values() for c in cands):
            cand.metrics.update(space.training_cost.as_metrics())
    log.info("%s: %d candidates", method, len({c.name for cands in per_device.values() for c in cands}))
    _keep(f"{method} offers", folder, lambda: save_offers(per_device, folder, folder.name))
    return per_device


def train_methods(ctx: RunContext, ref: DatasetRef, anchors: list[Anchor], teacher: Anchor | None
                  ) -> tuple[dict[str, CandidateSpace], dict[str, str], list[str], list[str]]:
    """Every configured method trained concurrently (``.submit``), longest first (:class:`TrainingTimes`);
    a failed one drops out.

    Returns (spaces in config order, training keys, methods reused from the cache, one line per failure)."""
    keys = training_keys(ctx, ref, anchors, teacher)
    times = TrainingTimes(ctx.cache_path)
    last = times.load()
    order = times.longest_first(list(ctx.cfg.methods), last)
    log.info("trainings submitted longest first (last times in %s): %s", times.path,
             ", ".join(f"{m} ({last[m]:.0f} s)" if m in last else f"{m} (never timed)" for m in order))
    futures = {}
    for m in order:
        with tags(f"method:{m}"):
            futures[m] = train_method.submit(ctx, ref, m, anchors, teacher, keys[m])
    spaces, cached, failed = {}, [], []
    for m in ctx.cfg.methods:  # every training done before any search
        future = futures[m]
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            failed.append(f"method {m}: {first_line(result)}")
            continue
        spaces[m], reused = result
        if reused:
            cached.append(m)
    return spaces, keys, cached, failed


def collect_offers(ctx: RunContext, spaces: dict[str, CandidateSpace], keys: dict[str, str],
                   anchor_candidates: list[Candidate], devices: list[DeviceProfile]) -> dict[str, list[Candidate]]:
    """Each device is offered the anchors plus what every method offers it, one method at a time
    (a space may measure latency while searching). Names are unique: the first offer wins."""
    offers: dict[str, list[Candidate]] = {d.name: list(anchor_candidates) for d in devices}
    for method, space in spaces.items():
        with tags(f"method:{method}"):
            offered = offer_candidates(ctx, method, space, devices, keys[method])
        for device in devices:
            offers[device.name] += offered.get(device.name, [])
    return offers
