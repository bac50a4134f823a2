"""The streaming data plane on generated photo folders: any format, mode and size decodes to the model's
channels; loaders read at the size asked for, the same batches with or without worker processes; data
-parallel shards; the recorded preprocessing reproduces the loader's tensors with plain PIL."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from podium.data import import_imagefolder, load_bundle
from podium.errors import DataError
from podium.images import decode
from podium.methods.data import DataBundle, EpochBatchSampler
from podium.methods.transforms import AugmentConfig, LoaderConfig
from tests.photos import VARIANTS, dvc_project, follow_preprocessing, make_photo_folder, png_bomb, write_photo


@pytest.mark.parametrize("suffix, mode", VARIANTS, ids=[f"{s[1:]}-{m}" for s, m in VARIANTS])
def test_every_format_and_mode_decodes_to_the_models_channels(tmp_path: Path, suffix: str, mode: str) -> None:
    path = write_photo(tmp_path / f"img{suffix}", (48, 30), label=1, seed=3, mode=mode)
    rgb, gray = decode(path, 3), decode(path, 1)
    assert (rgb.mode, gray.mode) == ("RGB", "L")
    assert rgb.size == gray.size == (48, 30)  # EXIF orientation applied: displayed size, not stored size
    reference = np.asarray(Image.open(write_photo(tmp_path / "ref.png", (48, 30), 1, 3)).convert("L"), np.float32)
    error = np.abs(np.asarray(gray, np.float32) - reference).mean()
    assert error < (25 if mode in ("P", "CMYK", "RGBA") or suffix != ".png" else 2), error  # content kept


def test_sixteen_bit_keeps_its_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(path)
    assert np.asarray(decode(path, 1)).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("name", ["ramp16.png", "ramp16.tif", "ramp16.pgm", "ramp-float.tif"])
def test_high_depth_ramps_are_scaled_not_clipped(tmp_path: Path, name: str) -> None:
    """A ramp over the whole declared range (0..65535, or 0..1 for floats) comes out as 0..255 evenly:
    not mostly 255 (16-bit values clipped) nor mostly 0 (floats clipped to [0, 255])."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    pixels = (ramp / 65535).astype(np.float32) if "float" in name else ramp.astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode in ("I;16", "I", "F")
    for channels in (1, 3):
        out = np.asarray(decode(tmp_path / name, channels), np.float64)
        assert out.min() == 0 and out.max() == 255
        assert abs(out.mean() - 127.5) < 1 and (out == 255).mean() < 0.01


