"""Once-for-All progressive shrinking (Cai et al., ICLR 2020) with per-device search.

One elastic MobileNetV3-style supernet is trained once, in the paper's phase order (full network,
then elastic kernel, elastic depth, elastic width), each phase sampling sub-networks per step and
distilling from the full network. Afterwards every device costs only a search: a latency lookup
table *measured on that device*, an accuracy predictor trained on evaluated sub-networks, and an
evolutionary search under the device's latency budget. The best few sub-networks are extracted as
standalone static modules (plain Conv2d/BatchNorm2d, transformed kernels, sorted and truncated
channels), BN-recalibrated, measured for real and yielded as candidates.

Elastic dimensions (see /work/shared/methods/shrinking.md):

- kernel: one max-size depthwise kernel per layer plus per-layer transformation matrices
  (25x25 for 7->5, 9x9 for 5->3) initialised to identity; a smaller kernel is the centre crop of
  the *transformed* next-larger kernel (K3 comes from the transformed K5, never from K7);
- width: hidden channels sorted by the L1 norm of the projection conv's weights at the start of
  each width phase (producer outputs and consumer inputs permuted together), a sub-network keeps
  the first ``make_divisible(C_in * e, 8)``;
- depth: a unit at depth D runs its first D blocks;
- resolution: one input size sampled per step; the teacher sees the same size.
"""
from __future__ import annotations

import copy
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Subset

from methods.base import Anchor, Candidate, DataBundle, StrictModel
from methods.complexity import count
from methods.losses import soft_target_ce
from methods.profiling import DeviceProfile, LatencyStats, measure, measure_onnx, measure_torch
from methods.train import TrainConfig, evaluate, fit, pick_device, recalibrate_bn, resize

log = logging.getLogger("podium.shrinking")

