"""Model families, timm style: one family per file, registered by a decorator in the defining module.

An architecture is a plain dict (stored in MLflow tags and release manifests so a model can be
rebuilt): ``{"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}`` builds
a timm ResNet of that shape; ``{"family": "timm", "name": "resnet18"}`` any registered timm model.

A family may register two hooks beside its builder, so methods need no ``isinstance``:

- ``split(model) -> AnchorParts``: the built model cut into embed / blocks / head (stitching);
- ``scale(arch, strategy, s) -> arch``: the arch dict scaled by a flops factor (fast scaling).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn

Builder = Callable[..., nn.Module]
Kind = Literal["cnn", "vit"]


@dataclass
class AnchorParts:
    """A model cut at block boundaries; modules are shared with the model, not copied."""

    kind: Kind  # cnn: feature maps (C x H x W); vit: tokens (T x C)
    embed: nn.Module
    blocks: list[nn.Module]
    stages: list[int]  # stage index of each block (ViT: all 0)
    head: nn.Module

    def modules_dict(self) -> nn.ModuleDict:
        return nn.ModuleDict({"embed": self.embed, "blocks": nn.ModuleList(self.blocks), "head": self.head})


Splitter = Callable[[nn.Module], AnchorParts]
Scaler = Callable[[dict[str, Any], str, float], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    name: str
    build: Builder
    split: Splitter | None = None
    scale: Scaler | None = None


FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, split: Splitter | None = None, scale: Scaler | None = None
                    ) -> Callable[[Builder], Builder]:
    """Register the decorated builder as family ``name`` with its optional hooks."""

    def wrap(fn: Builder) -> Builder:
        FAMILIES[name] = Family(name, fn, split, scale)
        return fn

    return wrap


def get_family(name: Any) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def build(arch: dict[str, Any], num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    """Build the module an architecture dict describes. ``pretrained`` only applies to timm hub models."""
    arch = dict(arch)
    family = get_family(arch.pop("family", None))
    return family.build(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **arch)


def split(arch: dict[str, Any], model: nn.Module) -> AnchorParts:
    """``model`` (built from ``arch``) cut into embed / blocks / head by its family's hook."""
    family = get_family(arch.get("family"))
    if family.split is None:
        raise ValueError(f"family {family.name!r} cannot be split into blocks (no split hook)")
    return family.split(model)


def scale(arch: dict[str, Any], strategy: str, s: float) -> dict[str, Any]:
    """``arch`` scaled by the flops factor ``s`` with ``strategy`` by its family's hook."""
    family = get_family(arch.get("family"))
    if family.scale is None:
        scalable = sorted(n for n, f in FAMILIES.items() if f.scale is not None)
        raise ValueError(f"family {family.name!r} cannot be scaled (use {' or '.join(scalable)})")
    return family.scale(copy.deepcopy(arch), strategy, s)


def shell(module: nn.Module, **replace: Any) -> nn.Module:
    """A shallow copy of ``module`` whose submodule/parameter tables are its own.

    Submodules stay shared with ``module`` (so training the shell trains the model), while the
    replacements (e.g. ``blocks=nn.Sequential()``) drop parts the shell must not carry: a deep
    copy of the shell then copies only what it still holds, which keeps exported parts small and
    lets split hooks reuse timm's own ``_pos_embed`` / ``forward_head`` code.
    """
    out = copy.copy(module)
    for key, value in list(out.__dict__.items()):
        if isinstance(value, (dict, set)):
            out.__dict__[key] = copy.copy(value)
    for name, value in replace.items():
        setattr(out, name, value)
    return out


from podium.methods.discovery import import_submodules  # noqa: E402

import_submodules(__name__, __path__)
