"""Export every candidate once and measure it on every device it is offered to.

Exports live under ``<cache>/exports/<digest>/`` and measurements in ``<cache>/latency.json``
keyed by (model digest, device settings), so an unchanged model is never re-exported or
re-measured (unless its measurement was ``noisy``: that one is not kept).

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
import platform
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from podium.files import TMP_MARK, atomic_path, atomic_write_text, parse_json, sha256_file
from podium.methods.base import Candidate
from podium.methods.export import export_onnx, save_weights
from podium.methods.profiling import (Artifact, DeviceProfile, LatencyStats, measure_against_budget, reference_shape,
                                      shape_text)
from podium.methods.runtimes import get_runtime
from podium.tasks.common import RunContext, candidate_digest, read_cache

log = logging.getLogger("podium.tasks.profile")
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class ExportedModel:
    """A candidate's deployment files, content-addressed by its digest: the FP32 ONNX graph, the
    weights and each runtime's FP32 artifact side by side (``model.xml``, ``model.pt2``, ...; ONNX
    runtimes share ``model.onnx``). A derived FP16/INT8 model's artifact lives in
    ``<precision>-<runtime>-<digest>/`` of its parent's folder and is the only one it has."""

    digest: str
    onnx: Path
    weights: Path
    input_shape: tuple[int, int, int]
    precision: str = "fp32"
    runtime: str | None = None  # derived models: the one runtime they were built for

    @property
    def folder(self) -> Path:
        return self.weights.parent

    def artifact(self, runtime: str, model: nn.Module | None = None) -> Path:
        """The main file ``runtime`` runs from, exported on first use (FP32; a derived model's artifact
        exists from its creation). A runtime's artifact may be several files: they are written to a temp
        folder and moved in with the main file last, so it exists only complete."""
        rt = get_runtime(runtime)
        if self.runtime is not None and runtime != self.runtime:
            raise ValueError(f"{self.precision} model {self.digest[:12]} was built for {self.runtime}, not {runtime}")
        folder = (self.folder if self.precision == "fp32"
                  else derived_folder(self.folder, runtime, self.precision, self.digest))
        target = folder / rt.artifact_name
        if not target.exists():
            if model is None or self.precision != "fp32":
                raise FileNotFoundError(f"{target} is missing")
            write_artifact(folder, rt.artifact_name, lambda tmp: rt.export(model, self.input_shape, tmp))
        return target

    def files(self, runtime: str, model: nn.Module | None = None) -> list[Path]:
        """Every file of ``runtime``'s artifact."""
        return get_runtime(runtime).artifact_files(self.artifact(runtime, model))


def derived_folder(parent_folder: Path, runtime: str, precision: str, digest: str) -> Path:
    return parent_folder / f"{precision}-{runtime}-{digest[:12]}"


def write_artifact(folder: Path, main: str, build) -> Path:
    """Run ``build(tmp)`` in a temp folder beside ``folder`` and move its files in, ``main`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=TMP_MARK) as tmp:
        build(Path(tmp))
        for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == main):
            os.replace(path, folder / path.name)
    return folder / main


@dataclass
class MeasuredCandidate:
    """One candidate as it travels from profiling to selection, release and report: the model, its
    exported files, the devices it was offered to and its measured stats per device (a device that
    could not measure it has no entry). A derived (FP16/INT8) member has ``parent`` set and its own
    measured ``val_acc`` in ``candidate.metrics``."""

    candidate: Candidate
    export: ExportedModel
    offered_to: tuple[str, ...]
    stats: dict[str, LatencyStats] = field(default_factory=dict)
    parent: str | None = None

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def precision(self) -> str:
        return self.export.precision


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


MEASUREMENT_VERSION = 7  # bump when what a measurement means changes (2: peak memory really measured,
#                          3-4: isolated, pinned, interleaved rounds with an interval, steal detected,
#                          5: ONNX Runtime's pool threads do not spin, 6: normalised to the reference network,
#                          7: ONNX Runtime measured on one spinning pool per process, as deployed)


def _measurement_key(digest: str, device: DeviceProfile) -> str:
    settings = device.model_dump(mode="json", exclude={"latency_budget_ms", "memory_budget_mb", "work_pool", "precisions"})
    return f"{digest}|{json.dumps({**settings, 'measurement': MEASUREMENT_VERSION}, sort_keys=True)}"


class LatencyCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = read_cache(path)

    def get(self, key: str) -> LatencyStats | None:
        entry = self.entries.get(key)
        try:
            return LatencyStats(**entry) if isinstance(entry, dict) else None
        except (TypeError, ValueError):  # an entry of another shape: measured again
            return None

    def put(self, key: str, stats: LatencyStats) -> None:
        """Keep a measurement for later runs, a ``noisy`` one too, flagged as it is (reports and model cards
        say so): a run with unchanged candidates measures nothing again. Measuring a noisy one again on
        every run cost a warm demo 17 s of its 47 (2-thread devices on a 2-core host are noisy in most
        runs) and rarely came back clean. A noisy figure never replaces a clean one."""
        existing = self.get(key)
        if stats.noisy and existing is not None and not existing.noisy:
            return
        with _cache_lock:
            self.entries[key] = stats.as_dict()
            atomic_write_text(self.path, json.dumps(self.entries, indent=1))


def host_identity() -> str:
    """This machine as a speed is valid for: its name, CPU model and CPU count."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
    return f"{platform.node()}|{model or platform.processor()}|{os.cpu_count()}"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