Activation = Literal["relu", "hswish"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class PhaseConfig(StrictModel):
    """One progressive-shrinking phase.

    ``elastic`` names the dimension this phase opens ("none" = the full network, the teacher);
    ``num_choices`` how many of that dimension's choices are open after it, largest first
    (None = all). Dimensions opened by earlier phases stay open.
    """

    name: str
    elastic: Literal["none", "kernel", "depth", "width"]
    num_choices: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr_mult: float = Field(1.0, gt=0)
    subnets_per_step: int = Field(1, ge=1)


class EvolutionConfig(StrictModel):
    """OFA's evolution finder: population, parents, children by mutation and by crossover."""

    population: int = Field(100, ge=2)
    generations: int = Field(60, ge=0)
    parents: int = Field(25, ge=1)
    mutation_children: int = Field(50, ge=0)
    crossover_children: int = Field(50, ge=0)
    mutation_prob: float = Field(0.1, ge=0, le=1)  # per block (kernel, expand) and per unit (depth)
    resolution_mutation_prob: float = Field(0.5, ge=0, le=1)
    max_tries: int = Field(500, ge=1)  # attempts to draw a sample under the budget


class PredictorConfig(StrictModel):
    """Accuracy predictor: an MLP over one-hot (K, E) per block slot + one-hot resolution."""

    samples: int = Field(60, ge=4)  # sub-networks evaluated (BN-recalibrated) to train it
    hidden: int = Field(400, ge=1)
    layers: int = Field(3, ge=1)
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    holdout: float = Field(0.2, ge=0, lt=1)  # fraction of samples kept to report its error


def _paper_phases() -> list[PhaseConfig]:
    """The paper's schedule (180/120/25/120/25/120 epochs) and learning rates relative to the full net."""
    return [
        PhaseConfig(name="full", elastic="none", epochs=180, lr_mult=1.0, subnets_per_step=1),
        PhaseConfig(name="kernel", elastic="kernel", epochs=120, lr_mult=0.96 / 2.6, subnets_per_step=1),
        PhaseConfig(name="depth-1", elastic="depth", num_choices=2, epochs=25, lr_mult=0.08 / 2.6, subnets_per_step=2),
        PhaseConfig(name="depth-2", elastic="depth", epochs=120, lr_mult=0.24 / 2.6, subnets_per_step=2),
        PhaseConfig(name="width-1", elastic="width", num_choices=2, epochs=25, lr_mult=0.08 / 2.6, subnets_per_step=4),
        PhaseConfig(name="width-2", elastic="width", epochs=120, lr_mult=0.24 / 2.6, subnets_per_step=4),
    ]


def _demo_phases() -> list[PhaseConfig]:
    """Paper order and relative lengths scaled down ~1/30; the later phases get relatively higher
    learning rates than the paper's because they are far shorter here."""
    return [
        PhaseConfig(name="full", elastic="none", epochs=4, lr_mult=1.0, subnets_per_step=1),
        PhaseConfig(name="kernel", elastic="kernel", epochs=2, lr_mult=0.4, subnets_per_step=1),
        PhaseConfig(name="depth-1", elastic="depth", num_choices=2, epochs=0.5, lr_mult=0.1, subnets_per_step=2),
        PhaseConfig(name="depth-2", elastic="depth", epochs=2, lr_mult=0.3, subnets_per_step=2),
        PhaseConfig(name="width-1", elastic="width", num_choices=2, epochs=0.5, lr_mult=0.1, subnets_per_step=4),
        PhaseConfig(name="width-2", elastic="width", epochs=2, lr_mult=0.3, subnets_per_step=4),
    ]


class ShrinkingConfig(StrictModel):
    """Supernet shape, search space, shrinking schedule, predictors and search.

    The defaults are a tiny space for the bundled digits (32x32, 1 channel); ``paper()`` gives
    OFA-MobileNetV3's space (5 units, depth {2,3,4}, expand {3,4,6}, kernel {3,5,7}, 25 resolutions).
    """

    # supernet shape
    stem_width: int = Field(8, ge=1)
    stem_stride: int = Field(2, ge=1)
    first_block_width: int = Field(8, ge=1)  # the fixed expand-1 block after the stem
    unit_widths: tuple[int, ...] = (16, 24, 40)
    unit_strides: tuple[int, ...] = (2, 2, 1)
    unit_se: tuple[bool, ...] = (False, True, True)
    unit_acts: tuple[Activation, ...] = ("relu", "hswish", "hswish")
    head_width: int = Field(96, ge=1)  # final 1x1 expand before pooling (960 in the paper)
    feature_width: int = Field(128, ge=1)  # 1x1 feature mix after pooling (1280 in the paper)
    # search space
    depth_choices: tuple[int, ...] = (1, 2, 3)
    expand_choices: tuple[float, ...] = (3, 4, 6)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    resolutions: tuple[int, ...] = (24, 28, 32)
    # progressive shrinking
    phases: list[PhaseConfig] = Field(default_factory=_demo_phases)
    kd_weight: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    bn_recalibration_batches: int = Field(4, ge=1)  # batches of the fixed training subset
    # specialisation
    predictor: PredictorConfig = PredictorConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    top_k: int = Field(3, ge=1)  # candidates per device (measured for real)
    lut_warmup: int = Field(2, ge=0)  # latency lookup table: per-entry measurement effort
    lut_repeats: int = Field(10, ge=3)
    lut_max_seconds: float = Field(0.5, gt=0)
    # OFA uses SGD-Nesterov; on the tiny demo AdamW reaches far higher accuracy in so few steps
    train: TrainConfig = TrainConfig(epochs=1, lr=0.005, optimizer="adamw", weight_decay=3e-5)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "ShrinkingConfig":
        n = len(self.unit_widths)
        if n == 0:
            raise ValueError("unit_widths must name at least one unit")
        for field in ("unit_strides", "unit_se", "unit_acts"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries, unit_widths has {n}")
        for field in ("depth_choices", "expand_choices", "kernel_choices", "resolutions"):
            values = getattr(self, field)
            if not values or len(set(values)) != len(values) or min(values) <= 0:
                raise ValueError(f"{field} must be distinct positive values, got {values}")
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ValueError(f"kernel_choices must be odd (centre crops), got {self.kernel_choices}")
        if not self.phases or self.phases[0].elastic != "none":
            raise ValueError("the first phase must train the full network (elastic: none): it is the teacher")
        return self

    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    @classmethod
    def paper(cls, **overrides: Any) -> "ShrinkingConfig":
        """OFA-MobileNetV3's space and schedule (ImageNet scale; far too large to train here)."""
        values: dict[str, Any] = dict(
            stem_width=16, stem_stride=2, first_block_width=16,
            unit_widths=(24, 40, 80, 112, 160), unit_strides=(2, 2, 2, 1, 2),
            unit_se=(False, True, False, True, True), unit_acts=("relu", "relu", "hswish", "hswish", "hswish"),
            head_width=960, feature_width=1280,
            depth_choices=(2, 3, 4), expand_choices=(3, 4, 6), kernel_choices=(3, 5, 7),
            resolutions=tuple(range(128, 225, 4)), phases=_paper_phases(),
            bn_recalibration_batches=32,
            predictor=PredictorConfig(samples=1000, epochs=100),
            evolution=EvolutionConfig(generations=500),
            train=TrainConfig(epochs=1, lr=2.6, optimizer="sgd", weight_decay=3e-5, warmup_steps=0),
        )
        values.update(overrides)
        return cls(**values)


def space_size(cfg: ShrinkingConfig) -> int:
    """Number of distinct sub-networks: (sum_d (|K|*|E|)^d)^units * |R| (closed form)."""
    per_block = len(cfg.kernel_choices) * len(cfg.expand_choices)
    per_unit = sum(per_block ** d for d in cfg.depth_choices)
    return per_unit ** len(cfg.unit_widths) * len(cfg.resolutions)


def describe_space(cfg: ShrinkingConfig) -> dict[str, Any]:
    """A pure summary of a configured space for the CLI (no model is built)."""
    size = space_size(cfg)
    return {
        "units": len(cfg.unit_widths),
        "unit_widths": list(cfg.unit_widths),
        "depth_choices": sorted(cfg.depth_choices),
        "kernel_choices": sorted(cfg.kernel_choices),
        "expand_choices": sorted(cfg.expand_choices),
        "resolutions": sorted(cfg.resolutions),
        "subnets_per_resolution": size // len(cfg.resolutions),
        "size": size,
        "summary": (f"OFA space: {len(cfg.unit_widths)} units, depth {sorted(cfg.depth_choices)}, "
                    f"kernel {sorted(cfg.kernel_choices)}, expand [{', '.join(f'{e:g}' for e in sorted(cfg.expand_choices))}], "
                    f"{len(cfg.resolutions)} resolutions -> {size:.3e} sub-networks"),
    }


# --------------------------------------------------------------------------------------------
# Architectures (sub-network descriptions)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One sub-network: input resolution, depth per unit, and (kernel, expand) per *active* block."""

    resolution: int
    depths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    expands: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for d, ks, es in zip(self.depths, self.kernels, self.expands):
            if len(ks) != d or len(es) != d:
                raise ValueError(f"unit at depth {d} needs {d} kernels and expands, got {ks}, {es}")

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "depths": list(self.depths),
                "kernels": [list(k) for k in self.kernels], "expands": [list(e) for e in self.expands]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Arch":
        return cls(int(d["resolution"]), tuple(int(v) for v in d["depths"]),
                   tuple(tuple(int(k) for k in ks) for ks in d["kernels"]),
                   tuple(tuple(float(e) for e in es) for es in d["expands"]))

    @property
    def name(self) -> str:
        ks = ",".join(str(k) for unit in self.kernels for k in unit)
        es = ",".join(f"{e:g}" for unit in self.expands for e in unit)
        return f"ofa-r{self.resolution}-d{','.join(map(str, self.depths))}-k{ks}-e{es}"


def _as_arch(arch: Arch | dict[str, Any]) -> Arch:
    return arch if isinstance(arch, Arch) else Arch.from_dict(arch)


@dataclass(frozen=True)
class OpenSpace:
    """The choices open at some point of progressive shrinking."""

    kernels: tuple[int, ...]
    depths: tuple[int, ...]
    expands: tuple[float, ...]
    resolutions: tuple[int, ...]

    @classmethod
    def full(cls, cfg: ShrinkingConfig) -> "OpenSpace":
        return cls(tuple(sorted(cfg.kernel_choices)), tuple(sorted(cfg.depth_choices)),
                   tuple(sorted(cfg.expand_choices)), tuple(sorted(cfg.resolutions)))

    @classmethod
    def largest(cls, cfg: ShrinkingConfig) -> "OpenSpace":
        return cls((max(cfg.kernel_choices),), (max(cfg.depth_choices),), (max(cfg.expand_choices),),
                   tuple(sorted(cfg.resolutions)))

    def opened(self, phase: PhaseConfig, cfg: ShrinkingConfig) -> "OpenSpace":
        def top(choices: Sequence, n: int | None) -> tuple:
            ordered = tuple(sorted(choices))
            return ordered if n is None else ordered[-n:]

        if phase.elastic == "kernel":
            return OpenSpace(top(cfg.kernel_choices, phase.num_choices), self.depths, self.expands, self.resolutions)
        if phase.elastic == "depth":
            return OpenSpace(self.kernels, top(cfg.depth_choices, phase.num_choices), self.expands, self.resolutions)
        if phase.elastic == "width":
            return OpenSpace(self.kernels, self.depths, top(cfg.expand_choices, phase.num_choices), self.resolutions)
        return self

    def sample(self, units: int, rng: random.Random, resolution: int | None = None) -> Arch:
        depths = tuple(rng.choice(self.depths) for _ in range(units))
        return Arch(resolution if resolution is not None else rng.choice(self.resolutions), depths,
                    tuple(tuple(rng.choice(self.kernels) for _ in range(d)) for d in depths),
                    tuple(tuple(rng.choice(self.expands) for _ in range(d)) for d in depths))

    def uniform(self, units: int, which: Literal["min", "mid", "max"]) -> Arch:
        def pick(choices: tuple) -> Any:
            return {"min": choices[0], "mid": choices[len(choices) // 2], "max": choices[-1]}[which]

        d = pick(self.depths)
        return Arch(pick(self.resolutions), (d,) * units, ((pick(self.kernels),) * d,) * units,
                    ((pick(self.expands),) * d,) * units)


# --------------------------------------------------------------------------------------------
# Building blocks (static and elastic)
# --------------------------------------------------------------------------------------------


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
    def sort_channels(self) -> None:
        """Reorder hidden channels by importance (L1 of the projection's input weights), descending.

        Producer outputs (expand conv + BN, depthwise filters + BN, SE expand) and consumer inputs
        (SE reduce, projection) move together, so the full block computes the same function; the
        SE's own hidden channels are then sorted by the L1 of the SE expand weights.
        """
        importance = self.project.weight.abs().sum(dim=(0, 2, 3))
        idx = torch.argsort(importance, descending=True)
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

    def sort_channels(self) -> None:
        for unit in self.units:
            for block in unit:
                block.sort_channels()

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


# --------------------------------------------------------------------------------------------
# Latency lookup table (measured on the device)
# --------------------------------------------------------------------------------------------


def _module_for_spec(spec: tuple, cfg: ShrinkingConfig) -> tuple[nn.Module, tuple[int, int, int]]:
    """A freshly initialised module with the shapes of one lookup-table entry, and its input shape."""
    kind = spec[0]
    if kind == "stem":
        _, in_chans, _, _, _, size = spec
        return _stem(cfg, in_chans), (in_chans, size, size)
    if kind == "head":
        _, in_ch, _, _, classes, size = spec
        return _head(cfg, in_ch, classes), (in_ch, size, size)
    _, in_ch, out_ch, mid, k, stride, red, act, size = spec
    return MBConv(in_ch, out_ch, mid, k, stride, act, red), (in_ch, size, size)


class LatencyTable:
    """Per-device latency lookup table: each distinct layer configuration is measured once on the
    device's runtime (threads/batch from its profile), lazily, and a network's latency is the sum
    of its layers' entries."""

    def __init__(self, supernet: OFASupernet, device: DeviceProfile, cfg: ShrinkingConfig) -> None:
        self.supernet, self.device, self.cfg = supernet, device, cfg
        self.profile = device.model_copy(update={"warmup": cfg.lut_warmup, "min_repeats": cfg.lut_repeats,
                                                 "max_repeats": cfg.lut_repeats, "max_seconds": cfg.lut_max_seconds})
        self.table: dict[tuple, float] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.scale, self.offset = 1.0, 0.0  # whole-network correction, see calibrate()

    def entry_ms(self, spec: tuple) -> float:
        if spec not in self.table:
            module, shape = _module_for_spec(spec, self.cfg)
            module.eval()
            if self.device.runtime == "onnxruntime":
                from methods.export import export_onnx

                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="podium-ofa-lut-")
                path = export_onnx(module, shape, Path(self._tmp.name) / f"entry{len(self.table)}.onnx")
                stats = measure_onnx(path, shape, self.profile)
            else:
                stats = measure_torch(module, shape, self.profile)
            self.table[spec] = stats.p50_ms
        return self.table[spec]

    def table_sum(self, arch: Arch | dict[str, Any]) -> float:
        return float(sum(self.entry_ms(spec) for spec in self.supernet.layer_specs(arch)))

    def predict(self, arch: Arch | dict[str, Any]) -> float:
        return self.scale * self.table_sum(arch) + self.offset

    def calibrate(self, archs: Sequence[Arch], measured_ms: Sequence[float]) -> None:
        """Fit measured = scale * table_sum + offset on a few whole networks.

        Summed per-layer timings miss the per-network overhead (framework dispatch, memory
        traffic between layers), so the raw sum reads low by a roughly constant share."""
        sums = np.array([self.table_sum(a) for a in archs])
        measured = np.asarray(measured_ms, dtype=float)
        if len(sums) >= 2 and np.ptp(sums) > 1e-9:
            self.scale, self.offset = (float(v) for v in np.polyfit(sums, measured, 1))
        elif len(sums):
            self.scale = float(measured.mean() / max(sums.mean(), 1e-9))


# --------------------------------------------------------------------------------------------
# Accuracy predictor
# --------------------------------------------------------------------------------------------


def encode_arch(arch: Arch, cfg: ShrinkingConfig) -> np.ndarray:
    """Per block slot one-hot(K) and one-hot(E) (zeros for skipped blocks) + one-hot(resolution)."""
    ks, es, rs = sorted(cfg.kernel_choices), sorted(cfg.expand_choices), sorted(cfg.resolutions)
    slot = len(ks) + len(es)
    vec = np.zeros(len(cfg.unit_widths) * cfg.max_depth * slot + len(rs), dtype=np.float32)
    for u, (kernels, expands) in enumerate(zip(arch.kernels, arch.expands)):
        for i, (k, e) in enumerate(zip(kernels, expands)):
            base = (u * cfg.max_depth + i) * slot
            vec[base + ks.index(k)] = 1.0
            vec[base + len(ks) + es.index(e)] = 1.0
    vec[-len(rs) + rs.index(arch.resolution)] = 1.0
    return vec


class AccuracyPredictor(nn.Module):
    """MLP (ReLU hidden layers) predicting accuracy as an offset from a fixed base accuracy."""

    def __init__(self, in_features: int, hidden: int = 400, layers: int = 3, base_acc: float = 0.0) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        mods.append(nn.Linear(width, 1, bias=False))
        self.mlp = nn.Sequential(*mods)
        self.register_buffer("base_acc", torch.tensor(float(base_acc)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1) + self.base_acc


def train_accuracy_predictor(features: np.ndarray, targets: np.ndarray, cfg: PredictorConfig,
                             seed: int = 0) -> tuple[AccuracyPredictor, dict[str, float]]:
    """Fit the MLP (Adam, MSE) on all but a held-out fraction; report the held-out error."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(targets)
    order = torch.randperm(n, generator=gen)
    n_hold = int(round(cfg.holdout * n)) if n >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    x = torch.as_tensor(features)
    y = torch.as_tensor(targets, dtype=torch.float32)
    model = AccuracyPredictor(x.shape[1], cfg.hidden, cfg.layers, base_acc=float(y[train].mean()))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for chunk in perm.split(128):
            loss = F.mse_loss(model(x[chunk]), y[chunk])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    report: dict[str, float] = {"samples": float(n)}
    with torch.no_grad():
        if n_hold:
            pred = model(x[hold]).numpy()
            true = y[hold].numpy()
            report["holdout_mae"] = float(np.abs(pred - true).mean())
            report["holdout_rmse"] = float(np.sqrt(((pred - true) ** 2).mean()))
            if len(true) > 2 and true.std() > 0 and pred.std() > 0:
                report["holdout_pearson"] = float(np.corrcoef(pred, true)[0, 1])
        report["train_mae"] = float((model(x[train]) - y[train]).abs().mean())
    return model, report


# --------------------------------------------------------------------------------------------
# Evolutionary search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    arch: Arch
    predicted_acc: float
    predicted_latency_ms: float


def _mutate(arch: Arch, space: OpenSpace, evo: EvolutionConfig, rng: random.Random) -> Arch:
    resolution = rng.choice(space.resolutions) if rng.random() < evo.resolution_mutation_prob else arch.resolution
    depths, kernels, expands = [], [], []
    for d, ks, es in zip(arch.depths, arch.kernels, arch.expands):
        new_d = rng.choice(space.depths) if rng.random() < evo.mutation_prob else d
        ks = [rng.choice(space.kernels) if rng.random() < evo.mutation_prob else k for k in ks]
        es = [rng.choice(space.expands) if rng.random() < evo.mutation_prob else e for e in es]
        while len(ks) < new_d:  # deeper: new blocks drawn at random
            ks.append(rng.choice(space.kernels))
            es.append(rng.choice(space.expands))
        depths.append(new_d)
        kernels.append(tuple(ks[:new_d]))
        expands.append(tuple(es[:new_d]))
    return Arch(resolution, tuple(depths), tuple(kernels), tuple(expands))


def _crossover(a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Uniform crossover: each unit's depth and each block's kernel/expand from either parent."""
    depths, kernels, expands = [], [], []
    for u in range(len(a.depths)):
        d = rng.choice((a.depths[u], b.depths[u]))
        ks, es = [], []
        for i in range(d):
            donors = [p for p in (a, b) if i < p.depths[u]]
            ks.append(rng.choice(donors).kernels[u][i])
            es.append(rng.choice(donors).expands[u][i])
        depths.append(d)
        kernels.append(tuple(ks))
        expands.append(tuple(es))
    return Arch(rng.choice((a.resolution, b.resolution)), tuple(depths), tuple(kernels), tuple(expands))


def evolutionary_search(space: OpenSpace, units: int, predict_acc: Callable[[list[Arch]], np.ndarray],
                        predict_latency: Callable[[Arch], float], budget_ms: float, evo: EvolutionConfig,
                        seed: int = 0) -> list[SearchResult]:
    """OFA's evolution finder: fitness = predicted accuracy; samples over the budget are rejected.

    Returns the final population (parents + children), best first, without duplicates; empty if
    not even the smallest sub-network fits the budget.
    """
    rng = random.Random(seed)
    latency_cache: dict[Arch, float] = {}

    def latency(arch: Arch) -> float:
        if arch not in latency_cache:
            latency_cache[arch] = predict_latency(arch)
        return latency_cache[arch]

    def feasible(make: Callable[[], Arch]) -> Arch | None:
        for _ in range(evo.max_tries):
            arch = make()
            if latency(arch) <= budget_ms:
                return arch
        return None

    smallest = space.uniform(units, "min")
    if latency(smallest) > budget_ms:
        log.warning("even the smallest sub-network (%.2f ms predicted) exceeds the %.2f ms budget",
                    latency(smallest), budget_ms)
        return []
    population = [feasible(lambda: space.sample(units, rng)) or smallest for _ in range(evo.population)]
    scores = list(predict_acc(population))
    for _ in range(evo.generations):
        ranked = sorted(zip(scores, population), key=lambda t: -t[0])[:evo.parents]
        parents = [arch for _, arch in ranked]
        children = []
        for _ in range(evo.mutation_children):
            parent = rng.choice(parents)
            children.append(feasible(lambda: _mutate(parent, space, evo, rng)) or parent)
        for _ in range(evo.crossover_children):
            a, b = rng.choice(parents), rng.choice(parents)
            children.append(feasible(lambda: _crossover(a, b, rng)) or a)
        population = parents + children
        scores = [s for s, _ in ranked] + list(predict_acc(children)) if children else [s for s, _ in ranked]
    seen: set[Arch] = set()
    results = []
    for score, arch in sorted(zip(scores, population), key=lambda t: -t[0]):
        if arch not in seen:
            seen.add(arch)
            results.append(SearchResult(arch, float(score), latency(arch)))
    return results


# --------------------------------------------------------------------------------------------
# The method: progressive shrinking and the candidate space
# --------------------------------------------------------------------------------------------


def fixed_subset_loader(loader: DataLoader, num_batches: int) -> DataLoader:
    """The first ``num_batches`` batches' worth of the training set, in a fixed order (BN recalibration)."""
    n = min(len(loader.dataset), num_batches * (loader.batch_size or 1))
    return DataLoader(Subset(loader.dataset, range(n)), batch_size=loader.batch_size, shuffle=False)


def phase_loss(supernet: OFASupernet, teacher: nn.Module | None, space: OpenSpace, phase: PhaseConfig,
               cfg: ShrinkingConfig, rng: random.Random) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """Per step: one resolution (elastic in every phase, as in OFA); teacher forward once (no grad,
    same resolution); the summed loss of ``subnets_per_step`` sub-networks sampled from the space
    open so far (CE with label smoothing + kd_weight * soft-target CE against the teacher)."""
    units = len(cfg.unit_widths)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        r = rng.choice(space.resolutions)
        x = resize(images, (r, r))
        soft = None
        if teacher is not None and cfg.kd_weight > 0:
            with torch.no_grad():
                soft = teacher(x)
        total = x.new_zeros(())
        for _ in range(phase.subnets_per_step):
            supernet.set_active(space.sample(units, rng, r))  # the full network while only it is open
            out = supernet(x)
            loss = F.cross_entropy(out, labels, label_smoothing=cfg.label_smoothing)
            if soft is not None:
                loss = loss + cfg.kd_weight * soft_target_ce(out, soft)
            total = total + loss
        return total

    return loss_fn


class Shrinking:
    """Once-for-All: train an elastic supernet by progressive shrinking, then search per device."""

    name = "shrinking"

    def __init__(self, cfg: ShrinkingConfig | None = None) -> None:
        self.cfg = cfg or ShrinkingConfig()

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> "ShrinkSpace":
        """Progressive shrinking on ``data.train``, then the accuracy predictor's data.

        The distillation teacher is the supernet's own full network after the first phase, as in
        the paper; ``anchors`` and ``teacher`` are not used by this method.
        """
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        device = pick_device()
        supernet = OFASupernet(cfg, data.input_spec.channels, data.num_classes).to(device)
        rng = random.Random(cfg.seed)
        space = OpenSpace.largest(cfg)
        kd_teacher: nn.Module | None = None
        history = []
        for i, phase in enumerate(cfg.phases):
            space = space.opened(phase, cfg)
            if phase.elastic == "width":
                supernet.sort_channels()
            train_cfg = cfg.train.model_copy(update={"epochs": phase.epochs, "max_steps": phase.max_steps,
                                                     "lr": cfg.train.lr * phase.lr_mult, "seed": cfg.train.seed + i})
            result = fit(supernet, data.train, phase_loss(supernet, kd_teacher, space, phase, cfg, rng), train_cfg,
                         name=f"shrinking/{phase.name}", rngs=[rng])
            history.append({"phase": phase.name, "steps": result.steps, "final_loss": result.final_loss,
                            "wall_s": result.wall_s, "kernels": list(space.kernels), "depths": list(space.depths),
                            "expands": list(space.expands)})
            if i == 0:
                kd_teacher = copy.deepcopy(supernet)
                kd_teacher.set_active(OpenSpace.full(cfg).uniform(len(cfg.unit_widths), "max"))
                kd_teacher.requires_grad_(False)
                kd_teacher.train()  # batch statistics, as OFA runs its teacher: valid at any resolution
        supernet.set_active(OpenSpace.full(cfg).uniform(len(cfg.unit_widths), "max"))
        out = ShrinkSpace(cfg, supernet.eval(), data)
        out.history = history
        out.fit_predictor()
        return out


class ShrinkSpace:
    """The trained supernet as a candidate space: a per-device search yields the best few sub-nets.

    Sub-network accuracies (predictor training data and candidate ``val_acc``) are measured on
    ``data.val`` after BN recalibration on a fixed subset of ``data.train``.
    """

    def __init__(self, cfg: ShrinkingConfig, supernet: OFASupernet, data: DataBundle) -> None:
        self.cfg, self.supernet, self.data = cfg, supernet, data
        self.space = OpenSpace.full(cfg)
        self.units = len(cfg.unit_widths)
        self.calib_loader = fixed_subset_loader(data.train, cfg.bn_recalibration_batches)
        self.history: list[dict] = []
        self.predictor: AccuracyPredictor | None = None
        self.predictor_report: dict[str, float] = {}
        self.latency_tables: dict[str, LatencyTable] = {}
        self._cache: dict[str, list[Candidate]] = {}

    # sub-networks -------------------------------------------------------------------------
    def subnet(self, arch: Arch | dict[str, Any]) -> OFASubnet:
        """Extracted, BN-recalibrated (at its resolution), eval-mode sub-network on CPU."""
        arch = _as_arch(arch)
        net = extract_subnet(self.supernet, arch).cpu()
        recalibrate_bn(net, self.calib_loader, self.cfg.bn_recalibration_batches, (arch.resolution,) * 2)
        return net.eval()

    def evaluate_arch(self, arch: Arch | dict[str, Any]) -> float:
        arch = _as_arch(arch)
        return evaluate(self.subnet(arch), self.data.val, (arch.resolution,) * 2)

    # accuracy predictor ---------------------------------------------------------------------
    def fit_predictor(self) -> dict[str, float]:
        """Evaluate random sub-networks (plus the extremes) and fit the MLP accuracy predictor."""
        rng = random.Random(self.cfg.seed + 1)
        archs = [self.space.uniform(self.units, "max"), self.space.uniform(self.units, "min")]
        archs += [self.space.sample(self.units, rng) for _ in range(self.cfg.predictor.samples - len(archs))]
        accs = np.array([self.evaluate_arch(a) for a in archs], dtype=np.float32)
        feats = np.stack([encode_arch(a, self.cfg) for a in archs])
        self.predictor, self.predictor_report = train_accuracy_predictor(feats, accs, self.cfg.predictor, self.cfg.seed)
        self.predictor_report.update(mean_acc=float(accs.mean()), min_acc=float(accs.min()), max_acc=float(accs.max()))
        log.info("accuracy predictor: %s", {k: round(v, 4) for k, v in self.predictor_report.items()})
        return self.predictor_report

    def predict_acc(self, archs: Sequence[Arch]) -> np.ndarray:
        if self.predictor is None:
            self.fit_predictor()
        with torch.no_grad():
            feats = torch.as_tensor(np.stack([encode_arch(a, self.cfg) for a in archs]))
            return self.predictor(feats).numpy()

    # per-device search ----------------------------------------------------------------------
    def latency_table(self, device: DeviceProfile) -> LatencyTable:
        if device.name not in self.latency_tables:
            table = LatencyTable(self.supernet, device, self.cfg)
            anchors = [self.space.uniform(self.units, w) for w in ("max", "mid", "min")]
            table.calibrate(anchors, [self.measure_arch(a, device).p50_ms for a in anchors])
            self.latency_tables[device.name] = table
        return self.latency_tables[device.name]

    def measure_arch(self, arch: Arch, device: DeviceProfile, net: nn.Module | None = None) -> LatencyStats:
        """Real latency of a whole extracted sub-network on the device's runtime."""
        net = net if net is not None else extract_subnet(self.supernet, arch).eval()
        shape = (self.supernet.in_chans, arch.resolution, arch.resolution)
        if device.runtime == "onnxruntime":
            from methods.export import export_onnx

            with tempfile.TemporaryDirectory(prefix="podium-ofa-") as tmp:
                return measure(net, shape, device, export_onnx(net, shape, Path(tmp) / "model.onnx"))
        return measure(net, shape, device)

    def search(self, device: DeviceProfile) -> list[SearchResult]:
        table = self.latency_table(device)
        return evolutionary_search(self.space, self.units, self.predict_acc, table.predict,
                                   device.latency_budget_ms, self.cfg.evolution, self.cfg.seed)

    def make_candidate(self, arch: Arch, device: DeviceProfile | None = None,
                       extra: dict[str, float] | None = None) -> Candidate:
        """Extract, recalibrate BN, evaluate on val, count complexity, and (for a device) measure."""
        net = self.subnet(arch)
        size = (arch.resolution, arch.resolution)
        metrics: dict[str, float] = {"val_acc": evaluate(net, self.data.val, size)}
        metrics.update({k: float(v) for k, v in count(net, size, self.supernet.in_chans).as_dict().items()})
        if device is not None:
            stats = self.measure_arch(arch, device, net)
            metrics.update(p50_ms=stats.p50_ms, p90_ms=stats.p90_ms, latency_budget_ms=device.latency_budget_ms)
        metrics.update(extra or {})
        return Candidate(name=arch.name, method=Shrinking.name, config=arch.to_dict(), model=net,
                         input_size=size, metrics=metrics)

    def candidates(self, device: DeviceProfile | None = None) -> Iterator[Candidate]:
        """For a device: the top_k sub-networks of an evolutionary search under its latency budget,
        measured for real (cached per device name). Without one: largest, middle and smallest."""
        key = device.name if device is not None else ""
        if key not in self._cache:
            if device is None:
                archs = [self.space.uniform(self.units, w) for w in ("max", "mid", "min")]
                self._cache[key] = [self.make_candidate(a) for a in archs]
            else:
                results = self.search(device)[: self.cfg.top_k]
                table = self.latency_table(device)
                self._cache[key] = [
                    self.make_candidate(r.arch, device, {"predicted_acc": r.predicted_acc,
                                                         "predicted_latency_ms": r.predicted_latency_ms,
                                                         "lut_entries": float(len(table.table))})
                    for r in results]
                for c in self._cache[key]:
                    log.info("%s on %s: val %.3f, predicted %.2f ms, measured p50 %.2f ms (budget %.2f)", c.name,
                             device.name, c.metrics["val_acc"], c.metrics["predicted_latency_ms"],
                             c.metrics["p50_ms"], device.latency_budget_ms)
        yield from self._cache[key]
