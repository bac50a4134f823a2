"""Core types shared by every method: data, anchors, candidates and candidate spaces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class StrictModel(BaseModel):
    """Base for every config model: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: channels, resolution and the normalisation applied to pixels in [0, 1]."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def with_size(self, height: int, width: int) -> "InputSpec":
        return InputSpec(self.channels, height, width, self.mean, self.std)


@dataclass
class DataBundle:
    """Train/val/test loaders over in-memory tensors (images already decoded, normalised, resized)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    class_names: list[str]
    input_spec: InputSpec
    data_hash: str

    def example_batch(self, n: int = 2) -> torch.Tensor:
        images, _ = next(iter(self.val))
        return images[:n]

    @classmethod
    def from_arrays(
        cls,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        class_names: list[str],
        image_size: tuple[int, int],
        batch_size: int,
        data_hash: str,
        seed: int = 0,
        num_workers: int = 0,
    ) -> "DataBundle":
        """Loaders over decoded images: ``splits[name] = (uint8 N x C x H x W, int labels)``.

        Images are resized to ``image_size`` and normalised once, here, with the train split's
        per-channel mean/std, so no epoch decodes or resizes anything again.
        """
        tensors = {}
        for name in ("train", "val", "test"):
            images, labels = splits[name]
            x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
            if tuple(x.shape[-2:]) != tuple(image_size):
                x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
            tensors[name] = (x, torch.as_tensor(labels, dtype=torch.long))
        train_x = tensors["train"][0]
        mean = train_x.mean(dim=(0, 2, 3))
        std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        loaders = {}
        for name, (x, y) in tensors.items():
            x = (x - mean[None, :, None, None]) / std[None, :, None, None]
            generator = torch.Generator().manual_seed(seed)
            loaders[name] = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=name == "train",
                                       drop_last=name == "train" and len(y) > batch_size,
                                       generator=generator, num_workers=num_workers)
        spec = InputSpec(channels=int(train_x.shape[1]), height=image_size[0], width=image_size[1],
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
        return cls(train=loaders["train"], val=loaders["val"], test=loaders["test"], num_classes=len(class_names),
                   class_names=list(class_names), input_spec=spec, data_hash=data_hash)


@dataclass
class Anchor:
    """A pretrained model that methods build on, and where it came from."""

    name: str
    model: nn.Module
    source: str  # e.g. "registry:models:/anchor-x@latest", "checkpoint:/path", "timm-hub:resnet18", "trained"
    arch: dict[str, Any] = field(default_factory=dict)  # enough to rebuild the module (family builder kwargs)


@dataclass
class Candidate:
    """One deployable model: standalone (no supernet machinery), exportable to ONNX.

    ``metrics`` holds at least ``val_acc`` (fraction in [0, 1]) and the complexity figures
    ``flops`` (multiply-adds), ``params`` and ``acts`` from :mod:`methods.complexity`.
    ``input_size`` is the (height, width) the candidate runs at: methods that scale
    resolution (scaling, OFA) give each candidate its own.
    """

    name: str
    method: str
    config: dict[str, Any]
    model: nn.Module
    input_size: tuple[int, int]
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class CandidateSpace(Protocol):
    """What ``Method.fit`` returns. ``candidates(device)`` yields a finite set for that device.

    ``device`` is a :class:`methods.profiling.DeviceProfile` or None (all candidates). Spaces too
    large to enumerate search per device and yield the top few.
    """

    def candidates(self, device: Any = None) -> Iterable[Candidate]: ...
