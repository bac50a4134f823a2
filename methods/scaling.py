"""Fast compound model scaling (Dollár, Singh, Girshick, "Fast and Accurate Model Scaling", CVPR 2021).

A base network is scaled by a flops factor ``s``. With flops ∝ d·w²·r², a strategy gives each of
depth, width and resolution a *share* of the flops growth; the width share is ``alpha``:

    d = s^((1-α)/2),  w = s^(α/2),  r = s^((1-α)/4)          (for d, w and r all scaled)

so params ∝ s^((1+α)/2) and activations ∝ s^(1-α/2). Uniform compound scaling ``dwr`` is
α = 1/3 (acts ∝ s^(5/6)); *fast* scaling ``dWr`` is α = 0.8 (acts ∝ s^0.6). The paper's point:
runtime follows activations more closely than flops, so ``dWr`` runs faster at equal flops.

Rounding follows pycls ``pycls/models/scaler.py``: per-stage depth ``max(1, round(d·depth))``,
width ``max(1, round(w·width/8))·8``, the group width scaled with the width for fast scaling
(otherwise the number of groups balloons) and snapped (≤2 kept, ≤5 → 4, else a multiple of 8),
then widths made compatible with the group width; resolution ``round(r·res/4)·4``. RegNet's stem
and head are not scaled (EfficientNet's stem and head widths are, as in pycls), so the realised
flops factor differs from ``s`` for small bases; :func:`match_flops_scale` searches the ``s`` fed
to the rule so the realised factor hits the target (on by default, ``ScalingConfig.match_flops``).

Two families are registered with :mod:`methods.families` so a scaled model can be rebuilt from its
arch dict alone: ``regnet_scaled`` (timm's RegNet with explicit per-stage depths/widths/group
widths) and ``efficientnet_scaled`` (timm's EfficientNet from explicit per-stage block strings).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn

from methods.base import Anchor, Candidate, DataBundle, StrictModel
from methods.complexity import Complexity, count
from methods.families import build, register_family
from methods.losses import kd_kl
from methods.train import TrainConfig, evaluate, fit, pick_device, resize

log = logging.getLogger("podium.scaling")

METHOD_NAME = "scaling"

# --------------------------------------------------------------------------------------------
# Strategies: which of depth/width/resolution scale, and the width's share of the flops growth.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A scaling strategy: the scaled dimensions and the width's flop share ``alpha``.

    The flops share not taken by width is split evenly between the other scaled dimensions;
    ``scale_groups`` scales the group width with the width (pycls ``g`` = ``w`` for fast scaling).
    """

    name: str
    dims: str  # subset of "dwr"
    alpha: float  # width share of flops growth (0 when width is not scaled)
    scale_groups: bool = False

    def shares(self) -> dict[str, float]:
        """Flop shares of d, w, r (sum to 1): flops ∝ d·w²·r² = s^(sd)·s^(sw)·s^(sr)."""
        shares = {"d": 0.0, "w": 0.0, "r": 0.0}
        if "w" in self.dims:
            shares["w"] = self.alpha
        others = [k for k in "dr" if k in self.dims]
        rest = 1.0 - shares["w"]
        for k in others:
            shares[k] = rest / len(others)
        return shares

    def exponents(self) -> dict[str, float]:
        """Exponents e with multiplier = s^e for d, w, r and the ideal flops/params/acts growth."""
        sh = self.shares()
        e_d, e_w, e_r = sh["d"], sh["w"] / 2.0, sh["r"] / 2.0
        return {"d": e_d, "w": e_w, "r": e_r, "flops": e_d + 2 * e_w + 2 * e_r,
                "params": e_d + 2 * e_w, "acts": e_d + e_w + 2 * e_r}


STRATEGIES: dict[str, Strategy] = {
    "d": Strategy("d", "d", 0.0),
    "w": Strategy("w", "w", 1.0),
    "r": Strategy("r", "r", 0.0),
    "dw": Strategy("dw", "dw", 0.5),
    "dr": Strategy("dr", "dr", 0.0),
    "wr": Strategy("wr", "wr", 0.5),
    "dwr": Strategy("dwr", "dwr", 1.0 / 3.0),
    "dWr": Strategy("dWr", "dwr", 0.8, scale_groups=True),
}
StrategyName = Literal["d", "w", "r", "dw", "dr", "wr", "dwr", "dWr"]


