"""The elastic supernet, its standalone sub-networks and the extraction of one from the other."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from podium.methods.shrinking.blocks import ElasticMBConv, MBConv, conv_out
from podium.methods.shrinking.config import ShrinkingConfig
from podium.methods.shrinking.space import Arch, OpenSpace, _as_arch


def _stem(cfg: ShrinkingConfig, in_chans: int) -> nn.Sequential:
    """Stem conv 3x3 (h-swish) + the fixed expand-1 first block."""
    return nn.Sequential(
        nn.Conv2d(in_chans, cfg.stem_width, 3, cfg.stem_stride, 1, bias=False), nn.BatchNorm2d(cfg.stem_width),
        nn.Hardswish(),
        MBConv(cfg.stem_width, cfg.first_block_width, cfg.stem_width, 3, 1, "relu", 0, expand=False))


def _head(cfg: ShrinkingConfig, in_ch: int, num_classes: int) -> nn.Sequential:
    """1x1 expand + BN + h-swish, global pool, 1x1 feature mix + h-swish, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_ch, cfg.head_width, 1, bias=False), nn.BatchNorm2d(cfg.head_width), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(cfg.head_width, cfg.feature_width, 1, bias=False), nn.Hardswish(),
        nn.Flatten(1), nn.Linear(cfg.feature_width, num_classes))


class OFASubnet(nn.Module):
    """A standalone sub-network: stem, static blocks, head. No elastic machinery."""

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class OFASupernet(nn.Module):
    """Elastic MobileNetV3-style supernet. ``set_active(arch)`` picks the sub-network ``forward`` runs."""

    def __init__(self, cfg: ShrinkingConfig, in_chans: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        self.cfg, self.in_chans, self.num_classes = cfg, in_chans, num_classes
        self.stem = _stem(cfg, in_chans)
        units = []
        in_ch = cfg.first_block_width
        for width, stride, se, act in zip(cfg.unit_widths, cfg.unit_strides, cfg.unit_se, cfg.unit_acts):
            blocks = []
            for i in range(cfg.max_depth):
                blocks.append(ElasticMBConv(in_ch, width, stride if i == 0 else 1, act, se,
                                            cfg.kernel_choices, cfg.expand_choices))
                in_ch = width
            units.append(nn.ModuleList(blocks))
        self.units = nn.ModuleList(units)
        self.head = _head(cfg, in_ch, num_classes)
        self.active = OpenSpace.full(cfg).uniform(len(units), "max")

    def set_active(self, arch: Arch | dict[str, Any]) -> None:
        self.active = _as_arch(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.active
        x = self.stem(x)
        for unit, depth, kernels, expands in zip(self.units, arch.depths, arch.kernels, arch.expands):
            for block, k, e in zip(unit[:depth], kernels, expands):
                x = block(x, k, e)
        return self.head(x)

    def sort_channels(self, keep_in_front: Sequence[float] = ()) -> None:
        """Sort every block's hidden channels; the channel sets of the expand ratios in
        ``keep_in_front`` (those earlier width phases trained) stay in front."""
        for unit in self.units:
            for block in unit:
                block.sort_channels(keep_in_front)

    def layer_specs(self, arch: Arch | dict[str, Any]) -> list[tuple]:
        """Latency lookup keys of the layers ``arch`` runs: (kind, shapes..., input resolution)."""
        arch = _as_arch(arch)
        size = arch.resolution
        specs: list[tuple] = [("stem", self.in_chans, self.cfg.stem_width, self.cfg.first_block_width,
                               self.cfg.stem_stride, size)]
        size = conv_out(size, self.cfg.stem_stride)
        for unit, depth, kernels, expands in zip(self.units, arch.depths, arch.kernels, arch.expands):
            for block, k, e in zip(unit[:depth], kernels, expands):
                specs.append(block.spec(k, e) + (size,))
                size = conv_out(size, block.stride)
        specs.append(("head", self.cfg.unit_widths[-1], self.cfg.head_width, self.cfg.feature_width,
                      self.num_classes, size))
        return specs

    def all_layer_specs(self, space: OpenSpace) -> set[tuple]:
        """Every lookup key a sub-network of ``space`` can run (:meth:`layer_specs` of any arch in it is a
        subset): each block with every kernel and expand ratio, at every input size it can be entered with."""
        cfg = self.cfg
        specs: set[tuple] = set()
        for resolution in space.resolutions:
            specs.add(("stem", self.in_chans, cfg.stem_width, cfg.first_block_width, cfg.stem_stride, resolution))
            sizes = {conv_out(resolution, cfg.stem_stride)}
            for unit in self.units:
                after: set[int] = set()
                for depth in space.depths:
                    for size in sizes:
                        for block in unit[:depth]:
                            specs.update(block.spec(k, e) + (size,) for k in space.kernels for e in space.expands)
                            size = conv_out(size, block.stride)
                        after.add(size)
                sizes = after
            specs.update(("head", cfg.unit_widths[-1], cfg.head_width, cfg.feature_width, self.num_classes, size)
                         for size in sizes)
        return specs


@torch.no_grad()
def extract_subnet(supernet: OFASupernet, arch: Arch | dict[str, Any]) -> OFASubnet:
    """Standalone static copy of ``arch`` (transformed kernels, sorted and truncated channels,
    the supernet's BN statistics for those channels). Same outputs as the supernet set to ``arch``."""
    arch = _as_arch(arch)
    blocks = [block.extract(k, e)
              for unit, depth, kernels, expands in zip(supernet.units, arch.depths, arch.kernels, arch.expands)
              for block, k, e in zip(unit[:depth], kernels, expands)]
    subnet = OFASubnet(copy.deepcopy(supernet.stem), blocks, copy.deepcopy(supernet.head))
    return subnet.train(supernet.training)
