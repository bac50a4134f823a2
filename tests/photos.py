"""Generated photo folders: the files a user of Podium actually has (JPEG, PNG, WebP, BMP; many sizes;
RGB, L, RGBA, P, 16-bit and CMYK; EXIF-rotated). Used by the data-plane tests and ``bench/data_scale.py``.

Each class has its own hue and stripe direction, so a model can learn the classes from a few
hundred images at any resolution, as from real photos.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# (suffix, PIL mode written) cycled through by make_photo_folder: every format and mode appears
VARIANTS: tuple[tuple[str, str], ...] = (
    (".jpg", "RGB"), (".png", "RGB"), (".webp", "RGB"), (".bmp", "RGB"), (".png", "L"), (".png", "RGBA"),
    (".png", "P"), (".png", "I;16"), (".jpg", "CMYK"), (".jpg", "EXIF6"),
)
REPO = Path(__file__).resolve().parents[1]
HUES = ((220, 60, 40), (40, 180, 70), (50, 80, 220), (200, 180, 40), (160, 50, 180), (40, 170, 180))


def photo_pixels(size: tuple[int, int], label: int, seed: int) -> np.ndarray:
    """H x W x 3 uint8: the class's hue, stripes at a class-specific angle, noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.pi * label / max(len(HUES), 1)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / max(8.0, width / 6)))
    hue = np.asarray(HUES[label % len(HUES)], dtype=np.float32)
    img = stripes[..., None] * hue + rng.normal(0, 18, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photo(path: Path, size: tuple[int, int], label: int = 0, seed: int = 0, mode: str = "RGB") -> Path:
    """One photo at ``path`` (format from the suffix) of ``size`` (width, height), written in ``mode``:
    RGB, L, RGBA, P (with a transparent palette entry), I;16 (16-bit PNG), CMYK (JPEG), or EXIF6 (a JPEG
    stored rotated, with EXIF orientation 6 saying so: displayed, it is ``size``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(photo_pixels(size, label, seed))
    if mode == "L":
        rgb.convert("L").save(path)
    elif mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(path)
    elif mode == "P":
        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        pal.info["transparency"] = 0
        pal.save(path, transparency=0)
    elif mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # 0..65535
        Image.fromarray(gray).save(path)  # uint16: mode I;16
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=90)
    elif mode == "EXIF6":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": store the image turned the other way
        rgb.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
    else:
        rgb.save(path, **({"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}))
    return path


def make_photo_folder(dest: Path, classes: Sequence[str] = ("cat", "dog", "fox"), per_class: int = 20,
                      sides: tuple[int, int] = (40, 160), variants: Sequence[tuple[str, str]] = VARIANTS,
                      seed: int = 0) -> Path:
    """``dest/<class>/<i><suffix>``: ``per_class`` photos per class of random sizes (each side in
    ``sides``), cycling through ``variants`` (format, mode)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            suffix, mode = variants[(c * per_class + i) % len(variants)]
            size = (int(rng.integers(*sides)), int(rng.integers(*sides)))
            write_photo(dest / name / f"{i:05d}{suffix}", size, c, seed * 1_000_003 + c * 10_007 + i, mode)
    return dest


def png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape): only
    its header is valid, so anything that decodes it fails, and anything that does not can read its size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def local_remote(project: Path) -> Path:
    """The default DVC remote of a :func:`dvc_project`: a sibling folder, in the test's temp dir."""
    return project.parent / f"{project.name}.dvc-remote"


def dvc_project(path: Path) -> Path:
    """A fresh git + DVC repository using this repo's committed DVC config (site cache, remotes), its
    default remote ``local`` moved from the user's cache to :func:`local_remote` (nothing written to ~)."""
    from configobj import ConfigObj

    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    shutil.copytree(REPO / ".dvc", path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copy(REPO / ".dvcignore", path / ".dvcignore")
    config = ConfigObj(str(path / ".dvc" / "config"))
    config['remote "local"']["url"] = str(local_remote(path))
    config.write()
    return path


def follow_preprocessing(path: Path, pre: dict) -> np.ndarray:
    """What a client without Podium does with a release's recorded ``preprocessing``: PIL only.
    Returns C x H x W float32."""
    from podium.images import decode

    img = decode(path, 1 if pre["channel_order"] == "L" else 3)
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}[pre["resize"]["interpolation"]]
    size = pre["resize"]["size"]
    if pre["resize"]["shorter_side"]:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new = (size, size * long // short) if w == short else (size * long // short, size)
    else:
        new = (size[1], size[0])
    img = img.resize(new, resample)
    ch, cw = pre["center_crop"]
    left, top = int(round((img.width - cw) / 2.0)), int(round((img.height - ch) / 2.0))
    arr = np.asarray(img.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return ((arr - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)).transpose(2, 0, 1)
