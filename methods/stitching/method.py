"""The SN-Net method: config, supernet, sampler, the fitted space and the space description.

:class:`Stitching` cuts each anchor with its family's split hook (``families.split(arch, model)``),
builds the supernet, trains it with :func:`podium.methods.train.fit` and returns a
:class:`StitchSpace` whose candidates are standalone, ONNX-exportable modules.
:func:`describe_space` lists the space with FLOPs without training (``podium space show``).
"""
from __future__ import annotations

import copy
import logging
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from podium.methods import families
from podium.methods.base import Anchor, AnchorSpec, Candidate, CandidateSpace, DataShape, LoadWeights, Method
from podium.methods.catalog import register_method
from podium.methods.complexity import count
from podium.methods.data import DataBundle
from podium.methods.families import AnchorParts
from podium.methods.losses import hard_distillation
from podium.methods.pareto import pareto_front
from podium.methods.recipes import RecipeConfig
from podium.methods.stitching.init import init_stitch_layers
from podium.methods.stitching.space import (
    Direction,
    StitchConfig,
    assemble,
    build_stitch_layers,
    enumerate_stitches,
    is_hierarchical,
    probe_shapes,
)
from podium.methods.train import (
    TrainConfig,
    evaluate,
    fit,
    images_per_step,
    make_optimizer,
    pick_device,
    recalibrate_bn,
    scaled_lr,
)

log = logging.getLogger("podium.stitching")


class StitchingConfig(RecipeConfig):
    # ``recipe: paper``: the reference recipes (ziplab/SN-Net), lr per 1024 images (its 8 GPUs x 128).
    # - DeiT (stitching_deit/config/deit_stitching.json, params.py, main.py): AdamW "lr": 5e-5, which
    #   main.py scales DeiT's way, lr * batch_size * world_size / 512, so 1e-4 at 1024 images (5e-5 is
    #   per 512, not per 1024); weight decay 0.05, cosine, 50 epochs, hard distillation from RegNetY-160.
    # - Swin (stitching_swin/configs/snnet/stitch_swin_ti_s_b.yaml, config.py, optimizer.py, main.py):
    #   the same AdamW, 0.05, 50 epochs and distillation; BASE_LR 5e-4 per 512 images scaled by
    #   BASE_LR_SCALE 0.1 for the anchors (1e-4 per 1024 again) and STITCH_LR_SCALE 1.0 for the
    #   stitching layers: 10x the anchors' lr.
    # - ResNet (stitching_resnet_swin/README.md, train.py): timm's train.py, SGD (nesterov, momentum 0.9)
    #   --lr 0.05 taken as given for -b 128 on 8 GPUs, weight decay 2e-5 (its default), cosine, 30 epochs,
    #   hard distillation from RegNetY-160.
    # Not carried: the 5 warm-up epochs (TrainConfig counts warm-up in steps: set train.warmup_steps),
    # the floor lr, label smoothing, mixup/cutmix/RandAugment/random erasing and drop path.
    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"distill": True,
                  "train": {"optimizer": "adamw", "lr": 1e-4, "lr_batch": 1024, "weight_decay": 0.05, "epochs": 50}},
        "paper:swin": {"stitch_lr_scale": 10.0},
        "paper:cnn": {"train": {"optimizer": "sgd", "lr": 0.05, "lr_batch": 1024, "momentum": 0.9,
                                "weight_decay": 2e-5, "epochs": 30}},
    }
    anchors: list[str] = []  # names of the anchors to stitch; empty: every anchor of one family
    window: int = 2  # paired stitching: sliding-window size (blocks)
    stride: int = 1  # paired stitching: window stride
    # stages where stitches may start; None: the reference code's (CNNs: the inner stages, 1-2 of a
    # ResNet; Swin: all but the last; ViTs: every block)
    stages: list[int] | None = None
    front_blocks: list[int] | None = None  # flat front-block indices where stitches may start (None: all)
    direction: Direction = "fast_to_slow"  # slow_to_fast (the paper's ablation): the larger anchor in front
    init: Literal["ls", "he"] = "ls"
    ls_batches: int = 8  # training batches of activations for the least-squares solution
    joint_training: bool = True  # False: evaluate right after initialisation
    sampling: Literal["uniform", "flops_bins"] = "uniform"  # flops_bins: SN-Netv2 resource-constrained
    flops_bins: int = 4
    distill: bool | None = None  # hard distillation from the teacher; None: when the method is given one
    stitch_lr_scale: float = Field(1.0, gt=0)  # the stitching layers' lr over the anchors' (official Swin: 10)
    bn_recalibration_batches: int = 10  # per configuration before evaluation (0: off)
    train: TrainConfig = TrainConfig(epochs=3, lr=1e-3, optimizer="adamw", weight_decay=0.05, warmup_steps=10)


