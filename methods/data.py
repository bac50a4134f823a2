"""The streaming data plane methods train on: files decoded per item, timm's transforms, any resolution.

A :class:`DataBundle` holds, per split, the files (or, for small datasets and tests, decoded uint8
images in memory) and hands out loaders on request:

- ``data.train_loader(sizes)``: timm's train transform (random-resized crop and flip by default;
  RandAugment/AutoAugment, random erasing, mixup/cutmix and label smoothing by config), shuffled,
  and sharded across processes under data-parallel training. With several ``sizes`` each batch is
  read at one of them (OFA's elastic resolution): resolution is a transform parameter, so a batch
  at 160 px is cropped from the source image, never resized from a stored tensor.
- ``data.eval_loader(split, size)``: timm's eval transform (resize by ``1 / crop_pct``, centre
  crop), a fixed order, the same in every process.

Transforms (:mod:`podium.methods.transforms`) produce uint8 tensors (timm's ``use_prefetcher`` form);
the loader normalises each batch with the bundle's mean/std in one vectorised step, so a worker ships
a quarter of the bytes.

Every random choice of an epoch (order, per-batch resolution, one seed per item) is drawn from the
loader's generator when the epoch starts, in the main process; each item's augmentation is seeded
from its own seed. The batches are therefore the same whatever ``num_workers`` is, and a training
resumed from a checkpoint (which restores that generator) reads exactly the batches it would have.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from podium.images import decode
from podium.methods.base import InputSpec
from podium.methods.transforms import (
    AugmentConfig,
    BatchAugment,
    LoaderConfig,
    Size,
    build_transform,
    eval_preprocessing,
    seeded,
)

log = logging.getLogger("podium.data")

SPLITS = ("train", "val", "test")

@dataclass
class ImageSet:
    """One split: file paths under ``root`` and labels; or decoded uint8 images (H x W or H x W x C)."""

    labels: np.ndarray
    root: str = ""
    paths: np.ndarray | None = None  # relative paths (a compact numpy string array, cheap to pickle)
    images: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(labels=self.labels[idx], root=self.root,
                        paths=self.paths[idx] if self.paths is not None else None,
                        images=[self.images[i] for i in idx] if self.images is not None else None)

    def decoded_bytes_estimate(self, channels: int, samples: int = 32) -> int:
        """Bytes the decoded split would take, from the sizes of a few evenly spaced files."""
        if self.images is not None:
            return sum(a.nbytes for a in self.images)
        from PIL import Image

        picks = np.linspace(0, len(self) - 1, min(samples, len(self))).astype(int) if len(self) else []
        pixels = []
        for i in picks:
            try:
                with Image.open(Path(self.root) / str(self.paths[i])) as img:  # the header only
                    pixels.append(img.size[0] * img.size[1])
            except Exception:  # noqa: BLE001 - an unreadable file is validation's to name, the loader's to refuse
                continue
        return int(np.mean(pixels) * channels * len(self)) if pixels else 0


class ImageDataset(Dataset):
    """Items are keys ``(index, size, seed, train)`` from :class:`EpochBatchSampler`; each is the
    image decoded and transformed at ``size`` (uint8 C x H x W), its label and its seed."""

    def __init__(self, images: ImageSet, spec: InputSpec, cfg: LoaderConfig, cache_sources: bool) -> None:
        self.images, self.spec, self.cfg = images, spec, cfg
        self.cache_sources = cache_sources or images.images is not None
        self._reset()

    def _reset(self) -> None:
        self._transforms: dict[tuple[Size, bool], Any] = {}
        self._sources: dict[int, Any] = {}
        self._outputs: dict[tuple[int, Size], torch.Tensor] = {}
        self._cached_bytes = 0

    def __getstate__(self) -> dict[str, Any]:  # workers start with empty caches and build their own transforms
        state = dict(self.__dict__)
        for name in ("_transforms", "_sources", "_outputs", "_cached_bytes"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self.images)

    def source(self, index: int):
        """The decoded image (PIL, mode L or RGB)."""
        from PIL import Image

        if self.images.images is not None:
            return Image.fromarray(self.images.images[index])
        img = self._sources.get(index)
        if img is None:
            img = decode(Path(self.images.root) / str(self.images.paths[index]), self.spec.channels,
                         self.cfg.max_pixels)
            if self.cache_sources and self._room(img.width * img.height * self.spec.channels):
                self._sources[index] = img
        return img

    def _room(self, nbytes: int) -> bool:
        if self._cached_bytes + nbytes > self.cfg.cache_mb * 2 ** 20:
            return False
        self._cached_bytes += nbytes
        return True

    def transform(self, size: Size, train: bool):
        key = (size, train)
        if key not in self._transforms:
            self._transforms[key] = build_transform(self.spec, self.cfg, size, train)
        return self._transforms[key]

    def deterministic(self, train: bool) -> bool:
        return not train or not self.cfg.augment.enabled

    def __getitem__(self, key: tuple[int, Size, int, bool]) -> tuple[torch.Tensor, int, int]:
        index, size, seed, train = key
        label = int(self.images.labels[index])
        if self.deterministic(train):
            out = self._outputs.get((index, size))
            if out is None:
                out = self.transform(size, False)(self.source(index))
                if self.cache_sources and self._room(out.numel()):  # in memory only: not once per worker
                    self._outputs[(index, size)] = out
            return out, label, seed
        with seeded(seed):
            return self.transform(size, True)(self.source(index)), label, seed


class EpochBatchSampler(Sampler[list]):
    """Batches of item keys. All of an epoch's randomness is drawn from ``generator`` at its start."""

    def __init__(self, indices: Sequence[int], batch_size: int, *, shuffle: bool, drop_last: bool,
                 sizes: Sequence[Size], train: bool, generator: torch.Generator | None, rank: int = 0,
                 world: int = 1) -> None:
        self.indices, self.n = torch.as_tensor(list(indices), dtype=torch.long), len(indices)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.sizes, self.train, self.generator, self.rank, self.world = list(sizes), train, generator, rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, Size, int, bool]]]:
        g = self.generator
        order = self.indices[torch.randperm(self.n, generator=g)] if self.shuffle else self.indices
        batches = len(self)
        picks = (torch.randint(len(self.sizes), (batches,), generator=g).tolist() if len(self.sizes) > 1
                 else [0] * batches)
        seeds = torch.randint(2 ** 62, (self.n,), generator=g).tolist() if self.train else [0] * self.n
        order = order.tolist()
        for b in range(batches):
            batch = range(b * self.batch_size, min((b + 1) * self.batch_size, self.n))
            if self.world > 1:  # this process's contiguous share of the global batch
                batch = np.array_split(np.asarray(batch), self.world)[self.rank].tolist()
            size = self.sizes[picks[b]]
            yield [(order[j], size, seeds[j], self.train) for j in batch]


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    images = torch.stack([item[0] for item in items])
    return images, torch.tensor([item[1] for item in items], dtype=torch.long), items[0][2] if items else 0


