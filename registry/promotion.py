"""Promotion: the champion/challenger rule and the two-phase move of a device's champion.

Order matters for safety. A winner is first registered as a new version without an alias (by the
caller); :func:`promote` then records the move, publishes that version's files as the device's
release in the store, verified, ``current.json`` last (phase one), and only then moves the device's
alias (phase two). A failure in phase one leaves both the alias and the store's current release as
they were; a crash between the phases is settled by :func:`reconcile`. Every promotion, keep and
rollback in Podium goes through this module, under the store's promotion lock
(:mod:`podium.registry.store_lock`).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from podium.errors import RegistryError, first_line
from podium.files import load_json
from podium.registry.mlflow_registry import ModelRegistry, model_files
from podium.registry.release import publish_release, read_current, set_current
from podium.registry.stores import ArtifactStore

log = logging.getLogger("podium.promotion")


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def decide_promotion(challenger_acc: float, champion: ModelVersion | None, data_hash: str,
                     champion_acc_on_data: float | None = None, basis: str = "") -> PromotionDecision:
    """Champion/challenger rule: the alias moves only when the challenger is strictly more accurate
    on the same validation data. When the champion's data hash differs, ``champion_acc_on_data`` is
    the champion re-evaluated on images it never trained on and ``challenger_acc`` the challenger on
    those same images (None = no honest comparison); ``basis`` says which images, or why none."""
    if champion is None:
        return PromotionDecision(True, "no champion yet")
    champion_hash = champion.tags.get("data_hash")
    if champion_hash == data_hash:
        champion_acc = float(champion.tags.get("val_acc", "nan"))
        basis = "same validation data"
    elif champion_acc_on_data is not None:
        champion_acc = champion_acc_on_data
        basis = f"data {data_hash[:12]}: {basis}" if basis else f"champion re-evaluated on data {data_hash[:12]}"
    else:
        why = f": {basis}" if basis else " and could not be re-evaluated"
        return PromotionDecision(True, f"champion v{champion.version} was validated on other data "
                                       f"({str(champion_hash)[:12]}){why}")
    if challenger_acc > champion_acc:
        return PromotionDecision(True, f"challenger {challenger_acc:.4f} beats champion v{champion.version} "
                                       f"{champion_acc:.4f} ({basis})")
    return PromotionDecision(False, f"champion v{champion.version} kept: {champion_acc:.4f} >= challenger "
                                    f"{challenger_acc:.4f} ({basis})")


def publish_version(registry: ModelRegistry, store: ArtifactStore, model: str, device: str, version: str) -> dict:
    """Publish a registered version's files (ONNX, weights, metadata) as the device's current release."""
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(registry.download_version(model, version, Path(tmp)))
        metadata = load_json(files["metadata.json"])
        metadata["registry"] = {"name": model, "version": str(version),
                                "tracking_uri_scheme": registry.tracking_uri.split(":", 1)[0]}
        return publish_release(store, model, device, version, files, metadata)


def rolled_back_guard(registry: ModelRegistry, model: str, device: str, digest: str,
                      decision: PromotionDecision) -> PromotionDecision:
    """Refuse to promote again a model (same file digest) that was rolled back on this device."""
    if not decision.promote:
        return decision
    rolled_back = registry.search_versions(model, {"device": device, "digest": digest, "promotion": "rolled-back"})
    if not rolled_back:
        return decision
    newest = max(rolled_back, key=lambda v: int(v.version))
    return PromotionDecision(False, f"not promoted: the same model (digest {digest[:12]}) is v{newest.version}, "
                                    f"which was rolled back on {device}")


# ------------------------------------------------------------------- the two-phase, recoverable move
#
# Every move of a device's champion (promote, rollback) first records its intent on the registered
# model (tag ``podium.intent.<device>``: action, from, to), then makes the store serve the target
# (current.json last), then moves the alias, then clears the intent. A crash leaves the intent, and
# `reconcile` -- run before every promotion decision, by `rollback` and by `podium models` -- settles
# it deterministically: if the target's release is current it was fully published and verified, so
# the move is completed (the alias follows the store: clients already run it); otherwise it never
# became current and is abandoned (the alias stays and the store is made to serve the alias).
# Without an intent the alias is the truth: a store serving another version is repaired to serve it.

def _intent_tag(device: str) -> str:
    return f"podium.intent.{device}"


def _begin(registry: ModelRegistry, model: str, device: str, action: str, to: str, source: str) -> dict:
    intent = {"action": action, "to": str(to), "from": str(source)}
    registry.set_model_tag(model, _intent_tag(device), json.dumps(intent, sort_keys=True))
    return intent


def pending_intent(registry: ModelRegistry, model: str, device: str) -> dict | None:
    """The recorded move of ``device``'s champion that has not finished, if any."""
    raw = registry.model_tags(model).get(_intent_tag(device))
    if raw is None:
        return None
    try:
        intent = json.loads(raw)
    except ValueError:
        intent = None
    if not isinstance(intent, dict) or intent.get("action") not in ("promote", "rollback") or not intent.get("to"):
        raise RegistryError(f"{model}: promotion record {_intent_tag(device)} is unreadable ({raw[:100]!r}); "
                            f"delete that registered-model tag after checking {device}'s alias and store")
    return intent


