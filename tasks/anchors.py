"""Anchor/teacher acquisition: registry alias, else pretrained weights (a checkpoint file or the
timm hub, opt-in) adapted to the dataset (none | head | finetune), else trained here from scratch.

Whatever is trained or loaded from outside is registered (``<model>-anchor-<name>@current``, a
teacher that is no anchor as ``<model>-teacher-<name>``), so the next run on the same data
resolves it from the registry instead of adapting or training it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from podium.config import AnchorConfig, TeacherConfig
from podium.errors import AnchorError, RegistryError
from podium.methods import complexity
from podium.methods.base import Anchor, Candidate
from podium.methods.checkpoint import training_env
from podium.methods.data import DataBundle
from podium.methods.export import export_onnx, load_weights, save_weights
from podium.methods.families import build
from podium.methods.pretrained import load_pretrained, train_head
from podium.methods.train import TrainResult, cross_entropy_loss, evaluate, fit, pick_device, seeded
from podium.registry.mlflow_registry import model_files
from podium.registry.stores import open_store
from podium.tasks.common import TRANSIENT_RETRIES, DatasetRef, RunContext, load_data, training_env_for

log = logging.getLogger("podium.tasks.anchors")
ALIAS = "current"


def anchor_registered_name(model_name: str, anchor: str, role: str = "anchor") -> str:
    return f"{model_name}-{role}-{anchor}"


def _arch_tag(arch: dict) -> str:
    return json.dumps(arch, sort_keys=True)


def _from_registry(ctx: RunContext, acfg: AnchorConfig, data: DataBundle, role: str) -> Anchor | None:
    name = anchor_registered_name(ctx.cfg.model_name, acfg.name, role)
    version = ctx.registry.version_by_alias(name, ALIAS)
    if version is None:
        return None
    if (version.tags.get("arch") != _arch_tag(acfg.arch) or version.tags.get("data_hash") != data.data_hash
            or version.tags.get("recipe") != _recipe_digest(ctx, acfg, data)):
        log.info("%s %s: registered v%s is for another arch, data or recipe; not reused", role, acfg.name,
                 version.version)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = model_files(ctx.registry.download_version(name, version.version, Path(tmp)))
        except RegistryError as exc:  # its artifacts are gone (a moved or deleted artifact root): acquire anew
            log.warning("%s %s: registered v%s cannot be loaded (%s); acquired again and registered as a new "
                        "version", role, acfg.name, version.version, exc)
            return None
        model = load_weights(build(acfg.arch, data.num_classes, data.input_spec.channels), files["weights.safetensors"])
    return Anchor(acfg.name, model.eval(), f"registry:models:/{name}@{ALIAS} (v{version.version})", dict(acfg.arch))


def _checkpoint_file(ctx: RunContext, acfg: AnchorConfig, tmp: Path) -> Path:
    """The checkpoint as a local file (an s3:// one is downloaded into ``tmp``, keeping its suffix)."""
    if acfg.checkpoint.startswith("s3://"):
        bucket, _, key = acfg.checkpoint[5:].partition("/")
        path = tmp / f"checkpoint{Path(key).suffix or '.safetensors'}"
        open_store(f"s3://{bucket}", ctx.cfg.store.endpoint_url).get_file(key, path)
        return path
    path = Path(acfg.checkpoint)
    path = path if path.is_absolute() else ctx.project_path / path
    if not path.exists():
        raise AnchorError(f"anchor {acfg.name!r}: checkpoint {acfg.checkpoint} does not exist")
    return path


def _pretrained(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> tuple[nn.Module, str]:
    """The pretrained model adapted as ``acfg.adapt`` says (resolved when unset), and that adaptation."""
    with tempfile.TemporaryDirectory() as tmp:
        file = _checkpoint_file(ctx, acfg, Path(tmp)) if acfg.checkpoint else None
        try:
            with seeded(acfg.recipe("head").seed):  # a fresh classifier's init is the config's, not the process's
                loaded = load_pretrained(acfg.arch, data.num_classes, data.input_spec.channels, file=file,
                                         hub=acfg.timm_hub)
        except ValueError as exc:
            raise AnchorError(f"anchor {acfg.name!r}: {exc}") from None
    adapt = acfg.adapt or ("none" if loaded.head_loaded else "head")
    if adapt == "none" and not loaded.head_loaded:
        got = "no classifier" if loaded.head_classes is None else f"a classifier for {loaded.head_classes} classes"
        raise AnchorError(f"anchor {acfg.name!r}: adapt: none, but its weights have {got} and the dataset has "
                          f"{data.num_classes}: use adapt: head or finetune")
    return loaded.model, adapt


def initial_model(acfg: AnchorConfig, data: DataBundle) -> nn.Module:
    """The anchor before training, initialised from its own seed: the weights never depend on what
    else this process drew from torch's global generator before (they did: two demo runs trained
    different anchors, and every stitch built on them differed too)."""
    with seeded(acfg.recipe("scratch").seed):
        return build(acfg.arch, data.num_classes, data.input_spec.channels)


def _acquire_new(ctx: RunContext, acfg: AnchorConfig, data: DataBundle, role: str
                 ) -> tuple[Anchor, TrainResult | None]:
    """Load (pretrained) or build (random init) the model, then adapt or train it here."""
    if acfg.pretrained:
        model, adapt = _pretrained(ctx, acfg, data)
        origin = f"checkpoint:{acfg.checkpoint}" if acfg.checkpoint else f"timm-hub:{acfg.arch.get('name')}"
    else:
        model, adapt, origin = initial_model(acfg, data), "scratch", "trained"
    result = None
    if adapt != "none":
        recipe = acfg.recipe(adapt)
        # an anchor is a plain classifier: its curves include each epoch's validation accuracy
        env, checkpoints = training_env_for(ctx, _training_key(ctx, acfg, data, role), validation=data)
        with training_env(env):
            model.to(pick_device())
            name = f"{role} {acfg.name}"
            if adapt == "head":
                result = train_head(model, data.train, recipe, name=name)
            else:
                result = fit(model, data.train, cross_entropy_loss(model), recipe, name=name)
        checkpoints.clear()  # the model is registered next; a later run resolves it from the registry
    source = origin if adapt in ("none", "scratch") else f"{origin}+{adapt}"
    return Anchor(acfg.name, model.cpu().eval(), source, dict(acfg.arch)), result


def _recipe_digest(ctx: RunContext, acfg: AnchorConfig, data: DataBundle) -> str:
    """What makes this anchor: its config (arch, weights, adaptation, training) and the data it is fed."""
    parts = {"data": data.data_hash, "anchor": acfg.model_dump(mode="json"),
             "batch": ctx.cfg.data.batch_size, "size": list(ctx.cfg.data.image_size)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _training_key(ctx: RunContext, acfg: AnchorConfig, data: DataBundle, role: str) -> str:
    """Names the training's checkpoints: only the same training on the same data resumes from them."""
    return f"{role}-{acfg.name}-{_recipe_digest(ctx, acfg, data)}"


def _register(ctx: RunContext, acfg: AnchorConfig, anchor: Anchor, data: DataBundle, val_acc: float,
              role: str) -> None:
    name = anchor_registered_name(ctx.cfg.model_name, anchor.name, role)
    spec = data.input_spec
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(anchor.model, (spec.channels, *spec.size), Path(tmp) / "model.onnx")
        weights = save_weights(anchor.model, Path(tmp) / "weights.safetensors")
        meta = {"arch": anchor.arch, "source": anchor.source, "input_spec": spec.__dict__, "val_acc": val_acc}
        uri = ctx.registry.log_model(ctx.run_id, f"{role}-{anchor.name}", onnx_path, weights, meta,
                                     data.example_batch(2).numpy())
    version = ctx.registry.register(name, uri, ctx.run_id, {
        "arch": _arch_tag(anchor.arch), "data_hash": data.data_hash, "recipe": _recipe_digest(ctx, acfg, data),
        "source": anchor.source,
        "val_acc": f"{val_acc:.6f}", "git_sha": ctx.git_sha, "run_id": ctx.run_id},
        description=(f"{role} `{anchor.name}` ({_arch_tag(anchor.arch)}) from {anchor.source}: val_acc {val_acc:.4f} "
                     f"on {len(data.splits['val'])} validation images of data {data.data_hash}; input "
                     f"{spec.channels}x{spec.size[0]}x{spec.size[1]}. Reused by later runs with the same data and "
                     f"recipe instead of training again."))
    ctx.registry.set_alias(name, ALIAS, version.version)


def acquire_one(ctx: RunContext, acfg: AnchorConfig, data: DataBundle, role: str = "anchor") -> Anchor:
    """``role`` (anchor or teacher) names its registered model: ``<model>-<role>-<name>@current``."""
    anchor = _from_registry(ctx, acfg, data, role)
    if anchor is not None:
        log.info("%s %s: %s", role, acfg.name, anchor.source)
        return anchor
    anchor, trained = _acquire_new(ctx, acfg, data, role)
    if trained is not None:
        ctx.registry.log_metrics(ctx.run_id, {"images_per_s": trained.images_per_s, "train_s": trained.wall_s},
                                 prefix=f"{role}.{acfg.name}.")
    _register(ctx, acfg, anchor, data, evaluate(anchor.model, data.val), role)
    log.info("%s %s: %s (registered)", role, acfg.name, anchor.source)
    return anchor


def anchor_candidate(anchor: Anchor, data: DataBundle) -> Candidate:
    """An anchor as it is: the baseline every method must beat."""
    cost = complexity.count(anchor.model, data.input_spec.size, data.input_spec.channels)
    return Candidate(name=f"anchor-{anchor.name}", method="anchor", config={"arch": anchor.arch, "source": anchor.source},
                     model=anchor.model, input_size=data.input_spec.size,
                     metrics={"val_acc": evaluate(anchor.model, data.val), **cost.as_dict()},
                     in_chans=data.input_spec.channels)


# never persisted (models are not data): PREFECT_RESULTS_PERSIST_BY_DEFAULT must not make this a pickle on disk
@task(name="acquire-anchor", task_run_name="acquire-{role}-{acfg.name}", cache_policy=NO_CACHE, persist_result=False,
      **TRANSIENT_RETRIES)
def acquire_anchor(ctx: RunContext, ref: DatasetRef, acfg: AnchorConfig, role: str = "anchor") -> Anchor:
    """One anchor (or the teacher) resolved: :func:`acquire_one` on the run's data."""
    return acquire_one(ctx, acfg, load_data(ctx, ref), role)


def acquire_anchors(ctx: RunContext, ref: DatasetRef) -> tuple[list[Anchor], Anchor, list[Candidate]]:
    """Resolve every configured anchor, and a teacher that is none of them, side by side (``.submit``:
    each training gets its share of the cores); returns (anchors small→large, teacher, anchors as candidates)."""
    futures = [acquire_anchor.submit(ctx, ref, acfg) for acfg in ctx.cfg.anchors]
    own_teacher = isinstance(ctx.cfg.teacher, TeacherConfig)
    teacher_future = acquire_anchor.submit(ctx, ref, ctx.cfg.teacher, role="teacher") if own_teacher else None
    anchors = [future.result() for future in futures]
    data = load_data(ctx, ref)
    candidates = [anchor_candidate(a, data) for a in anchors]
    order = sorted(range(len(anchors)), key=lambda i: candidates[i].metrics["flops"])
    anchors, candidates = [anchors[i] for i in order], [candidates[i] for i in order]
    if teacher_future is not None:
        teacher = teacher_future.result()
    else:
        teacher = next((a for a in anchors if a.name == ctx.cfg.teacher), anchors[-1])
    for cand in candidates:
        ctx.registry.log_metrics(ctx.run_id, {"val_acc": cand.metrics["val_acc"]}, prefix=f"{cand.name}.")
    return anchors, teacher, candidates
