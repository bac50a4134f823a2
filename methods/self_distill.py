"""Self-distillation with early exits ("Be Your Own Teacher", Zhang et al., ICCV 2019).

A CNN backbone (a timm model, ResNet family at least) is cut into its stages with timm's own
feature extraction (``forward_intermediates`` for training, ``prune_intermediate_layers`` for the
truncated exports, ``FeatureListNet`` for the stage-by-stage early-exit model): no forked
ResNet code. After every stage but the last a shallow branch is attached: a feature-adapting
"bottleneck" (depthwise-separable convs, one per stage gap, that bring the map to the deepest
stage's channels and stride, then global average pooling) and a linear classifier. The deepest
classifier is the backbone's own pooled features + ``fc``; it is the teacher of the shallow ones.

Training minimises, with mean reductions (so λ does not depend on the batch size)::

    L = Σ_shallow i [(1−α)·CE(z_i, y) + α·KL(softmax(z_C/T) ‖ softmax(z_i/T))·T² + λ·mean((F_i − F_C)²)]
        + CE(z_C, y)

with the teacher logits z_C and features F_C detached, so the KL and hint terms never send a
gradient into the deepest classifier or the stages only it uses (they do train the shared
shallower stages, as in the paper). Defaults T=3, α=0.3, λ=0.03 follow the authors' final code.

Every exit becomes a standalone truncated model (stem + stages up to i + its branch) and a
:class:`~methods.base.Candidate`. The dynamic early-exit model (stop at the first exit whose
max softmax reaches a threshold) is reported with its accuracy and latency but is not a
candidate: its data-dependent control flow does not export to a static ONNX graph.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models import FeatureListNet
from torch import nn

from podium.methods.base import Anchor, AnchorSpec, Candidate, CandidateSpace, DataShape, Method, StrictModel
from podium.methods.catalog import register_method
from podium.methods.complexity import count
from podium.methods.data import DataBundle
from podium.methods.families import build
from podium.methods.losses import kd_kl
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit, model_device, pick_device

log = logging.getLogger("podium.self_distill")

DEFAULT_ARCH: dict[str, Any] = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}


class SelfDistillConfig(StrictModel):
    """Self-distillation settings; defaults are the paper's (T, α, λ) and a few-second digits demo.

    ``init_from_anchor`` names an anchor passed to ``fit`` whose weights initialise the backbone
    (it must have the same architecture); None (default) trains from scratch. The baseline is
    initialised the same way, so the comparison isolates self-distillation.
    """

    backbone: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_ARCH))
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.3, ge=0, le=1)  # weight of the KL term; (1−α) goes to the shallow CE
    hint_weight: float = Field(0.03, ge=0)  # λ of the L2 hint loss; 0 switches the term off
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
    pooling -> adapted features F_i (same dimension as the deepest pooled features F_C), linear."""

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
    """The container that is trained: the timm backbone plus one branch per shallow stage.

    ``forward`` returns the deepest logits (the backbone's own output); ``forward_exits`` all of them.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = backbone_stages(backbone)
        self.branches = nn.ModuleList(ExitBranch(self.stages, pos, num_classes) for pos in range(len(self.stages) - 1))

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

    The deepest exit is the backbone itself; a shallow one is a :class:`TruncatedExit`.
    """
    if not 0 <= exit_pos < model.num_exits:
        raise IndexError(f"exit {exit_pos} out of range (model has {model.num_exits} exits)")
    backbone = copy.deepcopy(model.backbone).cpu()
    if exit_pos == model.num_exits - 1:
        return backbone.eval()
    index = model.stages[exit_pos].index
    backbone.prune_intermediate_layers(indices=[index], prune_head=True)
    return TruncatedExit(backbone, index, copy.deepcopy(model.branches[exit_pos]).cpu()).eval()


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

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError("early exit decides per image: call it with batch size 1")
        for name, layer in self._layers:
            x = layer(x)
            pos = self._exit_of.get(name)
            if pos is not None and pos < len(self.branches):
                logits = self.branches[pos](x)
                if F.softmax(logits, dim=1).max() >= self.threshold:
                    self.last_exit = pos
                    return logits
        self.last_exit = len(self.branches)
        return self.backbone.forward_head(x)


# --------------------------------------------------------------------------------------------
# Loss


@dataclass
class SelfDistillLoss:
    """The loss and its unweighted terms (for tests and logging). Lists follow exit order."""

    total: torch.Tensor
    ce: list[torch.Tensor]  # every exit, deepest last
    kl: list[torch.Tensor]  # shallow exits only (KL·T²)
    hint: list[torch.Tensor]  # shallow exits only (mean squared error)


def self_distillation_loss(
    logits: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 3.0,
    alpha: float = 0.3,
    hint_weight: float = 0.03,
) -> SelfDistillLoss:
    """The paper's three losses; ``logits``/``features`` are per exit, deepest last.

    The KL term is multiplied by T² (Hinton's scaling, via :func:`methods.losses.kd_kl`) so its
    gradient magnitude does not shrink as T grows and α keeps the same meaning at any T; the
    paper's formula omits it, the authors' code leaves it out, standard KD keeps it — we keep it.
    Teacher logits and features (the deepest exit's) are detached: the deepest classifier learns
    from labels only. ``hint_weight=0`` switches the L2 hint off (it is then not computed).
    """
    if len(logits) < 2 or len(logits) != len(features):
        raise ValueError("need logits and features for >= 2 exits, deepest last")
    teacher_logits = logits[-1].detach()
    teacher_features = features[-1].detach()
    zero = logits[-1].new_zeros(())
    ce = [F.cross_entropy(z, labels) for z in logits]
    kl = [kd_kl(z, teacher_logits, temperature) for z in logits[:-1]]
    hint = [F.mse_loss(f, teacher_features) if hint_weight > 0 else zero for f in features[:-1]]
    total = ce[-1]
    for ce_i, kl_i, hint_i in zip(ce[:-1], kl, hint):
        total = total + (1.0 - alpha) * ce_i + alpha * kl_i + hint_weight * hint_i
    return SelfDistillLoss(total=total, ce=ce, kl=kl, hint=hint)


