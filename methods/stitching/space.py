"""The stitch space: paired/unpaired rules, configurations, stitching layers and stitched networks.

Anchors arrive already cut into embed / blocks / head (:class:`~podium.methods.families.AnchorParts`,
by their family's split hook) and sorted small -> large.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from podium.methods.families import AnchorParts, Kind


@torch.no_grad()
def probe_shapes(parts: AnchorParts, in_chans: int, input_size: tuple[int, int]) -> list[tuple[int, ...]]:
    """Per-sample shapes ``[embed_out, block0_out, ...]`` at batch 1 (channels first for maps)."""
    device = next(parts.embed.parameters()).device
    modules = [parts.embed, *parts.blocks]
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    x = parts.embed(torch.zeros(1, in_chans, *input_size, device=device))
    shapes = [tuple(x.shape[1:])]
    for block in parts.blocks:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    for m, w in zip(modules, was):
        m.train(w)
    return shapes


def paired_stitching(depth: int, window: int = 2, stride: int = 1, rewind: bool = True
                     ) -> list[tuple[int, int, int]]:
    """Stitches between anchors of equal depth: ``(front_block, end_block, layer_id)``.

    A window of ``window`` blocks slides with ``stride``; every (j, k) pair inside a window is a
    stitch (front runs blocks 0..j, end runs k..), and each window that adds a new pair gets one
    stitching layer shared by its pairs. ``rewind=False`` leaves out the pairs with k <= j (the end
    anchor would re-run depth the front already covered), as the reference CNN and Swin code does
    (``if k == 0: continue; if j >= k: continue``); its DeiT code keeps them. depth=12, window=2,
    stride=1: 34 stitches on 11 layers with rewinds, 11 on 11 without.
    """
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    layer_id, start = 0, 0
    while start < depth:
        ids = range(start, min(start + window, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen and (rewind or j < k)]
        for pair in new:
            seen.add(pair)
            out.append((*pair, layer_id))
        if new:
            layer_id += 1
        start += stride
    return out


def unpaired_stitching(front_depth: int, end_depth: int) -> list[tuple[int, int, int]]:
    """Stitches between anchors of unequal depth: ``(front_block, end_block, layer_id)``.

    End block i maps to front block floor(i * d_front / d_end) (the reference code's nearest
    interpolation); a stitch runs front blocks 0..idx and end blocks i.. for every end block
    i > idx mapped to idx (never i = 0). One stitching layer per front block. ResNet-18/50
    stages 1-2: 3 + 5 stitches (10 configurations with the anchors).
    """
    out = []
    for i in range(1, end_depth):
        idx = (i * front_depth) // end_depth
        if idx < i:
            out.append((idx, i, idx))
    return out


Direction = Literal["fast_to_slow", "slow_to_fast"]


@dataclass(frozen=True)
class StitchConfig:
    """One configuration: an anchor (``end is None``) or front[:front_blocks] -> layer -> end[end_start:]."""

    name: str
    front: int  # anchor index (sorted small -> large)
    front_blocks: int  # number of front blocks run (0..front_blocks-1)
    end: int | None = None
    end_start: int = 0
    stage: int = 0
    layer: str | None = None  # key of the stitching layer

    @property
    def is_anchor(self) -> bool:
        return self.end is None


def is_hierarchical(parts: AnchorParts) -> bool:
    """Stages of growing stride (ResNet, Swin), not one plain stack of blocks (ViT)."""
    return len(set(parts.stages)) > 1


def official_stages(parts: AnchorParts) -> list[int]:
    """The stages the reference code stitches in: every block of a plain ViT; all stages but the
    last of a hierarchical transformer (Swin: ``if i == 3: continue``); a CNN's inner stages only
    (ResNet: ``if i in [0, 3]: continue``)."""
    stages = sorted(set(parts.stages))
    if len(stages) == 1:
        return stages
    return stages[1:-1] if parts.kind == "cnn" else stages[:-1]


def _same_grid(kind: Kind, front_out: tuple[int, ...], end_in: tuple[int, ...]) -> bool:
    """Same H x W (feature maps C x H x W) or the same tokens (T x C, or Swin's H x W x C)."""
    return front_out[1:] == end_in[1:] if kind == "cnn" else front_out[:-1] == end_in[:-1]


def _channels(kind: Kind, shape: tuple[int, ...]) -> int:
    return shape[0] if kind == "cnn" else shape[-1]


def enumerate_stitches(parts: Sequence[AnchorParts], names: Sequence[str], shapes: Sequence[list[tuple[int, ...]]],
                       window: int = 2, stride: int = 1, stages: Sequence[int] | None = None,
                       front_blocks: Sequence[int] | None = None,
                       direction: Direction = "fast_to_slow") -> list[StitchConfig]:
    """Anchors (sorted small -> large) plus stitches between neighbouring anchors.

    Stitches are grouped by stage and use the paired rule when both anchors have the same number
    of blocks in that stage (plain ViTs with rewinds, hierarchical anchors without, as the reference
    code), the unpaired rule otherwise. A stitch is kept only if the front block's output has the
    resolution/token count the end block expects (its input), since a 1x1 conv / linear cannot
    resample. ``stages`` (None: :func:`official_stages`) and ``front_blocks`` (flat indices)
    restrict where stitches may start.

    ``fast_to_slow`` (the paper's): the smaller anchor is the front. ``slow_to_fast`` (its ablation)
    runs each of those stitches the other way: ``a[:n] -> b[m:]`` becomes ``b[:m] -> a[n:]``, the
    same cut points and stitching-layer sharing with the larger anchor in front (a DeiT stitch
    that re-ran a block now skips one; ``b[:0]`` is b's embedding alone).
    """
    configs = [StitchConfig(name=names[i], front=i, front_blocks=len(p.blocks)) for i, p in enumerate(parts)]
    for small in range(len(parts) - 1):
        large = small + 1
        kind = parts[small].kind
        for stage, rule, layer_id, n, m in _fast_to_slow_cuts(parts[small], parts[large], shapes[small],
                                                              shapes[large], window, stride, stages):
            front, end, front_run, end_start = ((small, large, n, m) if direction == "fast_to_slow"
                                                else (large, small, m, n))
            if front_blocks is not None and front_run - 1 not in front_blocks:
                continue
            # shapes[.][0] is the embed output, so shapes[end][end_start] is the input of that end block
            in_dim = _channels(kind, shapes[front][front_run])
            out_dim = _channels(kind, shapes[end][end_start])
            # Positions share a layer (per window / front block) only when its shape fits them all.
            configs.append(StitchConfig(
                name=f"{names[front]}[:{front_run}]->{names[end]}[{end_start}:]", front=front,
                front_blocks=front_run, end=end, end_start=end_start, stage=stage,
                layer=f"a{small}_s{stage}_{rule}{layer_id}_{in_dim}x{out_dim}"))
    return configs


def _fast_to_slow_cuts(small: AnchorParts, large: AnchorParts, small_shapes: list[tuple[int, ...]],
                       large_shapes: list[tuple[int, ...]], window: int, stride: int,
                       stages: Sequence[int] | None) -> list[tuple[int, str, int, int, int]]:
    """``(stage, rule, layer_id, n, m)`` of every stitch small[:n] -> large[m:] (flat block counts)
    whose two activations have the same grid."""
    rewind = not is_hierarchical(small)
    allowed = official_stages(small) if stages is None else stages
    cuts = []
    for stage in sorted(set(small.stages) & set(large.stages) & set(allowed)):
        s_idx = [i for i, s in enumerate(small.stages) if s == stage]
        l_idx = [i for i, s in enumerate(large.stages) if s == stage]
        rule = "p" if len(s_idx) == len(l_idx) else "u"
        local = (paired_stitching(len(s_idx), window, stride, rewind) if rule == "p"
                 else unpaired_stitching(len(s_idx), len(l_idx)))
        for j_loc, k_loc, layer_id in local:
            n, m = s_idx[j_loc] + 1, l_idx[k_loc]
            if _same_grid(small.kind, small_shapes[n], large_shapes[m]):
                cuts.append((stage, rule, layer_id, n, m))
    return cuts


def make_stitch_layer(kind: Kind, in_dim: int, out_dim: int) -> nn.Module:
    """1x1 conv with bias on feature maps, linear with bias on tokens (over the last dimension, so
    Swin's NHWC token maps too)."""
    return nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=True) if kind == "cnn" else nn.Linear(in_dim, out_dim)


