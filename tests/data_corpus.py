"""Builders of real datasets on disk, good and bad, for data-plane tests (reusable by later tests).

Each ``BAD`` builder damages a copy of a valid ``{train,val,test}/<label>/`` dataset in place and
returns the dataset-relative path of a file the validator must name (or the missing value).
``BAD_CASES`` maps a case name to (builder, expectation type, column) that must fail.
``MIXED_BUT_VALID`` builders change a dataset in ways that must still pass (other sizes and modes).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from podium.data import SPLITS, export_digits
from tests.photos import VARIANTS, png_bomb, write_photo


def export_clean_digits(dest: Path) -> Path:
    """A clean digits export (the real DVC stage's function) at ``dest``."""
    return export_digits(dest, seed=0, val_fraction=0.15, test_fraction=0.15)


def copy_dataset(src: Path, dest: Path, per_class: int | None = None) -> Path:
    """Copy a dataset; with ``per_class``, only the first N files of each split/label folder (a
    smaller, still valid dataset: cheaper to damage and rescan; its manifest is left behind)."""
    if per_class is None:
        shutil.copytree(src, dest)
        return dest
    for split in SPLITS:
        for label_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dest / split / label_dir.name).mkdir(parents=True)
            for path in sorted(label_dir.iterdir())[:per_class]:
                shutil.copyfile(path, dest / split / label_dir.name / path.name)
    return dest


def write_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L", seed: int = 0) -> Path:
    """A random PNG (or whatever the suffix says) of ``size`` (width, height) and PIL ``mode``."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)  # mode inferred: L or RGB(A)
    return path


def make_flat_imagefolder(dest: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 20,
                          size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    """``dest/<class>/<i>.png`` (plus a stray non-image file that importers must skip)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(dest / name / f"{i:03d}.png", size, mode, seed=c * 1000 + i)
    (dest / classes[0] / "notes.txt").write_text("not an image")
    return dest


def make_presplit_imagefolder(dest: Path, classes: tuple[str, ...] = ("a", "b"),
                              counts: dict[str, int] | None = None, size: tuple[int, int] = (9, 9),
                              mode: str = "L") -> Path:
    """``dest/{train,val,test}/<class>/<i>.png`` with ``counts[split]`` images per class."""
    counts = counts or {"train": 8, "val": 3, "test": 2}
    for s, split in enumerate(SPLITS):
        for c, name in enumerate(classes):
            for i in range(counts[split]):
                write_image(dest / split / name / f"{split}-{i}.png", size, mode, seed=s * 10_000 + c * 100 + i)
    return dest


def _first(root: Path, split: str, label: str | None = None) -> Path:
    folder = root / split / label if label else root / split
    return sorted(folder.rglob("*.png"))[0]


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def truncate_png(root: Path) -> str:
    """Cut a val image in half (a download or copy interrupted after export)."""
    path = _first(root, "val")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _rel(root, path)


def flip_byte(root: Path) -> str:
    """Flip one byte inside a test image's pixel data, size unchanged (silent corruption / bit rot)."""
    path = _first(root, "test", "5")
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 6  # inside the compressed pixel data; the chunk CRC no longer matches
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return _rel(root, path)


def zero_byte_file(root: Path) -> str:
    path = _first(root, "train")
    path.write_bytes(b"")
    return _rel(root, path)


def rgb_among_gray(root: Path) -> str:
    """Replace one grayscale train image with an RGB one of the same size (valid: modes may differ)."""
    path = _first(root, "train", "4")
    write_image(path, (8, 8), "RGB", seed=1)
    return _rel(root, path)


def different_size(root: Path) -> str:
    """Replace a test image with a larger one (valid: sizes may differ)."""
    path = _first(root, "test")
    write_image(path, (16, 16), "L", seed=2)
    return _rel(root, path)


