"""The hard digits: the bundled digits augmented until methods differ (the ``export_digits_hard`` stage).

The ~1,800 scikit-learn digits saturate at 97-99 %, so method comparisons come down to one or two
images. This export draws ~20,000 RGB images at 32 px from them with random affine, elastic
distortion, clutter (pieces of other digits of the same split, strokes), colours and noise, on which
the demo's small ResNets reach 84-87 % (params.yaml). Source digits are split first (stratified),
then each is augmented only within its own split: no source appears in two splits. Deterministic:
the same params give byte-identical PNGs, so the DVC md5 is stable. numpy and PIL only.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from podium.data import SPLITS, ManifestRow, _replace_dir, digits_pixels, png_bytes, stratified_split, write_manifest
from podium.errors import DataError
from podium.files import sha256_bytes

log = logging.getLogger("podium.hard_digits")

HARD_DIGITS_SIZE = 32
_RENDER_CHUNK = 250  # images per random generator: fixed, so the bytes never depend on how work is divided


@dataclass(frozen=True)
class Difficulty:
    """How :func:`export_digits_hard` distorts each image; every draw is uniform within the bound."""

    rotation_deg: float = 25.0  # rotation in [-r, r]
    scale_min: float = 0.75     # the 8 x 8 source frame's side as a fraction of the image's
    scale_max: float = 1.1      # (the digit itself fills about 3/4 of its frame)
    shear_deg: float = 15.0     # horizontal shear in [-s, s]
    translate_px: float = 3.0   # the digit's centre moves up to this along each axis
    elastic_px: float = 1.25    # std of a smooth displacement field (4 x 4 control points)
    fragments: int = 2          # up to this many pieces of other digits (same split) reach in from the edges
    lines: int = 1              # up to this many random strokes
    noise_std: float = 0.06     # Gaussian pixel noise, std in [0, n] of the 0..1 range
    min_contrast: float = 0.3   # brightness (mean of R, G, B) of digit and background differ by this (< 0.5)

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise DataError(f"difficulty needs 0 < scale_min <= scale_max (got {self.scale_min}, {self.scale_max})")
        if not 0 <= self.min_contrast < 0.5:
            raise DataError(f"difficulty min_contrast must be in [0, 0.5) (got {self.min_contrast})")
        if min(self.rotation_deg, self.shear_deg, self.translate_px, self.elastic_px, self.fragments, self.lines,
               self.noise_std) < 0:
            raise DataError("difficulty bounds must not be negative")


@dataclass(frozen=True)
class HardDigitsPlan:
    """Which source digit each exported image comes from, and where its clutter may come from."""

    source: np.ndarray        # per image: index into scikit-learn's digits
    copy: np.ndarray          # per image: which augmentation of its source (0, 1, ...)
    split: np.ndarray         # per image: "train" / "val" / "test"
    clutter_pool: np.ndarray  # every source, grouped by split
    pool_start: np.ndarray    # per image: its split's block of clutter_pool (fragments never cross splits)
    pool_size: np.ndarray


def plan_hard_digits(labels: np.ndarray, count: int, val_fraction: float, test_fraction: float,
                     seed: int) -> HardDigitsPlan:
    """Split the *sources* (stratified), then spread ``count`` images over each split's sources.

    Each split gets images in proportion to its sources. Within a split the sources are visited in a
    seeded, class-interleaved order (one of each class, then a second of each, ...) and cycled, so
    every source gets ``count / n`` copies give or take one and a small ``count`` still covers every class.
    """
    if count < 1:
        raise DataError(f"hard digits count must be positive (got {count})")
    source_split = np.asarray(stratified_split([str(y) for y in labels], val_fraction, test_fraction, seed))
    rng = np.random.default_rng([seed, 1])
    n_images = {split: int(round(count * np.mean(source_split == split))) for split in ("val", "test")}
    n_images["train"] = count - n_images["val"] - n_images["test"]
    sources, copies, splits, pools, pool_starts, pool_sizes = [], [], [], [], [], []
    for split in SPLITS:
        members = np.flatnonzero(source_split == split)
        members = members[rng.permutation(len(members))]
        rank_in_class = np.empty(len(members), dtype=np.int64)
        for label in np.unique(labels[members]):
            same = labels[members] == label
            rank_in_class[same] = np.arange(same.sum())
        order = members[np.lexsort((labels[members], rank_in_class))]
        sources.append(np.resize(order, n_images[split]))
        copies.append(np.arange(n_images[split]) // max(len(order), 1))
        splits += [split] * n_images[split]
        pool_starts.append(np.full(n_images[split], sum(len(pool) for pool in pools)))
        pool_sizes.append(np.full(n_images[split], len(members)))
        pools.append(np.sort(members))
    return HardDigitsPlan(np.concatenate(sources), np.concatenate(copies), np.asarray(splits), np.concatenate(pools),
                          np.concatenate(pool_starts), np.concatenate(pool_sizes))


_GLYPH_PAD = 2  # zero border around each glyph: a lookup outside the glyph reads zeros


def _glyphs(images: np.ndarray, size: int) -> np.ndarray:
    """The 8 x 8 digits upsampled (bicubic) to ``size``, as floats in [0, 1] with a zero border."""
    resized = np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in images])
    return np.pad(resized.astype(np.float32) / 255.0, ((0, 0), (_GLYPH_PAD, _GLYPH_PAD), (_GLYPH_PAD, _GLYPH_PAD)))


def _sample(glyphs: np.ndarray, which: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``glyphs[which[n]]`` at glyph coordinates (pixel centres at 0, 1, ...), zero outside."""
    limit = glyphs.shape[1] - _GLYPH_PAD  # both neighbours of a clipped point lie in the zero border
    y = np.clip(y + _GLYPH_PAD, 0, limit).astype(np.float32)
    x = np.clip(x + _GLYPH_PAD, 0, limit).astype(np.float32)
    y0, x0 = np.floor(y), np.floor(x)
    wy, wx = y - y0, x - x0
    side = glyphs.shape[1]
    flat = glyphs.reshape(-1)
    top_left = (which.astype(np.int32)[:, None, None] * (side * side) + y0.astype(np.int32) * side
                + x0.astype(np.int32))
    top = flat[top_left] + wx * (flat[top_left + 1] - flat[top_left])
    bottom = flat[top_left + side] + wx * (flat[top_left + side + 1] - flat[top_left + side])
    return top + wy * (bottom - top)