def build_stitch_layers(parts: Sequence[AnchorParts], shapes: Sequence[list[tuple[int, ...]]],
                        configs: Sequence[StitchConfig]) -> nn.ModuleDict:
    layers = nn.ModuleDict()
    for c in configs:
        if c.is_anchor or c.layer in layers:
            continue
        kind = parts[c.front].kind
        in_dim = _channels(kind, shapes[c.front][c.front_blocks])
        out_dim = _channels(kind, shapes[c.end][c.end_start])
        layers[c.layer] = make_stitch_layer(kind, in_dim, out_dim)
    return layers


class StitchedNet(nn.Module):
    """A standalone stitch: embed, front blocks, stitching layer, end blocks, head."""

    def __init__(self, embed: nn.Module, front_blocks: Sequence[nn.Module], stitch: nn.Module | None,
                 end_blocks: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.embed = embed
        self.front = nn.Sequential(*front_blocks)
        self.stitch = stitch if stitch is not None else nn.Identity()
        self.end = nn.Sequential(*end_blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.end(self.stitch(self.front(self.embed(x)))))


def assemble(parts: Sequence[AnchorParts], layers: nn.ModuleDict, config: StitchConfig,
             standalone: bool = False) -> StitchedNet:
    """The network of one configuration; shares the supernet's modules unless ``standalone``.

    A standalone stitch is a deep copy holding only the blocks it runs (eval mode, CPU), so it
    exports to ONNX and its latency/size are those of the deployed model.
    """
    front = parts[config.front]
    if config.is_anchor:
        net = StitchedNet(front.embed, front.blocks, None, [], front.head)
    else:
        end = parts[config.end]
        net = StitchedNet(front.embed, front.blocks[:config.front_blocks], layers[config.layer],
                          end.blocks[config.end_start:], end.head)
    if standalone:
        net = copy.deepcopy(net).cpu().eval()
    return net