def recipe_kind(parts: AnchorParts) -> Literal["cnn", "swin", "vit"]:
    """The reference recipe that trains these anchors (the ``paper:<kind>`` variant): ``cnn`` (ResNet),
    ``swin`` (hierarchical transformers: the ViT recipe, stitching layers at their own lr) or ``vit``."""
    if parts.kind == "cnn":
        return "cnn"
    return "swin" if is_hierarchical(parts) else "vit"


class StitchSupernet(nn.Module):
    """Every anchor's parts plus every stitching layer: what the optimiser trains."""

    def __init__(self, parts: Sequence[AnchorParts], layers: nn.ModuleDict, configs: Sequence[StitchConfig]):
        super().__init__()
        self.parts = list(parts)
        self.anchors = nn.ModuleList(p.modules_dict() for p in parts)
        self.layers = layers
        self.configs = list(configs)

    def forward_config(self, x: torch.Tensor, config: StitchConfig) -> torch.Tensor:
        return assemble(self.parts, self.layers, config)(x)

    def forward(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.forward_config(x, self.configs[index])


class ConfigSampler:
    """Uniform over configurations, or (SN-Netv2) a uniform FLOPs bin first, then a stitch in it."""

    def __init__(self, flops: Sequence[int], mode: str = "uniform", bins: int = 4, seed: int = 0):
        self.rng = random.Random(seed)
        if mode == "uniform" or len(flops) < 2:
            self.groups = [list(range(len(flops)))]
        else:
            lo, hi = min(flops), max(flops)
            width = (hi - lo) / bins or 1.0
            grouped: dict[int, list[int]] = defaultdict(list)
            for i, f in enumerate(flops):
                grouped[min(bins - 1, int((f - lo) / width))].append(i)
            self.groups = [grouped[b] for b in sorted(grouped)]

    def __call__(self) -> int:
        return self.rng.choice(self.rng.choice(self.groups))


@dataclass
class StitchResult:
    config: StitchConfig
    model: nn.Module  # standalone, eval, CPU
    metrics: dict[str, float] = field(default_factory=dict)


class StitchSpace(CandidateSpace):
    """Every evaluated configuration; each one is a candidate for every device."""

    def __init__(self, results: list[StitchResult], anchor_names: list[str], input_size: tuple[int, int],
                 in_chans: int, settings: dict[str, Any], *, anchor_archs: Sequence[dict[str, Any]] = (),
                 num_classes: int = 0):
        self.results = results
        self.anchor_names = anchor_names
        self.input_size = input_size
        self.in_chans = in_chans
        self.settings = settings
        self.anchor_archs = [dict(a) for a in anchor_archs]  # in anchor order (by FLOPs): what rebuilds the stitches
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.results)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """The Pareto table of every configuration, for the run's records (logged and drawn by the report)."""
        return {"stitching_pareto": pareto_rows(self)}

    def candidates(self, device: Any = None) -> Iterator[Candidate]:
        for r in self.results:
            yield Candidate(name=f"sn-{r.config.name}", method=Stitching.name, config=config_dict(r.config, self.anchor_names,
                                                                                             self.settings),
                            model=r.model, input_size=self.input_size, metrics=dict(r.metrics), in_chans=self.in_chans)

    def to_record(self) -> tuple[dict[str, Any], dict[str, nn.Module]]:
        if len(self.anchor_archs) != len(self.anchor_names) or not all(self.anchor_archs) or not self.num_classes:
            raise ValueError("this stitch space does not know its anchors' architectures: it cannot be saved")
        record = {"anchor_names": self.anchor_names, "anchor_archs": self.anchor_archs, "num_classes": self.num_classes,
                  "input_size": list(self.input_size), "in_chans": self.in_chans, "settings": self.settings,
                  "results": [{"config": asdict(r.config), "metrics": r.metrics} for r in self.results]}
        return record, {f"result{i}": r.model for i, r in enumerate(self.results)}

    @classmethod
    def from_record(cls, record: dict[str, Any], weights: LoadWeights, data: DataBundle) -> StitchSpace:
        """Each stitch assembled, as in :meth:`Stitching.fit`, from anchors built from their architectures."""
        archs, in_chans, size = record["anchor_archs"], record["in_chans"], tuple(record["input_size"])
        parts = [families.split(a, families.build(a, record["num_classes"], in_chans).eval()) for a in archs]
        shapes = [probe_shapes(p, in_chans, size) for p in parts]
        configs = [StitchConfig(**r["config"]) for r in record["results"]]
        layers = build_stitch_layers(parts, shapes, configs)
        results = [StitchResult(c, weights(f"result{i}", assemble(parts, layers, c, standalone=True)), r["metrics"])
                   for i, (c, r) in enumerate(zip(configs, record["results"]))]
        return cls(results, record["anchor_names"], size, in_chans, record["settings"], anchor_archs=archs,
                   num_classes=record["num_classes"])

    def candidate_module(self, name: str, config: dict[str, Any]) -> nn.Module:
        result = next(r for r in self.results if f"sn-{r.config.name}" == name)
        return copy.deepcopy(result.model)