class Loader:
    """Iterates ``(float32 normalised images, labels)``; the DataLoader underneath yields uint8.

    ``generator`` is the sampler's (checkpointed by :func:`methods.train.fit`); ``sharded`` says
    that each process already gets only its share of every global batch."""

    def __init__(self, loader: DataLoader, spec: InputSpec, *, generator: torch.Generator | None,
                 sharded: bool, batch_augment: "BatchAugment | None" = None) -> None:
        self.loader, self.generator, self.sharded, self.batch_augment = loader, generator, sharded, batch_augment
        self.batch_size = loader.batch_sampler.batch_size
        self.dataset = loader.dataset
        self._mean = torch.tensor(spec.mean).view(1, -1, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(spec.std).view(1, -1, 1, 1) * 255.0)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, seed in self.loader:
            x = images.float().sub_(self._mean).mul_(self._inv_std)
            if self.batch_augment is not None and len(labels):
                x, labels = self.batch_augment(x, labels, seed)
            yield x, labels


def _worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers fork from a server process that has imported this module once (a worker then
    starts in milliseconds, not the seconds torch and timm take to import), never from the caller: it
    runs threads (Prefect's), and forking a threaded process can deadlock."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def default_workers() -> int:
    """Loader processes for a streamed dataset: the cores this process may use, less one, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


@dataclass
class DataBundle:
    """A dataset's splits and how to read them; methods ask it for loaders at the sizes they need."""

    splits: dict[str, ImageSet]
    class_names: list[str]
    input_spec: InputSpec  # channels, base size, mean/std, interpolation and crop_pct
    data_hash: str
    cfg: LoaderConfig = field(default_factory=LoaderConfig)
    seed: int = 0
    in_memory: bool = False  # every decoded image fits ``cfg.cache_mb``: no worker processes needed
    _datasets: dict[str, ImageDataset] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_workers(self) -> int:
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        return 0 if self.in_memory else default_workers()

    def dataset(self, split: str) -> ImageDataset:
        if split not in self._datasets:
            self._datasets[split] = ImageDataset(self.splits[split], self.input_spec, self.cfg, self.in_memory)
        return self._datasets[split]

    def _loader(self, split: str, sizes: Sequence[Size], *, train: bool, limit: int | None = None,
                batch_size: int | None = None) -> Loader:
        from podium.methods import distributed

        total = len(self.splits[split])
        n = total if limit is None else min(limit, total)
        # a limited subset is spread evenly over the split (files are in class order: the first n
        # would hold only the first classes)
        indices = _spread(total, n)
        world = distributed.world_size() if train else 1
        generator = torch.Generator().manual_seed(self.seed)
        bs = batch_size or self.cfg.batch_size
        sampler = EpochBatchSampler(indices, bs, shuffle=train, drop_last=train and n > bs, sizes=sizes, train=train,
                                    generator=generator, rank=distributed.rank() if train else 0, world=world)
        # worker processes pay for their start (and their own caches) only over a long pass; a short
        # one (a BN recalibration subset, a small validation split) is read here. Same batches either way.
        workers = self.num_workers if len(sampler) >= 4 * self.num_workers else 0
        loader = DataLoader(self.dataset(split), batch_sampler=sampler, collate_fn=_collate, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available() and workers > 0,
                            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: not the global RNG
                            multiprocessing_context=_worker_context() if workers > 0 else None)
        aug = self.cfg.augment
        batch_aug = BatchAugment(aug, self.num_classes) if train and BatchAugment.wanted(aug) else None
        return Loader(loader, self.input_spec, generator=generator, sharded=world > 1, batch_augment=batch_aug)

    def train_loader(self, sizes: Sequence[Size] | Size | None = None) -> Loader:
        """Augmented, shuffled training batches (this process's share under data-parallel training);
        several ``sizes``: each batch at one of them, drawn per batch."""
        return self._loader("train", _sizes(sizes, self.input_spec.size), train=True)

    def eval_loader(self, split: str = "val", size: Size | None = None, limit: int | None = None,
                    batch_size: int | None = None) -> Loader:
        """Eval-transformed batches of ``split`` in a fixed order (``limit``: that many images, evenly spread)."""
        return self._loader(split, _sizes(size, self.input_spec.size), train=False, limit=limit,
                            batch_size=batch_size)

    @property
    def train(self) -> Loader:
        return self.train_loader()

    @property
    def val(self) -> Loader:
        return self.eval_loader("val")

    @property
    def test(self) -> Loader:
        return self.eval_loader("test")

    def preprocessing(self, size: Size | None = None) -> dict[str, Any]:
        """The recorded eval preprocessing at ``size`` (default: the base size); see :func:`eval_preprocessing`."""
        return eval_preprocessing(self.input_spec, self.cfg, tuple(size or self.input_spec.size))

    def example_batch(self, n: int = 2) -> torch.Tensor:
        images, _ = next(iter(self.eval_loader("val", batch_size=n, limit=n)))
        return images

    @classmethod
    def from_arrays(cls, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                    image_size: Size, batch_size: int, data_hash: str, seed: int = 0,
                    cfg: LoaderConfig | None = None) -> "DataBundle":
        """A bundle over decoded images in memory: ``splits[name] = (uint8 N x C x H x W, labels)``
        (tests, notebooks). Without ``cfg``: no augmentation and no crop, as a plain resize."""
        cfg = cfg or LoaderConfig(augment=AugmentConfig(enabled=False), crop_pct=1.0)
        cfg = cfg.model_copy(update={"image_size": tuple(image_size), "batch_size": batch_size})
        sets = {}
        for name in SPLITS:
            images, labels = splits[name]
            hwc = [np.ascontiguousarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)) for a in images]
            sets[name] = ImageSet(labels=np.asarray(labels, dtype=np.int64), images=hwc)
        channels = int(np.asarray(splits["train"][0]).shape[1])
        return cls.create(sets, class_names, channels, data_hash, cfg, seed)

    @classmethod
    def create(cls, splits: dict[str, ImageSet], class_names: list[str], channels: int, data_hash: str,
               cfg: LoaderConfig, seed: int = 0, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> "DataBundle":
        """The bundle, with mean/std from ``cfg``, else ``mean``/``std`` (a pretrained anchor's), else
        measured on up to 512 training images through the eval transform."""
        in_memory = sum(s.decoded_bytes_estimate(channels) for s in splits.values()) <= cfg.cache_mb * 2 ** 20
        spec = InputSpec(channels=channels, height=cfg.image_size[0], width=cfg.image_size[1],
                         mean=(0.0,) * channels, std=(1.0,) * channels, interpolation=cfg.interpolation,
                         crop_pct=cfg.crop_pct)
        bundle = cls(splits=splits, class_names=list(class_names), input_spec=spec, data_hash=data_hash, cfg=cfg,
                     seed=seed, in_memory=in_memory)
        mean, std = (cfg.mean, cfg.std) if cfg.mean is not None and cfg.std is not None else (mean, std)
        if mean is None or std is None or len(mean) != channels or len(std) != channels:
            mean, std = bundle.measure_mean_std()
        bundle.input_spec = spec.with_stats(tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return bundle

    def subset(self, **counts: int) -> "DataBundle":
        """The same bundle (normalisation included) over fewer images: ``subset(train=128, val=32)``
        keeps that many of each named split, evenly spread over it (tests, benchmarks)."""
        splits = {name: part.take(_spread(len(part), counts[name])) if name in counts else part
                  for name, part in self.splits.items()}
        return DataBundle(splits=splits, class_names=self.class_names, input_spec=self.input_spec,
                          data_hash=self.data_hash, cfg=self.cfg, seed=self.seed, in_memory=self.in_memory)

    def restrict(self, split: str, indices: Sequence[int]) -> "DataBundle":
        """The same bundle with ``split`` cut down to the images at ``indices`` (in that split's order)."""
        splits = {**self.splits, split: self.splits[split].take(indices)}
        return DataBundle(splits=splits, class_names=self.class_names, input_spec=self.input_spec,
                          data_hash=self.data_hash, cfg=self.cfg, seed=self.seed, in_memory=self.in_memory)

    def hold_out(self, images: int, split: str) -> "DataBundle":
        """The same bundle with ``images`` training images, drawn at random with the bundle's seed,
        moved out of ``train`` into a new split ``split``: data to fit or select on that training never
        saw (Once-for-All's ``valid_size``: its accuracy predictor's data). The same draw in every process."""
        train = self.splits["train"]
        if not 0 < images < len(train):
            raise ValueError(f"cannot hold out {images} of the {len(train)} training images")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        kept, held = sorted(order[images:]), sorted(order[:images])
        splits = {**self.splits, "train": train.take(kept), split: train.take(held)}
        return DataBundle(splits=splits, class_names=self.class_names, input_spec=self.input_spec,
                          data_hash=self.data_hash, cfg=self.cfg, seed=self.seed, in_memory=self.in_memory)

    def measure_mean_std(self, samples: int = 512) -> tuple[list[float], list[float]]:
        """Per-channel mean and std (pixels in [0, 1]) of evenly spaced training images, eval transform."""
        train = self.dataset("train")
        picks = np.linspace(0, len(train) - 1, min(samples, len(train))).astype(int)
        size = self.input_spec.size
        x = torch.stack([train[(int(i), size, 0, False)][0] for i in picks]).double().div_(255.0)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def _spread(total: int, n: int) -> list[int]:
    """``n`` indices evenly spread over ``range(total)`` (all of them when ``n >= total``)."""
    if n >= total:
        return list(range(total))
    return np.unique(np.linspace(0, total - 1, n).round().astype(int)).tolist()


def _sizes(sizes: Sequence[Size] | Size | int | None, default: Size) -> list[Size]:
    if sizes is None:
        return [tuple(default)]
    if isinstance(sizes, int):
        return [(sizes, sizes)]
    if len(sizes) == 2 and all(isinstance(v, int) for v in sizes):
        return [(int(sizes[0]), int(sizes[1]))]
    return [(s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in sizes]
