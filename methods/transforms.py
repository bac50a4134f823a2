"""What an image goes through on its way to a batch: timm's transforms and their configuration.

:class:`LoaderConfig` (the ``data`` section's reading half) and :class:`AugmentConfig` choose them;
:func:`build_transform` builds timm's train or eval transform at a size, producing uint8 tensors
(normalisation happens once per batch, see :class:`podium.methods.data.Loader`);
:class:`BatchAugment` is what timm applies to whole batches (random erasing, mixup/cutmix, label
smoothing); :func:`eval_preprocessing` records the eval transform for clients of a release.
Every random draw runs under :class:`seeded`, so an item's augmentation depends on its seed only.
"""
from __future__ import annotations

import random
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import get_worker_info

from podium.images import DEFAULT_MAX_PIXELS
from podium.methods.base import InputSpec, StrictModel

Size = tuple[int, int]
ImageSide = Annotated[int, Field(ge=1, le=4096)]  # a model input side, in pixels


class AugmentConfig(StrictModel):
    """Training augmentation, passed to ``timm.data.create_transform`` (and ``timm.data.Mixup``)."""

    enabled: bool = True  # False: train on the eval transform (a deterministic, cacheable input)
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = None
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment), "original" (AutoAugment)
    re_prob: float = Field(0.0, ge=0, le=1)  # random erasing
    mixup: float = Field(0.0, ge=0)  # mixup alpha; 0 = off
    cutmix: float = Field(0.0, ge=0)  # cutmix alpha; 0 = off
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # soft targets for the training loss


class LoaderConfig(StrictModel):
    """How images become batches (everything but the files themselves)."""

    image_size: tuple[ImageSide, ImageSide] = (32, 32)  # the base resolution (methods may ask for others)
    batch_size: int = Field(64, ge=1, le=65_536)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = Field(0.875, gt=0, le=1)  # eval: resize to size / crop_pct, centre-crop size
    # None: the pretrained anchors', else measured on train images; one value per channel (1 or 3)
    mean: tuple[float, ...] | None = Field(None, min_length=1, max_length=3)
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(None, min_length=1, max_length=3)
    augment: AugmentConfig = AugmentConfig()
    num_workers: int | None = Field(None, ge=0)  # None: 0 for an in-memory dataset, else from the cores
    cache_mb: int = Field(1024, ge=0)  # decoded images (and deterministic transforms) kept up to this
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)


class seeded:
    """Seed Python's and torch's generators for one item's augmentation; in the main process the
    previous states are restored afterwards, so the training's own random stream is untouched."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.restore = get_worker_info() is None
        if self.restore:
            self.states = random.getstate(), torch.random.default_generator.get_state(), np.random.get_state()
        random.seed(self.seed)
        torch.random.default_generator.manual_seed(self.seed)
        np.random.seed(self.seed % 2 ** 32)  # timm's RandAugment and Mixup draw from numpy too

    def __exit__(self, *exc: Any) -> None:
        if self.restore:
            random.setstate(self.states[0])
            torch.random.default_generator.set_state(self.states[1])
            np.random.set_state(self.states[2])


def build_transform(spec: InputSpec, cfg: LoaderConfig, size: Size, train: bool):
    """timm's train or eval transform at ``size``, producing uint8 tensors (normalised per batch later)."""
    from timm.data import create_transform

    aug = cfg.augment
    common = dict(input_size=(spec.channels, *size), interpolation=cfg.interpolation, use_prefetcher=True)
    if train and aug.enabled:
        return create_transform(is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                                color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, re_prob=0.0,
                                **common)
    return create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)


def eval_preprocessing(spec: InputSpec, cfg: LoaderConfig, size: Size) -> dict[str, Any]:
    """The exact eval preprocessing at ``size``, read off the transform that runs (so it cannot drift):
    what a client must do with PIL to feed a release the inputs its accuracy was measured on."""
    from torchvision import transforms as T

    steps = build_transform(spec, cfg, size, train=False).transforms
    resize = next(t for t in steps if isinstance(t, T.Resize))
    crop = next(t for t in steps if isinstance(t, T.CenterCrop))
    resize_to = resize.size if isinstance(resize.size, int) else list(resize.size)
    return {
        "decode": "PIL; EXIF orientation applied; mode " + ("L" if spec.channels == 1 else "RGB"),
        # torchvision's rule for an int size (PIL's Image.resize underneath): the shorter side becomes
        # `size`, the longer floor(size * longer / shorter); a [height, width] size is exact
        "resize": {"size": resize_to, "shorter_side": isinstance(resize_to, int),
                   "longer_side": "floor(size * longer / shorter)" if isinstance(resize_to, int) else None,
                   "interpolation": cfg.interpolation, "library": "PIL Image.resize"},
        "center_crop": [int(v) for v in crop.size],  # top/left = round((side - crop) / 2)
        "crop_pct": cfg.crop_pct,
        "scale": "pixel / 255", "mean": list(spec.mean), "std": list(spec.std),
        "channel_order": "L" if spec.channels == 1 else "RGB", "layout": "NCHW", "dtype": "float32",
    }


class BatchAugment:
    """What timm applies to whole normalised batches, seeded per batch: random erasing
    (``timm.data.RandomErasing``), mixup/cutmix (``timm.data.Mixup``) and label smoothing."""

    def __init__(self, aug: AugmentConfig, num_classes: int) -> None:
        self.aug, self.num_classes = aug, num_classes
        self.erase = self.mixup = None
        if aug.re_prob > 0:
            from timm.data import RandomErasing

            self.erase = RandomErasing(aug.re_prob, mode="pixel", device="cpu")
        if aug.mixup > 0 or aug.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
                               num_classes=num_classes)

    @staticmethod
    def wanted(aug: AugmentConfig) -> bool:
        return bool(aug.enabled and (aug.re_prob or aug.mixup or aug.cutmix or aug.label_smoothing))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            with seeded(seed + 1):
                x = self.erase(x)
        if self.mixup is None and not self.aug.label_smoothing:
            return x, labels
        if self.mixup is None:
            from timm.data.mixup import one_hot

            off = self.aug.label_smoothing / self.num_classes
            return x, one_hot(labels, self.num_classes, on_value=1.0 - self.aug.label_smoothing + off, off_value=off)
        if len(x) % 2:  # timm's Mixup pairs images within the batch
            x, labels = x[:-1], labels[:-1]
        with seeded(seed + 2):
            return self.mixup(x, labels)