def _finish(registry: ModelRegistry, model: str, device: str, intent: dict) -> None:
    if intent["action"] == "promote":
        registry.set_version_tags(model, intent["to"], {"promotion": "promoted", "previous_version": intent["from"]})
    elif intent["from"]:
        registry.set_version_tags(model, intent["from"], {"promotion": "rolled-back"})
    registry.delete_model_tag(model, _intent_tag(device))


def _served_version(store: ArtifactStore, model: str, device: str) -> str | None:
    current = read_current(store, model, device)
    return str(current["version"]) if current else None


def promote(registry: ModelRegistry, store: ArtifactStore, model: str, device: str, version: str,
            champion: ModelVersion | None, reason: str) -> None:
    """Record the intent, publish ``version`` (current.json last), move the device alias, clear the intent."""
    intent = _begin(registry, model, device, "promote", version, champion.version if champion else "")
    registry.set_version_tags(model, version, {"promotion": "publishing", "previous_version": intent["from"]})
    try:
        publish_version(registry, store, model, device, version)
    except Exception as exc:
        registry.set_version_tags(model, version, {"promotion": "publish-failed",
                                                   "promotion_reason": first_line(exc)[:500]})
        registry.delete_model_tag(model, _intent_tag(device))  # current.json did not move: nothing to recover
        raise
    registry.set_alias(model, device, version)
    _finish(registry, model, device, intent)
    log.info("%s: v%s promoted (%s)", device, version, reason)


def keep_champion(registry: ModelRegistry, store: ArtifactStore, model: str, device: str,
                  champion: ModelVersion) -> str | None:
    """The champion stays: make the store serve it (a crash or a hand edit may have left another
    release current). Returns what was repaired, or None when the store already served it."""
    served = _served_version(store, model, device)
    if served == str(champion.version):
        return None
    publish_version(registry, store, model, device, champion.version)
    note = (f"{device}: the store served {f'v{served}' if served else 'nothing'} but the alias names "
            f"v{champion.version}: v{champion.version} published again")
    log.warning("%s", note)
    return note


def _settle(registry: ModelRegistry, store: ArtifactStore, model: str, device: str, intent: dict) -> str:
    """Complete or abandon an interrupted move (see above); returns what was done."""
    move = f"interrupted {intent['action']} of {device} from v{intent['from'] or '-'} to v{intent['to']}"
    alias = registry.version_by_alias(model, device)
    if alias is not None and str(alias.version) == intent["to"]:
        done = "completed (its alias had moved)"
    elif _served_version(store, model, device) == intent["to"]:
        registry.set_alias(model, device, intent["to"])
        done = "completed: its release was current, the alias now names it"
    else:
        if intent["action"] == "promote":
            registry.set_version_tags(model, intent["to"], {
                "promotion": "abandoned", "promotion_reason": "interrupted before its release became current"})
        registry.delete_model_tag(model, _intent_tag(device))
        return f"{move} abandoned: its release never became current"
    _finish(registry, model, device, intent)
    return f"{move} {done}"


def reconcile(registry: ModelRegistry, store: ArtifactStore, model: str, device: str
              ) -> tuple[ModelVersion | None, list[str]]:
    """Make the registry and the store agree on ``device``'s champion; call it under the promotion lock.

    Settles an interrupted move, then repairs a store that serves another version than the alias.
    Returns the champion afterwards and one line per thing found or repaired."""
    notes = []
    intent = pending_intent(registry, model, device)
    if intent is not None:
        notes.append(_settle(registry, store, model, device, intent))
    champion = registry.version_by_alias(model, device)
    if champion is not None:
        repaired = keep_champion(registry, store, model, device, champion)
        notes += [repaired] if repaired else []
    elif (served := _served_version(store, model, device)) is not None:
        notes.append(f"{device}: the store serves v{served} but the registry has no {device!r} alias "
                     f"(the next promotion replaces it)")
    for note in notes:
        log.warning("%s", note)
    return champion, notes


def rollback(registry: ModelRegistry, store: ArtifactStore, model: str, device: str) -> tuple[str, str]:
    """Move the device back to the previous champion, two-phase like a promotion: intent, store
    (verified), alias, done. Call it under the promotion lock. Returns (from_version, to_version)."""
    champion, _notes = reconcile(registry, store, model, device)
    if champion is None:
        raise RegistryError(f"model {model!r} has no alias {device!r}")
    previous = champion.tags.get("previous_version")
    if not previous:
        raise RegistryError(f"{model}@{device} (v{champion.version}) has no previous champion to roll back to")
    intent = _begin(registry, model, device, "rollback", previous, champion.version)
    try:
        set_current(store, model, device, previous)
    except Exception:
        registry.delete_model_tag(model, _intent_tag(device))  # current.json did not move
        raise
    registry.set_alias(model, device, previous)
    _finish(registry, model, device, intent)
    return champion.version, previous
