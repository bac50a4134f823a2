"""EfficientNet from explicit per-stage block strings (timm's ``EfficientNet``): what scaling produces.

Scale hook (:func:`scale_efficientnet`): the pycls rule (:mod:`podium.methods.scaling.rule`)
applied to depths and widths, and to the stem and head widths too: what pycls's ``scale_model``
does for ``effnet`` at the same ``s``. The group width is 1 (depthwise), so pycls's
``adjust_block_compatibility`` leaves the widths as they are (integer expansion ratios).
"""
from __future__ import annotations

from typing import Any

from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from torch import nn

from podium.methods.families import register_family
from podium.methods.scaling.rule import Strategy, get_strategy, round_depth, round_width, scale_factors


def _keep_channels(channels: int, *_args: Any, **_kwargs: Any) -> int:
    """Channel 'rounding' that keeps the arch dict's widths exactly (they are already rounded)."""
    return channels


def scale_efficientnet(arch: dict[str, Any], strategy: str | Strategy, s: float) -> dict[str, Any]:
    """The arch scaled by ``s``: depths, widths, stem and head widths (resolution is separate)."""
    d, w, _r = scale_factors(get_strategy(strategy), s)
    out = dict(arch)
    out["depths"] = [round_depth(x, d) for x in arch["depths"]]
    # pycls scales EfficientNet's stem and head widths too; group width is 1 (depthwise)
    out["widths"] = [round_width(x, w) for x in arch["widths"]]
    out["stem_width"] = round_width(arch.get("stem_width", 16), w)
    out["head_width"] = round_width(arch.get("head_width", 128), w)
    return out


@register_family("efficientnet_scaled", scale=scale_efficientnet)
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