def get_strategy(strategy: str | Strategy) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown scaling strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy]


def scale_factors(strategy: str | Strategy, s: float) -> tuple[float, float, float]:
    """Depth, width and resolution multipliers (d, w, r) with d·w²·r² = s."""
    if s <= 0:
        raise ValueError(f"scale factor must be positive, got {s}")
    e = get_strategy(strategy).exponents()
    return s ** e["d"], s ** e["w"], s ** e["r"]


# --------------------------------------------------------------------------------------------
# Rounding rules (pycls scaler.py / blocks.py)
# --------------------------------------------------------------------------------------------


def round_depth(depth: int, d: float) -> int:
    """Whole blocks, at least one (Python's round: half to even, as pycls)."""
    return max(1, round(depth * d))


def round_width(width: int, w: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` (8), at least ``divisor``."""
    return max(1, round(width * w / divisor)) * divisor


def round_group_width(group_width: int, g: float) -> int:
    """pycls's snapping of a scaled group width: ≤2 kept, ≤5 → 4, else a multiple of 8."""
    g_new = max(1, round(group_width * g))
    return g_new if g_new <= 2 else 4 if g_new <= 5 else round(g_new / 8) * 8


def adjust_block_compatibility(widths: Sequence[int], bottle_ratios: Sequence[float],
                               group_widths: Sequence[int]) -> tuple[list[int], list[float], list[int]]:
    """Make each bottleneck width ``w·b`` a multiple of its group width (pycls blocks.py)."""
    vs = [int(max(1, w * b)) for w, b in zip(widths, bottle_ratios)]
    gs = [int(min(g, v)) for g, v in zip(group_widths, vs)]
    ms = [math.lcm(g, int(b)) if b > 1 else g for g, b in zip(gs, bottle_ratios)]
    vs = [max(m, int(round(v / m) * m)) for v, m in zip(vs, ms)]
    ws = [int(v / b) for v, b in zip(vs, bottle_ratios)]
    assert all(int(w * b) % g == 0 for w, b, g in zip(ws, bottle_ratios, gs))
    return ws, list(bottle_ratios), gs


def scale_resolution(resolution: int, r: float, divisor: int = 4) -> int:
    """pycls: ``round(r·res/4)·4``; ``divisor`` is a base setting (small bases use 2, see RegNetBase)."""
    return max(divisor, round(resolution * r / divisor) * divisor)


# --------------------------------------------------------------------------------------------
# Families: arch dicts that fully describe a model, built with timm
# --------------------------------------------------------------------------------------------


@dataclass
class _StageRegNetCfg(RegNetCfg):
    """RegNetCfg with explicit per-stage shapes instead of the (w0, wa, wm, depth) generator."""

    stage_depths: tuple[int, ...] = ()
    stage_widths: tuple[int, ...] = ()
    stage_group_widths: tuple[int, ...] = ()
    stage_strides: tuple[int, ...] = (2, 2, 2, 2)


class StageRegNet(RegNet):
    """timm RegNet whose stages come from explicit lists (what scaling produces)."""

    def _get_stage_args(self, cfg, default_stride: int = 2, output_stride: int = 32,
                        drop_path_rate: float = 0.0):
        n = len(cfg.stage_depths)
        common = dict(downsample=cfg.downsample, se_ratio=cfg.se_ratio, linear_out=cfg.linear_out,
                      act_layer=cfg.act_layer, norm_layer=cfg.norm_layer)
        per_stage = [
            dict(out_chs=cfg.stage_widths[i], stride=cfg.stage_strides[i], dilation=1, depth=cfg.stage_depths[i],
                 bottle_ratio=cfg.bottle_ratio, group_size=cfg.stage_group_widths[i],
                 drop_path_rates=[0.0] * cfg.stage_depths[i])
            for i in range(n)
        ]
        return per_stage, common


@register_family("regnet_scaled")
def regnet_scaled(depths: list[int], widths: list[int], group_widths: list[int], num_classes: int, in_chans: int,
                  stem_width: int = 16, strides: list[int] = (2, 2, 2, 2), bottle_ratio: float = 1.0,
                  se_ratio: float = 0.0, pretrained: bool = False) -> nn.Module:
    """A RegNetX/Y (se_ratio>0) of explicit per-stage depths, widths and group widths (4 stages)."""
    if not (len(depths) == len(widths) == len(group_widths) == len(strides) == 4):
        raise ValueError("regnet_scaled needs 4 stages of depths, widths, group_widths and strides")
    for w, g in zip(widths, group_widths):
        if int(round(w * bottle_ratio)) % g:
            raise ValueError(f"bottleneck width {w}*{bottle_ratio} is not a multiple of group width {g}")
    cfg = _StageRegNetCfg(stem_width=stem_width, bottle_ratio=bottle_ratio, se_ratio=se_ratio,
                          stage_depths=tuple(depths), stage_widths=tuple(widths),
                          stage_group_widths=tuple(group_widths), stage_strides=tuple(strides))
    return StageRegNet(cfg, in_chans=in_chans, num_classes=num_classes)


def _keep_channels(channels: int, *_args: Any, **_kwargs: Any) -> int:
    """Channel 'rounding' that keeps the arch dict's widths exactly (they are already rounded)."""
    return channels


@register_family("efficientnet_scaled")
def efficientnet_scaled(depths: list[int], widths: list[int], kernels: list[int], strides: list[int],
                        expand_ratios: list[int], num_classes: int, in_chans: int, stem_width: int = 16,
                        head_width: int = 128, se_ratio: float = 0.25, pretrained: bool = False) -> nn.Module:
    """A timm EfficientNet (SiLU, SE) from explicit per-stage depths/widths/kernels/strides/expansions.

    Stage 0 uses a depthwise-separable block when its expansion is 1 (as EfficientNet-B0).
    """
    n = len(depths)
    if not (len(widths) == len(kernels) == len(strides) == len(expand_ratios) == n):
        raise ValueError("efficientnet_scaled needs equally long depths/widths/kernels/strides/expand_ratios")
    se = f"_se{se_ratio:g}" if se_ratio else ""
    arch_def = []
    for i in range(n):
        kind = "ds" if i == 0 and expand_ratios[i] == 1 else "ir"
        expand = "" if kind == "ds" else f"_e{expand_ratios[i]}"
        arch_def.append([f"{kind}_r{depths[i]}_k{kernels[i]}_s{strides[i]}{expand}_c{widths[i]}{se}"])
    return EfficientNet(block_args=decode_arch_def(arch_def, 1.0), num_classes=num_classes, in_chans=in_chans,
                        num_features=head_width, stem_size=stem_width, fix_stem=True, round_chs_fn=_keep_channels,
                        act_layer=nn.SiLU)


def scale_arch(arch: dict[str, Any], strategy: str | Strategy, s: float) -> dict[str, Any]:
    """The arch dict of the base scaled by ``s`` (depth and width; resolution is separate)."""
    strat = get_strategy(strategy)
    d, w, _r = scale_factors(strat, s)
    family = arch["family"]
    out = copy.deepcopy(arch)
    out["depths"] = [round_depth(x, d) for x in arch["depths"]]
    if family == "regnet_scaled":
        widths = [round_width(x, w) for x in arch["widths"]]
        g_mult = w if strat.scale_groups else 1.0
        groups = [round_group_width(g, g_mult) for g in arch["group_widths"]]
        bottle = [float(arch.get("bottle_ratio", 1.0))] * len(widths)
        widths, _b, groups = adjust_block_compatibility(widths, bottle, groups)
        out["widths"], out["group_widths"] = widths, groups
    elif family == "efficientnet_scaled":
        # pycls scales EfficientNet's stem and head widths too; group width is 1 (depthwise)
        out["widths"] = [round_width(x, w) for x in arch["widths"]]
        out["stem_width"] = round_width(arch.get("stem_width", 16), w)
        out["head_width"] = round_width(arch.get("head_width", 128), w)
    else:
        raise ValueError(f"family {family!r} cannot be scaled (use regnet_scaled or efficientnet_scaled)")
    return out


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class RegNetBase(StrictModel):
    """A small RegNetX for 1-channel 32x32 digits: stem 16, stages at 16/8/4/2 px."""

    depths: list[int] = [1, 1, 2, 2]
    widths: list[int] = [24, 48, 96, 192]
    group_widths: list[int] = [8, 8, 8, 8]
    strides: list[int] = [1, 2, 2, 2]
    stem_width: int = 16
    bottle_ratio: float = 1.0
    se_ratio: float = 0.0
    resolution: int = 32
    # pycls rounds resolution to multiples of 4: ~2% steps at 224 px but 12.5% (27% in flops) at
    # 32 px, too coarse to hit a flops target, so the small digits bases round to multiples of 2.
    resolution_divisor: int = Field(2, ge=1)

    def arch(self) -> dict[str, Any]:
        return {"family": "regnet_scaled", **self.model_dump(exclude={"resolution", "resolution_divisor"})}


class EfficientNetBase(StrictModel):
    """A small EfficientNet for 1-channel 32x32 digits (B0-like stages, fewer and narrower)."""

    depths: list[int] = [1, 1, 1, 2]
    widths: list[int] = [16, 24, 40, 64]
    kernels: list[int] = [3, 3, 5, 3]
    strides: list[int] = [1, 2, 2, 2]
    expand_ratios: list[int] = [1, 4, 4, 4]
    stem_width: int = 16
    head_width: int = 128
    se_ratio: float = 0.25
    resolution: int = 32
    resolution_divisor: int = Field(2, ge=1)  # see RegNetBase

    def arch(self) -> dict[str, Any]:
        return {"family": "efficientnet_scaled", **self.model_dump(exclude={"resolution", "resolution_divisor"})}


_BASES: dict[str, type[StrictModel]] = {"regnet": RegNetBase, "efficientnet": EfficientNetBase}


class ScalingConfig(StrictModel):
    family: Literal["regnet", "efficientnet"] = "regnet"
    base: RegNetBase | EfficientNetBase | None = None  # None: the family's small default base
    scales: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    strategy: StrategyName = "dWr"
    match_flops: bool = True  # search the rule's s so the *realised* flops factor hits each scale
    flops_tolerance: float = Field(0.05, gt=0, lt=1)  # accept the first shape within this relative error
    distill: bool = False  # KD from the teacher anchor (or, without one, from the largest scaled model)
    kd_temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)
    train: TrainConfig = TrainConfig(epochs=6.0, max_steps=120, lr=0.2, warmup_steps=10)  # 0.05: 76% val, 0.2: 97% (digits, s=1)

    @model_validator(mode="before")
    @classmethod
    def _base_for_family(cls, data: Any) -> Any:
        """Parse ``base`` with the family's base model (a RegNet base has no kernels, etc.)."""
        if isinstance(data, dict):
            family = data.get("family", "regnet")
            base = data.get("base")
            if isinstance(base, dict) and family in _BASES:
                data = {**data, "base": _BASES[family](**base)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ScalingConfig":
        if self.base is not None and not isinstance(self.base, _BASES[self.family]):
            raise ValueError(f"base {type(self.base).__name__} does not match family {self.family!r}")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        return self

    def resolved_base(self) -> RegNetBase | EfficientNetBase:
        return self.base if self.base is not None else _BASES[self.family]()


# --------------------------------------------------------------------------------------------
# Planning the scaled family (pure: no training)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledModel:
    """One member of the scaled family: requested factor, the factor fed to the rule, the shape."""

    strategy: str
    s: float  # requested flops factor
    s_rule: float  # factor given to the scaling rule (differs from s when flops are matched)
    d: float
    w: float
    r: float
    arch: dict[str, Any]
    resolution: int
    complexity: Complexity
    flops_factor: float  # realised flops / base flops

    @property
    def name(self) -> str:
        return f"{self.arch['family'].replace('_scaled', '')}-{self.strategy}-s{self.s:g}"


_SHAPE_CACHE: dict[str, Complexity] = {}


def shape_complexity(arch: dict[str, Any], resolution: int, num_classes: int = 10, in_chans: int = 1) -> Complexity:
    """The counter's figures for an arch, built on the meta device: shapes only, no compute.

    Exactly the figures of the real module (same hooks, same shapes) without allocating or
    running it: planning counts dozens of shapes, and a CPU forward of a new shape pays
    one-off kernel setup (seconds for depthwise/grouped convs). Memoised per shape.
    """
    key = repr((sorted(arch.items()), resolution, num_classes, in_chans))
    if key not in _SHAPE_CACHE:
        with torch.device("meta"):
            model = build(arch, num_classes=num_classes, in_chans=in_chans)
        _SHAPE_CACHE[key] = count(model, (resolution, resolution), in_chans)
    return _SHAPE_CACHE[key]


def realise_scale(arch: dict[str, Any], resolution: int, strategy: str, s_rule: float, num_classes: int = 10,
                  in_chans: int = 1, resolution_divisor: int = 4,
                  resolution_steps: int = 0) -> tuple[dict[str, Any], int, Complexity]:
    """Apply the rule for ``s_rule``: the rounded arch, the rounded resolution and their complexity.

    ``resolution_steps`` moves the rounded resolution by that many ``resolution_divisor`` steps
    (used only by the flops search, see :func:`match_flops_scale`).
    """
    _d, _w, r = scale_factors(strategy, s_rule)
    scaled = scale_arch(arch, strategy, s_rule)
    res = scale_resolution(resolution, r, resolution_divisor) + resolution_steps * resolution_divisor
    res = max(resolution_divisor, res)
    return scaled, res, shape_complexity(scaled, res, num_classes, in_chans)


def match_flops_scale(arch: dict[str, Any], resolution: int, strategy: str, target: float, base_flops: int,
                      num_classes: int = 10, in_chans: int = 1, resolution_divisor: int = 4,
                      tolerance: float = 0.05, grid: int = 25, span: float = 2.0,
                      ) -> tuple[float, dict[str, Any], int, Complexity]:
    """Find the rule's ``s`` whose *rounded* model realises ``target`` x the base flops.

    Why: the unscaled stem/head and the rounding of depth (whole blocks), width (multiples of 8)
    and resolution make the realised factor differ from ``s``, by tens of percent for tiny bases.
    Realised flops are a step function of ``s`` (a fixed-point iteration stalls on a step), so:
    try ``s = target``; if it misses by more than ``tolerance``, visit a geometric grid of ``s``
    over ``[target/span, target·span]`` nearest-to-target first, and for each allow the
    resolution one rounding step either side of the rule's (resolution is the finest knob: depth
    moves in whole blocks and width in multiples of 8). The first shape within ``tolerance``
    wins, so ``s`` stays as close to the target as the rounding allows; otherwise the closest
    shape overall (ties: the rule's own resolution, then the ``s`` nearest the target).
    """

    def score(s_rule: float, steps: int) -> tuple[float, int, float]:
        _a, _r, cx = realise_scale(arch, resolution, strategy, s_rule, num_classes, in_chans, resolution_divisor,
                                   steps)
        return abs(cx.flops / base_flops / target - 1.0), abs(steps), abs(math.log(s_rule / target))

    best_args, best = (target, 0), score(target, 0)
    grid_s = sorted((target * span ** (2.0 * i / (grid - 1) - 1.0) for i in range(grid)),
                    key=lambda s: abs(math.log(s / target)))
    res_steps = (0, -1, 1) if "r" in get_strategy(strategy).dims else (0,)
    for s_rule in grid_s:
        if best[0] <= tolerance:
            break
        for steps in res_steps:
            current = score(s_rule, steps)
            if current < best:
                best_args, best = (s_rule, steps), current
    s_rule, steps = best_args
    scaled, res, cx = realise_scale(arch, resolution, strategy, s_rule, num_classes, in_chans, resolution_divisor,
                                    steps)
    return s_rule, scaled, res, cx


def plan_scales(cfg: ScalingConfig, num_classes: int = 10, in_chans: int = 1) -> list[ScaledModel]:
    """Every scaled model of ``cfg`` (shape, resolution, complexity), built on meta, not trained."""
    base = cfg.resolved_base()
    arch, resolution, divisor = base.arch(), base.resolution, base.resolution_divisor
    base_cx = shape_complexity(arch, resolution, num_classes, in_chans)
    plans = []
    for s in cfg.scales:
        if cfg.match_flops and s != 1:
            s_rule, scaled, res, cx = match_flops_scale(arch, resolution, cfg.strategy, s, base_cx.flops, num_classes,
                                                        in_chans, divisor, cfg.flops_tolerance)
        else:
            s_rule = float(s)
            scaled, res, cx = realise_scale(arch, resolution, cfg.strategy, s_rule, num_classes, in_chans, divisor)
        d, w, r = scale_factors(cfg.strategy, s_rule)
        plans.append(ScaledModel(strategy=cfg.strategy, s=float(s), s_rule=float(s_rule), d=d, w=w, r=r,
                                 arch=scaled, resolution=res, complexity=cx, flops_factor=cx.flops / base_cx.flops))
    return plans


def describe_scales(cfg: ScalingConfig, num_classes: int = 10, in_chans: int = 1) -> list[dict[str, Any]]:
    """A row per scaled model (d/w/r, resolution, flops, params, acts) without training, for the CLI."""
    return [{"name": p.name, "strategy": p.strategy, "s": p.s, "s_rule": round(p.s_rule, 4),
             "d": round(p.d, 4), "w": round(p.w, 4), "r": round(p.r, 4), "resolution": p.resolution,
             "depths": p.arch["depths"], "widths": p.arch["widths"], "flops": p.complexity.flops,
             "params": p.complexity.params, "acts": p.complexity.acts, "flops_factor": round(p.flops_factor, 4)}
            for p in plan_scales(cfg, num_classes, in_chans)]


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class _Trained:
    plan: ScaledModel
    model: nn.Module
    val_acc: float
    complexity: Complexity


@dataclass
class ScalingSpace:
    """The trained scaled family; every member is a candidate on every device."""

    family: str
    members: list[_Trained] = field(default_factory=list)

    def candidates(self, device: Any = None) -> Iterator[Candidate]:
        for m in self.members:
            cx = m.complexity
            yield Candidate(
                name=f"scaling-{m.plan.name}",
                method=METHOD_NAME,
                config={"strategy": m.plan.strategy, "s": m.plan.s, "arch": copy.deepcopy(m.plan.arch),
                        "resolution": m.plan.resolution},
                model=m.model,
                input_size=(m.plan.resolution, m.plan.resolution),
                metrics={"val_acc": m.val_acc, "flops": float(cx.flops), "params": float(cx.params),
                         "acts": float(cx.acts), "flops_factor": m.plan.flops_factor, "s_rule": m.plan.s_rule},
            )


class Scaling:
    """Train every member of a scaled family (base × scales × strategy) and offer each as a candidate."""

    name = METHOD_NAME

    def __init__(self, cfg: ScalingConfig):
        self.cfg = cfg

    def _loss_fn(self, model: nn.Module, size: tuple[int, int], teacher: nn.Module | None):
        cfg = self.cfg

        def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
            logits = model(resize(images, size))
            loss = F.cross_entropy(logits, labels)
            if teacher is None:
                return loss
            with torch.no_grad():
                teacher_logits = teacher(images)  # the teacher runs at the data's own resolution
            return (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_kl(logits, teacher_logits, cfg.kd_temperature)

        return loss_fn

    def _train_one(self, plan: ScaledModel, data: DataBundle, teacher: nn.Module | None,
                   device: torch.device) -> _Trained:
        torch.manual_seed(self.cfg.train.seed)
        model = build(plan.arch, num_classes=data.num_classes, in_chans=data.input_spec.channels).to(device)
        size = (plan.resolution, plan.resolution)
        fit(model, data.train, self._loss_fn(model, size, teacher), self.cfg.train, name=plan.name)
        model = model.cpu().eval()
        val_acc = evaluate(model, data.val, input_size=size)
        cx = count(model, size, data.input_spec.channels)
        log.info("%s: res %d depths %s widths %s flops %.2fM (x%.2f) params %.3fM acts %.3fM val_acc %.4f",
                 plan.name, plan.resolution, plan.arch["depths"], plan.arch["widths"], cx.flops / 1e6,
                 plan.flops_factor, cx.params / 1e6, cx.acts / 1e6, val_acc)
        return _Trained(plan=plan, model=model, val_acc=val_acc, complexity=cx)

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> ScalingSpace:
        """Plan the family, then train each member; ``anchors`` are not used (scaling starts from scratch)."""
        cfg = self.cfg
        in_chans = data.input_spec.channels
        plans = plan_scales(cfg, num_classes=data.num_classes, in_chans=in_chans)
        device = pick_device()
        teacher_model: nn.Module | None = None
        order = list(range(len(plans)))
        trained: dict[int, _Trained] = {}
        if cfg.distill:
            if teacher is not None:
                teacher_model = teacher.model.to(device).eval()
            else:
                # No teacher given: train the largest member first and distil the others from it.
                largest = max(order, key=lambda i: plans[i].complexity.flops)
                trained[largest] = self._train_one(plans[largest], data, None, device)
                teacher_model = copy.deepcopy(trained[largest].model).to(device).eval()
                big_size = (plans[largest].resolution,) * 2
                inner = teacher_model
                teacher_model = _Resized(inner, big_size)
        for i in order:
            if i not in trained:
                trained[i] = self._train_one(plans[i], data, teacher_model, device)
        return ScalingSpace(family=cfg.family, members=[trained[i] for i in order])


class _Resized(nn.Module):
    """Runs a model at its own resolution whatever the input size (a scaled teacher)."""

    def __init__(self, model: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize(x, self.size))


# --------------------------------------------------------------------------------------------
# Runtime correlation: the paper's central analysis, per device
# --------------------------------------------------------------------------------------------

METRICS = ("flops", "params", "acts")


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when undefined (fewer than 2 points or a constant series)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) < 2 or xa.std() == 0 or ya.std() == 0:
        return float("nan")
    return float(np.corrcoef(xa, ya)[0, 1])


def runtime_correlation(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pearson r of measured latency (``p50_ms``) vs flops, params and acts over the records.

    ``records``: ``{name, flops, params, acts, p50_ms}`` per model. Returns
    ``{"r_flops", "r_params", "r_acts", "n", "best"}`` (best: the metric with the highest r).
    """
    latency = [float(r["p50_ms"]) for r in records]
    out: dict[str, Any] = {f"r_{m}": pearson_r([float(r[m]) for r in records], latency) for m in METRICS}
    out["n"] = len(records)
    finite = {m: out[f"r_{m}"] for m in METRICS if not math.isnan(out[f"r_{m}"])}
    out["best"] = max(finite, key=finite.get) if finite else None
    return out


def plot_runtime_correlation(records: Sequence[dict[str, Any]], path: str | Path, device_name: str) -> Path:
    """Three scatter panels (latency vs flops/params/acts) with Pearson r in the titles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = runtime_correlation(records)
    latency = [float(r["p50_ms"]) for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, metric in zip(axes, METRICS):
        xs = [float(r[metric]) / 1e6 for r in records]
        ax.scatter(xs, latency)
        for x, y, r in zip(xs, latency, records):
            ax.annotate(str(r.get("name", "")), (x, y), fontsize=6, alpha=0.7)
        ax.set_xlabel(f"{metric} (M)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{metric}: r = {corr[f'r_{metric}']:.3f}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency vs complexity on {device_name} (n={corr['n']})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
