"""Pretrained weights for anchors and teachers, and their adaptation to the dataset's classes.

Weights come from timm's hub (``hub=True``: downloads, so opt-in), from a local file, or both
absent (random init, to be trained here). A file for a timm hub architecture goes through timm's
own loader (``pretrained_cfg_overlay(file=...)``: its checkpoint filter, input-conv adaptation and
``weights_only`` loading); a file for one of Podium's families is a safetensors state dict.

Adaptation (``adapt``):

- ``none``: the weights already predict the dataset's classes and are used untouched;
- ``head``: a new classifier trained on frozen features (the backbone stays in eval mode, so its
  batch-norm statistics are those it was pretrained with);
- ``finetune``: every weight trained, with the anchor's own recipe.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from podium.methods.families import build
from podium.methods.train import TrainConfig, TrainResult, fit

log = logging.getLogger("podium.pretrained")

Adapt = Literal["none", "head", "finetune"]


@dataclass
class Pretrained:
    model: nn.Module
    head_classes: int | None  # classes the weights' own classifier predicts (None: no pretrained head)
    head_loaded: bool  # the weights' classifier was kept (it has the dataset's number of classes)


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the model's classifier (timm's ``get_classifier``), e.g. ``fc`` or ``head``."""
    if not hasattr(model, "get_classifier"):
        raise ValueError(f"{type(model).__name__} has no get_classifier(): its head cannot be adapted")
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError(f"{type(model).__name__}: its classifier is not one of its modules")


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weights file, without loading the tensors of a safetensors file."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _head_classes(shapes: dict[str, tuple[int, ...]], classifier: str) -> int | None:
    weight = shapes.get(f"{classifier}.weight")
    return int(weight[0]) if weight else None


def _first_line(exc: BaseException) -> str:
    """The informative line: PyTorch's load errors put theirs after an "Error(s) in loading" header."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0])
    return detail[:200]


def load_pretrained(arch: dict[str, Any], num_classes: int, in_chans: int, *, file: Path | None = None,
                    hub: bool = False) -> Pretrained:
    """The model of ``arch`` for ``num_classes`` classes with pretrained weights from ``file`` or the hub.

    A pretrained classifier is kept only when it has ``num_classes`` outputs; otherwise the model
    gets a freshly initialised one (``head_loaded`` False). Any other mismatch is a ``ValueError``.
    """
    if file is None and not hub:
        raise ValueError("no pretrained weights: give a checkpoint file or allow the timm hub")
    if arch.get("family") == "timm":
        return _load_timm(arch, num_classes, in_chans, file)
    if file is None:
        raise ValueError(f"family {arch.get('family')!r} has no hub weights: give a checkpoint file")
    model = build(arch, num_classes, in_chans)
    classifier = classifier_name(model)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file.name}: weights for family {arch.get('family')!r} must be a .safetensors file")
    state = load_file(str(file))
    head_classes = _head_classes({k: tuple(v.shape) for k, v in state.items()}, classifier)
    head_keys = {k for k in state if k.startswith(f"{classifier}.")}
    own = model.state_dict()
    head_fits = bool(head_keys) and all(k in own and own[k].shape == state[k].shape for k in head_keys)
    if not head_fits:
        state = {k: v for k, v in state.items() if k not in head_keys}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"{file.name} does not fit arch {arch}: {_first_line(exc)}") from None
    missing = [k for k in result.missing_keys if head_fits or not k.startswith(f"{classifier}.")]
    if missing or result.unexpected_keys:
        what = (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise ValueError(f"{file.name} does not fit arch {arch}: {what}")
    return Pretrained(model, head_classes, head_fits)


def _load_timm(arch: dict[str, Any], num_classes: int, in_chans: int, file: Path | None) -> Pretrained:
    kwargs = {k: v for k, v in arch.items() if k not in ("family", "name")}
    name = arch["name"]
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or "head"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    overlay: dict[str, Any] = {}
    if file is not None:
        head_classes = _head_classes(file_shapes(file), classifier)
        # timm drops a checkpoint's classifier whenever num_classes differs from the *config's*
        # (1000 for ImageNet names): tell it the file's own head size so a fitting head is kept.
        overlay = {"file": str(file), "num_classes": head_classes if head_classes is not None else -1}
    else:
        head_classes = cfg.num_classes if cfg is not None else None
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                  pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds; one line names the problem
        if file is None:
            raise ValueError(f"could not load the timm hub weights of {name}: {_first_line(exc)}") from None
        raise ValueError(f"{file.name} does not fit arch {arch}: {_first_line(exc)}") from None
    return Pretrained(model, head_classes, head_classes == num_classes)


def train_head(model: nn.Module, loader: Any, cfg: TrainConfig, name: str = "head") -> TrainResult:
    """Train only ``model``'s classifier on frozen features (timm's ``forward_features``/``forward_head``).

    The backbone runs in eval mode under ``no_grad``: its weights and batch-norm statistics stay
    exactly as they were pretrained.
    """
    head = model.get_classifier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    model.eval()

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        with torch.no_grad():
            features = model.forward_features(images)
        return F.cross_entropy(model.forward_head(features), labels)

    try:
        return fit(head, loader, loss_fn, cfg, name=name)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.eval()
