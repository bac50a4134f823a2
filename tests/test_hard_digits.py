"""The hard digits export: deterministic bytes, splits built from disjoint source digits, 32 x 32 RGB
images, every class in every split, a manifest like the easy export's, and the project's validation passes."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from podium.data import MANIFEST, SPLITS, DataError, digits_pixels, main, read_manifest
from podium.hard_digits import Difficulty, export_digits_hard, plan_hard_digits
from podium.validation import validate_dataset

COUNT = 400  # 60 images per evaluation split: 6 per class, above validation's min_per_class of 5
FILE_NAME = re.compile(r"^(?P<split>train|val|test)/(?P<label>\d)/(?P<source>\d{4})-(?P<copy>\d{2})\.png$")


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digits_hard(tmp_path_factory.mktemp("hard") / "digits-hard", seed=0, count=COUNT)


def test_same_seed_same_bytes_other_seed_other_bytes(hard: Path, tmp_path: Path) -> None:
    first = _tree(hard)
    assert _tree(export_digits_hard(tmp_path / "again", seed=0, count=COUNT)) == first
    other = _tree(export_digits_hard(tmp_path / "other", seed=1, count=COUNT))
    assert len(other) == len(first) and not set(other.values()) & set(first.values())  # no image alike


def test_no_source_digit_in_two_splits(hard: Path) -> None:
    rows = read_manifest(hard)
    assert len(rows) == COUNT
    splits_of_source: dict[str, set[str]] = {}
    labels = digits_pixels()[1]
    for row in rows:
        name = FILE_NAME.match(row["path"])
        assert name, row["path"]
        assert (name["split"], name["label"]) == (row["split"], row["label"])
        assert int(name["label"]) == labels[int(name["source"])]  # the label is the source digit's
        splits_of_source.setdefault(name["source"], set()).add(name["split"])
    assert all(len(splits) == 1 for splits in splits_of_source.values())


def test_copies_spread_evenly_and_clutter_stays_in_its_split() -> None:
    labels = digits_pixels()[1]
    plan = plan_hard_digits(labels, 20_000, 0.15, 0.15, seed=0)
    copies = Counter(plan.source.tolist())
    assert len(copies) == len(labels) and max(copies.values()) - min(copies.values()) <= 1
    sources_of_split = {split: set(plan.source[plan.split == split].tolist()) for split in SPLITS}
    for i in range(0, len(plan.source), 997):
        pool = plan.clutter_pool[plan.pool_start[i]:plan.pool_start[i] + plan.pool_size[i]]
        assert set(pool.tolist()) == sources_of_split[plan.split[i]]


def test_images_are_32_px_rgb_and_every_class_in_every_split(hard: Path) -> None:
    rows = read_manifest(hard)
    for row in rows[::20]:
        with Image.open(hard / row["path"]) as img:
            assert (img.mode, img.size) == ("RGB", (32, 32))
        assert np.asarray(Image.open(hard / row["path"])).std() > 0  # not a blank image
    assert {(r["height"], r["width"], r["channels"]) for r in rows} == {("32", "32", "3")}
    per_split = {split: Counter(r["label"] for r in rows if r["split"] == split) for split in SPLITS}
    for split, counts in per_split.items():
        assert set(counts) == {str(d) for d in range(10)}, split
    assert sum(per_split["val"].values()) == sum(per_split["test"].values()) == 60


def test_manifest_matches_the_files(hard: Path) -> None:
    files = _tree(hard)
    rows = read_manifest(hard)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert {r["path"]: r["sha256"] for r in rows} == {k: v for k, v in files.items() if k != MANIFEST}


def test_project_validation_passes(hard: Path) -> None:
    report = validate_dataset(hard)
    assert report.success, report.summary()
    assert report.rows == COUNT


def test_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export-digits-hard", "--out", str(tmp_path / "cli"), "--count", "40", "--fragments", "0",
                 "--noise-std", "0"]) == 0
    assert len(read_manifest(tmp_path / "cli")) == 40 and "exported hard digits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["export-digits-hard", "--out", str(tmp_path / "bad"), "--scale-min", "2", "--scale-max", "1"])
    assert info.value.code == 1 and "scale_min" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="count must be positive"):
        export_digits_hard(tmp_path / "none", count=0)
    with pytest.raises(DataError, match="min_contrast"):
        Difficulty(min_contrast=0.5)
