"""The data plane on real files: digits export, ImageFolder import, DVC repro/add/push, load_bundle."""
from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from podium import dvc_ops
from podium.data import (
    MANIFEST_COLUMNS,
    DataError,
    clear_cache,
    digits_pixels,
    export_digits,
    import_imagefolder,
    load_bundle,
    read_manifest,
    stratified_split,
)
from podium.methods.transforms import LoaderConfig
from podium.validation import validate_dataset
from tests.data_corpus import make_flat_imagefolder, make_presplit_imagefolder
from tests.photos import dvc_project, local_remote

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digits(tmp_path_factory.mktemp("export") / "digits")


def test_export_is_deterministic(digits_dir: Path, tmp_path: Path) -> None:
    again = export_digits(tmp_path / "digits")
    assert _tree(again) == _tree(digits_dir)
    other_seed = export_digits(tmp_path / "other", seed=1)
    assert _tree(other_seed) != _tree(digits_dir)


def test_export_layout_and_manifest(digits_dir: Path) -> None:
    rows = read_manifest(digits_dir)
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS and len(rows) == 1797
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    for row in rows[:50]:
        path = digits_dir / row["path"]
        assert row["path"] == f"{row['split']}/{row['label']}/{path.name}"
        assert _sha(path) == row["sha256"] and (row["height"], row["width"], row["channels"]) == ("8", "8", "1")
    files = sorted(p.relative_to(digits_dir).as_posix() for p in digits_dir.rglob("*.png"))
    assert files == sorted(r["path"] for r in rows)
    # pixels are round(v * 255 / 16) of the sklearn array, sample index in the file name
    images, labels = digits_pixels()
    row = rows[123]
    index = int(Path(row["path"]).stem)
    with Image.open(digits_dir / row["path"]) as img:
        assert img.mode == "L" and img.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(img), images[index])
    assert int(row["label"]) == labels[index]


def test_split_is_stratified(digits_dir: Path) -> None:
    rows = read_manifest(digits_dir)
    per_class = Counter(r["label"] for r in rows)
    by = Counter((r["label"], r["split"]) for r in rows)
    for label, n in per_class.items():
        assert by[(label, "val")] == round(n * 0.15) and by[(label, "test")] == round(n * 0.15)
        assert by[(label, "train")] == n - 2 * round(n * 0.15)
    labels = [r["label"] for r in rows]
    assert stratified_split(labels, 0.15, 0.15, 0) == stratified_split(labels, 0.15, 0.15, 0)
    assert stratified_split(labels, 0.15, 0.15, 0) != stratified_split(labels, 0.15, 0.15, 1)
    with pytest.raises(DataError, match="fractions"):
        stratified_split(labels, 0.6, 0.5, 0)


def test_load_bundle_loads_once(digits_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    clear_cache()
    caplog.set_level(logging.INFO, logger="podium.data")
    cfg = LoaderConfig(image_size=(16, 16), batch_size=32)
    with ThreadPoolExecutor(4) as pool:  # tasks in threads ask at once: one bundle, one set of caches
        bundles = list(pool.map(lambda _: load_bundle(digits_dir, cfg, "h1"), range(4)))
    assert sum(r.getMessage().startswith("loaded") for r in caplog.records) == 1
    assert len({id(b) for b in bundles}) == 1
    bundle = bundles[0]
    assert bundle.num_classes == 10 and bundle.class_names == [str(i) for i in range(10)]
    assert (bundle.input_spec.channels, bundle.input_spec.height, bundle.input_spec.width) == (1, 16, 16)
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [1259, 269, 269]
    assert bundle.in_memory and bundle.num_workers == 0  # 1,797 tiny PNGs fit the default cache
    images, labels = next(iter(bundle.val))
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32 and bundle.data_hash == "h1"
    # each loader has its own seeded generator, so threads never share a sampler's state
    assert bundle.train is not bundle.train and bundle.train.generator is not bundle.train.generator
    assert load_bundle(digits_dir, cfg, "h1") is bundle and load_bundle(digits_dir, cfg, "h2") is not bundle


def test_import_flat_imagefolder(tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "proj")
    src = make_flat_imagefolder(tmp_path / "src", classes=("cat", "dog", "fox"), per_class=20)

    root = import_imagefolder(src, project, "pets", val_fraction=0.2, test_fraction=0.1, seed=3)

    assert root == project / "data" / "pets"
    rows = read_manifest(root)
    assert len(rows) == 60 and not list(root.rglob("*.txt"))  # the stray text file is skipped
    assert Counter((r["label"], r["split"]) for r in rows)[("dog", "val")] == 4
    assert {(r["height"], r["width"], r["channels"]) for r in rows} == {("10", "12", "3")}
    for row in rows:  # bytes copied unchanged
        assert _sha(root / row["path"]) == _sha(src / row["label"] / Path(row["path"]).name) == row["sha256"]
    md5 = dvc_ops.dataset_hash(project, "data/pets")
    assert md5.endswith(".dir") and (project / "data" / "pets.dvc").is_file()
    assert "/pets" in (project / "data" / ".gitignore").read_text()
    assert validate_dataset(root, min_per_class=2).success  # 2 per class in test (10 %)
    bundle = load_bundle(root, LoaderConfig(image_size=(10, 12), batch_size=8), md5)
    assert bundle.input_spec.channels == 3 and bundle.class_names == ["cat", "dog", "fox"]

    # the pre-split layout is kept as is, into the same project
    pre = make_presplit_imagefolder(tmp_path / "pre", classes=("a", "b"), counts={"train": 8, "val": 3, "test": 2})
    (pre / "train" / "a" / "alias.png").symlink_to(pre / "train" / "a" / "train-0.png")  # a link inside the source
    root2 = import_imagefolder(pre, project, "letters")
    assert Counter(r["split"] for r in read_manifest(root2)) == {"train": 17, "val": 6, "test": 4}
    assert not (root2 / "train" / "a" / "alias.png").is_symlink()  # copied as the file it points to
    assert (root2 / "val" / "b" / "val-2.png").is_file()
    assert dvc_ops.dataset_hash(project, root2) != md5
    # a deterministic import: same source and seed, same md5
    assert import_imagefolder(src, project, "pets", 0.2, 0.1, 3) and dvc_ops.dataset_hash(project, "data/pets") == md5


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / ".dvc").mkdir(parents=True)  # these errors come before DVC runs
    with pytest.raises(DataError, match="not a directory"):
        import_imagefolder(tmp_path / "missing", project, "x")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        import_imagefolder(tmp_path / "empty", project, "x")
    with pytest.raises(DataError, match="dataset name"):
        import_imagefolder(tmp_path / "empty", project, "../evil")
    half = make_presplit_imagefolder(tmp_path / "half")
    shutil.rmtree(half / "test")
    with pytest.raises(DataError, match=r"lacks \['test'\]"):
        import_imagefolder(half, project, "x")
    src = make_flat_imagefolder(tmp_path / "flat", per_class=3)
    with pytest.raises(DataError, match="not a DVC repository"):
        import_imagefolder(src, tmp_path / "nodvc", "x")
    assert not (tmp_path / "nodvc").exists()  # checked before anything is written
    (half / "test").mkdir()
    (half / "extra").mkdir()
    with pytest.raises(DataError, match=r"mixes split folders with others \(extra\)"):
        import_imagefolder(half, project, "x")


