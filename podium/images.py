"""The one image decoder: what a file becomes before any transform, for validation and loading alike.

PIL and numpy only (the validation workers and the DVC stage import it without torch). A file is
opened, its declared size checked against a pixel limit *before* any pixel is decoded (so a
decompression bomb is refused, not decoded), its EXIF orientation applied, and its mode converted
to the model's channels: ``L`` for one channel, ``RGB`` for three. CMYK, YCbCr and LAB go through
PIL's conversion; alpha is dropped (palette images with transparency are expanded first), as timm's
and torchvision's loaders do.

High-depth grayscale is scaled to 0..255 by its declared range, never clipped: 16-bit samples (modes
``I;16*``, and ``I`` from PNG, PGM/PPM or a TIFF declaring at most 16 bits) by ``round(v * 255 / 65535)``
(``2**bits - 1`` for fewer bits); float pixels (mode ``F``) must lie in [0, 1] and become
``round(v * 255)``. Integer data of more than 16 bits and floats outside [0, 1] have no defined 8-bit
range and are refused with one line.
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
# Above a 61 MP full-frame camera, below Pillow's own bomb warning (89 MP): one decoded RGB image is
# at most ~200 MB per worker. Larger photos: raise data.max_pixels.
DEFAULT_MAX_PIXELS = 64_000_000
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

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
        if img.mode in HIGH_DEPTH_MODES:
            img = _gray_to_8bit(img)
        elif img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if channels == 1:
            return img if img.mode == "L" else img.convert("L")
        return img if img.mode == "RGB" else img.convert("RGB")


def _integer_bits(img: Image.Image) -> int | None:
    """Bits per sample an integer grayscale image declares; None when its file does not say."""
    if img.mode.startswith("I;16"):
        return 16
    if img.format in ("PNG", "PPM"):  # their mode-I images hold 16-bit samples (PGM maxval scaled to 65535)
        return 16
    if img.format == "TIFF":
        bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        return int(bits[0]) if bits else None
    return None


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale scaled to 0..255 by its declared range (see the module docstring).

    Raises ValueError (``decode`` words it with the path) for data without a defined 8-bit range."""
    arr = np.asarray(img)
    if img.mode == "F":
        low, high = float(arr.min()), float(arr.max())
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise ValueError(f"float pixels span {low:g}..{high:g}: only [0, 1] has a defined 8-bit range")
        return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8))
    bits = _integer_bits(img)
    if bits is None or bits > 16:
        raise ValueError(f"{bits or 'unknown'}-bit integer pixels (mode {img.mode}) have no defined 8-bit range: "
                         "save them as 8 or 16 bits")
    top = (1 << bits) - 1
    samples = np.clip(arr, 0, top).astype(np.uint32)  # within the declared range already; uint32 holds v * 255
    return Image.fromarray(((samples * 255 + top // 2) // top).astype(np.uint8))


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
