"""Promotion: the champion/challenger rule and the two-phase move of a device's champion.

Order matters for safety. A winner is first registered as a new version without an alias (by the
caller); :func:`promote` then publishes that version's files as the device's release in the store,
verified, ``current.json`` last (phase one), and only then moves the device's alias (phase two). A
failure in phase one leaves both the alias and the store's current release as they were. Every
promotion, keep and rollback in Podium goes through this module.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from podium.errors import RegistryError, first_line
from podium.registry.mlflow_registry import ModelRegistry, model_files
from podium.registry.release import publish_release, read_current, set_current
from podium.registry.stores import ArtifactStore

log = logging.getLogger("podium.promotion")


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def decide_promotion(challenger_acc: float, champion: ModelVersion | None, data_hash: str,
                     champion_acc_on_data: float | None = None) -> PromotionDecision:
    """Champion/challenger rule: the alias moves only when the challenger is strictly more accurate
    on the same validation data. ``champion_acc_on_data`` is the champion re-evaluated on this data
    when its own data hash differs (None = could not be re-evaluated)."""
    if champion is None:
        return PromotionDecision(True, "no champion yet")
    champion_hash = champion.tags.get("data_hash")
    if champion_hash == data_hash:
        champion_acc = float(champion.tags.get("val_acc", "nan"))
        basis = "same validation data"
    elif champion_acc_on_data is not None:
        champion_acc = champion_acc_on_data
        basis = f"champion re-evaluated on the new validation data {data_hash[:12]}"
    else:
        return PromotionDecision(True, f"champion v{champion.version} was validated on other data "
                                       f"({str(champion_hash)[:12]}) and could not be re-evaluated")
    if challenger_acc > champion_acc:
        return PromotionDecision(True, f"challenger {challenger_acc:.4f} beats champion v{champion.version} "
                                       f"{champion_acc:.4f} ({basis})")
    return PromotionDecision(False, f"champion v{champion.version} kept: {champion_acc:.4f} >= challenger "
                                    f"{challenger_acc:.4f} ({basis})")


def publish_version(registry: ModelRegistry, store: ArtifactStore, model: str, device: str, version: str) -> dict:
    """Publish a registered version's files (ONNX, weights, metadata) as the device's current release."""
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(registry.download_version(model, version, Path(tmp)))
        metadata = json.loads(files["metadata.json"].read_text())
        metadata["registry"] = {"name": model, "version": str(version),
                                "tracking_uri_scheme": registry.tracking_uri.split(":", 1)[0]}
        return publish_release(store, model, device, version, files, metadata)


def promote(registry: ModelRegistry, store: ArtifactStore, model: str, device: str, version: str,
            champion: ModelVersion | None, reason: str) -> None:
    """Publish ``version`` (phase one), then move the device alias to it (phase two)."""
    try:
        publish_version(registry, store, model, device, version)
    except Exception as exc:
        registry.set_version_tags(model, version, {"promotion": "publish-failed",
                                                   "promotion_reason": first_line(exc)[:500]})
        raise
    registry.set_version_tags(model, version, {"promotion": "promoted",
                                               "previous_version": champion.version if champion else ""})
    registry.set_alias(model, device, version)
    log.info("%s: v%s promoted (%s)", device, version, reason)


def keep_champion(registry: ModelRegistry, store: ArtifactStore, model: str, device: str,
                  champion: ModelVersion) -> None:
    """The champion stays: make sure the store serves it (a crash may have left another release current)."""
    current = read_current(store, model, device)
    if current is None or str(current.get("version")) != str(champion.version):
        log.warning("%s: store serves v%s but the alias names v%s: publishing v%s again", device,
                    current.get("version") if current else "nothing", champion.version, champion.version)
        publish_version(registry, store, model, device, champion.version)


def rollback(registry: ModelRegistry, store: ArtifactStore, model: str, device: str) -> tuple[str, str]:
    """Move the device back to the previous champion: store first (verified), then the alias.

    Returns (from_version, to_version)."""
    champion = registry.version_by_alias(model, device)
    if champion is None:
        raise RegistryError(f"model {model!r} has no alias {device!r}")
    previous = champion.tags.get("previous_version")
    if not previous:
        raise RegistryError(f"{model}@{device} (v{champion.version}) has no previous champion to roll back to")
    set_current(store, model, device, previous)
    registry.set_alias(model, device, previous)
    registry.set_version_tags(model, champion.version, {"promotion": "rolled-back"})
    return champion.version, previous
