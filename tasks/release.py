"""Selection of each device's winner, and its registration and promotion (:mod:`podium.registry.promotion`).

The winner is registered as a new version (no alias); :func:`podium.registry.promotion.promote`
then publishes and verifies its release and only then moves the device alias. A failure at any
step leaves the alias and the store's current release as they were.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from podium.data import MANIFEST, read_manifest
from podium.errors import first_line
from podium.files import load_json, sha256_file
from podium.methods.data import DataBundle
from podium.methods.export import with_metadata
from podium.methods.profiling import DeviceProfile, LatencyStats
from podium.methods.runtimes import available_runtimes, get_runtime
from podium.registry import promotion
from podium.registry.mlflow_registry import model_files, onnx_signature
from podium.registry.model_card import model_card
from podium.registry.store_lock import promotion_lock
from podium.tasks.common import TRANSIENT_RETRIES, DatasetRef, RunContext, load_data
from podium.tasks.profile import MeasuredCandidate
from podium.tasks.runs import record_dataset

log = logging.getLogger("podium.tasks.release")


@dataclass(frozen=True)
class Outcome:
    """What happened to one device's winner."""

    device: str
    winner: str | None
    version: str | None = None
    alias_moved: bool = False
    reason: str = ""  # of the promotion (or why there is no winner)
    chosen: str = ""  # why this candidate won the device (see choose_winner)
    tied: tuple[str, ...] = ()  # candidates it tied with (the same winner, in effect)


@dataclass(frozen=True)
class Choice:
    winner: MeasuredCandidate | None
    why: str
    tied: tuple[str, ...] = ()  # tied with the winner, the tie broken by flops then name
    ambiguous: tuple[str, ...] = ()  # still straddling the budget after re-measuring: not chosen


def accuracy_resolution(accuracy: float, images: int) -> float:
    """The smallest accuracy difference ``images`` validation images resolve: one standard error of
    the accuracy, and never less than one image."""
    images = max(images, 1)
    return max(1 / images, math.sqrt(accuracy * (1 - accuracy) / images))


def choose_winner(pool: list[MeasuredCandidate], device: DeviceProfile, val_images: int) -> Choice:
    """The device's winner among candidates whose whole latency interval is within budget (and memory).

    The most accurate wins, except that candidates within :func:`accuracy_resolution` of it contend:
    the fastest of them and every one whose interval overlaps its interval are a tie, broken by fewer
    flops, then by name. So the same candidates give the same winner whatever noise moved p50."""
    budget = device.latency_budget_ms
    fits = [m for m in pool if device.name in m.stats and m.stats[device.name].peak_mem_mb <= device.memory_budget_mb]
    verdict = {m.name: m.stats[device.name].budget_verdict(budget) for m in fits}
    eligible = [m for m in fits if verdict[m.name] == "within"]
    ambiguous = tuple(sorted(m.name for m in fits if verdict[m.name] == "ambiguous"))
    if not eligible:
        straddle = f"; {len(ambiguous)} straddle the budget after re-measuring" if ambiguous else ""
        return Choice(None, f"no candidate within {budget:g} ms / {device.memory_budget_mb:g} MB{straddle}",
                      ambiguous=ambiguous)

    def acc(m: MeasuredCandidate) -> float:
        return m.candidate.metrics["val_acc"]

    def stats(m: MeasuredCandidate) -> LatencyStats:
        return m.stats[device.name]

    best = max(eligible, key=lambda m: (acc(m), -stats(m).p50_ms))
    resolution = accuracy_resolution(acc(best), val_images)
    contenders = [m for m in eligible if acc(best) - acc(m) < resolution]
    fastest = min(contenders, key=lambda m: (stats(m).p50_ms, m.name))
    tied = [m for m in contenders if stats(m).p50_low_ms <= stats(fastest).p50_high_ms]
    winner = min(tied, key=lambda m: (m.candidate.metrics.get("flops", math.inf), m.name))
    measured = f"val_acc {acc(winner):.4f}, p50 {stats(winner).interval_text()} within {budget:g} ms"
    if len(contenders) == 1:
        why = f"most accurate within budget ({measured})"
    elif len(tied) == 1:
        why = (f"fastest of {len(contenders)} candidates within {100 * resolution:.1f} pts of the best accuracy "
               f"({measured})")
    else:
        why = (f"tie of {len(tied)} (accuracy within {100 * resolution:.1f} pts, latency intervals overlap), "
               f"broken by fewer flops then name ({measured})")
    return Choice(winner, why, tuple(sorted(m.name for m in tied if m is not winner)), ambiguous)


