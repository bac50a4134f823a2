"""The one image decoder: what a file becomes before any transform, for validation and loading alike.

PIL and numpy only (the validation workers and the DVC stage import it without torch). A file is
opened, its declared size checked against a pixel limit *before* any pixel is decoded (so a
decompression bomb is refused, not decoded), its EXIF orientation applied, and its mode converted
to the model's channels: ``L`` for one channel, ``RGB`` for three. 16-bit grayscale keeps its top
8 bits; CMYK, YCbCr and LAB go through PIL's conversion; alpha is dropped (palette images
with transparency are expanded first), as timm's and torchvision's loaders do.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from podium.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
# Modes that decode to one channel; every other convertible mode becomes RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
CONVERTIBLE_MODES = GRAY_MODES | frozenset({"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Far above any camera photo (a 100 MP sensor), far below what exhausts memory when decoded.
DEFAULT_MAX_PIXELS = 250_000_000

# The limit is ours (checked on the header, with a one-line error); PIL's own bomb check would
# otherwise warn or raise with a different message at a different threshold.
Image.MAX_IMAGE_PIXELS = None


def decoded_channels(mode: str) -> int:
    """Channels a file of this PIL mode has once decoded (grayscale 1, everything else 3)."""
    return 1 if mode in GRAY_MODES else 3


def open_checked(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` lazily (header only) and refuse it if it declares more than ``max_pixels``."""
    img = Image.open(path)
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise DataError(f"{path} declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), above "
                        f"data.max_pixels ({max_pixels / 1e6:.0f} MP): refused without decoding")
    return img


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """``img`` (EXIF orientation applied) as mode ``L`` (``channels == 1``) or ``RGB`` (3)."""
    with warnings.catch_warnings():  # "palette images with transparency should be converted to RGBA"
        warnings.simplefilter("ignore")
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            img = _gray_to_8bit(img)
        elif img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if channels == 1:
            return img if img.mode == "L" else img.convert("L")
        return img if img.mode == "RGB" else img.convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale to 8 bits: the top byte of 16-bit data, a clip of float data to [0, 255]."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0, 255)
    else:
        arr = np.clip(arr.astype(np.int64) >> 8, 0, 255)  # "I" comes from 16-bit files (PNG, TIFF)
    return Image.fromarray(arr.astype(np.uint8))


def decode(path: Path | str, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode ``path`` as an ``L`` or ``RGB`` image; any failure is a one-line :class:`DataError`."""
    try:
        with open_checked(path, max_pixels) as img:
            img.load()
            return to_channels(img, channels)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "cannot decode"
        raise DataError(f"cannot decode {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None