def self_distill_loss_fn(model: MultiExitNet, cfg: SelfDistillConfig):
    """``loss_fn(images, labels, step)`` for :func:`methods.train.fit`."""

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        out = model.forward_exits(images)
        return self_distillation_loss(out.logits, out.features, labels, cfg.temperature, cfg.alpha,
                                      cfg.hint_weight).total

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


def measure_early_exit(net: EarlyExitNet, loader, threads: int = 1) -> dict[str, Any]:
    """Accuracy, mean batch-1 latency and exit histogram of ``net`` over a whole loader.

    Latency is ``time.perf_counter`` around each call on CPU with ``threads`` intra-op threads
    (default 1, like a ``cpu-1t`` device: tiny batch-1 ops gain nothing from more threads and
    suffer badly from OpenMP spinning on a busy machine), after one warm-up image. It is the
    mean over the real images, because the cost depends on where each image exits.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_early_exit(net, loader)
    finally:
        torch.set_num_threads(previous_threads)


def _run_early_exit(net: EarlyExitNet, loader) -> dict[str, Any]:
    net.eval()
    correct = total = 0
    times: list[float] = []
    hist = [0] * (len(net.branches) + 1)
    warmed = False
    with torch.inference_mode():
        for images, labels in loader:
            for image, label in zip(images, labels):
                x = image[None].cpu()
                if not warmed:
                    net(x)
                    warmed = True
                start = time.perf_counter()
                logits = net(x)
                times.append(time.perf_counter() - start)
                hist[net.last_exit] += 1
                correct += int(logits.argmax(1).item() == int(label))
                total += 1
    return {"acc": correct / max(total, 1), "mean_ms": 1e3 * sum(times) / max(len(times), 1), "exit_counts": hist}


class SelfDistillSpace(CandidateSpace):
    """One candidate per exit; ``report()`` holds the numbers the task layer logs to MLflow."""

    def __init__(self, model: MultiExitNet, cfg: SelfDistillConfig, data: DataBundle,
                 baseline: nn.Module | None) -> None:
        self.model = model
        self.cfg = cfg
        self.data = data
        self.baseline = baseline
        self._report: dict[str, float] | None = None

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
        (if trained) and, with a threshold, ``early_exit_val_acc``, ``early_exit_mean_ms``,
        ``deepest_mean_ms`` (same batch-1 timing, for comparison), ``early_exit_threshold`` and
        ``early_exit_frac_exit{i}`` (share of images answered by each exit). Computed once."""
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
            early = measure_early_exit(self.early_exit_model(threshold), self.data.val)
            deepest = measure_early_exit(self.early_exit_model(float("inf")), self.data.val)
            report["early_exit_threshold"] = float(threshold)
            report["early_exit_val_acc"] = early["acc"]
            report["early_exit_mean_ms"] = early["mean_ms"]
            report["deepest_mean_ms"] = deepest["mean_ms"]
            n = max(sum(early["exit_counts"]), 1)
            for pos, c in enumerate(early["exit_counts"]):
                report[f"early_exit_frac_exit{pos + 1}"] = c / n
        self._report = report
        return dict(report)


def describe(cfg: SelfDistillConfig, shape: DataShape, anchors: Sequence[AnchorSpec]) -> list[dict[str, Any]]:
    return [describe_space(cfg, shape.num_classes, shape.channels)]


@register_method('self_distill', SelfDistillConfig, describe)
class SelfDistill(Method):
    """Be Your Own Teacher: train a multi-exit backbone with self-distillation; exits are candidates."""

    name = "self_distill"

    def __init__(self, cfg: SelfDistillConfig | None = None) -> None:
        self.cfg = cfg or SelfDistillConfig()

    def _backbone(self, data: DataBundle, anchors: Sequence[Anchor]) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)  # the baseline starts from the very same weights
        backbone = build(self.cfg.backbone, data.num_classes, data.input_spec.channels)
        if self.cfg.init_from_anchor is not None:
            _init_from_anchor(backbone, anchors, self.cfg.init_from_anchor, self.cfg.backbone)
        return backbone

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> SelfDistillSpace:
        """Train the multi-exit model (and the plain-CE baseline unless ``train_baseline`` is off).

        ``teacher`` is ignored: the deepest exit is the teacher (that is the method).
        """
        device = pick_device(self.cfg.device)
        # the branches exist before fit builds the optimiser, so they are trained too
        model = MultiExitNet(self._backbone(data, anchors), data.num_classes).to(device)
        result = fit(model, data.train, self_distill_loss_fn(model, self.cfg), self.cfg.train, name="self-distill")
        log.info("self-distillation: %d steps in %.1fs", result.steps, result.wall_s)
        baseline = None
        if self.cfg.train_baseline:
            baseline = self._backbone(data, anchors).to(device)
            fit(baseline, data.train, cross_entropy_loss(baseline), self.cfg.train, name="self-distill-baseline")
            baseline = baseline.cpu().eval()
        return SelfDistillSpace(model.cpu().eval(), self.cfg, data, baseline)
