"""Core types shared by every method: data, anchors, candidates and candidate spaces."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
    resolution (scaling, OFA) give each candidate its own; ``in_chans`` its input channels.
    """

    name: str
    method: str
    config: dict[str, Any]
    model: nn.Module
    input_size: tuple[int, int]
    metrics: dict[str, float] = field(default_factory=dict)
    in_chans: int = field(kw_only=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W of one input (exports and measurements use it)."""
        return (self.in_chans, *self.input_size)


class CandidateSpace(ABC):
    """What ``Method.fit`` returns. ``candidates(device)`` yields a finite set for that device.

    ``device`` is a :class:`podium.methods.profiling.DeviceProfile` or None (all candidates). Spaces
    too large to enumerate search per device and yield the top few. ``report`` (numbers and small
    JSON) and ``tables`` (rows the run report logs and plots) are optional.
    """

    @abstractmethod
    def candidates(self, device: Any = None) -> Iterable[Candidate]: ...

    def report(self) -> dict[str, Any]:
        return {}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Named tables of rows; rows with ``flops`` and ``val_acc`` are drawn as an accuracy front."""
        return {}


class Method(ABC):
    """A method as the catalogue knows it: built from its config, ``fit`` returns its space.

    Usable without orchestration: ``space = Stitching(cfg).fit(data, anchors)``. ``name`` is set by
    :func:`podium.methods.catalog.register_method`.
    """

    name: str = ""

    @abstractmethod
    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None
            ) -> CandidateSpace: ...


@dataclass(frozen=True)
class DataShape:
    """What a space needs to know of the data without loading it (``podium space show``)."""

    num_classes: int
    channels: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class AnchorSpec:
    """An anchor by name and architecture, before any weights exist."""

    name: str
    arch: dict[str, Any]
