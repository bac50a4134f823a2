"""Building blocks: the static MobileNetV3 block and the elastic one (kernel and width).

``ElasticMBConv.extract`` turns one elastic block, at a chosen kernel and expand ratio, into a
static ``MBConv`` (plain Conv2d/BatchNorm2d); ``sort_channels`` reorders its hidden channels by
importance before each width phase.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def mid_channels(in_ch: int, expand: float) -> int:
    return make_divisible(round(in_ch * expand), 8)


def se_channels(mid: int) -> int:
    return make_divisible(mid // 4, 8)


def make_act(name: str) -> nn.Module:
    return nn.ReLU(inplace=False) if name == "relu" else nn.Hardswish()


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded odd-kernel conv."""
    return (size - 1) // stride + 1


class SqueezeExcite(nn.Module):
    """MobileNetV3 SE: global pool, 1x1 reduce (bias) + ReLU, 1x1 expand (bias) + hard sigmoid."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.act = nn.ReLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(y))))


class MBConv(nn.Module):
    """Static inverted-residual block: [1x1 expand+BN+act] -> kxk depthwise+BN+act -> [SE] -> 1x1+BN."""

    def __init__(self, in_ch: int, out_ch: int, mid: int, kernel: int, stride: int, act: str,
                 se_reduced: int = 0, expand: bool = True) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), make_act(act)) \
            if expand else None
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
                                       nn.BatchNorm2d(mid), make_act(act))
        self.se = SqueezeExcite(mid, se_reduced) if se_reduced else None
        self.project = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.depthwise(h)
        if self.se is not None:
            h = self.se(h)
        h = self.project(h)
        return h + x if self.residual else h


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its input (running stats of those channels updated)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
                            self.training, factor, self.eps)


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, c: int) -> None:
    dst.weight.copy_(src.weight[:c])
    dst.bias.copy_(src.bias[:c])
    dst.running_mean.copy_(src.running_mean[:c])
    dst.running_var.copy_(src.running_var[:c])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


def _permute_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.data.copy_(t.data.index_select(0, idx))


class ElasticMBConv(nn.Module):
    """Inverted-residual block with elastic kernel (transformed centre crops) and elastic width."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str, se: bool,
                 kernel_choices: Sequence[int], expand_choices: Sequence[float]) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride, self.act_name, self.use_se = in_ch, out_ch, stride, act, se
        self.kernel_choices = tuple(sorted(kernel_choices))
        self.max_kernel = self.kernel_choices[-1]
        self.max_mid = mid_channels(in_ch, max(expand_choices))
        self.expand_conv = nn.Conv2d(in_ch, self.max_mid, 1, bias=False)
        self.expand_bn = DynamicBatchNorm2d(self.max_mid)
        self.depthwise = nn.Conv2d(self.max_mid, self.max_mid, self.max_kernel, stride, self.max_kernel // 2,
                                   groups=self.max_mid, bias=False)
        self.depthwise_bn = DynamicBatchNorm2d(self.max_mid)
        # one matrix per consecutive pair (big -> small), shared across channels, identity at init
        self.kernel_transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for small, big in zip(self.kernel_choices[:-1], self.kernel_choices[1:])})
        if se:
            reduced = se_channels(self.max_mid)
            self.se_reduce = nn.Conv2d(self.max_mid, reduced, 1, bias=True)
            self.se_expand = nn.Conv2d(reduced, self.max_mid, 1, bias=True)
        self.project = nn.Conv2d(self.max_mid, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)
        self.act = make_act(act)
        self.residual = stride == 1 and in_ch == out_ch

    def active_kernel(self, kernel: int, channels: int | None = None) -> torch.Tensor:
        """Depthwise filters of size ``kernel``: K_small = M_{big->small} @ centre_crop(K_big), chained
        from the largest kernel down, so each smaller kernel derives from the transformed larger one."""
        if kernel not in self.kernel_choices:
            raise ValueError(f"kernel {kernel} not in {self.kernel_choices}")
        weight = self.depthwise.weight[:channels] if channels is not None else self.depthwise.weight
        for big, small in zip(self.kernel_choices[::-1], self.kernel_choices[-2::-1]):
            if big <= kernel:
                break
            start = (big - small) // 2
            crop = weight[:, :, start:start + small, start:start + small]
            flat = crop.reshape(-1, small * small)
            weight = F.linear(flat, self.kernel_transforms[f"{big}to{small}"]).reshape(crop.shape)
        return weight

    def forward(self, x: torch.Tensor, kernel: int, expand: float) -> torch.Tensor:
        mid = mid_channels(self.in_ch, expand)
        h = self.act(self.expand_bn(F.conv2d(x, self.expand_conv.weight[:mid])))
        h = F.conv2d(h, self.active_kernel(kernel, mid), None, self.stride, kernel // 2, 1, mid)
        h = self.act(self.depthwise_bn(h))
        if self.use_se:
            red = se_channels(mid)
            y = h.mean((2, 3), keepdim=True)
            y = F.relu(F.conv2d(y, self.se_reduce.weight[:red, :mid], self.se_reduce.bias[:red]))
            y = F.hardsigmoid(F.conv2d(y, self.se_expand.weight[:mid, :red], self.se_expand.bias[:mid]))
            h = h * y
        h = self.project_bn(F.conv2d(h, self.project.weight[:, :mid]))
        return h + x if self.residual else h

    def spec(self, kernel: int, expand: float) -> tuple:
        mid = mid_channels(self.in_ch, expand)
        return ("block", self.in_ch, self.out_ch, mid, kernel, self.stride,
                se_channels(mid) if self.use_se else 0, self.act_name)

    @torch.no_grad()
    def extract(self, kernel: int, expand: float) -> MBConv:
        """A static block with the transformed kernel and the first ``mid`` (sorted) channels."""
        mid = mid_channels(self.in_ch, expand)
        red = se_channels(mid) if self.use_se else 0
        block = MBConv(self.in_ch, self.out_ch, mid, kernel, self.stride, self.act_name, red)
        block = block.to(self.depthwise.weight.device)
        block.expand[0].weight.copy_(self.expand_conv.weight[:mid])
        _copy_bn(block.expand[1], self.expand_bn, mid)
        block.depthwise[0].weight.copy_(self.active_kernel(kernel, mid))
        _copy_bn(block.depthwise[1], self.depthwise_bn, mid)
        if red:
            block.se.reduce.weight.copy_(self.se_reduce.weight[:red, :mid])
            block.se.reduce.bias.copy_(self.se_reduce.bias[:red])
            block.se.expand.weight.copy_(self.se_expand.weight[:mid, :red])
            block.se.expand.bias.copy_(self.se_expand.bias[:mid])
        block.project[0].weight.copy_(self.project.weight[:, :mid])
        _copy_bn(block.project[1], self.project_bn, self.out_ch)
        return block

    @torch.no_grad()
    def sort_channels(self, keep_in_front: Sequence[float] = ()) -> None:
        """Reorder hidden channels by importance (L1 of the projection's input weights), descending.

        ``keep_in_front``: the expand ratios earlier width phases trained; the channels each of them
        used (its first ``mid_channels``) stay in front as a set, sorted only among themselves, as the
        official ``re_organize_middle_weights(expand_ratio_stage)`` does with its large penalties on
        channels beyond the earlier widths.

        Producer outputs (expand conv + BN, depthwise filters + BN, SE expand) and consumer inputs
        (SE reduce, projection) move together, so the full block computes the same function; the
        SE's own hidden channels are then sorted by the L1 of the SE expand weights.
        """
        importance = self.project.weight.abs().sum(dim=(0, 2, 3))
        positions = torch.arange(self.max_mid, device=importance.device)
        # group of a channel: how many of the kept widths its current position lies beyond
        group = torch.zeros_like(positions)
        for width in {mid_channels(self.in_ch, e) for e in keep_in_front}:
            group += (positions >= width).long()
        by_importance = torch.argsort(importance, descending=True, stable=True)
        idx = by_importance[torch.argsort(group[by_importance], stable=True)]
        self.project.weight.data = self.project.weight.data.index_select(1, idx)
        self.expand_conv.weight.data = self.expand_conv.weight.data.index_select(0, idx)
        _permute_bn(self.expand_bn, idx)
        self.depthwise.weight.data = self.depthwise.weight.data.index_select(0, idx)
        _permute_bn(self.depthwise_bn, idx)
        if self.use_se:
            self.se_expand.weight.data = self.se_expand.weight.data.index_select(0, idx)
            self.se_expand.bias.data = self.se_expand.bias.data.index_select(0, idx)
            self.se_reduce.weight.data = self.se_reduce.weight.data.index_select(1, idx)
            se_idx = torch.argsort(self.se_expand.weight.abs().sum(dim=(0, 2, 3)), descending=True)
            self.se_expand.weight.data = self.se_expand.weight.data.index_select(1, se_idx)
            self.se_reduce.weight.data = self.se_reduce.weight.data.index_select(0, se_idx)
            self.se_reduce.bias.data = self.se_reduce.bias.data.index_select(0, se_idx)
