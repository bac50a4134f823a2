"""Stitching-layer initialisation: least squares on real activations (or He, for comparison).

For a stitch front[:j+1] -> end[k:], X = output of front block j and Y = input of end block k
(embed output when k = 0), both taken on the *same* images, as rows of channels: NCHW feature maps
are permuted to NHWC first; tokens (T x C, and Swin's NHWC token maps) already end in channels.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from podium.methods.families import AnchorParts, Kind
from podium.methods.stitching.space import StitchConfig

log = logging.getLogger("podium.stitching")


def as_rows(features: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Activations as rows of channels: a CNN's N x C x H x W maps become (N*H*W) x C (NHWC); tokens,
    N x T x C or Swin's N x H x W x C, become (N*T) x C."""
    if kind == "cnn":
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return features.reshape(-1, features.shape[-1])


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W, b`` minimising ``||x W^T + b - y||`` (closed form, float64, rank-deficiency safe).

    Solves ``[x, 1] A = y`` with ``torch.linalg.lstsq`` (gelsd) on CPU: W = A[:C]^T, b = A[C].
    """
    x64 = x.detach().to("cpu", torch.float64)
    y64 = y.detach().to("cpu", torch.float64)
    if x64.shape[0] <= x64.shape[1]:
        log.warning("least squares with %d rows for %d features: under-determined, use more ls_batches",
                    x64.shape[0], x64.shape[1])
    x1 = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(x1, y64, driver="gelsd").solution
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def set_stitch_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        w = weight.view(*weight.shape, 1, 1) if isinstance(layer, nn.Conv2d) else weight
        layer.weight.copy_(w.to(layer.weight))
        layer.bias.copy_(bias.to(layer.bias))


def stitch_residual(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative residual ``||layer(x) - y|| / ||y||`` of a stitching layer on row activations."""
    with torch.no_grad():
        w = layer.weight.reshape(layer.weight.shape[0], -1).double()
        pred = x.double() @ w.T + layer.bias.double()
        return float(torch.linalg.norm(pred - y.double()) / torch.linalg.norm(y.double()))


def take_batches(loader: Any, num_batches: int) -> list[torch.Tensor]:
    """The first ``num_batches`` image batches of a loader, drawn once.

    Front and end activations must come from the *same* images (the loader shuffles), so every
    anchor is run on this one list.
    """
    batches = []
    for i, (images, _labels) in enumerate(loader):
        if i >= num_batches:
            break
        batches.append(images)
    return batches


@torch.no_grad()
def collect_features(parts: AnchorParts, batches: Sequence[torch.Tensor],
                     keep: set[int] | None = None) -> dict[int, torch.Tensor]:
    """Rows of ``{0: embed_out, 1: block0_out, ...}`` on the given image batches, in eval mode.

    ``keep`` limits which positions are stored (activations of large anchors are big).
    """
    device = next(parts.embed.parameters()).device
    modules = [parts.embed, *parts.blocks]
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    keep = set(range(len(parts.blocks) + 1)) if keep is None else keep
    feats: dict[int, list[torch.Tensor]] = defaultdict(list)
    for images in batches:
        x = parts.embed(images.to(device))
        for b, block in enumerate([nn.Identity(), *parts.blocks]):
            x = block(x)
            if b in keep:
                feats[b].append(as_rows(x, parts.kind).cpu())
    for m, w in zip(modules, was):
        m.train(w)
    return {b: torch.cat(f) for b, f in feats.items()}


def init_stitch_layers(parts: Sequence[AnchorParts], layers: nn.ModuleDict, configs: Sequence[StitchConfig],
                       loader: Any, method: Literal["ls", "he"] = "ls", num_batches: int = 8) -> None:
    """Least-squares init from real activations (mean over the positions sharing a layer), or He.

    For a stitch front[:j+1] -> end[k:], X = output of front block j and Y = input of end block k
    (embed output when k = 0), as in the reference code.
    """
    if method == "he":
        for layer in layers.values():
            layer.reset_parameters()  # PyTorch's default: Kaiming(He)-uniform weights
        return
    positions: dict[str, list[StitchConfig]] = defaultdict(list)
    for c in configs:
        if not c.is_anchor:
            positions[c.layer].append(c)
    batches = take_batches(loader, num_batches)
    needed: dict[int, set[int]] = defaultdict(set)
    for stitches in positions.values():
        for c in stitches:
            needed[c.front].add(c.front_blocks)
            needed[c.end].add(c.end_start)
    feats = {i: collect_features(parts[i], batches, keep) for i, keep in needed.items()}
    for key, stitches in positions.items():
        solutions = [least_squares(feats[c.front][c.front_blocks], feats[c.end][c.end_start]) for c in stitches]
        weight = torch.stack([w for w, _ in solutions]).mean(0)
        bias = torch.stack([b for _, b in solutions]).mean(0)
        set_stitch_weights(layers[key], weight, bias)
