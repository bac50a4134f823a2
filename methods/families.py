"""Builders for the model families Podium trains or loads, in timm's style: a registry of builders.

An architecture is a plain dict (stored in MLflow tags and release manifests so a model can be
rebuilt): ``{"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}`` builds
a timm ResNet of that shape; ``{"family": "timm", "name": "resnet18"}`` any registered timm model.
"""
from __future__ import annotations

from typing import Any, Callable

import timm
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_family(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return wrap


def build(arch: dict[str, Any], num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    """Build the module an architecture dict describes. ``pretrained`` only applies to timm hub models."""
    arch = dict(arch)
    family = arch.pop("family", None)
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[family](num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **arch)


@register_family("resnet")
def resnet(layers: list[int], channels: list[int], num_classes: int, in_chans: int,
           block: str = "basic", pretrained: bool = False) -> nn.Module:
    """A timm ResNet of any depth/width (small ones train in seconds on CPU)."""
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    return ResNet(block=block_cls, layers=tuple(layers), channels=tuple(channels), stem_width=channels[0],
                  num_classes=num_classes, in_chans=in_chans)


@register_family("timm")
def timm_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Any registered timm model; hub weights are downloaded only when ``pretrained`` is set."""
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
