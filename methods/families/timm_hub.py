"""Any registered timm model by name; hub weights are downloaded only when ``pretrained`` is set.

Split hook (:func:`split_timm`): timm ResNets, VisionTransformers and SwinTransformers, by the built
model's class.
"""
from __future__ import annotations

from typing import Any

import timm
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from podium.methods.families import AnchorParts, register_family
from podium.methods.families.resnet import split_resnet
from podium.methods.families.swin import split_swin
from podium.methods.families.vit import split_vit


def split_timm(model: nn.Module) -> AnchorParts:
    """Embed / blocks / head of a timm ResNet, VisionTransformer or SwinTransformer (whatever hub name built it)."""
    if isinstance(model, ResNet):
        return split_resnet(model)
    if isinstance(model, VisionTransformer):
        return split_vit(model)
    if isinstance(model, SwinTransformer):
        return split_swin(model)
    raise TypeError(f"stitching supports timm ResNet, VisionTransformer and SwinTransformer anchors, not "
                    f"{type(model).__name__}")


@register_family("timm", split=split_timm)
def timm_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def pretrained_stats(name: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The mean/std a hub model's pretrained weights expect (timm's ``pretrained_cfg``; no download)."""
    cfg = timm.models.get_pretrained_cfg(name)
    return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (None, None)