TRAINING_IMAGES = "lineage/training_images.npy"  # per run: content keys of the images its models trained on
MIN_FAIR_IMAGES = 20  # fewer unseen validation images than this cannot rank two models


def split_keys(ref: DatasetRef, data: DataBundle, split: str) -> np.ndarray | None:
    """Content keys of ``split``'s images in the split's order: the first 64 bits of each file's
    sha256 (from the dataset manifest; a file it does not list is hashed). None for in-memory data."""
    paths = data.splits[split].paths
    if paths is None:
        return None
    root = Path(ref.root)
    listed = {row["path"]: row["sha256"] for row in read_manifest(root)} if (root / MANIFEST).is_file() else {}
    return np.array([int((listed.get(p) or sha256_file(root / p))[:16], 16) for p in paths], dtype=np.uint64)


def log_training_images(ctx: RunContext, ref: DatasetRef, data: DataBundle) -> None:
    """Record what this run's models trained on (sorted unique content keys, a .npy with no pickle),
    so a later run on changed data can compare them with a challenger on images neither has seen."""
    keys = split_keys(ref, data, "train")
    if keys is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRAINING_IMAGES).name
        np.save(path, np.unique(keys), allow_pickle=False)
        ctx.registry.log_artifact(ctx.run_id, path, str(Path(TRAINING_IMAGES).parent))


