"""Export every candidate once and measure it on every device it is offered to.

Exports live under ``<cache>/exports/<digest>/`` and measurements in ``<cache>/latency.json``
keyed by (model digest, device settings), so an unchanged model is never re-exported or
re-measured.

Devices with a ``work_pool`` are measured remotely: the exports go to the run's artifact store
under ``profiling/<digest>/``, the ``profile`` deployment of that pool (`flows.device_profile`) runs on a
worker on the device, and its answer comes back through the store. A device that does not answer
within the timeout, or whose run fails, stays unprofiled (no stats, so no winner) while the other
devices finish.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from podium.files import TMP_MARK, atomic_path, atomic_write_text, sha256_file
from podium.methods.base import Candidate
from podium.methods.export import export_onnx, save_weights
from podium.methods.profiling import DeviceProfile, LatencyStats, measure
from podium.methods.runtimes import get_runtime
from podium.tasks.common import RunContext, candidate_digest

log = logging.getLogger("podium.tasks.profile")
_cache_lock = threading.Lock()

EXPORT_FILES = ("model.onnx", "weights.safetensors")


@dataclass(frozen=True)
class ExportedModel:
    """A candidate's deployment files, content-addressed by its digest."""

    digest: str
    onnx: Path
    weights: Path
    input_shape: tuple[int, int, int]

    def artifact(self, runtime: str, model: nn.Module) -> Path | None:
        """The file ``runtime`` runs from (None: it runs the module itself), exported on first use
        into the same content-addressed folder. A runtime's artifact may be several files: they are
        written to a temp folder and moved in with the named file last, so it exists only complete."""
        rt = get_runtime(runtime)
        if rt.artifact_name is None:
            return None
        folder = self.onnx.parent
        target = folder / rt.artifact_name
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=folder, prefix=TMP_MARK) as tmp:
                rt.export(model, self.input_shape, Path(tmp))
                for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == rt.artifact_name):
                    os.replace(path, folder / path.name)
        return target


@dataclass
class MeasuredCandidate:
    """One candidate as it travels from profiling to selection, release and report: the model, its
    exported files, the devices it was offered to and its measured stats per device (a device that
    could not measure it has no entry)."""

    candidate: Candidate
    export: ExportedModel
    offered_to: tuple[str, ...]
    stats: dict[str, LatencyStats] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.candidate.name


def export_candidate(ctx: RunContext, candidate: Candidate) -> ExportedModel:
    digest = candidate_digest(candidate)
    folder = ctx.cache_path / "exports" / digest[:24]
    onnx_path, weights_path = folder / "model.onnx", folder / "weights.safetensors"
    if not (onnx_path.exists() and weights_path.exists()):  # complete files only: a crash leaves no half export
        with atomic_path(weights_path) as tmp:
            save_weights(candidate.model, tmp)
        with atomic_path(onnx_path) as tmp:
            export_onnx(candidate.model, candidate.input_shape, tmp)
    return ExportedModel(digest, onnx_path, weights_path, candidate.input_shape)


def _measurement_key(digest: str, device: DeviceProfile) -> str:
    settings = device.model_dump(mode="json", exclude={"latency_budget_ms", "memory_budget_mb", "work_pool"})
    return f"{digest}|{json.dumps(settings, sort_keys=True)}"


class LatencyCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> LatencyStats | None:
        entry = self.entries.get(key)
        return LatencyStats(**entry) if entry else None

    def put(self, key: str, stats: LatencyStats) -> None:
        with _cache_lock:
            self.entries[key] = stats.as_dict()
            atomic_write_text(self.path, json.dumps(self.entries, indent=1))


def gather_offers(devices: list[DeviceProfile], offers: dict[str, list[Candidate]]
                  ) -> list[tuple[Candidate, tuple[str, ...]]]:
    """Each distinct candidate (by name; the first offer wins) with the devices it was offered to."""
    by_name: dict[str, tuple[Candidate, list[str]]] = {}
    for device in devices:
        for cand in offers.get(device.name, []):
            names = by_name.setdefault(cand.name, (cand, []))[1]
            if device.name not in names:
                names.append(device.name)
    return [(cand, tuple(names)) for cand, names in by_name.values()]


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="profile-candidates", cache_policy=NO_CACHE)
def profile_candidates(ctx: RunContext, offers: dict[str, list[Candidate]], devices: list[DeviceProfile],
                       remote_timeout_s: float = 900.0) -> list[MeasuredCandidate]:
    """Export every offered candidate once and measure it on each device it was offered to.

    Local devices are measured here, one after another (measurements on this CPU must not overlap);
    devices with a ``work_pool`` afterwards, all at once, one remote run each (see `profile_remote`),
    waiting at most ``remote_timeout_s`` (config ``devices.remote_timeout_s``). An unreachable or
    failing remote device measures nothing (its candidates have no stats for it).
    """
    cache = LatencyCache(ctx.cache_path / "latency.json")
    pool = [MeasuredCandidate(cand, export_candidate(ctx, cand), names) for cand, names in gather_offers(devices, offers)]
    for device in devices:
        if device.work_pool:
            continue
        offered = [m for m in pool if device.name in m.offered_to]
        for member in offered:
            key = _measurement_key(member.export.digest, device)
            measured = cache.get(key)
            if measured is None:
                measured = measure(member.candidate.model, member.export.input_shape, device,
                                   artifact=member.export.artifact(device.runtime, member.candidate.model))
                cache.put(key, measured)
            member.stats[device.name] = measured
        log.info("profiled %d candidates on %s", len(offered), device.name)
    profile_remote_devices(ctx, [d for d in devices if d.work_pool], pool, cache, remote_timeout_s)
    return pool


