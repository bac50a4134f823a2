"""RegNet of explicit per-stage depths, widths and group widths (timm's ``RegNet``): what scaling produces.

Scale hook (:func:`scale_regnet`): the pycls rule (:mod:`podium.methods.scaling.rule`) applied to
depths, widths and group widths, as pycls's ``scale_model`` does for an AnyNet/RegNet at the same
``s``; the stem and head are not scaled (as in pycls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.models.regnet import RegNet, RegNetCfg
from torch import nn

from podium.methods.families import register_family
from podium.methods.scaling.rule import (
    Strategy,
    adjust_block_compatibility,
    get_strategy,
    round_depth,
    round_group_width,
    round_width,
    scale_factors,
)


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


def scale_regnet(arch: dict[str, Any], strategy: str | Strategy, s: float) -> dict[str, Any]:
    """The arch scaled by ``s``: depths and widths, group widths too for fast scaling (resolution is separate)."""
    strat = get_strategy(strategy)
    d, w, _r = scale_factors(strat, s)
    out = dict(arch)
    out["depths"] = [round_depth(x, d) for x in arch["depths"]]
    widths = [round_width(x, w) for x in arch["widths"]]
    g_mult = w if strat.scale_groups else 1.0
    groups = [round_group_width(g, g_mult) for g in arch["group_widths"]]
    bottle = [float(arch.get("bottle_ratio", 1.0))] * len(widths)
    widths, _b, groups = adjust_block_compatibility(widths, bottle, groups)
    out["widths"], out["group_widths"] = widths, groups
    return out


@register_family("regnet_scaled", scale=scale_regnet)
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