def test_high_depth_without_an_8_bit_range_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) << 20).save(tmp_path / "i32.tif")
    Image.fromarray(np.linspace(-1, 2, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"i32.tif: 32-bit integer pixels \(mode I\) have no defined 8-bit range"):
        decode(tmp_path / "i32.tif", 1)
    with pytest.raises(DataError, match=r"f.tif: float pixels span -1..2: only \[0, 1\]"):
        decode(tmp_path / "f.tif", 3)


def test_decompression_bomb_is_refused_without_decoding(tmp_path: Path, monkeypatch) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        decode(bomb, 3, max_pixels=250_000_000)
    assert "30000x30000" in str(info.value) and "max_pixels" in str(info.value) and "\n" not in str(info.value)
    assert loads == [] and time.perf_counter() - start < 1.0


def _photo_dataset(tmp_path: Path, per_class: int = 24) -> Path:
    src = make_photo_folder(tmp_path / "src", per_class=per_class, sides=(40, 120))
    return import_imagefolder(src, dvc_project(tmp_path / "proj"), "photos", val_fraction=0.25, test_fraction=0.25,
                              seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _photo_dataset(tmp_path_factory.mktemp("photos"))


def _batches(loader, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, batch in enumerate(loader):
        if i == n:
            break
        out.append(batch)
    return out


def test_streamed_photos_read_at_any_size_the_same_with_or_without_workers(photos: Path) -> None:
    cfg = LoaderConfig(image_size=(32, 32), batch_size=4, cache_mb=0, augment=AugmentConfig(hflip=0.5))
    streamed = load_bundle(photos, cfg.model_copy(update={"num_workers": 2}), "h")
    inline = load_bundle(photos, cfg.model_copy(update={"num_workers": 0}), "h")
    assert not streamed.in_memory and streamed.num_workers == 2 and streamed.input_spec.channels == 3
    # elastic resolution: each batch at one of the sizes, cropped from the source image
    elastic = streamed.train_loader([(24, 24), (40, 40)])
    assert elastic.loader.num_workers == 2  # 9 batches: a pass long enough for worker processes
    assert {tuple(x.shape[-2:]) for x, _ in elastic} == {(24, 24), (40, 40)}
    for a, b in zip(_batches(streamed.train_loader([(24, 24), (40, 40)])), _batches(inline.train_loader([(24, 24), (40, 40)]))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # augmentation seeded per item, not per worker
    x, y = next(iter(streamed.eval_loader("val", (48, 48))))
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.long


def test_augmentation_leaves_the_training_random_stream_alone(photos: Path) -> None:
    data = load_bundle(photos, LoaderConfig(image_size=(32, 32), batch_size=8, num_workers=0,
                                            augment=AugmentConfig(auto_augment="rand-m9-mstd0.5")), "h")
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(1).item())
    random.seed(5)
    torch.manual_seed(5)
    first = _batches(data.train_loader(), 2)
    assert (random.random(), torch.rand(1).item()) == expected  # dropout draws do not depend on the data
    again = _batches(data.train_loader(), 2)  # a fresh loader (a resumed training): the same batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))


def test_mixup_and_label_smoothing_give_soft_targets(photos: Path) -> None:
    aug = AugmentConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    data = load_bundle(photos, LoaderConfig(image_size=(32, 32), batch_size=8, num_workers=0, augment=aug), "h")
    x, y = next(iter(data.train_loader()))
    assert y.shape == (8, 3) and torch.allclose(y.sum(1), torch.ones(8)) and (y.max(1).values < 1).all()
    smooth = load_bundle(photos, LoaderConfig(image_size=(32, 32), batch_size=8, num_workers=0,
                                              augment=AugmentConfig(label_smoothing=0.3)), "h")
    _, y = next(iter(smooth.train_loader()))
    assert torch.allclose(y.max(1).values, torch.full((8,), 0.8))


def test_data_parallel_ranks_share_each_global_batch(photos: Path) -> None:
    def batches(rank: int, world: int) -> list[list[int]]:
        sampler = EpochBatchSampler(range(50), 16, shuffle=True, drop_last=False, sizes=[(8, 8)], train=True,
                                    generator=torch.Generator().manual_seed(1), rank=rank, world=world)
        return [[key[0] for key in batch] for batch in sampler]

    whole, ranks = batches(0, 1), [batches(r, 3) for r in range(3)]
    assert len(whole) == 4 and all(len(r) == 4 for r in ranks)
    for b, batch in enumerate(whole):  # every image once per global batch, split in order across ranks
        assert ranks[0][b] + ranks[1][b] + ranks[2][b] == batch


def test_recorded_preprocessing_reproduces_the_eval_tensor_with_pil(photos: Path) -> None:
    data = load_bundle(photos, LoaderConfig(image_size=(36, 36), batch_size=4, num_workers=0, crop_pct=0.875,
                                            interpolation="bicubic"), "h")
    pre = data.preprocessing((36, 36))
    x, _ = next(iter(data.eval_loader("val", (36, 36), limit=4)))
    val = data.splits["val"]
    for i, index in enumerate(np.unique(np.linspace(0, len(val) - 1, 4).round().astype(int))):
        client = follow_preprocessing(Path(val.root) / str(val.paths[index]), pre)
        np.testing.assert_allclose(client, x[i].numpy(), atol=1e-5)


def test_in_memory_arrays_use_the_same_transforms() -> None:
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (6, 3, 20, 20), dtype=np.uint8), np.arange(6) % 2) for s in ("train", "val", "test")}
    data = DataBundle.from_arrays(splits, ["a", "b"], (10, 10), 3, "mem")
    assert data.in_memory and data.num_workers == 0
    x, _ = next(iter(data.eval_loader("val")))
    raw = torch.nn.functional.interpolate(torch.from_numpy(splits["val"][0][:3]).float(), (10, 10), mode="bilinear",
                                          antialias=True, align_corners=False)
    expected = (raw / 255 - torch.tensor(data.input_spec.mean).view(1, -1, 1, 1)) / torch.tensor(
        data.input_spec.std).view(1, -1, 1, 1)
    assert torch.allclose(x, expected, atol=0.05)  # PIL's antialiased bilinear (uint8) vs torch's