def profile_remote_devices(ctx: RunContext, devices: list[DeviceProfile], pool: list[MeasuredCandidate],
                           cache: LatencyCache, timeout_s: float) -> None:
    """Every work-pool device at once: each measures on its own hardware, so the waits overlap
    (a silent device costs ``timeout_s`` once, not once per device). Threads run in a copy of this
    context: Prefect's settings (the API URL) and the parent task run live in context variables."""
    if not devices:
        return
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="profile-remote") as pool_runner:
        futures = {device.name: pool_runner.submit(contextvars.copy_context().run, profile_remote, ctx, device,
                                                   {m.name: m.export for m in pool if device.name in m.offered_to},
                                                   cache, timeout_s)
                   for device in devices}
    by_name = {m.name: m for m in pool}
    for device in devices:
        measured = futures[device.name].result()
        if measured is not None:
            for name, stats in measured.items():
                by_name[name].stats[device.name] = stats
            log.info("profiled %d candidates on %s (work pool %s)", len(measured), device.name, device.work_pool)


# ------------------------------------------------------------------------------ remote devices

REMOTE_POLL_S = 2.0


def profiler_deployment(work_pool: str) -> str:
    """The full name (``flow/deployment``) of the profile deployment serving ``work_pool``."""
    return f"profile/{work_pool}"


def upload_exports(store, exports: dict[str, ExportedModel]) -> list[dict]:
    """Put each export under ``profiling/<digest>/`` (content-addressed: skipped when present).

    Returns the JSON model list the ``profile`` flow expects.
    """
    models = []
    for name, exported in exports.items():
        prefix = f"profiling/{exported.digest[:24]}"
        onnx_key, weights_key = f"{prefix}/model.onnx", f"{prefix}/weights.safetensors"
        for key, path in ((onnx_key, exported.onnx), (weights_key, exported.weights)):
            if not store.exists(key):
                store.put_file(key, path)
        models.append({"name": name, "onnx": onnx_key, "weights": weights_key,
                       "onnx_sha256": sha256_file(exported.onnx), "input_shape": list(exported.input_shape)})
    return models


def _cancel(flow_run_id) -> None:
    """Cancel a run that outlived its timeout so a late worker does not spend the device on it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelled(message="podium: profiling timeout"), force=True)
    except Exception as exc:  # noqa: BLE001 - best effort; the device is already reported unprofiled
        log.warning("could not cancel profile run %s: %s", flow_run_id, exc)


def profile_remote(ctx: RunContext, device: DeviceProfile, exports: dict[str, ExportedModel],
                   cache: LatencyCache, timeout_s: float) -> dict[str, LatencyStats] | None:
    """Measure ``exports`` on ``device`` through its work pool; None (and a warning) when it cannot.

    Cached measurements are reused; only the rest travel. Stats from the device are cached like
    local ones (same key: model digest + device settings).
    """
    from prefect.deployments import run_deployment

    from podium.errors import StoreError

    result: dict[str, LatencyStats] = {}
    missing: dict[str, ExportedModel] = {}
    for name, exported in exports.items():
        cached = cache.get(_measurement_key(exported.digest, device))
        if cached is None:
            missing[name] = exported
        else:
            result[name] = cached
    if not missing:
        return result

    deployment = profiler_deployment(device.work_pool)
    uri, endpoint = ctx.store_uri, ctx.cfg.store.endpoint_url
    result_key = f"profiling/results/{device.name}-{uuid.uuid4().hex}.json"
    try:
        store = ctx.open_store()
        parameters = {"device": device.model_dump(mode="json"), "models": upload_exports(store, missing),
                      "store_uri": uri, "store_endpoint_url": endpoint, "result_key": result_key}
        flow_run = run_deployment(name=deployment, parameters=parameters, timeout=timeout_s,
                                  poll_interval=min(REMOTE_POLL_S, timeout_s),
                                  tags=["podium-profile", f"device:{device.name}"])
    except Exception as exc:  # noqa: BLE001 - any failure to start leaves just this device unprofiled
        log.warning("device %s (work pool %s) unprofiled: could not run %s: %s",
                    device.name, device.work_pool, deployment, exc)
        return None

    state = flow_run.state
    if state is None or not state.is_final():
        log.warning("device %s (work pool %s) unprofiled: no answer from %s within %.0f s (run %s, state %s)",
                    device.name, device.work_pool, deployment, timeout_s, flow_run.id,
                    state.name if state else "none")
        _cancel(flow_run.id)
        return None
    if not state.is_completed():
        log.warning("device %s (work pool %s) unprofiled: run %s ended %s: %s",
                    device.name, device.work_pool, flow_run.id, state.name, state.message or "")
        return None
    try:
        answer = json.loads(store.get_bytes(result_key))
        store.delete(result_key)
        for name, exported in missing.items():
            stats = LatencyStats(**answer[name])
            cache.put(_measurement_key(exported.digest, device), stats)
            result[name] = stats
    except (StoreError, KeyError, TypeError, ValueError) as exc:
        log.warning("device %s (work pool %s) unprofiled: bad answer from run %s: %s",
                    device.name, device.work_pool, flow_run.id, exc)
        return None
    return result
