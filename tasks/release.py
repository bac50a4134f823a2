"""Selection, promotion and publication of each device's winner.

Order matters for safety: the winner is registered as a new version (no alias), its release is
published and verified in the store (``current.json`` last), and only then does the device alias
move. A failure at any step leaves the alias and the store's current release as they were.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from methods.base import Candidate, DataBundle
from methods.export import onnx_logits
from methods.profiling import DeviceProfile, LatencyStats
from methods.train import resize
from registry.mlflow_registry import decide_promotion, model_files
from registry.release import publish_release, read_current
from tasks.common import TRANSIENT_RETRIES, DatasetRef, RunContext, load_data
from tasks.profile import ExportedModel

log = logging.getLogger("podium.tasks.release")


@dataclass(frozen=True)
class Outcome:
    """What happened to one device's winner."""

    device: str
    winner: str | None
    version: str | None = None
    alias_moved: bool = False
    reason: str = ""


def select_winner(candidates: list[Candidate], stats: dict[str, LatencyStats],
                  device: DeviceProfile) -> Candidate | None:
    """The most accurate measured candidate within the latency and memory budgets (ties: faster)."""
    eligible = [c for c in candidates if c.name in stats
                and stats[c.name].p50_ms <= device.latency_budget_ms
                and stats[c.name].peak_mem_mb <= device.memory_budget_mb]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (c.metrics["val_acc"], -stats[c.name].p50_ms))


def _champion_accuracy_on(ctx: RunContext, version, data: DataBundle) -> float | None:
    """Re-evaluate a champion's ONNX model on this run's validation split (data hash changed)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = model_files(ctx.registry.download_version(ctx.cfg.model_name, version.version, Path(tmp)))
            meta = json.loads(files["metadata.json"].read_text())
            size = tuple(meta["input_size"])
            correct = total = 0
            for images, labels in data.val:
                logits = onnx_logits(files["model.onnx"], resize(images, size).numpy())
                correct += int((np.argmax(logits, axis=1) == labels.numpy()).sum())
                total += labels.numel()
        return correct / max(total, 1)
    except Exception as exc:  # an incompatible champion (other classes, channels) cannot be compared
        log.warning("champion v%s could not be re-evaluated: %s", version.version, str(exc).splitlines()[0][:200])
        return None


def _metadata(ctx: RunContext, ref: DatasetRef, data: DataBundle, winner: Candidate, device: DeviceProfile,
              stats: LatencyStats, exported: ExportedModel) -> dict:
    spec = data.input_spec
    return {
        "model": ctx.cfg.model_name, "device": device.name, "candidate": winner.name, "method": winner.method,
        "config": winner.config, "input_size": list(winner.input_size),
        "input_spec": {"channels": spec.channels, "height": winner.input_size[0], "width": winner.input_size[1],
                       "mean": list(spec.mean), "std": list(spec.std), "pixel_scale": "[0, 1] then (x - mean) / std",
                       "class_names": data.class_names},
        "metrics": {**winner.metrics, "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "peak_mem_mb": stats.peak_mem_mb},
        "latency": stats.as_dict(), "device_profile": device.model_dump(mode="json"),
        "lineage": {"data_hash": ref.data_hash, "git_sha": ctx.git_sha, "run_id": ctx.run_id, "digest": exported.digest},
    }


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="promote-and-publish", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def promote_and_publish(ctx: RunContext, ref: DatasetRef, device: DeviceProfile, winner: Candidate | None,
                        stats: LatencyStats | None, exported: ExportedModel | None) -> Outcome:
    if winner is None or stats is None or exported is None:
        return Outcome(device.name, None, reason=f"no candidate within {device.latency_budget_ms} ms / "
                                                  f"{device.memory_budget_mb} MB")
    registry, name = ctx.registry, ctx.cfg.model_name
    store = ctx.open_store()
    champion = registry.version_by_alias(name, device.name)
    if champion is not None and champion.tags.get("digest") == exported.digest:
        current = read_current(store, name, device.name)
        if current is None or str(current.get("version")) != str(champion.version):
            _publish(ctx, store, champion.version, device)
        return Outcome(device.name, winner.name, champion.version, False, "unchanged: the winner is the champion")
    data = load_data(ctx, ref)
    champion_acc = None
    if champion is not None and champion.tags.get("data_hash") != ref.data_hash:
        champion_acc = _champion_accuracy_on(ctx, champion, data)
    decision = decide_promotion(winner.metrics["val_acc"], champion, ref.data_hash, champion_acc)

    metadata = _metadata(ctx, ref, data, winner, device, stats, exported)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / "metadata.json"
        meta_path.write_text(json.dumps(metadata, indent=2, default=str))
        uri = registry.log_model(ctx.run_id, f"winner-{device.name}", exported.onnx, exported.weights, metadata,
                                 np.zeros((2, *exported.input_shape), dtype=np.float32))
    tags = {"device": device.name, "method": winner.method, "candidate": winner.name,
            "config": json.dumps(winner.config, default=str)[:5000], "val_acc": f"{winner.metrics['val_acc']:.6f}",
            "p50_ms": f"{stats.p50_ms:.4f}", "flops": winner.metrics.get("flops"), "params": winner.metrics.get("params"),
            "acts": winner.metrics.get("acts"), "data_hash": ref.data_hash, "git_sha": ctx.git_sha,
            "run_id": ctx.run_id, "digest": exported.digest, "input_size": json.dumps(list(winner.input_size)),
            "promotion": "pending", "promotion_reason": decision.reason}
    version = registry.register(name, uri, ctx.run_id, tags)
    if not decision.promote:
        registry.set_version_tags(name, version.version, {"promotion": "kept-champion"})
        log.info("%s: %s", device.name, decision.reason)
        return Outcome(device.name, winner.name, version.version, False, decision.reason)
    try:
        _publish(ctx, store, version.version, device)
    except Exception as exc:
        registry.set_version_tags(name, version.version, {"promotion": "publish-failed",
                                                          "promotion_reason": str(exc).splitlines()[0][:500]})
        raise
    registry.set_version_tags(name, version.version, {
        "promotion": "promoted", "previous_version": champion.version if champion else ""})
    registry.set_alias(name, device.name, version.version)
    log.info("%s: v%s promoted (%s)", device.name, version.version, decision.reason)
    return Outcome(device.name, winner.name, version.version, True, decision.reason)


def _publish(ctx: RunContext, store, version: str, device: DeviceProfile) -> dict:
    """Publish a registered version's files as the device's current release."""
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(ctx.registry.download_version(ctx.cfg.model_name, version, Path(tmp)))
        metadata = json.loads(files["metadata.json"].read_text())
        metadata["registry"] = {"name": ctx.cfg.model_name, "version": str(version),
                                "tracking_uri_scheme": ctx.cfg.tracking.uri.split(":", 1)[0]}
        return publish_release(store, ctx.cfg.model_name, device.name, version, files, metadata)
