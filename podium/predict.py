"""Run a released model on image files: what `podium predict` and a deployment script do.

A release carries everything a client needs (`tasks/release.py: _metadata`): the artifact to run and
its runtime (``artifact``), the exact eval preprocessing (``preprocessing``: decode mode, resize rule,
centre crop, mean/std, layout) and the class names (``input_spec.class_names``). This module follows
that record with PIL and NumPy (the pipeline's decoder, :func:`podium.images.decode`, with its pixel
limit) and runs the artifact through the runtime interface every measurement uses
(:mod:`podium.methods.runtimes`). It imports numpy, PIL and, when a model is opened, the runtime's own
library: never torch (unless the release runs on ``torch``), Prefect or MLflow.

    from podium import open_store, fetch_or_reuse, ReleasedModel
    fetch_or_reuse(open_store("s3://bucket/models"), "digits-classifier", "cpu-1t", "models/cpu-1t")
    with ReleasedModel.open("models/cpu-1t") as model:
        for p in model.predict_files(["a.png", "b.jpg"]):
            print(p.path, p.label, p.confidence)
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from podium.errors import DataError, ReleaseError
from podium.files import parse_json, size_and_sha256
from podium.images import DEFAULT_MAX_PIXELS, decode
from podium.registry.release import MANIFEST, check_name, fetch_release, read_current, read_fetch_marker
from podium.registry.stores import ArtifactStore

log = logging.getLogger("podium.predict")

__all__ = ["Prediction", "ReleasedModel", "check_image_paths", "fetch_or_reuse", "preprocess_image",
           "verified_fetch"]

# What a release without an ``artifact`` entry (published before runtimes were recorded) runs.
DEFAULT_ARTIFACT = {"runtime": "onnxruntime", "precision": "fp32", "main": "model.onnx"}
_MANIFEST_MAX_BYTES = 4 << 20
_RESAMPLING = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}
BATCH = 32  # images per runtime call: bounds memory whatever the number of files


@dataclass(frozen=True)
class Prediction:
    path: str
    index: int  # the class index the model chose
    label: str  # its name when the release records class names, else the index
    confidence: float  # softmax probability of that class


# ------------------------------------------------------------------------- fetched folders

def verified_fetch(folder: Path | str, model: str, device: str, version: str | None = None) -> dict | None:
    """The manifest of the fetch of ``model``/``device`` in ``folder`` when every file it lists is
    still there with its size and sha256 (and, with ``version``, it is that version); else None."""
    try:
        return _verified_fetch(Path(folder), model, device, version)
    except (OSError, ReleaseError):  # unreadable, or not a marker: not a fetch to trust
        return None


def _verified_fetch(folder: Path, model: str, device: str, version: str | None) -> dict | None:
    marker = read_fetch_marker(folder)
    if marker is None or (marker.get("model"), marker.get("device")) != (model, device):
        return None
    if version is not None and str(marker.get("version")) != str(version):
        return None
    manifest_path = folder / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return None
    data = manifest_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != marker.get("manifest_sha256"):
        return None
    try:
        manifest = parse_json(data, _MANIFEST_MAX_BYTES)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    if (manifest.get("model"), manifest.get("device"), str(manifest.get("version"))) != \
            (model, device, str(marker.get("version"))):
        return None
    for entry in manifest["files"]:
        path = folder / str(entry.get("name", "")) if isinstance(entry, dict) else None
        if path is None or path == folder or path.is_symlink() or not path.is_file() or \
                size_and_sha256(path) != (entry.get("size"), entry.get("sha256")):
            return None
    return manifest


def fetch_or_reuse(store: ArtifactStore, model: str, device: str, dest: Path | str,
                   version: object | None = None) -> tuple[dict, bool]:
    """``(manifest, reused)``: the release in ``dest``, fetched with :func:`fetch_release` unless
    ``dest`` already holds a verified fetch of it (:func:`verified_fetch`).

    With ``version`` a verified folder of that version is used without contacting the store; without
    it the store's ``current.json`` says which version is wanted (one small read). A folder that no
    longer verifies (a file changed or went missing) is replaced by a fresh fetch."""
    check_name(model, "model name")  # before either becomes part of a path
    check_name(device, "device name")
    dest = Path(dest)
    wanted, manifest_sha = (None if version is None else str(version)), None
    if wanted is None:
        pointer = read_current(store, model, device)
        if pointer is None:
            raise ReleaseError(f"no current release of {model}/{device} in {store.uri}")
        wanted, manifest_sha = str(pointer["version"]), str(pointer["manifest_sha256"])
    manifest = verified_fetch(dest, model, device, wanted)
    if manifest is not None and (manifest_sha is None or _sha256(dest / MANIFEST) == manifest_sha):
        log.info("%s/%s v%s: reusing the verified fetch in %s", model, device, wanted, dest)
        return manifest, True
    return fetch_release(store, model, device, dest, version=wanted), False


def _sha256(path: Path) -> str:
    return size_and_sha256(path)[1]


# ---------------------------------------------------------------------------- preprocessing

def check_image_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Every path as a Path, after checking each names a readable file (before any work is done)."""
    checked = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"image {path} does not exist or is not a file")
        checked.append(path)
    return checked


