"""Anchor/teacher acquisition: registry alias → checkpoint → timm hub (opt-in) → train here.

Whatever is trained or loaded from outside is registered (``<model>-anchor-<name>@current``),
so the next run on the same data resolves it from the registry instead of retraining.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import load_file
from torch import nn

from podium.config import AnchorConfig
from podium.errors import AnchorError
from podium.methods import complexity
from podium.methods.base import Anchor, Candidate
from podium.methods.checkpoint import training_env
from podium.methods.data import DataBundle
from podium.methods.export import export_onnx, load_weights, save_weights
from podium.methods.families import build
from podium.methods.train import cross_entropy_loss, evaluate, fit, pick_device
from podium.registry.mlflow_registry import model_files
from podium.registry.stores import open_store
from podium.tasks.common import TRANSIENT_RETRIES, DatasetRef, RunContext, load_data, training_env_for

log = logging.getLogger("podium.tasks.anchors")
ALIAS = "current"


def anchor_registered_name(model_name: str, anchor: str) -> str:
    return f"{model_name}-anchor-{anchor}"


def _arch_tag(arch: dict) -> str:
    return json.dumps(arch, sort_keys=True)


def _from_registry(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> Anchor | None:
    name = anchor_registered_name(ctx.cfg.model_name, acfg.name)
    version = ctx.registry.version_by_alias(name, ALIAS)
    if version is None:
        return None
    if (version.tags.get("arch") != _arch_tag(acfg.arch) or version.tags.get("data_hash") != data.data_hash
            or version.tags.get("recipe") != _recipe_digest(ctx, acfg, data)):
        log.info("anchor %s: registered v%s is for another arch, data or training recipe; not reused",
                 acfg.name, version.version)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(ctx.registry.download_version(name, version.version, Path(tmp)))
        model = load_weights(build(acfg.arch, data.num_classes, data.input_spec.channels), files["weights.safetensors"])
    return Anchor(acfg.name, model.eval(), f"registry:models:/{name}@{ALIAS} (v{version.version})", dict(acfg.arch))


def _from_checkpoint(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> Anchor:
    model = build(acfg.arch, data.num_classes, data.input_spec.channels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(acfg.checkpoint)
        if acfg.checkpoint.startswith("s3://"):
            bucket, _, key = acfg.checkpoint[5:].partition("/")
            path = Path(tmp) / "checkpoint.safetensors"
            open_store(f"s3://{bucket}", ctx.cfg.store.endpoint_url).get_file(key, path)
        elif not path.is_absolute():
            path = ctx.project_path / path
        if not path.exists():
            raise AnchorError(f"anchor {acfg.name!r}: checkpoint {acfg.checkpoint} does not exist")
        try:
            model.load_state_dict(load_file(str(path)))  # safetensors: no code runs on load
        except Exception as exc:
            raise AnchorError(f"anchor {acfg.name!r}: checkpoint {acfg.checkpoint} does not fit arch "
                              f"{acfg.arch}: {str(exc).splitlines()[0][:200]}") from None
    return Anchor(acfg.name, model.eval(), f"checkpoint:{acfg.checkpoint}", dict(acfg.arch))


def initial_model(acfg: AnchorConfig, data: DataBundle, pretrained: bool = False) -> nn.Module:
    """The anchor before training, initialised from its own seed: the weights never depend on what
    else this process drew from torch's global generator before (they did: two demo runs trained
    different anchors, and every stitch built on them differed too)."""
    torch.manual_seed(acfg.train.seed)
    return build(acfg.arch, data.num_classes, data.input_spec.channels, pretrained=pretrained)


def _train(ctx: RunContext, acfg: AnchorConfig, data: DataBundle, pretrained: bool) -> Anchor:
    model = initial_model(acfg, data, pretrained)
    env, checkpoints = training_env_for(ctx, _training_key(ctx, acfg, data))
    with training_env(env):
        model.to(pick_device())
        result = fit(model, data.train, cross_entropy_loss(model), acfg.train, name=f"anchor {acfg.name}")
    checkpoints.clear()  # the anchor is registered next; a later run resolves it from the registry
    ctx.registry.log_metrics(ctx.run_id, {"images_per_s": result.images_per_s, "train_s": result.wall_s},
                             prefix=f"anchor.{acfg.name}.")
    source = f"timm-hub:{acfg.arch.get('name')}+trained" if pretrained else "trained"
    return Anchor(acfg.name, model.cpu().eval(), source, dict(acfg.arch))


def _recipe_digest(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> str:
    """What makes this anchor: its config (arch, checkpoint, training) and the data it is fed."""
    parts = {"data": data.data_hash, "anchor": acfg.model_dump(mode="json"),
             "batch": ctx.cfg.data.batch_size, "size": list(ctx.cfg.data.image_size)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _training_key(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> str:
    """Names the anchor's checkpoints: only the same training on the same data resumes from them."""
    return f"anchor-{acfg.name}-{_recipe_digest(ctx, acfg, data)}"


