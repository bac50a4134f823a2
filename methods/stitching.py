"""Stitchable Neural Networks (SN-Net, Pan et al., CVPR 2023): every stitch is a candidate.

Several pretrained *anchors* of one family (ResNets or ViTs of growing size) are joined into one
network that runs at many accuracy/FLOPs points: the first blocks of a smaller anchor, a small
stitching layer (1x1 conv on feature maps, linear on tokens), then the remaining blocks and head
of the next larger anchor ("Fast-to-Slow"). Stitching layers are initialised by least squares on
real activations, then all weights are trained jointly, one sampled configuration per step.

Pieces, timm style:

- :func:`split_anchor` cuts a timm ResNet / VisionTransformer into embed, a flat list of blocks
  (with stage indices) and head, sharing the anchor's modules.
- :func:`paired_stitching` / :func:`unpaired_stitching` / :func:`enumerate_stitches` build the
  stitch space (reference rules of ziplab/SN-Net).
- :func:`least_squares` solves ``min ||[X, 1] A - Y||`` in float64; :func:`init_stitch_layers`
  applies it to collected activations (or He initialisation for comparison).
- :class:`Stitching` builds the supernet, trains it with :func:`methods.train.fit` and returns a
  :class:`StitchSpace` whose candidates are standalone, ONNX-exportable modules.
- :func:`describe_space` lists the space with FLOPs without training (for ``podium stitching space``).
"""
from __future__ import annotations

import copy
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import families
from methods.base import Anchor, Candidate, DataBundle, StrictModel
from methods.complexity import count
from methods.losses import hard_distillation
from methods.pareto import pareto_front
from methods.train import TrainConfig, evaluate, fit, pick_device, recalibrate_bn

log = logging.getLogger("podium.stitching")

Kind = Literal["cnn", "vit"]


# ---------------------------------------------------------------------------------------------
# Splitting anchors into embed / blocks / head
# ---------------------------------------------------------------------------------------------

def _shell(module: nn.Module, **replace: Any) -> nn.Module:
    """A shallow copy of ``module`` whose submodule/parameter tables are its own.

    Submodules stay shared with ``module`` (so training the shell trains the anchor), while the
    replacements (e.g. ``blocks=nn.Sequential()``) drop parts the shell must not carry: a deep
    copy of the shell then copies only what it still holds, which keeps exported stitches small
    and lets us reuse timm's own ``_pos_embed`` / ``forward_head`` code.
    """
    shell = copy.copy(module)
    for key, value in list(shell.__dict__.items()):
        if isinstance(value, (dict, set)):
            shell.__dict__[key] = copy.copy(value)
    for name, value in replace.items():
        setattr(shell, name, value)
    return shell


class ResNetStem(nn.Module):
    """conv1 -> bn1 -> act1 -> maxpool of a timm ResNet."""

    def __init__(self, model: ResNet):
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = model.conv1, model.bn1, model.act1, model.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