def _recorded(preprocessing: Any, *keys: str) -> Any:
    value = preprocessing
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise ReleaseError(f"the release's preprocessing records no {'.'.join(keys)!r}")
        value = value[key]
    return value


def preprocess_image(path: Path | str, preprocessing: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``path`` as the release's model input (C x H x W float32), following its recorded
    ``preprocessing`` exactly as the pipeline's eval transform did: decode (EXIF orientation, mode L or
    RGB), resize (the shorter side to ``size``, the longer ``floor(size * longer / shorter)``; or an
    exact ``[height, width]``), centre crop (top/left ``round((side - crop) / 2)``), ``pixel / 255``,
    ``(x - mean) / std``."""
    from PIL import Image

    order = _recorded(preprocessing, "channel_order")
    if order not in ("L", "RGB") or _recorded(preprocessing, "layout") != "NCHW":
        raise ReleaseError(f"the release's preprocessing asks for channel order {order!r}, layout "
                           f"{preprocessing.get('layout')!r}: only L/RGB and NCHW are known")
    interpolation = _recorded(preprocessing, "resize", "interpolation")
    if interpolation not in _RESAMPLING:
        raise ReleaseError(f"the release's preprocessing asks for {interpolation!r} resizing: "
                           f"only {', '.join(_RESAMPLING)} are known")
    channels = 1 if order == "L" else 3
    mean = np.asarray(_recorded(preprocessing, "mean"), np.float32)
    std = np.asarray(_recorded(preprocessing, "std"), np.float32)
    if mean.shape != (channels,) or std.shape != (channels,) or not np.all(std > 0):
        raise ReleaseError(f"the release's preprocessing has mean {mean.tolist()} / std {std.tolist()} for "
                           f"{channels} channel(s)")

    img = decode(path, channels, max_pixels)
    size = _recorded(preprocessing, "resize", "size")
    if _recorded(preprocessing, "resize", "shorter_side"):
        width, height = img.size
        short, long = min(width, height), max(width, height)
        longer = int(size) * long // short
        new_size = (int(size), longer) if width == short else (longer, int(size))
    else:
        new_size = (int(size[1]), int(size[0]))  # PIL takes (width, height)
    img = img.resize(new_size, getattr(Image.Resampling, _RESAMPLING[interpolation]))
    crop_h, crop_w = (int(v) for v in _recorded(preprocessing, "center_crop"))
    left, top = round((img.width - crop_w) / 2.0), round((img.height - crop_h) / 2.0)
    pixels = np.asarray(img.crop((left, top, left + crop_w, top + crop_h)), np.float32) / 255.0
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return ((pixels - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------- the model

class ReleasedModel:
    """A fetched release opened in the runtime its manifest names."""

    def __init__(self, folder: Path, manifest: dict, session: Any, max_batch: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.folder, self.manifest, self.session = folder, manifest, session
        self.max_batch, self.max_pixels = max_batch, max_pixels
        self.preprocessing = manifest["preprocessing"]
        names = (manifest.get("input_spec") or {}).get("class_names")
        self.class_names = [str(n) for n in names] if isinstance(names, list) else None

    @classmethod
    def open(cls, folder: Path | str, threads: int | None = None, manifest: dict | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> "ReleasedModel":
        """Open the release fetched into ``folder`` (its ``manifest.json`` unless ``manifest`` is given)
        with its runtime; ``threads`` defaults to the device profile's."""
        folder = Path(folder)
        if manifest is None:
            try:
                manifest = parse_json((folder / MANIFEST).read_bytes(), _MANIFEST_MAX_BYTES)
            except (OSError, ValueError) as exc:
                raise ReleaseError(f"{folder} holds no readable {MANIFEST} ({exc}): fetch the release first") from None
        if not isinstance(manifest.get("preprocessing"), dict):
            raise ReleaseError(f"{folder}: the release records no preprocessing")
        artifact = manifest.get("artifact") or DEFAULT_ARTIFACT
        name, main = str(artifact.get("runtime")), str(artifact.get("main"))
        if threads is None:
            threads = int((manifest.get("device_profile") or {}).get("threads") or 1)

        from podium.methods.runtimes import available_runtimes, get_runtime  # numpy only; libraries on open

        try:
            runtime = get_runtime(name)
        except KeyError:
            raise ReleaseError(f"{folder}: the release runs on {name!r}, a runtime this Podium does not know") from None
        if not runtime.available():
            raise ReleaseError(f"{folder}: the release runs on {name!r}, not available here (available: "
                               f"{', '.join(available_runtimes()) or 'none'})")
        if not (folder / main).is_file():
            raise ReleaseError(f"{folder}: the release's main file {main!r} is missing")
        try:
            session = runtime.open(folder / main, threads)
        except Exception as exc:  # noqa: BLE001 - every runtime raises its own types for a file it cannot load
            raise ReleaseError(f"{folder}: {name} cannot open {main}: {str(exc).splitlines()[0][:200]}") from None
        max_batch = getattr(session, "max_batch", runtime.max_batch)  # an ExecuTorch program fixes its own
        return cls(folder, manifest, session, max(1, min(BATCH, max_batch)), max_pixels)

    def __enter__(self) -> "ReleasedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def predict_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(class indices, confidences)`` of a preprocessed N x C x H x W float32 batch."""
        probabilities = _softmax(self.session.predict(batch))
        if self.class_names is not None and probabilities.shape[1] != len(self.class_names):
            raise ReleaseError(f"{self.folder}: the model gives {probabilities.shape[1]} scores but the release "
                               f"names {len(self.class_names)} classes")
        indices = probabilities.argmax(axis=1)
        return indices, probabilities[np.arange(len(indices)), indices]

    def predict_files(self, paths: Sequence[Path | str]) -> Iterator[Prediction]:
        """A :class:`Prediction` per file, in order, ``max_batch`` files at a time; a file that cannot be
        decoded raises :class:`~podium.errors.DataError` when its batch is reached."""
        for start in range(0, len(paths), self.max_batch):
            chunk = paths[start:start + self.max_batch]
            batch = np.stack([preprocess_image(p, self.preprocessing, self.max_pixels) for p in chunk])
            indices, confidences = self.predict_batch(batch)
            for path, index, confidence in zip(chunk, indices.tolist(), confidences.tolist()):
                label = self.class_names[index] if self.class_names is not None else str(index)
                yield Prediction(str(path), index, label, float(confidence))