def config_dict(c: StitchConfig, names: Sequence[str], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"front": names[c.front], "front_blocks": c.front_blocks,
                           "end": None if c.is_anchor else names[c.end],
                           "end_start": None if c.is_anchor else c.end_start,
                           "stage": None if c.is_anchor else c.stage, "layer": c.layer, "anchors": list(names)}
    out.update(settings or {})
    return out


def _family_key(anchor: Anchor) -> str:
    family = anchor.arch.get("family", "")
    if family == "timm":
        return f"timm:{type(anchor.model).__name__}"
    return family or type(anchor.model).__name__


def select_anchors(anchors: Sequence[Anchor], wanted: Sequence[str]) -> list[Anchor]:
    """The named anchors, or the largest group of one family when no names are given."""
    if wanted:
        by_name = {a.name: a for a in anchors}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"stitching anchors {missing} not acquired; have {sorted(by_name)}")
        chosen = [by_name[n] for n in wanted]
    else:
        groups: dict[str, list[Anchor]] = defaultdict(list)
        for a in anchors:
            groups[_family_key(a)].append(a)
        chosen = max(groups.values(), key=len) if groups else []
        if len(groups) > 1:
            log.info("stitching the %s family (%d anchors); other families ignored", _family_key(chosen[0]),
                     len(chosen))
    if len(chosen) < 2:
        raise ValueError("stitching needs at least two anchors of one family")
    return chosen


def describe(cfg: StitchingConfig, shape: DataShape, anchors: Sequence[AnchorSpec]) -> list[dict[str, Any]]:
    return describe_space([a.arch for a in anchors], shape.num_classes, shape.channels, shape.image_size, cfg,
                          names=[a.name for a in anchors])


