"""The data plane's files: export the bundled digits, import any ImageFolder, load a DataBundle.

Every dataset Podium uses lives under ``data/<name>/`` in one layout::

    data/<name>/{train,val,test}/<label>/<file>     images (PNG for the exported digits)
    data/<name>/manifest.csv                        path,label,split,sha256,height,width,channels

so one validation suite, one loader and one DVC md5 (the lineage / cache key) cover them all.
Exports are deterministic: the same params give byte-identical files and therefore the same md5.

This module is also the DVC stage's command (``python -m podium.data export-digits ...``), so it
imports only numpy, PIL and scikit-learn at module level; torch is imported lazily by
:func:`load_bundle`.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image

from podium.errors import DataError
from podium.files import sha256_bytes, sha256_file
from podium.images import IMAGE_SUFFIXES, decoded_channels

if TYPE_CHECKING:
    from podium.methods.base import DataShape
    from podium.methods.data import DataBundle, ImageSet
    from podium.methods.transforms import LoaderConfig

log = logging.getLogger("podium.data")

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "split", "sha256", "height", "width", "channels")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- file helpers


def class_sort_key(name: str) -> tuple[int, int | str]:
    """Numeric folder names sort as numbers ("2" before "10"), the rest alphabetically after them."""
    return (0, int(name)) if name.isdigit() else (1, name)


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, hidden files skipped), in a stable order."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def stratified_split(labels: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Assign each item to train/val/test so every class keeps the requested proportions.

    Per class (in :func:`class_sort_key` order, one seeded generator for all), the items are
    permuted and ``round(n * fraction)`` go to val and to test, the rest to train. Same labels,
    fractions and seed always give the same assignment.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"split fractions must be in [0, 1) and sum below 1 (val={val_fraction}, test={test_fraction})")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=object)
    out = np.empty(len(labels_arr), dtype=object)
    for label in sorted(set(labels), key=class_sort_key):
        idx = np.flatnonzero(labels_arr == label)
        idx = idx[rng.permutation(len(idx))]
        n_val, n_test = int(round(len(idx) * val_fraction)), int(round(len(idx) * test_fraction))
        out[idx[:n_val]] = "val"
        out[idx[n_val:n_val + n_test]] = "test"
        out[idx[n_val + n_test:]] = "train"
    return [str(s) for s in out]


@dataclass(frozen=True)
class ManifestRow:
    path: str  # relative to the dataset root, posix separators
    label: str
    split: str
    sha256: str
    height: int | None
    width: int | None
    channels: int | None


def describe_image(root: Path, path: Path, split: str, label: str) -> ManifestRow:
    """Manifest row for one file; size and mode come from the header (no full decode)."""
    height = width = channels = None
    try:
        with Image.open(path) as img:
            width, height = img.size
            channels = decoded_channels(img.mode)
    except Exception:  # undecodable files are recorded as such; validation reports them
        pass
    return ManifestRow(path.relative_to(root).as_posix(), label, split, sha256_file(path), height, width, channels)


def write_manifest(root: Path, rows: Iterable[ManifestRow]) -> Path:
    """Write ``manifest.csv`` sorted by path, with "\\n" line ends, so equal data gives equal bytes."""
    path = root / MANIFEST
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in sorted(rows, key=lambda r: r.path):
            writer.writerow(["" if getattr(row, c) is None else getattr(row, c) for c in MANIFEST_COLUMNS])
    return path


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(Path(root) / MANIFEST, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _replace_dir(staging: Path, dest: Path) -> None:
    """Swap a fully written staging folder into place, so a failure never leaves half a dataset."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(dest)


# ----------------------------------------------------------------------------- bundled digits


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as uint8 N x 8 x 8 (``round(v * 255 / 16)``) and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 H x W (grayscale) or H x W x 3 array as PNG; PIL writes no timestamps, so it is deterministic."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def export_digits(out: Path | str, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Path:
    """Export the bundled digits to ``out/{split}/{label}/{index:04d}.png`` plus ``out/manifest.csv``.

    ``index`` is the sample's position in scikit-learn's array, so file names never depend on
    the split. Written to a sibling staging folder and swapped in at the end.
    """
    out = Path(out)
    images, labels = digits_pixels()
    splits = stratified_split([str(y) for y in labels], val_fraction, test_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = []
        for index, (pixels, label, split) in enumerate(zip(images, labels, splits)):
            rel = f"{split}/{label}/{index:04d}.png"
            data = png_bytes(pixels)
            (staging / split / str(label)).mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
            rows.append(ManifestRow(rel, str(label), split, sha256_bytes(data), 8, 8, 1))
        write_manifest(staging, rows)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %d digits to %s (seed %d, val %.2f, test %.2f)", len(rows), out, seed, val_fraction,
             test_fraction)
    return out


# ----------------------------------------------------------------------------- user ImageFolders


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: class_sort_key(p.name))


