"""Planning the scaled family (pure: no training): each scale's rounded shape, resolution and complexity."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from podium.methods import families
from podium.methods.complexity import Complexity, count
from podium.methods.scaling.config import ScalingConfig
from podium.methods.scaling.rule import get_strategy, scale_factors, scale_resolution


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
            model = families.build(arch, num_classes=num_classes, in_chans=in_chans)
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
    scaled = families.scale(arch, strategy, s_rule)
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