@register_method('stitching', StitchingConfig, describe)
class Stitching(Method):
    name = "stitching"
    space_type = StitchSpace

    def __init__(self, cfg: StitchingConfig | None = None):
        self.cfg = cfg or StitchingConfig()

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> StitchSpace:
        cfg = self.cfg  # the space's fields; the training recipe may depend on the anchors (below)
        spec = data.input_spec
        in_chans, size = spec.channels, spec.size
        device = pick_device()
        chosen = select_anchors(anchors, cfg.anchors)
        # Deep copies: the caller's anchors (shared with other methods) must not be trained here.
        models = [copy.deepcopy(a.model).to(device) for a in chosen]
        flops = [count(m, size, in_chans).flops for m in models]
        order = sorted(range(len(models)), key=lambda i: flops[i])
        models, names = [models[i] for i in order], [chosen[i].name for i in order]
        parts = [families.split(chosen[i].arch, m) for i, m in zip(order, models)]
        if len({p.kind for p in parts}) > 1:
            raise ValueError("stitching anchors must all be CNNs or all ViTs")
        cfg = cfg.variant(recipe_kind(parts[0]))  # recipe: paper trains ResNets, Swins and ViTs differently
        shapes = [probe_shapes(p, in_chans, size) for p in parts]
        configs = enumerate_stitches(parts, names, shapes, cfg.window, cfg.stride, cfg.stages, cfg.front_blocks,
                                     cfg.direction)
        layers = build_stitch_layers(parts, shapes, configs).to(device)
        log.info("stitching %s: %d configurations (%d stitching layers)", " < ".join(names), len(configs), len(layers))
        batch = data.cfg.batch_size  # LS init and BN statistics from fixed training images, the same in every process
        init_stitch_layers(parts, layers, configs, data.eval_loader("train", limit=cfg.ls_batches * batch), cfg.init,
                           cfg.ls_batches)
        supernet = StitchSupernet(parts, layers, configs).to(device)

        if cfg.joint_training:
            self._train(cfg, supernet, data, teacher, in_chans, size)
        results = []
        calibration = data.eval_loader("train", limit=cfg.bn_recalibration_batches * batch)
        val = data.eval_loader("val")
        for c in configs:
            model = assemble(parts, layers, c, standalone=True).to(device)
            if cfg.bn_recalibration_batches:
                recalibrate_bn(model, calibration)
            acc = evaluate(model, val)
            model = model.cpu().eval()
            metrics = {"val_acc": acc, **count(model, size, in_chans).as_dict()}
            log.info("%s: val_acc %.4f flops %d", c.name, acc, metrics["flops"])
            results.append(StitchResult(c, model, metrics))
        settings = {"init": cfg.init, "joint_training": cfg.joint_training, "direction": cfg.direction}
        return StitchSpace(results, names, size, in_chans, settings, anchor_archs=[chosen[i].arch for i in order],
                           num_classes=data.num_classes)

    @staticmethod
    def _train(cfg: StitchingConfig, supernet: StitchSupernet, data: DataBundle, teacher: Anchor | None,
               in_chans: int, size: tuple[int, int]) -> None:
        flops = [count(assemble(supernet.parts, supernet.layers, c), size, in_chans).flops for c in supernet.configs]
        sample = ConfigSampler(flops, cfg.sampling, cfg.flops_bins, cfg.train.seed)
        distill = teacher is not None if cfg.distill is None else cfg.distill
        if distill and teacher is None:
            log.warning("stitching: distill is on but no teacher was given; training on the labels alone")
        teacher_model = None
        if distill and teacher is not None:
            teacher_model = copy.deepcopy(teacher.model).to(next(supernet.parameters()).device).eval()

        def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
            logits = supernet.forward_config(images, supernet.configs[sample()])
            if teacher_model is None:
                return F.cross_entropy(logits, labels)
            with torch.no_grad():
                teacher_logits = teacher_model(images)
            return hard_distillation(logits, teacher_logits, labels)

        fit(supernet, data.train, loss_fn, cfg.train, name="stitching", rngs=[sample.rng],
            optimizer=stitch_lr_optimizer(supernet, data.train, cfg))
        supernet.eval()