def _inverse_affine(rotation: np.ndarray, shear: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per image, the 2 x 2 matrix (float32) taking image offsets (y, x) to source offsets: inverse of
    rotation @ horizontal shear @ scale."""
    cos, sin, tan = np.cos(rotation), np.sin(rotation), np.tan(shear)
    one, zero = np.ones_like(tan), np.zeros_like(tan)
    rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear_x = np.stack([np.stack([one, zero], -1), np.stack([tan, one], -1)], -2)
    return np.linalg.inv(rotate @ shear_x * scale[:, None, None]).astype(np.float32)


def _warp(glyphs: np.ndarray, which: np.ndarray, inverse: np.ndarray, centre: np.ndarray, y: np.ndarray,
          x: np.ndarray) -> np.ndarray:
    """``glyphs[which]`` mapped through per-image ``inverse`` matrices, centred at ``centre`` (n x 2, image px),
    read at the image points ``y``, ``x`` (n x S x S each, possibly displaced)."""
    glyph_centre = (glyphs.shape[1] - 2 * _GLYPH_PAD - 1) / 2.0
    dy = y - centre[:, 0, None, None].astype(np.float32)
    dx = x - centre[:, 1, None, None].astype(np.float32)
    m = inverse[:, :, :, None, None]
    return _sample(glyphs, which, m[:, 0, 0] * dy + m[:, 0, 1] * dx + glyph_centre,
                   m[:, 1, 0] * dy + m[:, 1, 1] * dx + glyph_centre)


def _stroke(y: np.ndarray, x: np.ndarray, start: np.ndarray, end: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Antialiased coverage (n x S x S) of one line segment per image, ``start``/``end`` n x 2 (y, x)."""
    sy, sx = (start[:, i, None, None] for i in (0, 1))
    ey, ex = ((end - start)[:, i, None, None] for i in (0, 1))
    ay, ax = y - sy, x - sx
    t = np.clip((ay * ey + ax * ex) / np.maximum(ey * ey + ex * ex, 1e-6), 0, 1)
    distance = np.hypot(ay - t * ey, ax - t * ex)
    return np.clip(width[:, None, None] / 2 + 0.5 - distance, 0, 1)


def _colours(rng: np.random.Generator, n: int, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Background and digit colours (n x 3 each) whose brightness (mean of R, G, B) differs by min_contrast or more."""
    background_lum = rng.uniform(0, 1, n)
    below, above = np.clip(background_lum - min_contrast, 0, None), np.clip(1 - background_lum - min_contrast, 0, None)
    pick = rng.uniform(0, 1, n) * (below + above)  # uniform over the allowed luminances on either side
    digit_lum = np.where(pick < below, pick, background_lum + min_contrast + (pick - below))
    chroma = rng.normal(0, 0.2, (2, n, 3))
    chroma -= chroma.mean(-1, keepdims=True)  # a hue that leaves the luminance alone (before clipping)
    return np.clip(background_lum[:, None] + chroma[0], 0, 1), np.clip(digit_lum[:, None] + chroma[1], 0, 1)


def render_hard_digits(glyphs: np.ndarray, plan: HardDigitsPlan, start: int, stop: int, seed: int,
                       difficulty: Difficulty) -> np.ndarray:
    """Images ``start:stop`` of ``plan`` as uint8 n x S x S x 3. Each chunk of :data:`_RENDER_CHUNK` images
    has its own generator, so ``start`` must begin a chunk, and any division of the work gives the same pixels."""
    if start % _RENDER_CHUNK or not 0 < stop - start <= _RENDER_CHUNK:
        raise ValueError(f"render_hard_digits renders within one chunk of {_RENDER_CHUNK} (got {start}:{stop})")
    rng = np.random.default_rng([seed, 2, start // _RENDER_CHUNK])
    size, d, n = HARD_DIGITS_SIZE, difficulty, stop - start
    middle = (size - 1) / 2.0
    y, x = np.broadcast_to(np.mgrid[0:size, 0:size].astype(np.float32)[:, None], (2, n, size, size))

    def rotation() -> np.ndarray:
        return np.deg2rad(rng.uniform(-d.rotation_deg, d.rotation_deg, n))

    # the digit: a smooth random displacement of the sampling points (elastic), then the affine map
    control = rng.normal(0, d.elastic_px, (2, n, 4, 4)).astype(np.float32)
    upsample = np.clip(1 - np.abs(np.linspace(0, 3, size)[:, None] - np.arange(4)), 0, 1).astype(np.float32)
    shift_y, shift_x = upsample @ control @ upsample.T
    inverse = _inverse_affine(rotation(), np.deg2rad(rng.uniform(-d.shear_deg, d.shear_deg, n)),
                              rng.uniform(d.scale_min, d.scale_max, n))
    centre = middle + rng.uniform(-d.translate_px, d.translate_px, (n, 2))
    digit = np.clip(_warp(glyphs, plan.source[start:stop], inverse, centre, y + shift_y, x + shift_x), 0, 1)

    # clutter: pieces of digits of the same split reaching in from the edges, and random strokes
    clutter = np.zeros((n, size, size), dtype=np.float32)
    n_fragments, n_lines = rng.integers(0, d.fragments + 1, n), rng.integers(0, d.lines + 1, n)
    for slot in range(d.fragments):
        pick = (rng.uniform(0, 1, n) * plan.pool_size[start:stop]).astype(np.int64)
        which = plan.clutter_pool[plan.pool_start[start:stop] + pick]
        angle, radius = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.4, 0.65, n) * size
        centre = middle + radius[:, None] * np.stack([np.sin(angle), np.cos(angle)], -1)
        inverse = _inverse_affine(rotation(), np.zeros(n), rng.uniform(d.scale_min, d.scale_max, n))
        strength = (rng.uniform(0.6, 1.0, n) * (n_fragments > slot)).astype(np.float32)
        clutter = np.maximum(clutter, strength[:, None, None] * _warp(glyphs, which, inverse, centre, y, x))
    for slot in range(d.lines):
        ends = rng.uniform(-0.2 * size, 1.2 * size, (2, n, 2)).astype(np.float32)
        strength = (rng.uniform(0.5, 1.0, n) * (n_lines > slot)).astype(np.float32)
        clutter = np.maximum(clutter, strength[:, None, None] * _stroke(y, x, ends[0], ends[1],
                                                                        rng.uniform(0.8, 2.0, n).astype(np.float32)))

    # colour: a background with a gradient, the clutter under the digit, then noise
    background, ink = _colours(rng, n, d.min_contrast)
    clutter_ink = np.where(rng.uniform(0, 1, (n, 1)) < 0.5, ink, rng.uniform(0, 1, (n, 3)))
    gradient = rng.uniform(-0.15, 0.15, (2, n, 1, 1)).astype(np.float32)
    ramp = (gradient[0] * (y - middle) + gradient[1] * (x - middle)) / size
    image = background[:, None, None, :].astype(np.float32) + ramp[..., None]
    image += (clutter_ink[:, None, None, :].astype(np.float32) - image) * clutter[..., None]
    image += (ink[:, None, None, :].astype(np.float32) - image) * digit[..., None]
    noise_std = rng.uniform(0, d.noise_std, n).astype(np.float32)
    image += rng.standard_normal(image.shape, dtype=np.float32) * noise_std[:, None, None, None]
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def export_digits_hard(out: Path | str, seed: int = 0, count: int = 20_000, val_fraction: float = 0.15,
                       test_fraction: float = 0.15, difficulty: Difficulty = Difficulty()) -> Path:
    """Export ``count`` hard 32 x 32 RGB digits to ``out/{split}/{label}/{source:04d}-{copy:02d}.png`` + manifest.

    The 1,797 sources are split first (stratified, ``seed``), so a source digit and all its augmentations
    (and any fragment of it used as clutter) live in one split only; ``source`` is its index in
    scikit-learn's array. Same arguments, same bytes.
    """
    out = Path(out)
    images, labels = digits_pixels()
    plan = plan_hard_digits(labels, count, val_fraction, test_fraction, seed)
    glyphs = _glyphs(images, HARD_DIGITS_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = []
        for start in range(0, count, _RENDER_CHUNK):
            stop = min(start + _RENDER_CHUNK, count)
            pixels = render_hard_digits(glyphs, plan, start, stop, seed, difficulty)
            for i, image in zip(range(start, stop), pixels):
                label, split = labels[plan.source[i]], plan.split[i]
                rel = f"{split}/{label}/{plan.source[i]:04d}-{plan.copy[i]:02d}.png"
                data = png_bytes(image)
                (staging / split / str(label)).mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(data)
                rows.append(ManifestRow(rel, str(label), str(split), sha256_bytes(data), HARD_DIGITS_SIZE,
                                        HARD_DIGITS_SIZE, 3))
        write_manifest(staging, rows)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %d hard digits to %s (seed %d, val %.2f, test %.2f, %s)", count, out, seed, val_fraction,
             test_fraction, difficulty)
    return out