class ResNetHead(nn.Module):
    """Global pool (+ dropout) + fc, through timm's ``forward_head`` on a stripped shell."""

    def __init__(self, model: ResNet):
        super().__init__()
        stripped = {name: nn.Identity() for name in ("conv1", "bn1", "act1", "maxpool",
                                                     "layer1", "layer2", "layer3", "layer4")}
        self.shell = _shell(model, **stripped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(x)


class ViTEmbed(nn.Module):
    """patch_embed -> _pos_embed -> patch_drop -> norm_pre of a timm VisionTransformer."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.shell = _shell(model, blocks=nn.Sequential(), norm=nn.Identity(), fc_norm=nn.Identity(),
                            head_drop=nn.Identity(), head=nn.Identity(), attn_pool=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shell
        return s.norm_pre(s.patch_drop(s._pos_embed(s.patch_embed(x))))


class ViTHead(nn.Module):
    """Final norm + pooling + head. Applied on stitched paths too (SN-Netv2 fix)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.shell = _shell(model, blocks=nn.Sequential(), patch_embed=nn.Identity(), norm_pre=nn.Identity(),
                            patch_drop=nn.Identity(), pos_drop=nn.Identity(), pos_embed=None, cls_token=None,
                            reg_token=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(self.shell.norm(x))


@dataclass
class AnchorParts:
    """An anchor cut at block boundaries; modules are shared with the anchor, not copied."""

    kind: Kind
    embed: nn.Module
    blocks: list[nn.Module]
    stages: list[int]  # stage index of each block (ViT: all 0)
    head: nn.Module

    def modules_dict(self) -> nn.ModuleDict:
        return nn.ModuleDict({"embed": self.embed, "blocks": nn.ModuleList(self.blocks), "head": self.head})


def split_resnet(model: ResNet) -> AnchorParts:
    blocks, stages = [], []
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for block in layer:
            blocks.append(block)
            stages.append(stage)
    return AnchorParts("cnn", ResNetStem(model), blocks, stages, ResNetHead(model))


def split_vit(model: VisionTransformer) -> AnchorParts:
    blocks = list(model.blocks)
    return AnchorParts("vit", ViTEmbed(model), blocks, [0] * len(blocks), ViTHead(model))


_SPLITTERS: list[tuple[type, Callable[[Any], AnchorParts]]] = [(ResNet, split_resnet), (VisionTransformer, split_vit)]


def split_anchor(model: nn.Module) -> AnchorParts:
    """Embed / blocks / head of a supported timm model (ResNet or VisionTransformer)."""
    for cls, splitter in _SPLITTERS:
        if isinstance(model, cls):
            return splitter(model)
    raise TypeError(f"stitching supports timm ResNet and VisionTransformer anchors, not {type(model).__name__}")


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


# ---------------------------------------------------------------------------------------------
# The stitch space
# ---------------------------------------------------------------------------------------------

def paired_stitching(depth: int, window: int = 2, stride: int = 1) -> list[tuple[int, int, int]]:
    """Stitches between anchors of equal depth: ``(front_block, end_block, layer_id)``.

    A window of ``window`` blocks slides with ``stride``; every (j, k) pair inside a window is a
    stitch (front runs blocks 0..j, end runs k..), and each window that adds a new pair gets one
    stitching layer shared by its pairs. depth=12, window=2, stride=1: 34 stitches, 11 layers.
    """
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    layer_id, start = 0, 0
    while start < depth:
        ids = range(start, min(start + window, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen]
        for pair in new:
            seen.add(pair)
            out.append((*pair, layer_id))
        if new:
            layer_id += 1
        start += stride
    return out


def unpaired_stitching(front_depth: int, end_depth: int) -> list[tuple[int, int, int]]:
    """Stitches between anchors of unequal depth: ``(front_block, end_block, layer_id)``.

    End block i maps to front block floor(i * d_front / d_end); a stitch runs front blocks 0..idx
    and end blocks i.. for every end block i > idx mapped to idx (never i = 0). One stitching layer
    per front block. ResNet-18/50 stages 1-2: 3 + 5 stitches (10 configurations with the anchors).
    """
    out = []
    for i in range(1, end_depth):
        idx = (i * front_depth) // end_depth
        if idx < i:
            out.append((idx, i, idx))
    return out


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


def _allowed(stage: int, front_block: int, stages: Sequence[int] | None, blocks: Sequence[int] | None) -> bool:
    return (stages is None or stage in stages) and (blocks is None or front_block in blocks)


def _same_grid(kind: Kind, front_out: tuple[int, ...], end_in: tuple[int, ...]) -> bool:
    """Same H x W (feature maps, C x H x W) or same token count (tokens, T x C)."""
    return front_out[1:] == end_in[1:] if kind == "cnn" else front_out[0] == end_in[0]


def enumerate_stitches(parts: Sequence[AnchorParts], names: Sequence[str], shapes: Sequence[list[tuple[int, ...]]],
                       window: int = 2, stride: int = 1, stages: Sequence[int] | None = None,
                       front_blocks: Sequence[int] | None = None) -> list[StitchConfig]:
    """Anchors (sorted small -> large) plus Fast-to-Slow stitches between neighbouring anchors.

    Stitches are grouped by stage (CNN) and use the paired rule when both anchors have the same
    number of blocks in that stage, the unpaired rule otherwise. A stitch is kept only if the
    front block's output has the resolution/token count the end block expects (its input),
    since a 1x1 conv / linear cannot resample. ``stages`` and ``front_blocks`` (flat indices)
    restrict where stitches may start.
    """
    configs = [StitchConfig(name=names[i], front=i, front_blocks=len(p.blocks)) for i, p in enumerate(parts)]
    for a in range(len(parts) - 1):
        b = a + 1
        front, end = parts[a], parts[b]
        for stage in sorted(set(front.stages) & set(end.stages)):
            f_idx = [i for i, s in enumerate(front.stages) if s == stage]
            e_idx = [i for i, s in enumerate(end.stages) if s == stage]
            rule = "p" if len(f_idx) == len(e_idx) else "u"
            local = (paired_stitching(len(f_idx), window, stride) if rule == "p"
                     else unpaired_stitching(len(f_idx), len(e_idx)))
            for j_loc, k_loc, layer_id in local:
                j, k = f_idx[j_loc], e_idx[k_loc]
                if not _allowed(stage, j, stages, front_blocks):
                    continue
                # shapes[.][0] is the embed output, so shapes[b][k] is the input of end block k
                if not _same_grid(front.kind, shapes[a][j + 1], shapes[b][k]):
                    continue
                # Positions share a layer (per window / front block) only when its shape fits them all.
                dim = 0 if front.kind == "cnn" else -1
                in_dim, out_dim = shapes[a][j + 1][dim], shapes[b][k][dim]
                configs.append(StitchConfig(
                    name=f"{names[a]}[:{j + 1}]->{names[b]}[{k}:]", front=a, front_blocks=j + 1, end=b, end_start=k,
                    stage=stage, layer=f"a{a}_s{stage}_{rule}{layer_id}_{in_dim}x{out_dim}"))
    return configs


def make_stitch_layer(kind: Kind, in_dim: int, out_dim: int) -> nn.Module:
    """1x1 conv with bias on feature maps, linear with bias on tokens."""
    return nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=True) if kind == "cnn" else nn.Linear(in_dim, out_dim)


def build_stitch_layers(parts: Sequence[AnchorParts], shapes: Sequence[list[tuple[int, ...]]],
                        configs: Sequence[StitchConfig]) -> nn.ModuleDict:
    layers = nn.ModuleDict()
    for c in configs:
        if c.is_anchor or c.layer in layers:
            continue
        kind = parts[c.front].kind
        dim = 0 if kind == "cnn" else -1
        in_dim = shapes[c.front][c.front_blocks][dim]
        out_dim = shapes[c.end][c.end_start][dim]
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


# ---------------------------------------------------------------------------------------------
# Stitching-layer initialisation
# ---------------------------------------------------------------------------------------------

def as_rows(features: torch.Tensor) -> torch.Tensor:
    """Activations as rows: N x C x H x W maps become (N*H*W) x C (NHWC), N x T x C tokens (N*T) x C."""
    if features.ndim == 4:
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
                feats[b].append(as_rows(x).cpu())
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


# ---------------------------------------------------------------------------------------------
# Config, supernet, method
# ---------------------------------------------------------------------------------------------

class StitchingConfig(StrictModel):
    anchors: list[str] = []  # names of the anchors to stitch; empty: every anchor of one family
    window: int = 2  # paired stitching: sliding-window size (blocks)
    stride: int = 1  # paired stitching: window stride
    stages: list[int] | None = None  # stages where stitches may start (None: all)
    front_blocks: list[int] | None = None  # flat front-block indices where stitches may start (None: all)
    init: Literal["ls", "he"] = "ls"
    ls_batches: int = 8  # training batches of activations for the least-squares solution
    joint_training: bool = True  # False: evaluate right after initialisation
    sampling: Literal["uniform", "flops_bins"] = "uniform"  # flops_bins: SN-Netv2 resource-constrained
    flops_bins: int = 4
    distill: bool = False  # hard distillation from the teacher (when one is given)
    bn_recalibration_batches: int = 10  # per configuration before evaluation (0: off)
    train: TrainConfig = TrainConfig(epochs=3, lr=1e-3, optimizer="adamw", weight_decay=0.05, warmup_steps=10)


class StitchSupernet(nn.Module):
    """Every anchor's parts plus every stitching layer: what the optimiser trains."""

    def __init__(self, parts: Sequence[AnchorParts], layers: nn.ModuleDict, configs: Sequence[StitchConfig]):
        super().__init__()
        self.parts = list(parts)
        self.anchors = nn.ModuleList(p.modules_dict() for p in parts)
        self.layers = layers
        self.configs = list(configs)

    def forward_config(self, x: torch.Tensor, config: StitchConfig) -> torch.Tensor:
        return assemble(self.parts, self.layers, config)(x)

    def forward(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.forward_config(x, self.configs[index])


class ConfigSampler:
    """Uniform over configurations, or (SN-Netv2) a uniform FLOPs bin first, then a stitch in it."""

    def __init__(self, flops: Sequence[int], mode: str = "uniform", bins: int = 4, seed: int = 0):
        self.rng = random.Random(seed)
        if mode == "uniform" or len(flops) < 2:
            self.groups = [list(range(len(flops)))]
        else:
            lo, hi = min(flops), max(flops)
            width = (hi - lo) / bins or 1.0
            grouped: dict[int, list[int]] = defaultdict(list)
            for i, f in enumerate(flops):
                grouped[min(bins - 1, int((f - lo) / width))].append(i)
            self.groups = [grouped[b] for b in sorted(grouped)]

    def __call__(self) -> int:
        return self.rng.choice(self.rng.choice(self.groups))


@dataclass
class StitchResult:
    config: StitchConfig
    model: nn.Module  # standalone, eval, CPU
    metrics: dict[str, float] = field(default_factory=dict)


class StitchSpace:
    """Every evaluated configuration; each one is a candidate for every device."""

    def __init__(self, results: list[StitchResult], anchor_names: list[str], input_size: tuple[int, int],
                 in_chans: int, settings: dict[str, Any]):
        self.results = results
        self.anchor_names = anchor_names
        self.input_size = input_size
        self.in_chans = in_chans
        self.settings = settings

    def __len__(self) -> int:
        return len(self.results)

    def write_artifacts(self, folder: Path) -> list[Path]:
        """The Pareto table (JSON) and plot (PNG) of every configuration, for the run's records."""
        rows = pareto_rows(self)
        table = Path(folder) / "stitching_pareto.json"
        table.write_text(json.dumps(rows, indent=1))
        return [table, plot_pareto(rows, Path(folder) / "stitching_pareto.png")]

    def candidates(self, device: Any = None) -> Iterator[Candidate]:
        for r in self.results:
            yield Candidate(name=f"sn-{r.config.name}", method=Stitching.name, config=config_dict(r.config, self.anchor_names,
                                                                                             self.settings),
                            model=r.model, input_size=self.input_size, metrics=dict(r.metrics))


def config_dict(c: StitchConfig, names: Sequence[str], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"front": names[c.front], "front_blocks": c.front_blocks,
                           "end": None if c.is_anchor else names[c.end],
                           "end_start": None if c.is_anchor else c.end_start,
                           "stage": None if c.is_anchor else c.stage, "layer": c.layer, "anchors": list(names)}
    out.update(settings or {})
    return out


def _family_key(anchor: Anchor) -> str:
    family = anchor.arch.get("family", "")
    if family == "timm":
        return f"timm:{type(anchor.model).__name__}"
    return family or type(anchor.model).__name__


def select_anchors(anchors: Sequence[Anchor], wanted: Sequence[str]) -> list[Anchor]:
    """The named anchors, or the largest group of one family when no names are given."""
    if wanted:
        by_name = {a.name: a for a in anchors}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"stitching anchors {missing} not acquired; have {sorted(by_name)}")
        chosen = [by_name[n] for n in wanted]
    else:
        groups: dict[str, list[Anchor]] = defaultdict(list)
        for a in anchors:
            groups[_family_key(a)].append(a)
        chosen = max(groups.values(), key=len) if groups else []
        if len(groups) > 1:
            log.info("stitching the %s family (%d anchors); other families ignored", _family_key(chosen[0]),
                     len(chosen))
    if len(chosen) < 2:
        raise ValueError("stitching needs at least two anchors of one family")
    return chosen


class Stitching:
    name = "stitching"

    def __init__(self, cfg: StitchingConfig | None = None):
        self.cfg = cfg or StitchingConfig()

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> StitchSpace:
        cfg = self.cfg
        spec = data.input_spec
        in_chans, size = spec.channels, spec.size
        device = pick_device()
        chosen = select_anchors(anchors, cfg.anchors)
        # Deep copies: the caller's anchors (shared with other methods) must not be trained here.
        models = [copy.deepcopy(a.model).to(device) for a in chosen]
        flops = [count(m, size, in_chans).flops for m in models]
        order = sorted(range(len(models)), key=lambda i: flops[i])
        models, names = [models[i] for i in order], [chosen[i].name for i in order]
        parts = [split_anchor(m) for m in models]
        if len({p.kind for p in parts}) > 1:
            raise ValueError("stitching anchors must all be CNNs or all ViTs")
        shapes = [probe_shapes(p, in_chans, size) for p in parts]
        configs = enumerate_stitches(parts, names, shapes, cfg.window, cfg.stride, cfg.stages, cfg.front_blocks)
        layers = build_stitch_layers(parts, shapes, configs).to(device)
        log.info("stitching %s: %d configurations (%d stitching layers)", " < ".join(names), len(configs), len(layers))
        init_stitch_layers(parts, layers, configs, data.train, cfg.init, cfg.ls_batches)
        supernet = StitchSupernet(parts, layers, configs).to(device)

        if cfg.joint_training:
            self._train(supernet, data, teacher, in_chans, size)
        results = []
        for c in configs:
            model = assemble(parts, layers, c, standalone=True).to(device)
            if cfg.bn_recalibration_batches:
                recalibrate_bn(model, data.train, cfg.bn_recalibration_batches)
            acc = evaluate(model, data.val)
            model = model.cpu().eval()
            metrics = {"val_acc": acc, **count(model, size, in_chans).as_dict()}
            log.info("%s: val_acc %.4f flops %d", c.name, acc, metrics["flops"])
            results.append(StitchResult(c, model, metrics))
        settings = {"init": cfg.init, "joint_training": cfg.joint_training}
        return StitchSpace(results, names, size, in_chans, settings)

    def _train(self, supernet: StitchSupernet, data: DataBundle, teacher: Anchor | None, in_chans: int,
               size: tuple[int, int]) -> None:
        cfg = self.cfg
        flops = [count(assemble(supernet.parts, supernet.layers, c), size, in_chans).flops for c in supernet.configs]
        sample = ConfigSampler(flops, cfg.sampling, cfg.flops_bins, cfg.train.seed)
        teacher_model = None
        if cfg.distill and teacher is not None:
            teacher_model = copy.deepcopy(teacher.model).to(next(supernet.parameters()).device).eval()

        def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
            logits = supernet.forward_config(images, supernet.configs[sample()])
            if teacher_model is None:
                return F.cross_entropy(logits, labels)
            with torch.no_grad():
                teacher_logits = teacher_model(images)
            return hard_distillation(logits, teacher_logits, labels)

        fit(supernet, data.train, loss_fn, cfg.train, name="stitching", rngs=[sample.rng])
        supernet.eval()


# ---------------------------------------------------------------------------------------------
# Space description (no training), tables and plots
# ---------------------------------------------------------------------------------------------

def arch_name(arch: dict[str, Any]) -> str:
    """A short readable anchor name from its architecture dict."""
    if arch.get("family") == "timm":
        return str(arch["name"])
    rest = [f"{k[0]}{'.'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in arch.items() if k != "family"]
    return "-".join([str(arch.get("family", "model")), *rest])


def describe_space(anchor_archs: Sequence[dict[str, Any]], num_classes: int, in_chans: int,
                   input_size: tuple[int, int], cfg: StitchingConfig | None = None,
                   names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every configuration of the space for these anchors with its FLOPs/params, without training."""
    cfg = cfg or StitchingConfig()
    names = list(names) if names else [arch_name(a) for a in anchor_archs]
    models = [families.build(a, num_classes, in_chans).eval() for a in anchor_archs]
    flops = [count(m, input_size, in_chans).flops for m in models]
    order = sorted(range(len(models)), key=lambda i: flops[i])
    models, names = [models[i] for i in order], [names[i] for i in order]
    parts = [split_anchor(m) for m in models]
    shapes = [probe_shapes(p, in_chans, input_size) for p in parts]
    configs = enumerate_stitches(parts, names, shapes, cfg.window, cfg.stride, cfg.stages, cfg.front_blocks)
    layers = build_stitch_layers(parts, shapes, configs)
    rows = []
    for c in configs:
        cx = count(assemble(parts, layers, c), input_size, in_chans)
        rows.append({"name": c.name, "kind": "anchor" if c.is_anchor else "stitch", **config_dict(c, names),
                     "flops": cx.flops, "params": cx.params, "acts": cx.acts})
    return rows


def pareto_rows(space: StitchSpace) -> list[dict[str, Any]]:
    """One row per configuration (sorted by FLOPs) with a ``pareto`` flag (FLOPs vs val_acc)."""
    front = {id(r) for r in pareto_front(space.results, lambda r: r.metrics["flops"], lambda r: r.metrics["val_acc"])}
    rows = []
    for r in sorted(space.results, key=lambda r: r.metrics["flops"]):
        c = r.config
        rows.append({"name": c.name, "kind": "anchor" if c.is_anchor else "stitch",
                     "front": space.anchor_names[c.front], "front_blocks": c.front_blocks,
                     "end": None if c.is_anchor else space.anchor_names[c.end],
                     "end_start": None if c.is_anchor else c.end_start,
                     **{k: r.metrics[k] for k in ("val_acc", "flops", "params", "acts")}, "pareto": id(r) in front})
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table (for logs and benches)."""
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path | str, title: str = "SN-Net stitches") -> Path:
    """Accuracy vs MFLOPs of every configuration; anchors and the Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    stitches = [r for r in rows if r["kind"] == "stitch"]
    anchors = [r for r in rows if r["kind"] == "anchor"]
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["flops"])
    ax.scatter([r["flops"] / 1e6 for r in stitches], [100 * r["val_acc"] for r in stitches], s=18, label="stitches")
    ax.scatter([r["flops"] / 1e6 for r in anchors], [100 * r["val_acc"] for r in anchors], s=60, marker="*",
               color="red", label="anchors")
    if front:
        ax.plot([r["flops"] / 1e6 for r in front], [100 * r["val_acc"] for r in front], "k--", lw=1,
                label="Pareto front")
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "AnchorParts", "StitchConfig", "StitchResult", "StitchSpace", "StitchedNet", "Stitching", "StitchingConfig",
    "StitchSupernet", "ConfigSampler", "as_rows", "assemble", "build_stitch_layers", "collect_features",
    "describe_space", "enumerate_stitches", "take_batches", "format_table", "init_stitch_layers", "least_squares",
    "make_stitch_layer", "paired_stitching", "pareto_rows", "plot_pareto", "probe_shapes", "set_stitch_weights",
    "split_anchor", "stitch_residual", "unpaired_stitching",
]