def test_dvc_repro_gives_dir_md5(tmp_path: Path) -> None:
    """The real stage in a copy of the repo: repro, md5, no-op second repro, push to the local remote."""
    project = dvc_project(tmp_path / "proj")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    (project / "podium").mkdir()
    for name in ("__init__.py", "data.py", "errors.py", "files.py", "images.py"):  # what the stage command imports
        shutil.copy(REPO / "podium" / name, project / "podium" / name)

    dvc_ops.reproduce(project, "export_digits")

    md5 = dvc_ops.dataset_hash(project, "data/digits")
    assert md5.endswith(".dir") and len(md5) == 36
    assert dvc_ops.dataset_hash(project, project / "data" / "digits") == md5
    assert len(read_manifest(project / "data" / "digits")) == 1797
    assert "didn't change" in dvc_ops.reproduce(project, "export_digits")
    dvc_ops.push(project)
    store = local_remote(project)  # outside the project: a clone pulls from it
    assert (store / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert not (project / ".dvc" / "config.local").exists()
    with pytest.raises(DataError, match="no DVC md5 for data/other"):
        dvc_ops.dataset_hash(project, "data/other")
    with pytest.raises(DataError, match="dvc repro nope failed"):
        dvc_ops.reproduce(project, "nope")


def test_s3_remote_goes_to_committed_config_and_push_works(tmp_path: Path, s3: str) -> None:
    """configure_remote records the remote in .dvc/config (a clone pulls from it), never in
    .dvc/config.local, and writes only what differs; a push lands in a real (moto) S3 bucket."""
    import boto3

    project = dvc_project(tmp_path / "proj")
    src = make_presplit_imagefolder(tmp_path / "src", counts={"train": 5, "val": 1, "test": 1})
    root = import_imagefolder(src, project, "small")
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="podium-data")

    changes = dvc_ops.configure_remote(project, "podium", "s3://podium-data/dvc", s3)
    dvc_ops.push(project, "podium")

    assert [str(c) for c in changes] == [f".dvc/config: remote.podium.endpointurl = {s3} (was http://minio:9000)"]
    remote = dvc_ops.read_config(project)["remote"]["podium"]
    assert remote == {"url": "s3://podium-data/dvc", "endpointurl": s3}
    assert not (project / ".dvc" / "config.local").exists()
    assert dvc_ops.configure_remote(project, "podium", "s3://podium-data/dvc", s3) == []  # nothing differs
    md5 = dvc_ops.dataset_hash(project, root)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="podium-data")["Contents"]}
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys and len(keys) == 14 + 2  # 14 images, manifest.csv, the .dir listing
    with pytest.raises(DataError, match="must be s3://bucket/path or an absolute folder"):
        dvc_ops.configure_remote(project, "podium", "relative/path")
