"""Derived candidates: each method's best few FP32 candidates per device, rebuilt in the other
precisions the device accepts (FP16, INT8) by its runtime, and measured like any candidate.

For every device that lists more than ``fp32``:

1. **Parents.** Per method, the ``devices.quantize.per_method`` most accurate FP32 candidates measured
   on the device whose p50 is at most ``max_speedup`` × the latency budget (no quantisation makes a
   model faster than that, so slower ones cannot win; the cost of this stage stays bounded).
2. **Build.** The device's runtime exports the parent in the precision (INT8: static quantisation
   calibrated on ``calibration_images`` training images, each runtime's own way). The artifact is
   content-addressed by parent digest, runtime, precision and calibration, so reruns reuse it.
3. **Accuracy.** Measured by running the artifact in its runtime on the validation split, never
   copied from the parent (cached by the derived digest).
4. **Latency and memory** on every device with that runtime and precision, through
   :func:`podium.tasks.profile.measure_pool` (local or remote, cached like any measurement).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE

from podium.errors import first_line
from podium.files import atomic_write_text
from podium.methods.precision import artifact_accuracy, calibration_batches
from podium.methods.profiling import DeviceProfile
from podium.methods.runtimes import get_runtime
from podium.tasks.common import DatasetRef, RunContext, load_data, read_cache
from podium.tasks.profile import ExportedModel, MeasuredCandidate, derived_folder, measure_pool, write_artifact

log = logging.getLogger("podium.tasks.quantize")
_lock = threading.Lock()


def quantisation_parents(pool: list[MeasuredCandidate], device: DeviceProfile, per_method: int,
                         max_speedup: float) -> list[MeasuredCandidate]:
    """Per method, the ``per_method`` most accurate FP32 members measured on ``device`` that could fit
    its budget once ``max_speedup`` × faster (ties: faster first, then name)."""
    reachable = [m for m in pool if m.precision == "fp32" and device.name in m.stats
                 and m.stats[device.name].p50_ms <= device.latency_budget_ms * max_speedup]
    parents = []
    for method in sorted({m.candidate.method for m in reachable}):
        ranked = sorted((m for m in reachable if m.candidate.method == method),
                        key=lambda m: (-m.candidate.metrics["val_acc"], m.stats[device.name].p50_ms, m.name))
        parents.extend(ranked[:per_method])
    return parents


def derived_name(parent: str, precision: str, runtime: str) -> str:
    return f"{parent}@{precision}-{runtime}"


def _derived_digest(parent: ExportedModel, runtime: str, precision: str, calibration: dict, data_hash: str) -> str:
    spec = {"parent": parent.digest, "runtime": runtime, "precision": precision, "calibration": calibration,
            "data": data_hash}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class AccuracyCache:
    """Measured accuracy of derived artifacts, by derived digest (``<cache>/derived_accuracy.json``)."""

    def __init__(self, ctx: RunContext) -> None:
        self.path = ctx.cache_path / "derived_accuracy.json"
        self.entries: dict[str, float] = read_cache(self.path)

    def get(self, digest: str) -> float | None:
        value = self.entries.get(digest)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def put(self, digest: str, accuracy: float) -> None:
        with _lock:
            self.entries[digest] = accuracy
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))


def derive(ctx: RunContext, ref: DatasetRef, parent: MeasuredCandidate, runtime: str, precision: str,
           accuracies: AccuracyCache) -> MeasuredCandidate:
    """``parent`` rebuilt by ``runtime`` in ``precision``, its accuracy measured (not yet its latency)."""
    qcfg = ctx.cfg.devices.quantize
    rt, cand = get_runtime(runtime), parent.candidate
    calibration_spec = {"images": qcfg.calibration_images, "split": "train"}
    digest = _derived_digest(parent.export, runtime, precision, calibration_spec, ref.data_hash)
    folder = derived_folder(parent.export.folder, runtime, precision, digest)
    main = folder / rt.artifact_name
    data = load_data(ctx, ref)
    if not main.exists():
        batches = calibration_batches(data, cand.input_size, qcfg.calibration_images) if precision == "int8" else []
        write_artifact(folder, rt.artifact_name,
                       lambda tmp: rt.export(cand.model, cand.input_shape, tmp, precision, batches))
    accuracy = accuracies.get(digest)
    if accuracy is None:
        accuracy = artifact_accuracy(runtime, main, data, cand.input_size)
        accuracies.put(digest, accuracy)
    onnx = main if rt.artifact_name.endswith(".onnx") else parent.export.onnx
    export = ExportedModel(digest, onnx, parent.export.weights, parent.export.input_shape, precision, runtime)
    metrics = {**cand.metrics, "val_acc": accuracy, "fp32_val_acc": cand.metrics["val_acc"]}
    config = {**cand.config, "precision": precision, "runtime": runtime}
    derived = replace(cand, name=derived_name(cand.name, precision, runtime), config=config, metrics=metrics)
    log.info("%s: %s %s accuracy %.4f (FP32 %.4f)", cand.name, runtime, precision, accuracy, cand.metrics["val_acc"])
    return MeasuredCandidate(derived, export, (), parent=cand.name)


# cache_policy=NO_CACHE: models are inputs (hashing them would cloudpickle every one); reuse is by digest.
@task(name="derive-precisions", cache_policy=NO_CACHE)
def derive_precisions(ctx: RunContext, ref: DatasetRef, pool: list[MeasuredCandidate],
                      devices: list[DeviceProfile]) -> list[MeasuredCandidate]:
    """The derived members for every device's non-FP32 precisions, measured on each device that accepts
    them (same runtime, precision listed). Returns only the new members. A model its runtime cannot
    convert is left out with a warning: the FP32 race goes on."""
    qcfg = ctx.cfg.devices.quantize
    accuracies = AccuracyCache(ctx)
    derived: dict[str, MeasuredCandidate] = {}
    failed: set[str] = set()
    for device in devices:
        extra = [p for p in device.precisions if p != "fp32"]
        if not extra:
            continue
        for parent in quantisation_parents(pool, device, qcfg.per_method, qcfg.max_speedup):
            for precision in extra:
                name = derived_name(parent.name, precision, device.runtime)
                if name not in derived and name not in failed:
                    try:
                        derived[name] = derive(ctx, ref, parent, device.runtime, precision, accuracies)
                    except Exception as exc:  # noqa: BLE001 - one model the runtime cannot convert leaves the race
                        failed.add(name)
                        log.warning("%s: not built (%s: %s)", name, type(exc).__name__, first_line(exc)[:200])
                if name in derived:
                    derived[name].offered_to = (*derived[name].offered_to, device.name)
    members = list(derived.values())
    measure_pool(ctx, members, devices, ctx.cfg.devices.remote_timeout_s)
    return members