def too_small(root: Path) -> str:
    """Replace a val image with an 8x4 one: its smaller side is below the default ``min_side`` (8)."""
    path = _first(root, "val")
    write_image(path, (8, 4), "L", seed=4)
    return _rel(root, path)


def decompression_bomb(root: Path) -> str:
    """Add a 30000x30000 PNG bomb to train."""
    return _rel(root, png_bomb(root / "train" / "2" / "bomb.png"))


def unknown_label(root: Path) -> str:
    """A val image under a label folder the train split (the class set) does not have."""
    path = write_image(root / "val" / "11" / "0001.png", (8, 8), "L", seed=3)
    return _rel(root, path)


def empty_split(root: Path) -> str:
    """Delete every test image, keeping the (now empty) folders."""
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    return "missing 'test'"


def duplicate_across_splits(root: Path) -> str:
    """Copy a train image into val under a new name: the same bytes in two splits (leakage)."""
    src = _first(root, "train", "7")
    dest = root / "val" / "7" / "duplicate.png"
    shutil.copyfile(src, dest)
    return _rel(root, dest)


def too_few_per_class(root: Path, label: str = "3", keep: int = 2, split: str = "train") -> str:
    """Leave only ``keep`` ``split`` examples of one class."""
    files = sorted((root / split / label).glob("*.png"))
    for path in files[keep:]:
        path.unlink()
    return _rel(root, files[0])


def too_few_in_val(root: Path) -> str:
    return too_few_per_class(root, label="6", keep=2, split="val")


def class_missing_from_test(root: Path) -> str:
    """Delete every test image of one class (train and val still have it)."""
    for path in (root / "test" / "8").glob("*.png"):
        path.unlink()
    return "missing '8'"


BAD_CASES: dict[str, tuple[Callable[[Path], str], str, str]] = {
    "truncated_png": (truncate_png, "expect_column_values_to_be_in_set", "decodable"),
    "flipped_byte": (flip_byte, "expect_column_values_to_be_in_set", "decodable"),
    "zero_byte_file": (zero_byte_file, "expect_column_values_to_be_between", "size_bytes"),
    "too_small": (too_small, "expect_column_values_to_be_between", "min_side"),
    "decompression_bomb": (decompression_bomb, "expect_column_values_to_be_in_set", "too_large"),
    "unknown_label": (unknown_label, "expect_column_values_to_be_in_set", "label"),
    "empty_split": (empty_split, "expect_column_distinct_values_to_contain_set", "split"),
    "class_missing_from_test": (class_missing_from_test, "expect_column_distinct_values_to_contain_set",
                                "test_label"),
    "duplicate_across_splits": (duplicate_across_splits, "expect_column_values_to_be_in_set", "leaked"),
    "too_few_per_class": (too_few_per_class, "expect_column_values_to_be_between", "class_count_in_split"),
    "too_few_in_val": (too_few_in_val, "expect_column_values_to_be_between", "class_count_in_split"),
}
MIXED_BUT_VALID: dict[str, Callable[[Path], str]] = {"rgb_among_gray": rgb_among_gray,
                                                     "different_size": different_size}


def make_mixed_photo_folder(dest: Path, classes: tuple[str, ...] = ("a", "b"), per_kind: int = 1) -> Path:
    """``dest/{train,val,test}/<class>/``: in every folder, ``per_kind`` files of each kind a photo
    dataset holds (:data:`tests.photos.VARIANTS`: JPEG, PNG, WebP, BMP; L, RGB, RGBA, P, I;16, CMYK,
    EXIF-rotated), each of another size."""
    rng = np.random.default_rng(0)
    for s, split in enumerate(SPLITS):
        for c, label in enumerate(classes):
            for i in range(per_kind):
                for k, (suffix, mode) in enumerate(VARIANTS):
                    size = (8 + int(rng.integers(0, 90)), 8 + int(rng.integers(0, 60)))
                    write_photo(dest / split / label / f"{i}-{k}{suffix}", size, c, s * 1000 + i * 100 + k, mode)
    return dest