def _refuse_links_out(src: Path, files: Iterable[Path]) -> None:
    """DataError for the first file that resolves outside ``src`` (``src`` itself is resolved)."""
    for file in files:
        target = file.resolve()
        if not target.is_relative_to(src):
            raise DataError(f"{file} leads outside the ImageFolder source {src} (a symbolic link to {target}): "
                            "refused; copy the file into the source or remove the link")


def import_imagefolder(src: Path | str, project_dir: Path | str, name: str, val_fraction: float = 0.15,
                       test_fraction: float = 0.15, seed: int = 0) -> Path:
    """Copy an ImageFolder dataset to ``project_dir/data/<name>``, write its manifest, ``dvc add`` it.

    Two source layouts are accepted: ``src/{class}/*`` (split here, stratified and seeded) or
    ``src/{train,val,test}/{class}/*`` (kept as is). File bytes are copied unchanged (nothing is
    re-encoded); non-image and hidden files are skipped. A symbolic link (to a file, or a folder on
    the way to one) is followed only while it stays inside ``src``: one leading out of it is refused
    with one line before anything is copied, so an import never pulls in files the source tree does
    not hold. Returns the dataset root.
    """
    from podium import dvc_ops

    src, project_dir = Path(src).resolve(), Path(project_dir).resolve()
    if not _NAME.match(name):
        raise DataError(f"dataset name {name!r} must be letters, digits, '_', '-' or '.'")
    if not src.is_dir():
        raise DataError(f"ImageFolder source {src} is not a directory")
    dest = project_dir / "data" / name
    if dest == src or dest in src.parents:
        raise DataError(f"ImageFolder source {src} is inside the destination {dest}")
    if not (project_dir / ".dvc").is_dir():
        raise DataError(f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there")
    top = [p.name for p in _class_dirs(src)]
    presplit = bool(set(top) & set(SPLITS))
    if presplit and set(top) != set(SPLITS):
        problem = (f"lacks {sorted(set(SPLITS) - set(top))}" if set(top) < set(SPLITS)
                   else f"mixes split folders with others ({', '.join(sorted(set(top) - set(SPLITS)))})")
        raise DataError(f"{src} looks pre-split but {problem}: give train, val and test, or one folder per class")
    items: list[tuple[Path, str, str]] = []  # (file, split, label)
    if presplit:
        for split in SPLITS:
            for class_dir in _class_dirs(src / split):
                items += [(f, split, class_dir.name) for f in image_files(class_dir)]
    else:
        flat = [(f, class_dir.name) for class_dir in _class_dirs(src) for f in image_files(class_dir)]
        splits = stratified_split([label for _, label in flat], val_fraction, test_fraction, seed)
        items = [(f, split, label) for (f, label), split in zip(flat, splits)]
    if not items:
        raise DataError(f"no image files found in {src} (expected {src}/<class>/<image> or {src}/train/<class>/<image>)")
    _refuse_links_out(src, [file for file, _, _ in items])

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        rows = []
        for file, split, label in items:
            class_root = src / split / label if presplit else src / label
            target = staging / split / label / file.relative_to(class_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            rows.append(describe_image(staging, target, split, label))
        write_manifest(staging, rows)
        _replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("imported %d images from %s into %s (%s)", len(items), src, dest,
             "pre-split" if presplit else f"split seed {seed}")
    dvc_ops.track(project_dir, dest.relative_to(project_dir))
    return dest


# ----------------------------------------------------------------------------- loading


def scan_imagefolder(root: Path) -> list[tuple[Path, str, str]]:
    """(file, split, label) for every image under ``root/{split}/{label}/``, in a stable order."""
    items = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"dataset {root} has no {split}/ folder")
        for class_dir in _class_dirs(split_dir):
            items += [(f, split, class_dir.name) for f in image_files(class_dir)]
    return items


def dataset_channels(files: Sequence[Path], samples: int = 64) -> int:
    """1 when every sampled training image is grayscale (the digits), else 3: RGB, with gray images
    converted, as for any photo dataset. The headers of evenly spaced files are read, nothing decoded."""
    picks = np.linspace(0, len(files) - 1, min(samples, len(files))).astype(int) if files else []
    for i in picks:
        try:
            with Image.open(files[i]) as img:
                if decoded_channels(img.mode) == 3:
                    return 3
        except Exception:  # noqa: BLE001 - validation names undecodable files; here they say nothing
            continue
    return 1 if len(picks) else 3


def data_shape(root: Path | str, classes: Sequence[str] | None, image_size: Sequence[int]) -> "DataShape":
    """Classes, channels and size of a dataset from its folders and a few image headers (nothing
    decoded); 10 classes of 1 channel (the digits) when it is not exported yet."""
    from podium.methods.base import DataShape

    root = Path(root)
    size = (int(image_size[0]), int(image_size[1]))
    if not (root / "train").is_dir():
        return DataShape(len(classes) if classes else 10, 1, size)
    class_dirs = _class_dirs(root / "train")
    train = [f for f, split, _ in scan_imagefolder(root) if split == "train"]
    return DataShape(len(classes) if classes else len(class_dirs), dataset_channels(train), size)


def image_sets(root: Path, classes: Sequence[str] | None = None) -> tuple[dict[str, "ImageSet"], list[str]]:
    """The files of every split as :class:`podium.methods.data.ImageSet` (paths and label indices) and
    the class names; nothing is decoded."""
    from podium.methods.data import ImageSet

    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist")
    items = scan_imagefolder(root)
    class_names = list(classes) if classes else sorted({label for _, s, label in items if s == "train"},
                                                      key=class_sort_key)
    index = {name: i for i, name in enumerate(class_names)}
    stray = sorted({label for _, _, label in items if label not in index})
    if stray:
        raise DataError(f"dataset {root} has labels outside the class set: {', '.join(stray[:5])}")
    sets = {}
    for split in SPLITS:
        chosen = [(f, label) for f, s, label in items if s == split]
        if not chosen:
            raise DataError(f"dataset {root} split {split} is empty")
        sets[split] = ImageSet(labels=np.array([index[label] for _, label in chosen], dtype=np.int64), root=str(root),
                               paths=np.array([f.relative_to(root).as_posix() for f, _ in chosen]))
    return sets, class_names


_BUNDLES: dict[tuple, "DataBundle"] = {}
_LOCKS: dict[tuple, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def load_bundle(root: Path | str, cfg: "LoaderConfig", data_hash: str, classes: Sequence[str] | None = None,
                seed: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                ) -> "DataBundle":
    """The dataset at ``root`` as a :class:`podium.methods.data.DataBundle` (files, not pixels).

    Memoised on (root, data_hash, cfg, classes, seed, mean, std): tasks in one process (threads
    included: a per-key lock) share one bundle, and so its in-memory caches of decoded images.
    ``mean``/``std`` are a pretrained anchor's normalisation, used unless ``cfg`` sets its own.
    """
    from podium.methods.data import DataBundle
    from podium.methods.transforms import LoaderConfig

    cfg = LoaderConfig.model_validate({k: getattr(cfg, k) for k in LoaderConfig.model_fields})
    key = (str(Path(root).resolve()), data_hash, cfg.model_dump_json(), tuple(classes) if classes else None,
           int(seed), tuple(mean) if mean else None, tuple(std) if std else None)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        bundle = _BUNDLES.get(key)
        if bundle is None:
            sets, class_names = image_sets(Path(root), classes)
            channels = dataset_channels([Path(root) / p for p in sets["train"].paths])
            bundle = DataBundle.create(sets, class_names, channels, data_hash, cfg, seed=seed, mean=mean, std=std)
            _BUNDLES[key] = bundle
            log.info("loaded %s (%s): %s; %s, mean %s std %s", root, data_hash[:12],
                     ", ".join(f"{s} {len(v)}" for s, v in sets.items()),
                     "in memory" if bundle.in_memory else f"streamed by {bundle.num_workers} workers",
                     [round(v, 3) for v in bundle.input_spec.mean], [round(v, 3) for v in bundle.input_spec.std])
    return bundle


def clear_cache() -> None:
    """Forget memoised bundles (tests; or after rewriting a dataset in place under the same hash)."""
    with _LOCKS_GUARD:
        _BUNDLES.clear()
        _LOCKS.clear()


# ----------------------------------------------------------------------------- DVC stage entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m podium.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-digits", help="export the bundled scikit-learn digits to an ImageFolder")
    export.add_argument("--out", type=Path, default=Path("data/digits"))
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--val-fraction", type=float, default=0.15)
    export.add_argument("--test-fraction", type=float, default=0.15)
    from podium.hard_digits import Difficulty, export_digits_hard

    hard = sub.add_parser("export-digits-hard", help="export ~20,000 augmented 32 px RGB digits (sources split first)")
    hard.add_argument("--out", type=Path, default=Path("data/digits-hard"))
    hard.add_argument("--seed", type=int, default=0)
    hard.add_argument("--count", type=int, default=20_000)
    hard.add_argument("--val-fraction", type=float, default=0.15)
    hard.add_argument("--test-fraction", type=float, default=0.15)
    for knob in fields(Difficulty):
        hard.add_argument(f"--{knob.name.replace('_', '-')}", type=type(knob.default), default=knob.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command == "export-digits-hard":
            difficulty = Difficulty(**{knob.name: getattr(args, knob.name) for knob in fields(Difficulty)})
            out = export_digits_hard(args.out, args.seed, args.count, args.val_fraction, args.test_fraction,
                                     difficulty)
        else:
            out = export_digits(args.out, args.seed, args.val_fraction, args.test_fraction)
    except DataError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"exported {'hard digits' if args.command == 'export-digits-hard' else 'digits'} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