def stitch_lr_optimizer(supernet: StitchSupernet, loader: Any, cfg: StitchingConfig) -> torch.optim.Optimizer | None:
    """None (fit builds its own) unless ``cfg.stitch_lr_scale`` gives the stitching layers their own lr:
    then the anchors at the recipe's lr, scaled to the global batch as fit scales it, and the layers
    at ``stitch_lr_scale`` times that."""
    if cfg.stitch_lr_scale == 1.0:
        return None
    lr = scaled_lr(cfg.train, images_per_step(loader, cfg.train))
    optimizer = make_optimizer(supernet.anchors, cfg.train, lr)
    for group in make_optimizer(supernet.layers, cfg.train, lr * cfg.stitch_lr_scale).param_groups:
        optimizer.add_param_group(group)
    return optimizer


# ---------------------------------------------------------------------------------------------
# Space description (no training) and the Pareto table
# ---------------------------------------------------------------------------------------------

def arch_name(arch: dict[str, Any]) -> str:
    """A short readable anchor name from its architecture dict."""
    if arch.get("family") == "timm":
        return str(arch["name"])
    rest = [f"{k[0]}{'.'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in arch.items() if k != "family"]
    return "-".join([str(arch.get("family", "model")), *rest])


def describe_space(anchor_archs: Sequence[dict[str, Any]], num_classes: int, in_chans: int,
                   input_size: tuple[int, int], cfg: StitchingConfig | None = None,
                   names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every configuration of the space for these anchors with its FLOPs/params, without training.

    The anchors are built on the meta device: shapes without weights, so DeiT-B or Swin-B spaces
    are described in seconds and without their memory.
    """
    cfg = cfg or StitchingConfig()
    names = list(names) if names else [arch_name(a) for a in anchor_archs]
    with torch.device("meta"):
        models = [families.build(a, num_classes, in_chans).eval() for a in anchor_archs]
        flops = [count(m, input_size, in_chans).flops for m in models]
        order = sorted(range(len(models)), key=lambda i: flops[i])
        models, names = [models[i] for i in order], [names[i] for i in order]
        parts = [families.split(anchor_archs[i], m) for i, m in zip(order, models)]
        shapes = [probe_shapes(p, in_chans, input_size) for p in parts]
        configs = enumerate_stitches(parts, names, shapes, cfg.window, cfg.stride, cfg.stages, cfg.front_blocks,
                                     cfg.direction)
        layers = build_stitch_layers(parts, shapes, configs)
        rows = []
        for c in configs:
            cx = count(assemble(parts, layers, c), input_size, in_chans)
            rows.append({"name": c.name, "kind": "anchor" if c.is_anchor else "stitch", **config_dict(c, names),
                         "flops": cx.flops, "params": cx.params, "acts": cx.acts})
    return rows


def pareto_rows(space: StitchSpace) -> list[dict[str, Any]]:
    """One row per configuration (sorted by FLOPs) with a ``pareto`` flag (FLOPs vs val_acc)."""
    front = {id(r) for r in pareto_front(space.results, lambda r: r.metrics["flops"], lambda r: r.metrics["val_acc"])}
    rows = []
    for r in sorted(space.results, key=lambda r: r.metrics["flops"]):
        c = r.config
        rows.append({"name": c.name, "kind": "anchor" if c.is_anchor else "stitch",
                     "front": space.anchor_names[c.front], "front_blocks": c.front_blocks,
                     "end": None if c.is_anchor else space.anchor_names[c.end],
                     "end_start": None if c.is_anchor else c.end_start,
                     **{k: r.metrics[k] for k in ("val_acc", "flops", "params", "acts")}, "pareto": id(r) in front})
    return rows