def _register(ctx: RunContext, acfg: AnchorConfig, anchor: Anchor, data: DataBundle, val_acc: float) -> None:
    name = anchor_registered_name(ctx.cfg.model_name, anchor.name)
    spec = data.input_spec
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(anchor.model, (spec.channels, *spec.size), Path(tmp) / "model.onnx")
        weights = save_weights(anchor.model, Path(tmp) / "weights.safetensors")
        meta = {"arch": anchor.arch, "source": anchor.source, "input_spec": spec.__dict__, "val_acc": val_acc}
        uri = ctx.registry.log_model(ctx.run_id, f"anchor-{anchor.name}", onnx_path, weights, meta,
                                     data.example_batch(2).numpy())
    version = ctx.registry.register(name, uri, ctx.run_id, {
        "arch": _arch_tag(anchor.arch), "data_hash": data.data_hash, "recipe": _recipe_digest(ctx, acfg, data),
        "source": anchor.source,
        "val_acc": f"{val_acc:.6f}", "git_sha": ctx.git_sha, "run_id": ctx.run_id})
    ctx.registry.set_alias(name, ALIAS, version.version)


def acquire_one(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> Anchor:
    anchor = _from_registry(ctx, acfg, data)
    if anchor is not None:
        log.info("anchor %s: %s", acfg.name, anchor.source)
        return anchor
    if acfg.checkpoint:
        anchor = _from_checkpoint(ctx, acfg, data)
    else:
        anchor = _train(ctx, acfg, data, pretrained=acfg.timm_hub)
    _register(ctx, acfg, anchor, data, evaluate(anchor.model, data.val))
    log.info("anchor %s: %s (registered)", acfg.name, anchor.source)
    return anchor


def anchor_candidate(anchor: Anchor, data: DataBundle) -> Candidate:
    """An anchor as it is: the baseline every method must beat."""
    cost = complexity.count(anchor.model, data.input_spec.size, data.input_spec.channels)
    return Candidate(name=f"anchor-{anchor.name}", method="anchor", config={"arch": anchor.arch, "source": anchor.source},
                     model=anchor.model, input_size=data.input_spec.size,
                     metrics={"val_acc": evaluate(anchor.model, data.val), **cost.as_dict()},
                     in_chans=data.input_spec.channels)


@task(name="acquire-anchors", **TRANSIENT_RETRIES)
def acquire_anchors(ctx: RunContext, ref: DatasetRef) -> tuple[list[Anchor], Anchor, list[Candidate]]:
    """Resolve every configured anchor; returns (anchors small→large, teacher, anchors as candidates)."""
    data = load_data(ctx, ref)
    anchors = [acquire_one(ctx, acfg, data) for acfg in ctx.cfg.anchors]
    candidates = [anchor_candidate(a, data) for a in anchors]
    order = sorted(range(len(anchors)), key=lambda i: candidates[i].metrics["flops"])
    anchors, candidates = [anchors[i] for i in order], [candidates[i] for i in order]
    teacher = next((a for a in anchors if a.name == ctx.cfg.teacher), anchors[-1])
    for cand in candidates:
        ctx.registry.log_metrics(ctx.run_id, {"val_acc": cand.metrics["val_acc"]}, prefix=f"{cand.name}.")
    return anchors, teacher, candidates
