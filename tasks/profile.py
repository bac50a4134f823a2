"""Export every candidate once and measure it on every device it is offered to.

Exports live under ``<cache>/exports/<digest>/`` and measurements in ``<cache>/latency.json``
keyed by (model digest, device settings), so an unchanged model is never re-exported or
re-measured.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from methods.base import Candidate
from methods.export import export_onnx, save_weights
from methods.profiling import DeviceProfile, LatencyStats, measure
from tasks.common import RunContext, candidate_digest

log = logging.getLogger("podium.tasks.profile")
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class ExportedModel:
    digest: str
    onnx: Path
    weights: Path
    input_shape: tuple[int, int, int]


def export_candidate(ctx: RunContext, candidate: Candidate, channels: int) -> ExportedModel:
    digest = candidate_digest(candidate)
    folder = ctx.cache_path / "exports" / digest[:24]
    onnx_path, weights_path = folder / "model.onnx", folder / "weights.safetensors"
    shape = (channels, *candidate.input_size)
    if not (onnx_path.exists() and weights_path.exists()):
        save_weights(candidate.model, folder / "weights.tmp")
        export_onnx(candidate.model, shape, folder / "model.tmp")
        (folder / "weights.tmp").replace(weights_path)
        (folder / "model.tmp").replace(onnx_path)  # complete files only: a crash leaves no half export
    return ExportedModel(digest, onnx_path, weights_path, shape)


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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries, indent=1))
            tmp.replace(self.path)


@task(name="profile-candidates")
def profile_candidates(ctx: RunContext, candidates: dict[str, list[Candidate]], devices: list[DeviceProfile],
                       channels: int) -> tuple[dict[str, dict[str, LatencyStats]], dict[str, ExportedModel]]:
    """Measure each device's candidates on that device (sequentially: measurements must not overlap).

    Returns (stats[device][candidate], exports[candidate]).
    """
    cache = LatencyCache(ctx.cache_path / "latency.json")
    exports: dict[str, ExportedModel] = {}
    stats: dict[str, dict[str, LatencyStats]] = {}
    for device in devices:
        if device.work_pool:
            log.warning("device %s runs on work pool %s: remote profiling is not available in this run; unprofiled",
                        device.name, device.work_pool)
            continue
        stats[device.name] = {}
        for cand in candidates.get(device.name, []):
            exported = exports.get(cand.name) or export_candidate(ctx, cand, channels)
            exports[cand.name] = exported
            key = _measurement_key(exported.digest, device)
            measured = cache.get(key)
            if measured is None:
                measured = measure(cand.model, exported.input_shape, device, onnx_path=exported.onnx)
                cache.put(key, measured)
            stats[device.name][cand.name] = measured
        log.info("profiled %d candidates on %s", len(stats[device.name]), device.name)
    return stats, exports