def _training_keys_of(ctx: RunContext, version) -> np.ndarray | None:
    """The content keys a registered version's run trained on; None when that run did not record them."""
    run_id = version.tags.get("run_id") or version.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = ctx.registry.client.download_artifacts(run_id, TRAINING_IMAGES, tmp)
            keys = np.load(local, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - an older run, or a missing artifact: no fair comparison
        log.warning("champion v%s: its training images are not on record (%s)", version.version, first_line(exc)[:200])
        return None
    return keys if keys.ndim == 1 and keys.dtype == np.uint64 else None


def _release_accuracy(files: dict[str, Path], meta: dict, data: DataBundle) -> float:
    """A release's accuracy on ``data``'s validation split: its own runtime's artifact in its precision
    where that runtime is here, else its ONNX graph with ONNX Runtime, fed with its own normalisation."""
    size = tuple(meta["input_size"])
    spec, theirs = data.input_spec, meta["input_spec"]
    scale = torch.tensor(spec.std).view(1, -1, 1, 1) / torch.tensor(theirs["std"]).view(1, -1, 1, 1)
    shift = (torch.tensor(spec.mean) - torch.tensor(theirs["mean"])).view(1, -1, 1, 1) / torch.tensor(
        theirs["std"]).view(1, -1, 1, 1)
    artifact = meta.get("artifact") or {}
    runtime, main = artifact.get("runtime", "onnxruntime"), artifact.get("main", "model.onnx")
    if runtime not in available_runtimes() or main not in files:
        runtime, main = "onnxruntime", "model.onnx"
    correct = total = 0
    with get_runtime(runtime).open(files[main], threads=1) as session:
        for images, labels in data.eval_loader("val", size):
            logits = session.predict((images * scale + shift).numpy())
            correct += int((np.argmax(logits, axis=1) == labels.numpy()).sum())
            total += labels.numel()
    return correct / max(total, 1)


@dataclass(frozen=True)
class FairComparison:
    """Champion and challenger on the validation images neither trained on (the data changed)."""

    champion_acc: float | None  # None: no honest comparison was possible (``note`` says why)
    challenger_acc: float | None
    note: str


def compare_on_unseen(ctx: RunContext, ref: DatasetRef, data: DataBundle, champion, challenger_files: dict[str, Path],
                      challenger_meta: dict) -> FairComparison:
    """Re-evaluate the champion, and the challenger beside it, on this run's validation images whose
    content the champion's run did not train on (the challenger never trains on validation images).
    A new split can hold the champion's old training images: scoring it there would favour it."""
    trained = _training_keys_of(ctx, champion)
    val = split_keys(ref, data, "val")
    if trained is None or val is None:
        return FairComparison(None, None, f"champion v{champion.version}'s training images are not on record")
    unseen = np.flatnonzero(~np.isin(val, trained))
    if len(unseen) < MIN_FAIR_IMAGES:
        return FairComparison(None, None, f"only {len(unseen)} of {len(val)} validation images are new to "
                                          f"champion v{champion.version}")
    fair = data.restrict("val", unseen.tolist())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = model_files(ctx.registry.download_version(ctx.cfg.model_name, champion.version, Path(tmp)))
            champion_acc = _release_accuracy(files, load_json(files["metadata.json"]), fair)
    except Exception as exc:  # noqa: BLE001 - an incompatible champion (other classes, channels)
        log.warning("champion v%s could not be re-evaluated: %s", champion.version, first_line(exc)[:200])
        return FairComparison(None, None, f"champion v{champion.version} could not be re-evaluated")
    challenger_acc = _release_accuracy(challenger_files, challenger_meta, fair)
    return FairComparison(champion_acc, challenger_acc,
                          f"both scored on the {len(unseen)} of {len(val)} validation images the champion never "
                          f"trained on")


def runtime_files(winner: MeasuredCandidate, device: DeviceProfile) -> list[Path]:
    """The device runtime's own artifact files that ship beside ``model.onnx`` (none when the
    runtime runs the ONNX graph itself)."""
    files = winner.export.files(device.runtime, winner.candidate.model)
    return [] if files == [winner.export.onnx] else files


def _interface(onnx_path: Path) -> dict:
    """The graph's input and output tensors (name, shape with -1 for the batch), as the card states them."""
    signature = onnx_signature(onnx.load(str(onnx_path)))
    return {"input": {"name": signature.inputs.inputs[0].name, "shape": list(signature.inputs.inputs[0].shape)},
            "output": {"name": signature.outputs.inputs[0].name, "shape": list(signature.outputs.inputs[0].shape)}}


def _metadata(ctx: RunContext, ref: DatasetRef, data: DataBundle, winner: MeasuredCandidate,
              device: DeviceProfile, stats: LatencyStats, shipped: list[Path]) -> dict:
    spec, cand = data.input_spec, winner.candidate
    main = shipped[0].name if shipped else "model.onnx"
    return {
        "model": ctx.cfg.model_name, "device": device.name, "candidate": cand.name, "method": cand.method,
        "config": cand.config, "input_size": list(cand.input_size),
        # what the device runs: its runtime's artifact (``main``) in this precision; model.onnx is that
        # same graph for ONNX runtimes, else the FP32 graph it was built from
        "artifact": {"runtime": device.runtime, "precision": winner.precision, "main": main,
                     "files": [p.name for p in shipped], "parent": winner.parent},
        "input_spec": {"channels": spec.channels, "height": cand.input_size[0], "width": cand.input_size[1],
                       "mean": list(spec.mean), "std": list(spec.std), "pixel_scale": "[0, 1] then (x - mean) / std",
                       "class_names": data.class_names},
        "preprocessing": data.preprocessing(cand.input_size), "interface": _interface(winner.export.onnx),
        "evaluation": {"split": "val", "images": len(data.splits["val"])},
        "metrics": {**cand.metrics, "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "peak_mem_mb": stats.peak_mem_mb},
        "latency": stats.as_dict(), "device_profile": device.model_dump(mode="json"),
        "lineage": {"data_hash": ref.data_hash, "git_sha": ctx.git_sha, "run_id": ctx.run_id,
                    "digest": winner.export.digest},
    }


def onnx_properties(metadata: dict) -> dict[str, str]:
    """What a client of the bare ONNX file needs (as its ``metadata_props``): preprocessing, classes."""
    return {"podium.preprocessing": json.dumps(metadata["preprocessing"]),
            "podium.class_names": json.dumps(metadata["input_spec"]["class_names"]),
            "podium.model": str(metadata["model"]), "podium.device": str(metadata["device"]),
            "podium.candidate": str(metadata["candidate"]),
            "podium.precision": str(metadata["artifact"]["precision"]) if metadata["artifact"]["main"] == "model.onnx"
            else "fp32"}


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="promote-and-publish", task_run_name="promote-{device.name}", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def promote_and_publish(ctx: RunContext, ref: DatasetRef, device: DeviceProfile,
                        winner: MeasuredCandidate | None, chosen: str = "") -> Outcome:
    if winner is None:
        return Outcome(device.name, None, reason=chosen or "no candidate")
    registry, name, store = ctx.registry, ctx.cfg.model_name, ctx.open_store()
    cand, stats, exported = winner.candidate, winner.stats[device.name], winner.export
    champion, _repaired = promotion.reconcile(registry, store, name, device.name)  # after a crash, agree first
    if champion is not None and champion.tags.get("digest") == exported.digest:
        promotion.keep_champion(registry, store, name, device.name, champion)
        return Outcome(device.name, cand.name, champion.version, False, "unchanged: the winner is the champion")
    data = load_data(ctx, ref)
    shipped = runtime_files(winner, device)
    metadata = {**_metadata(ctx, ref, data, winner, device, stats, shipped), "chosen": chosen}
    challenger_acc, fair = cand.metrics["val_acc"], None
    if champion is not None and champion.tags.get("data_hash") != ref.data_hash:
        fair = compare_on_unseen(ctx, ref, data, champion, {"model.onnx": exported.onnx, **{p.name: p for p in shipped}},
                                 metadata)
        challenger_acc = fair.challenger_acc if fair.challenger_acc is not None else challenger_acc
    decision = promotion.decide_promotion(challenger_acc, champion, ref.data_hash,
                                          fair.champion_acc if fair else None, fair.note if fair else "")
    decision = promotion.rolled_back_guard(registry, name, device.name, exported.digest, decision)
    metadata["promotion"] = {"promote": decision.promote, "reason": decision.reason}
    card = model_card(metadata)  # README.md of the release and the version's description
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = with_metadata(exported.onnx, Path(tmp) / "model.onnx", onnx_properties(metadata))
        example = next(iter(data.eval_loader("val", cand.input_size, limit=2)))[0].numpy()  # two real images
        uri = registry.log_model(ctx.run_id, f"winner-{device.name}", onnx_path, exported.weights, metadata, example,
                                 extra_files=shipped, card=card,
                                 params={"device": device.name, "method": cand.method, "candidate": cand.name,
                                         "runtime": device.runtime, "precision": winner.precision})
    tags = {"device": device.name, "method": cand.method, "candidate": cand.name, "runtime": device.runtime,
            "precision": winner.precision,
            "config": json.dumps(cand.config, default=str)[:5000], "val_acc": f"{cand.metrics['val_acc']:.6f}",
            "p50_ms": f"{stats.p50_ms:.4f}", "flops": cand.metrics.get("flops"), "params": cand.metrics.get("params"),
            "acts": cand.metrics.get("acts"), "data_hash": ref.data_hash, "git_sha": ctx.git_sha,
            "run_id": ctx.run_id, "digest": exported.digest, "input_size": json.dumps(list(cand.input_size)),
            "promotion": "pending", "promotion_reason": decision.reason, "chosen": chosen[:5000]}
    version = registry.register(name, uri, ctx.run_id, tags, description=card)
    if not decision.promote:
        registry.set_version_tags(name, version.version, {"promotion": "kept-champion"})
        log.info("%s: %s", device.name, decision.reason)
        return Outcome(device.name, cand.name, version.version, False, decision.reason)
    promotion.promote(registry, store, name, device.name, version.version, champion, decision.reason)
    return Outcome(device.name, cand.name, version.version, True, decision.reason)


def promote_winners(ctx: RunContext, ref: DatasetRef, pool: list[MeasuredCandidate], devices: list[DeviceProfile]
                    ) -> tuple[list[Outcome], dict[str, MeasuredCandidate], list[str]]:
    """Each device's winner promoted (or not) under the promotion lock, so no two runs promote at once.

    A device whose promotion fails keeps its release; the others go on. Returns (outcomes, winners
    by device, one line per failed device)."""
    outcomes, winners, failed = [], {}, []
    data = load_data(ctx, ref)
    val_images = len(data.dataset("val"))
    log_training_images(ctx, ref, data)
    record_dataset(ctx, ref, data)  # again if the flow did (same name and digest: nothing added)
    with promotion_lock(ctx.open_store(), ctx.cfg.model_name):  # shared by every promoter of the store
        for device in devices:
            choice = choose_winner(pool, device, val_images)
            log.info("%s: %s", device.name, f"{choice.winner.name}: {choice.why}" if choice.winner else choice.why)
            if choice.winner is not None:
                winners[device.name] = choice.winner
            outcome = promote_and_publish(ctx, ref, device, choice.winner, choice.why,
                                          return_state=True).result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                failed.append(f"device {device.name}: {first_line(outcome)}")
                outcome = Outcome(device.name, choice.winner.name if choice.winner else None,
                                  reason=f"failed: {first_line(outcome)}")
            outcomes.append(dataclasses.replace(outcome, chosen=choice.why, tied=choice.tied))
    return outcomes, winners, failed