class SpeedBook:
    """Each local device's reference speed on this host (``<cache>/device_speed.json``): the reference
    network's p50 in the first clean measurement of that device here. Every later measurement reports
    its p50s at that speed (`methods.profiling.normalise_to_reference`), so a host that runs 20 % slower
    this minute does not make this run's candidates 20 % slower than last run's. Delete the file (or
    an entry) to recalibrate; a ``reference_ms`` in the device's config wins over the book."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = read_cache(path)

    @staticmethod
    def key(device: DeviceProfile, reference_input: str) -> str:
        settings = _measurement_key(f"reference {reference_input}", device.model_copy(update={"reference_ms": None}))
        return f"{host_identity()}|{settings}"

    def with_speed(self, device: DeviceProfile, reference_input: str) -> DeviceProfile:
        """``device`` at its kept speed for the reference at ``reference_input`` (CxHxW), if any."""
        if device.reference_ms is not None:
            return device
        entry = self.entries.get(self.key(device, reference_input))
        speed = entry.get("reference_ms") if isinstance(entry, dict) else None
        if not isinstance(speed, (int, float)) or not speed > 0:
            return device
        return device.model_copy(update={"reference_ms": float(speed)})

    def record(self, device: DeviceProfile, measured: dict[str, LatencyStats]) -> DeviceProfile:
        """Keep the reference speed of ``measured`` when ``device`` has none yet and one result is clean;
        ``device`` at the speed ``measured`` is reported at (its cache key)."""
        clean = [s for s in measured.values() if not s.noisy and s.reference_ms > 0]  # nan: not normalised
        if device.reference_ms is not None or not clean:
            return device
        speed, reference_input = clean[0].reference_ms, clean[0].reference_input
        with _cache_lock:
            self.entries[self.key(device, reference_input)] = {"reference_ms": speed, "device": device.name,
                                                               "load": round(os.getloadavg()[0], 2)}
            atomic_write_text(self.path, json.dumps(self.entries, indent=1))
        log.info("device %s: reference speed %.4f ms kept in %s", device.name, speed, self.path)
        return device.model_copy(update={"reference_ms": speed})


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


def _profile_run_name(parameters: dict) -> str:
    """``profile-<device>+<device>...``: the devices this task run measures, in the Prefect UI."""
    return "profile-" + ("+".join(d.name for d in parameters["devices"]) or "no-devices")


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="profile-candidates", task_run_name=_profile_run_name, tags=["profiling"], cache_policy=NO_CACHE)
def profile_candidates(ctx: RunContext, offers: dict[str, list[Candidate]], devices: list[DeviceProfile],
                       remote_timeout_s: float = 900.0) -> list[MeasuredCandidate]:
    """Export every offered candidate once and measure it on each device it was offered to.

    Local devices are measured here, one after another (measurements on this CPU must not overlap);
    devices with a ``work_pool`` afterwards, all at once, one remote run each (see `profile_remote`),
    waiting at most ``remote_timeout_s`` (config ``devices.remote_timeout_s``). An unreachable or
    failing remote device measures nothing (its candidates have no stats for it).
    """
    pool = [MeasuredCandidate(cand, export_candidate(ctx, cand), names) for cand, names in gather_offers(devices, offers)]
    measure_pool(ctx, pool, devices, remote_timeout_s)
    return pool


def measure_pool(ctx: RunContext, pool: list[MeasuredCandidate], devices: list[DeviceProfile],
                 remote_timeout_s: float) -> None:
    """Fill each member's stats on every device it was offered to: local devices here, one after
    another, each in its own pinned process (:func:`measure_device`); work-pool devices afterwards,
    all at once. Cached measurements are reused."""
    cache = LatencyCache(ctx.cache_path / "latency.json")
    speeds = SpeedBook(ctx.cache_path / "device_speed.json")
    for device in devices:
        if device.work_pool:
            continue
        offered = [m for m in pool if device.name in m.offered_to]
        if not offered:
            continue
        reference_input = reference_shape([m.export.input_shape for m in offered])  # the same for every run
        device = speeds.with_speed(device, shape_text(reference_input))
        missing = []
        for member in offered:
            cached = cache.get(_measurement_key(member.export.digest, device))
            if cached is None:
                missing.append(member)
            else:
                member.stats[device.name] = cached
        measured = measure_device({m.name: m for m in missing}, device, reference_input) if missing else {}
        device = speeds.record(device, measured)  # the first clean measurement here sets the speed
        for name, stats in measured.items():
            member = next(m for m in missing if m.name == name)
            cache.put(_measurement_key(member.export.digest, device), stats)
            member.stats[device.name] = stats
        log.info("profiled %d candidates on %s (%d measured, %d cached)", len(offered), device.name,
                 len(missing), len(offered) - len(missing))
    profile_remote_devices(ctx, [d for d in devices if d.work_pool], pool, cache, remote_timeout_s)


def measure_device(members: dict[str, MeasuredCandidate], device: DeviceProfile,
                   reference_input: tuple[int, int, int] | None = None) -> dict[str, LatencyStats]:
    """Each member's own artifact for ``device``'s runtime, measured together in one isolated process
    (:func:`~podium.methods.profiling.measure_against_budget`)."""
    artifacts = [Artifact(name, m.export.artifact(device.runtime, m.candidate.model), m.export.input_shape,
                          m.precision) for name, m in members.items()]
    return measure_against_budget(artifacts, device, reference_input=reference_input)


def profile_remote_devices(ctx: RunContext, devices: list[DeviceProfile], pool: list[MeasuredCandidate],
                           cache: LatencyCache, timeout_s: float) -> None:
    """Every work-pool device at once: each measures on its own hardware, so the waits overlap
    (a silent device costs ``timeout_s`` once, not once per device). Threads run in a copy of this
    context: Prefect's settings (the API URL) and the parent task run live in context variables."""
    if not devices:
        return
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="profile-remote") as pool_runner:
        futures = {device.name: pool_runner.submit(contextvars.copy_context().run, profile_remote, ctx, device,
                                                   {m.name: m for m in pool if device.name in m.offered_to},
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


def upload_exports(store, members: dict[str, MeasuredCandidate], runtime: str) -> list[dict]:
    """Put each member's ``runtime`` artifact under ``profiling/<digest>/`` (content-addressed: skipped
    when present). Returns the JSON model list the ``profile`` flow expects: per model its files with
    their sha256, the main file and the precision."""
    models = []
    for name, member in members.items():
        exported = member.export
        prefix = f"profiling/{exported.digest[:24]}/{runtime}"
        paths = exported.files(runtime, member.candidate.model)
        files = []
        for path in paths:
            key = f"{prefix}/{path.name}"
            if not store.exists(key):
                store.put_file(key, path)
            files.append({"key": key, "name": path.name, "sha256": sha256_file(path)})
        models.append({"name": name, "runtime": runtime, "main": paths[0].name, "files": files,
                       "precision": exported.precision, "input_shape": list(exported.input_shape)})
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


def profile_remote(ctx: RunContext, device: DeviceProfile, members: dict[str, MeasuredCandidate],
                   cache: LatencyCache, timeout_s: float) -> dict[str, LatencyStats] | None:
    """Measure ``members`` on ``device`` through its work pool (each as its runtime's own artifact);
    None (and a warning) when it cannot.

    Cached measurements are reused; only the rest travel. Stats from the device are cached like
    local ones (same key: model digest + device settings).
    """
    from prefect.deployments import run_deployment

    from podium.errors import StoreError

    result: dict[str, LatencyStats] = {}
    missing: dict[str, MeasuredCandidate] = {}
    for name, member in members.items():
        cached = cache.get(_measurement_key(member.export.digest, device))
        if cached is None:
            missing[name] = member
        else:
            result[name] = cached
    if not missing:
        return result

    deployment = profiler_deployment(device.work_pool)
    uri, endpoint = ctx.store_uri, ctx.cfg.store.endpoint_url
    result_key = f"profiling/results/{device.name}-{uuid.uuid4().hex}.json"
    try:
        store = ctx.open_store()
        parameters = {"device": device.model_dump(mode="json"), "models": upload_exports(store, missing, device.runtime),
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
        answer = parse_json(store.get_bytes(result_key))
        store.delete(result_key)
        for name, member in missing.items():
            stats = LatencyStats(**answer[name])
            cache.put(_measurement_key(member.export.digest, device), stats)
            result[name] = stats
    except (StoreError, KeyError, TypeError, ValueError) as exc:
        log.warning("device %s (work pool %s) unprofiled: bad answer from run %s: %s",
                    device.name, device.work_pool, flow_run.id, exc)
        return None
    return result
