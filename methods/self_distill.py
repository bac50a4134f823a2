"""Self-distillation with early exits ("Be Your Own Teacher", Zhang et al., ICCV 2019).

A CNN backbone (a timm model, ResNet family at least) is cut into its stages with timm's own
feature extraction (``forward_intermediates`` for training, ``prune_intermediate_layers`` for the
truncated exports, ``FeatureListNet`` for the stage-by-stage early-exit model): no forked
ResNet code. After every stage but the last a shallow branch is attached: a feature-adapting
"bottleneck" (depthwise-separable convs, one per stage gap, that bring the map to the deepest
stage's channels and stride, then global average pooling) and a linear classifier. The deepest
classifier is the backbone's own pooled features + ``fc``; it is the teacher of the shallow ones.

Training minimises, as the authors' final code (``train.py`` of
ArchipLab-LinfengZhang/pytorch-self-distillation-final) does::

    L = CE(z_C, y) + Σ_shallow i [(1−α)·CE(z_i, y) + α·H(softmax(z_C/T), softmax(z_i/T))]
                   + λ·Σ_hinted i ‖A_i(F_i) − F_C‖₂

- H is the soft-target cross-entropy at temperature T, batch mean, *without* the T² factor
  (``kd_t2_scaling=True`` multiplies it by T², standard KD). H = KL + the teacher's entropy, a
  constant for the student: its gradients are those of the KL.
- F_i are the branch's pooled features (after the bottleneck, the classifier's input), F_C the
  backbone's pooled features; A_i is a learned ``nn.Linear(C, C)`` adaptation layer (part of the
  trained :class:`MultiExitNet`, never of an exported exit). ‖·‖₂ is ``torch.dist`` over the whole
  batch (an L2 distance, not squared, not averaged), so it grows as √batch; ``hint_batch`` rescales
  it to a reference batch (see :func:`self_distillation_loss`).
- The hint skips the shallow exit next to the deepest (the 3/4-depth classifier of a ResNet), as
  the authors' ``if index != 1`` does (their comment says "the shallowest", their code skips 3/4).
- Teacher logits z_C and features F_C are detached, so the KD and hint terms never send a gradient
  into the deepest classifier or the stages only it uses (they do train the shared shallower stages).

Defaults T=3, α=0.3, λ=0.03 follow the authors; ``recipe: paper`` adds their ResNet-18 and SGD
schedule (:class:`SelfDistillConfig`).

Every exit becomes a standalone truncated model (stem + stages up to i + its branch) and a
:class:`~methods.base.Candidate`. The dynamic early-exit model (stop at the first exit whose
max softmax reaches a threshold) is reported with its accuracy and latency next to the plain
backbone's (no branches), both timed by :func:`methods.profiling.measure`; it is not a candidate:
its data-dependent control flow does not export to a static ONNX graph.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models import FeatureListNet
from torch import nn

from podium.methods.base import Anchor, AnchorSpec, Candidate, CandidateSpace, DataShape, LoadWeights, Method
from podium.methods.catalog import register_method
from podium.methods.complexity import count
from podium.methods.data import DataBundle
from podium.methods.families import build
from podium.methods.losses import soft_target_ce
from podium.methods.profiling import DeviceProfile, measure
from podium.methods.recipes import RecipeConfig
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit, model_device, pick_device, seeded

log = logging.getLogger("podium.self_distill")

DEFAULT_ARCH: dict[str, Any] = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}

# The authors' final code (train.py of ArchipLab-LinfengZhang/pytorch-self-distillation-final) trains a
# CIFAR ResNet-18 with torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4) (plain momentum, not
# nesterov: timm's "momentum"), batch 128, 250 epochs, lr / 10 at epochs 83, 166 and 240, no warm-up.
# TrainConfig has a cosine schedule only: cosine from 0.1 to 0 over the same 250 epochs is the closest
# (no step decay). Two further gaps: timm's optimizer exempts biases and norms from weight decay (the
# authors decay every parameter), and timm's ResNet has the ImageNet stem (7x7/2 conv + max-pool), not
# the authors' CIFAR 3x3/1 conv without max-pool.
PAPER_RECIPE: dict[str, Any] = {
    "backbone": {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [64, 128, 256, 512]},
    "temperature": 3.0, "alpha": 0.3, "hint_weight": 0.03, "kd_t2_scaling": False,
    "hint_batch": 128,  # torch.dist as at the authors' batch of 128, with the same strength at any batch
    "train": {"epochs": 250, "lr": 0.1, "lr_batch": 128, "optimizer": "momentum", "momentum": 0.9,
              "weight_decay": 5e-4, "warmup_steps": 0},
}


class SelfDistillConfig(RecipeConfig):
    """Self-distillation settings. The class defaults are the ``demo`` recipe (a few-second digits
    run with the authors' T, α, λ and loss form); ``recipe: paper`` is :data:`PAPER_RECIPE`.

    ``init_from_anchor`` names an anchor passed to ``fit`` whose weights initialise the backbone
    (it must have the same architecture); None (default) trains from scratch. The baseline is
    initialised the same way, so the comparison isolates self-distillation.
    """

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {"paper": PAPER_RECIPE}

    backbone: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_ARCH))
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.3, ge=0, le=1)  # weight of the KD term; (1−α) goes to the shallow CE
    # False: the authors' soft-target cross-entropy at T as it is; True: times T² (standard KD)
    kd_t2_scaling: bool = False
    hint_weight: float = Field(0.03, ge=0)  # λ of the L2 hint (torch.dist); 0 switches the term off
    # None: torch.dist over the batch loss_fn sees, as the authors (it grows as √batch); N: times
    # √(N / batch), the authors' value at N images per batch and the same strength at any other batch
    hint_batch: int | None = Field(None, ge=1)
    early_exit_threshold: float | None = Field(0.95, gt=0, le=1)  # None: no early-exit report
    train_baseline: bool = True  # same backbone, plain CE, same steps (the task layer may skip it)
    init_from_anchor: str | None = None
    device: str = "auto"  # training device (methods.train.pick_device); candidates always end on CPU
    train: TrainConfig = TrainConfig(epochs=6, lr=0.05, warmup_steps=10)


# --------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class StageInfo:
    """One backbone stage as timm's feature_info describes it."""

    index: int  # index for forward_intermediates / prune_intermediate_layers
    channels: int
    reduction: int
    module: str


def backbone_stages(backbone: nn.Module) -> list[StageInfo]:
    """The stages of a timm CNN from its ``feature_info``, stem excluded.

    ``feature_info[0]`` of timm CNNs (ResNet: ``act1``) is the stem, not a stage; the rest are
    the stages whose outputs the exits tap, in order (the last one is the deepest).
    """
    info = getattr(backbone, "feature_info", None)
    if not isinstance(info, list) or len(info) < 3:
        raise ValueError(f"{type(backbone).__name__} has no usable timm feature_info (need stem + >= 2 stages)")
    return [StageInfo(i, int(d["num_chs"]), int(d["reduction"]), str(d["module"])) for i, d in enumerate(info)][1:]


def hinted_exits(num_exits: int) -> list[int]:
    """The shallow exits (0-based) that get the feature hint: all but the one next to the deepest.

    The authors' loop (outputs deepest first) applies it ``if index != 1``, i.e. not to the
    3/4-depth classifier of a 4-stage ResNet; the comment beside it says "the shallowest", the code
    skips 3/4, and we follow the code.
    """
    return list(range(num_exits - 2))


class SepConv(nn.Module):
    """The authors' depthwise-separable block: (dw 3x3 stride s, pw 1x1, BN, ReLU) then
    (dw 3x3, pw 1x1 to ``out_chs``, BN, ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, stride=stride, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, in_chs, 1, bias=False),
            nn.BatchNorm2d(in_chs),
            nn.ReLU(inplace=False),
            nn.Conv2d(in_chs, in_chs, 3, stride=1, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ExitBranch(nn.Module):
    """Shallow classifier i: bottleneck (one SepConv per stage gap, following the backbone's own
    channel/stride progression so the map reaches the deepest stage's shape), global average
    pooling -> features F_i (same dimension as the deepest pooled features F_C), linear."""

    def __init__(self, stages: Sequence[StageInfo], exit_pos: int, num_classes: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for src, dst in zip(stages[exit_pos:-1], stages[exit_pos + 1:]):
            stride = max(1, dst.reduction // src.reduction)
            blocks.append(SepConv(src.channels, dst.channels, stride=stride))
        self.bottleneck = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stages[-1].channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bottleneck(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@dataclass
class ExitOutputs:
    """Logits and pooled features of every exit, shallowest first, deepest last."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class MultiExitNet(nn.Module):
    """The container that is trained: the timm backbone, one branch per shallow stage and the hint
    adaptation layers (``nn.Linear(C, C)`` on F_i, the authors' "final version" hint; only for the
    :func:`hinted_exits`). The adaptation layers serve the loss alone: no exit uses them.

    ``forward`` returns the deepest logits (the backbone's own output); ``forward_exits`` all of them.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = backbone_stages(backbone)
        self.branches = nn.ModuleList(ExitBranch(self.stages, pos, num_classes) for pos in range(len(self.stages) - 1))
        width = self.stages[-1].channels
        self.hint_adapters = nn.ModuleDict({str(pos): nn.Linear(width, width) for pos in hinted_exits(self.num_exits)})

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward_exits(self, x: torch.Tensor) -> ExitOutputs:
        indices = [s.index for s in self.stages]
        final, taps = self.backbone.forward_intermediates(x, indices=indices)
        deep_features = self.backbone.forward_head(final, pre_logits=True)
        features = [branch.features(tap) for branch, tap in zip(self.branches, taps)]
        logits = [branch.fc(f) for branch, f in zip(self.branches, features)]
        return ExitOutputs(logits=[*logits, self.backbone.get_classifier()(deep_features)],
                           features=[*features, deep_features])

    def adapted_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """A_i(F_i) for every shallow exit (``features`` deepest last); None where no hint applies."""
        return [self.hint_adapters[str(pos)](f) if str(pos) in self.hint_adapters else None
                for pos, f in enumerate(features[:-1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_exits(x).logits[-1]


class TruncatedExit(nn.Module):
    """A standalone exit: the backbone pruned after stage ``index`` (timm's
    ``prune_intermediate_layers``, later stages and head removed) plus that stage's branch."""

    def __init__(self, backbone: nn.Module, index: int, branch: nn.Module) -> None:
        super().__init__()
        self.index = index
        self.backbone = backbone
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self.backbone.forward_intermediates(x, indices=[self.index], stop_early=True, intermediates_only=True)[-1]
        return self.branch(tap)


def export_exit(model: MultiExitNet, exit_pos: int) -> nn.Module:
    """Exit ``exit_pos`` (0-based; the last is the deepest) as its own deep-copied model, eval, CPU.

    The deepest exit is the backbone itself; a shallow one is a :class:`TruncatedExit`. Neither
    carries the hint adaptation layers (training-only).
    """
    if not 0 <= exit_pos < model.num_exits:
        raise IndexError(f"exit {exit_pos} out of range (model has {model.num_exits} exits)")
    backbone = copy.deepcopy(model.backbone).cpu()
    if exit_pos == model.num_exits - 1:
        return backbone.eval()
    index = model.stages[exit_pos].index
    backbone.prune_intermediate_layers(indices=[index], prune_head=True)
    return TruncatedExit(backbone, index, copy.deepcopy(model.branches[exit_pos]).cpu()).eval()


def plain_backbone(model: MultiExitNet) -> nn.Module:
    """The deepest path without branches (stem, every stage, pooling and ``fc``): what the network
    costs when it is not multi-exit, the reference of the early exit's latency."""
    return export_exit(model, model.num_exits - 1)


class EarlyExitNet(nn.Module):
    """Dynamic early exit for batch-1 inference: run the stages in order and return the first
    exit whose max softmax probability reaches ``threshold``; otherwise the deepest exit.

    The stage order comes from timm's ``FeatureListNet`` over the (deep-copied) backbone, whose
    modules it shares, so every exit computes exactly what the truncated exports compute.
    ``last_exit`` records which exit (0-based) answered the latest call.
    """

    def __init__(self, model: MultiExitNet, threshold: float) -> None:
        super().__init__()
        model = copy.deepcopy(model).cpu().eval()
        self.threshold = threshold
        self.backbone = model.backbone
        self.branches = model.branches
        body = FeatureListNet(self.backbone, out_indices=[s.index for s in model.stages])
        self._layers = list(body.items())  # plain list: the modules are registered via ``backbone``
        self._exit_of = {name: int(pos) for pos, name in enumerate(body.return_layers)}
        self.last_exit = -1

    @property
    def num_exits(self) -> int:
        return len(self.branches) + 1

    @torch.no_grad()
    def run(self, x: torch.Tensor, stop_at: int | None = None) -> torch.Tensor:
        """The early-exit pass; ``stop_at`` forces the exit (0-based) instead of the threshold, with
        every test on the way still computed, so it costs what an image leaving there costs."""
        if x.shape[0] != 1:
            raise ValueError("early exit decides per image: call it with batch size 1")
        for name, layer in self._layers:
            x = layer(x)
            pos = self._exit_of.get(name)
            if pos is not None and pos < len(self.branches):
                logits = self.branches[pos](x)
                confident = bool(F.softmax(logits, dim=1).max() >= self.threshold)
                if (confident if stop_at is None else pos == stop_at):
                    self.last_exit = pos
                    return logits
        self.last_exit = len(self.branches)
        return self.backbone.forward_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class ForcedExitPath(nn.Module):
    """The early-exit pass of ``net`` always leaving at ``exit_pos``: a fixed path the profiler can
    time (its cost does not depend on the image)."""

    def __init__(self, net: EarlyExitNet, exit_pos: int) -> None:
        super().__init__()
        if not 0 <= exit_pos < net.num_exits:
            raise IndexError(f"exit {exit_pos} out of range (the net has {net.num_exits} exits)")
        self.net = net
        self.exit_pos = exit_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run(x, stop_at=self.exit_pos)


# --------------------------------------------------------------------------------------------
# Loss


@dataclass
class SelfDistillLoss:
    """The loss and its unweighted terms (for tests and logging). Lists follow exit order."""

    total: torch.Tensor
    ce: list[torch.Tensor]  # every exit, deepest last
    kd: list[torch.Tensor]  # shallow exits only: soft-target CE at T (×T² with kd_t2_scaling)
    hint: list[torch.Tensor]  # shallow exits only: torch.dist(A_i(F_i), F_C); 0 where no hint applies


def self_distillation_loss(
    logits: Sequence[torch.Tensor],
    adapted_features: Sequence[torch.Tensor | None],
    teacher_features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 3.0,
    alpha: float = 0.3,
    hint_weight: float = 0.03,
    kd_t2_scaling: bool = False,
    hint_batch: int | None = None,
) -> SelfDistillLoss:
    """The authors' three losses (see the module docstring); ``logits`` per exit, deepest last;
    ``adapted_features`` per shallow exit (A_i(F_i), None: no hint there); ``teacher_features`` F_C.

    KD: ``soft_target_ce(z_i/T, z_C/T)``, the authors' ``CrossEntropy``, times T² only with
    ``kd_t2_scaling``. Hint: ``torch.dist(A_i(F_i), F_C)``, the L2 norm over the whole batch, so its
    size (and λ's effect) grows as √batch; with ``hint_batch`` = N it is multiplied by √(N/batch)
    (= √(N · mean_b ‖A_i(F_i)_b − F_C,b‖²)): the authors' value at N images, batch-independent
    otherwise, also when accumulation or data parallelism splits a batch. Teacher logits and
    features are detached: the deepest classifier learns from labels only. ``hint_weight=0``
    switches the hint off (it is then not computed).
    """
    if len(logits) < 2 or len(adapted_features) != len(logits) - 1:
        raise ValueError("need logits for >= 2 exits (deepest last) and one adapted feature (or None) per shallow exit")
    t = temperature
    teacher_logits = logits[-1].detach()
    teacher_features = teacher_features.detach()
    zero = logits[-1].new_zeros(())
    kd_scale = t * t if kd_t2_scaling else 1.0
    hint_scale = (hint_batch / labels.shape[0]) ** 0.5 if hint_batch is not None else 1.0
    ce = [F.cross_entropy(z, labels) for z in logits]
    kd = [soft_target_ce(z / t, teacher_logits / t) * kd_scale for z in logits[:-1]]
    hint = [torch.dist(a, teacher_features) * hint_scale if hint_weight > 0 and a is not None else zero
            for a in adapted_features]
    total = ce[-1]
    for ce_i, kd_i, hint_i in zip(ce[:-1], kd, hint):
        total = total + (1.0 - alpha) * ce_i + alpha * kd_i + hint_weight * hint_i
    return SelfDistillLoss(total=total, ce=ce, kd=kd, hint=hint)


def model_loss(model: MultiExitNet, images: torch.Tensor, labels: torch.Tensor,
               cfg: SelfDistillConfig) -> SelfDistillLoss:
    """:func:`self_distillation_loss` of ``model`` on a batch with ``cfg``'s settings."""
    out = model.forward_exits(images)
    adapted = model.adapted_features(out.features) if cfg.hint_weight > 0 else [None] * (model.num_exits - 1)
    return self_distillation_loss(out.logits, adapted, out.features[-1], labels, cfg.temperature, cfg.alpha,
                                  cfg.hint_weight, cfg.kd_t2_scaling, cfg.hint_batch)


def self_distill_loss_fn(model: MultiExitNet, cfg: SelfDistillConfig):
    """``loss_fn(images, labels, step)`` for :func:`methods.train.fit`."""

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        return model_loss(model, images, labels, cfg).total

    return loss_fn


# --------------------------------------------------------------------------------------------
# Method and candidate space


def describe_space(cfg: SelfDistillConfig, num_classes: int = 10, in_chans: int = 1) -> dict[str, Any]:
    """The space without training: one candidate per stage (exit), with the tapped stage."""
    stages = backbone_stages(build(cfg.backbone, num_classes, in_chans))
    return {"method": SelfDistill.name, "size": len(stages),
            "exits": [{"name": f"sd-exit{i + 1}", "stage": s.module, "channels": s.channels,
                       "reduction": s.reduction} for i, s in enumerate(stages)]}


def _init_from_anchor(backbone: nn.Module, anchors: Sequence[Anchor], name: str, arch: dict[str, Any]) -> None:
    """Copy an anchor's weights into ``backbone``; the classifier is skipped if its shape differs."""
    found = [a for a in anchors if a.name == name]
    if not found:
        raise ValueError(f"init_from_anchor={name!r} but no such anchor; have {[a.name for a in anchors]}")
    anchor = found[0]
    if anchor.arch and dict(anchor.arch) != dict(arch):
        raise ValueError(f"anchor {name!r} has arch {anchor.arch}, the backbone is {arch}")
    source = anchor.model.state_dict()
    target = backbone.state_dict()
    head = {f"{n}.{p}" for n, m in backbone.named_modules() if m is backbone.get_classifier()
            for p in ("weight", "bias")}
    state = {}
    for key, value in target.items():
        if key in source and source[key].shape == value.shape:
            state[key] = source[key]
        elif key not in head:
            raise ValueError(f"anchor {name!r} does not match the backbone at {key!r}")
    backbone.load_state_dict(state, strict=False)
    log.info("backbone initialised from anchor %s (%s)", name, anchor.source)


@torch.no_grad()
def exit_logits(model: MultiExitNet, loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits on a loader (eval mode), and the labels."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    per_exit: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    labels = []
    for images, y in loader:
        for store, z in zip(per_exit, model.forward_exits(images.to(device)).logits):
            store.append(z.cpu())
        labels.append(y)
    model.train(was_training)
    return [torch.cat(z) for z in per_exit], torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(1) == labels).sum()) / max(labels.numel(), 1)


# Batch-1 eager PyTorch on one CPU thread, the only runtime the data-dependent early exit runs in; the
# plain backbone it is compared with is timed with the very same profile.
EARLY_EXIT_PROFILE = DeviceProfile(name="cpu-1t-eager", runtime="torch", threads=1, batch_size=1,
                                   latency_budget_ms=1000.0, max_seconds=2.0)


def early_exit_outcomes(net: EarlyExitNet, loader, threads: int = 1) -> dict[str, Any]:
    """Accuracy and exit histogram (images answered by each exit) of ``net`` over a whole loader.

    Runs with ``threads`` intra-op threads (default 1): tiny batch-1 ops gain nothing from more, and
    OpenMP spinning on a busy machine makes them many times slower.
    """
    net.eval()
    correct = total = 0
    counts = [0] * net.num_exits
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for images, labels in loader:
                for image, label in zip(images, labels):
                    logits = net(image[None].cpu())
                    counts[net.last_exit] += 1
                    correct += int(logits.argmax(1).item() == int(label))
                    total += 1
    finally:
        torch.set_num_threads(previous_threads)
    return {"acc": correct / max(total, 1), "exit_counts": counts}


def early_exit_latency(net: EarlyExitNet, exit_counts: Sequence[int], input_shape: tuple[int, int, int],
                       profile: DeviceProfile = EARLY_EXIT_PROFILE) -> dict[str, Any]:
    """Mean batch-1 latency of the dynamic early exit over images that left as ``exit_counts`` says.

    The cost of an image depends only on where it leaves, so each exit's path
    (:class:`ForcedExitPath`: stages up to it, every branch tried on the way, their softmax tests)
    is timed by :func:`methods.profiling.measure`, and the exit-weighted mean of those means is the
    mean over the images. Paths no image took are not timed.
    """
    total = sum(exit_counts)
    if total == 0:
        raise ValueError("no images: the exit histogram is empty")
    per_exit_ms = [measure(ForcedExitPath(net, pos), input_shape, profile, memory=False).mean_ms if n else float("nan")
                   for pos, n in enumerate(exit_counts)]
    mean_ms = sum(ms * n for ms, n in zip(per_exit_ms, exit_counts) if n) / total
    return {"mean_ms": mean_ms, "exit_mean_ms": per_exit_ms}


def measure_early_exit(net: EarlyExitNet, loader, input_shape: tuple[int, int, int],
                       profile: DeviceProfile = EARLY_EXIT_PROFILE) -> dict[str, Any]:
    """:func:`early_exit_outcomes` on ``loader`` and the :func:`early_exit_latency` they imply."""
    outcomes = early_exit_outcomes(net, loader, profile.threads)
    return {**outcomes, **early_exit_latency(net, outcomes["exit_counts"], input_shape, profile)}


class SelfDistillSpace(CandidateSpace):
    """One candidate per exit; ``report()`` holds the numbers the task layer logs to MLflow."""

    def __init__(self, model: MultiExitNet, cfg: SelfDistillConfig, data: DataBundle,
                 baseline: nn.Module | None) -> None:
        self.model = model
        self.cfg = cfg
        self.data = data
        self.baseline = baseline
        self._report: dict[str, float] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.data.input_spec
        return (spec.channels, *spec.size)

    def exit_model(self, exit_pos: int) -> nn.Module:
        return export_exit(self.model, exit_pos)

    def early_exit_model(self, threshold: float | None = None) -> EarlyExitNet:
        threshold = self.cfg.early_exit_threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("no early-exit threshold configured")
        return EarlyExitNet(self.model, threshold)

    def candidates(self, device: Any = None) -> Iterator[Candidate]:
        """All exits (a finite set of four for a ResNet; ``device`` does not change it)."""
        spec = self.data.input_spec
        for pos in range(self.model.num_exits):
            exit_net = self.exit_model(pos)
            metrics: dict[str, float] = {"val_acc": evaluate(exit_net, self.data.val), "exit": float(pos + 1)}
            metrics.update(count(exit_net, spec.size, spec.channels).as_dict())
            config = {**self.cfg.model_dump(mode="json"), "exit": pos + 1, "num_exits": self.model.num_exits,
                      "stage": self.model.stages[pos].module}
            yield Candidate(name=f"sd-exit{pos + 1}", method=SelfDistill.name, config=config, model=exit_net,
                            input_size=spec.size, metrics=metrics, in_chans=spec.channels)

    def report(self) -> dict[str, float]:
        """Flat numeric metrics on the validation split, ready for ``mlflow.log_metrics``:
        ``exit{i}_val_acc``, ``ensemble_val_acc`` (mean of all exits' logits), ``baseline_val_acc``
        (if trained) and, with a threshold, ``early_exit_val_acc``, ``early_exit_threshold``,
        ``early_exit_frac_exit{i}`` (share of images answered by each exit), ``early_exit_mean_ms``
        (mean batch-1 latency over the val images) next to ``backbone_mean_ms`` (the plain backbone,
        no branches), both from :func:`methods.profiling.measure` with :data:`EARLY_EXIT_PROFILE`,
        and ``early_exit_speedup`` (their ratio, > 1: the early exit is faster). Computed once."""
        if self._report is not None:
            return dict(self._report)
        logits, labels = exit_logits(self.model, self.data.val)
        report: dict[str, float] = {}
        for pos, z in enumerate(logits):
            report[f"exit{pos + 1}_val_acc"] = _accuracy(z, labels)
        report["ensemble_val_acc"] = _accuracy(torch.stack(logits).mean(0), labels)
        if self.baseline is not None:
            report["baseline_val_acc"] = evaluate(self.baseline, self.data.val)
        threshold = self.cfg.early_exit_threshold
        if threshold is not None:
            early = measure_early_exit(self.early_exit_model(threshold), self.data.val, self.input_shape)
            backbone = measure(plain_backbone(self.model), self.input_shape, EARLY_EXIT_PROFILE, memory=False)
            report["early_exit_threshold"] = float(threshold)
            report["early_exit_val_acc"] = early["acc"]
            report["early_exit_mean_ms"] = early["mean_ms"]
            report["backbone_mean_ms"] = backbone.mean_ms
            report["early_exit_speedup"] = backbone.mean_ms / early["mean_ms"]
            n = max(sum(early["exit_counts"]), 1)
            for pos, c in enumerate(early["exit_counts"]):
                report[f"early_exit_frac_exit{pos + 1}"] = c / n
        self._report = report
        return dict(report)

    def to_record(self) -> tuple[dict[str, Any], dict[str, nn.Module]]:
        """The config that builds the backbone, the input spec's size and the report (its latencies were
        measured once; a loaded space reports them as they were)."""
        spec = self.data.input_spec
        record = {"cfg": self.cfg.model_dump(mode="json"), "num_classes": self.data.num_classes,
                  "in_chans": spec.channels, "report": self.report(), "baseline": self.baseline is not None}
        modules = {"model": self.model, **({"baseline": self.baseline} if self.baseline is not None else {})}
        return record, modules

    @classmethod
    def from_record(cls, record: dict[str, Any], weights: LoadWeights, data: DataBundle) -> SelfDistillSpace:
        cfg = SelfDistillConfig.model_validate(record["cfg"])
        num_classes, in_chans = record["num_classes"], record["in_chans"]
        model = weights("model", MultiExitNet(build(cfg.backbone, num_classes, in_chans), num_classes)).eval()
        baseline = None
        if record.get("baseline", False):
            baseline = weights("baseline", build(cfg.backbone, num_classes, in_chans)).eval()
        space = cls(model, cfg, data, baseline)
        space._report = dict(record["report"])
        return space

    def candidate_module(self, name: str, config: dict[str, Any]) -> nn.Module:
        return self.exit_model(int(config["exit"]) - 1)


def describe(cfg: SelfDistillConfig, shape: DataShape, anchors: Sequence[AnchorSpec]) -> list[dict[str, Any]]:
    return [describe_space(cfg, shape.num_classes, shape.channels)]


@register_method('self_distill', SelfDistillConfig, describe)
class SelfDistill(Method):
    """Be Your Own Teacher: train a multi-exit backbone with self-distillation; exits are candidates."""

    name = "self_distill"
    space_type = SelfDistillSpace

    def __init__(self, cfg: SelfDistillConfig | None = None) -> None:
        self.cfg = cfg or SelfDistillConfig()

    def _backbone(self, data: DataBundle, anchors: Sequence[Anchor]) -> nn.Module:
        backbone = build(self.cfg.backbone, data.num_classes, data.input_spec.channels)
        if self.cfg.init_from_anchor is not None:
            _init_from_anchor(backbone, anchors, self.cfg.init_from_anchor, self.cfg.backbone)
        return backbone

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> SelfDistillSpace:
        """Train the multi-exit model (and the plain-CE baseline unless ``train_baseline`` is off).

        ``teacher`` is ignored: the deepest exit is the teacher (that is the method).
        """
        device = pick_device(self.cfg.device)
        # the branches and hint adaptation layers exist before fit builds the optimiser: all are trained
        with seeded(self.cfg.train.seed):  # the baseline below starts from the very same backbone weights
            model = MultiExitNet(self._backbone(data, anchors), data.num_classes).to(device)
        result = fit(model, data.train, self_distill_loss_fn(model, self.cfg), self.cfg.train, name="self-distill")
        log.info("self-distillation: %d steps in %.1fs", result.steps, result.wall_s)
        baseline = None
        if self.cfg.train_baseline:
            with seeded(self.cfg.train.seed):
                baseline = self._backbone(data, anchors).to(device)
            fit(baseline, data.train, cross_entropy_loss(baseline), self.cfg.train, name="self-distill-baseline")
            baseline = baseline.cpu().eval()
        return SelfDistillSpace(model.cpu().eval(), self.cfg, data, baseline)
