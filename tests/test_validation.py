"""Validation of real files on disk: clean digits and mixed photos pass; each kind of damage fails the
right expectation; file facts are computed in parallel, cached by file identity and reused."""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFile, PngImagePlugin

import podium.facts
import podium.validation
from podium.facts import collect_facts
from podium.validation import DataValidationError, scan_files, validate_dataset, validate_dataset_cached
from tests.data_corpus import (
    BAD_CASES,
    MIXED_BUT_VALID,
    copy_dataset,
    decompression_bomb,
    export_clean_digits,
    make_mixed_photo_folder,
    make_presplit_imagefolder,
    too_small,
    truncate_png,
)
from tests.photos import VARIANTS


@pytest.fixture(scope="module")
def clean_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_clean_digits(tmp_path_factory.mktemp("clean") / "digits")


def test_clean_digits_pass(clean_digits: Path) -> None:
    report = validate_dataset(clean_digits)
    assert report.success, report.summary()
    assert report.failures == [] and report.summary() == "" and report.rows == 1797
    assert (report.facts_computed, report.facts_reused) == (1797, 0)  # no facts cache given
    report.raise_for_failures()  # no-op
    payload = json.loads(json.dumps(report.to_json()))
    assert payload["success"] is True and payload["great_expectations"]["success"] is True
    assert payload["facts"] == {"computed": 1797, "reused": 0}
    assert len(payload["great_expectations"]["results"]) >= 16


def test_scan_reads_files_not_manifest(clean_digits: Path) -> None:
    df = scan_files(clean_digits)
    assert set(df.columns) >= {"path", "label", "split", "sha256", "size_bytes", "width", "height", "mode",
                               "decodable", "too_large", "error", "channels", "min_side", "leaked",
                               "class_count_in_split", "train_label", "val_label", "test_label"}
    assert df["decodable"].all() and not df["too_large"].any() and df["error"].isna().all()
    assert set(df["height"]) == {8} and set(df["min_side"]) == {8} and set(df["mode"]) == {"L"}
    assert df["split"].value_counts().to_dict() == {"train": 1259, "val": 269, "test": 269}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_dataset_fails_named_expectation(case: str, clean_digits: Path, tmp_path: Path) -> None:
    build, expectation, column = BAD_CASES[case]
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    culprit = build(root)

    report = validate_dataset(root)

    assert not report.success
    failed = {(f.expectation, f.column): f for f in report.failures}
    assert (expectation, column) in failed, report.summary()
    failure = failed[(expectation, column)]
    assert failure.unexpected_count >= 1 and culprit in failure.examples
    assert f"{expectation}({column}): " in report.summary()
    with pytest.raises(DataValidationError) as info:
        report.raise_for_failures()
    message = str(info.value)
    assert "\n" not in message and f"{expectation}({column})" in message and failure.examples[0] in message


@pytest.mark.parametrize("case", sorted(MIXED_BUT_VALID))
def test_other_sizes_and_modes_are_valid(case: str, clean_digits: Path, tmp_path: Path) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    MIXED_BUT_VALID[case](root)
    report = validate_dataset(root, workers=0)
    assert report.success, report.summary()


def test_mixed_photo_folder_passes(tmp_path: Path) -> None:
    root = make_mixed_photo_folder(tmp_path / "photos")
    report = validate_dataset(root, workers=0)
    assert report.success, report.summary()
    df = scan_files(root, workers=0)
    assert df["decodable"].all() and len(df) == 3 * 2 * len(VARIANTS)
    assert set(df["mode"]) >= {"L", "RGB", "I;16", "P", "RGBA", "CMYK"}
    assert {Path(p).suffix for p in df["path"]} == {".png", ".jpg", ".webp", ".bmp"}
    assert df["width"].nunique() > 10 and df["height"].nunique() > 10
    assert set(df["channels"]) == {1, 3}
    # the smallest-side limit is the only size rule: raise it and the small ones fail, by name
    small = df.loc[df["min_side"] < 20, "path"].tolist()
    failure, = validate_dataset(root, workers=0, min_side=20).failures
    assert failure.column == "min_side" and failure.unexpected_count == len(small) > 0
    assert set(failure.examples) <= set(small)


def test_decompression_bomb_is_refused_without_decoding(clean_digits: Path, tmp_path: Path, monkeypatch) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    culprit = decompression_bomb(root)
    touched = []

    def guard(real):
        def method(self, *args, **kwargs):
            if self.size == (30000, 30000):
                touched.append(real.__name__)
                raise AssertionError("the bomb was decoded")
            return real(self, *args, **kwargs)
        return method

    for cls in (Image.Image, ImageFile.ImageFile, PngImagePlugin.PngImageFile):
        for name in ("load", "verify", "convert"):
            if name in vars(cls):
                monkeypatch.setattr(cls, name, guard(vars(cls)[name]))

    report = validate_dataset(root, workers=0)  # in this process, where the guards are

    assert touched == []
    assert [f.column for f in report.failures] == ["too_large"]  # not also "decodable"
    assert report.failures[0].examples == [culprit]
    assert f"expect_column_values_to_be_in_set(too_large): 1 unexpected, e.g. {culprit}" == report.summary()
    row = scan_files(root, workers=0).set_index("path").loc[culprit]
    assert (row["width"], row["height"], row["too_large"], row["decodable"]) == (30000, 30000, True, False)
    assert "30000x30000" in row["error"]
    # the limit is a parameter: above it, the same file is opened for decoding, which the guards see
    row = scan_files(root, workers=0, max_pixels=10**9).set_index("path").loc[culprit]
    assert not row["too_large"] and not row["decodable"] and "the bomb was decoded" in row["error"]
    assert touched == ["verify"]


def test_unconvertible_mode_fails_the_mode_expectation(clean_digits: Path, tmp_path: Path, monkeypatch) -> None:
    """Every mode a real file opens with is convertible; an unknown one is put in the facts table."""
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    culprit = "val/5/" + sorted(os.listdir(root / "val" / "5"))[0]
    real = podium.facts.describe

    def describe(path, max_pixels):
        facts = real(path, max_pixels)
        return facts[:4] + ("I;32",) + facts[5:] if Path(path).as_posix().endswith(culprit) else facts

    monkeypatch.setattr(podium.facts, "describe", describe)
    report = validate_dataset(root, workers=0)
    failure, = report.failures
    assert (failure.column, failure.unexpected_count, failure.examples) == ("mode", 1, [culprit])


def test_declared_classes_are_the_set(tmp_path: Path) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", classes=("a", "b"), counts={"train": 6, "val": 2, "test": 2})
    assert validate_dataset(root, classes=["a", "b"], min_per_class=2).success
    # "b" is not declared: its images are unexpected labels.
    report = validate_dataset(root, classes=["a"], min_per_class=2)
    assert any(f.column == "label" and f.unexpected_count == 10 for f in report.failures), report.summary()
    # a declared class with no examples at all is named as missing, in every split.
    report = validate_dataset(root, classes=["a", "b", "c"], min_per_class=2)
    missing = {f.column: f.examples for f in report.failures}
    assert missing == {f"{s}_label": ["missing 'c'"] for s in ("train", "val", "test")}, report.summary()


def test_min_per_class_holds_in_every_split(tmp_path: Path) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", counts={"train": 6, "val": 3, "test": 4})
    assert validate_dataset(root, min_per_class=3).success
    report = validate_dataset(root, min_per_class=4)
    failure, = report.failures
    assert failure.column == "class_count_in_split" and failure.unexpected_count == 6  # 3 val files x 2 classes
    assert failure.examples and all(e.startswith("val/") for e in failure.examples)
    assert validate_dataset(root, min_per_class=7).failures[0].unexpected_count == 12 + 6 + 8


def test_missing_dataset_or_split_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="does not exist"):
        validate_dataset(tmp_path / "nope")
    root = make_presplit_imagefolder(tmp_path / "ds")
    for path in (root / "val").rglob("*"):
        if path.is_file():
            path.unlink()
    for folder in sorted((root / "val").glob("*")):
        folder.rmdir()
    (root / "val").rmdir()
    with pytest.raises(DataValidationError, match=r"no val/ folder"):
        validate_dataset(root)
    empty = tmp_path / "empty"
    for split in ("train", "val", "test"):
        (empty / split).mkdir(parents=True)
    with pytest.raises(DataValidationError, match="holds no image files"):
        validate_dataset(empty)


# ----------------------------------------------------------------------------- the facts cache


def test_facts_cache_reuses_unchanged_files_and_rechecks_changed_ones(clean_digits: Path, tmp_path: Path) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    cache = tmp_path / "facts.sqlite"
    first = validate_dataset(root, facts_cache=cache, workers=0)
    assert first.success and (first.facts_computed, first.facts_reused) == (300, 0)
    warm = validate_dataset(root, facts_cache=cache, workers=0)
    assert warm.success and (warm.facts_computed, warm.facts_reused) == (0, 300)

    # a file damaged in place is checked again (alone) and caught
    culprit = truncate_png(root)
    damaged = validate_dataset(root, facts_cache=cache, workers=0)
    assert (damaged.facts_computed, damaged.facts_reused) == (1, 299)
    assert not damaged.success and culprit in damaged.summary()

    # touched (same bytes, new mtime): checked again; a deleted file's row is simply not used
    victim = root / "train" / "0" / sorted(os.listdir(root / "train" / "0"))[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    (root / "test" / "9" / sorted(os.listdir(root / "test" / "9"))[0]).unlink()
    again = validate_dataset(root, facts_cache=cache, workers=0)
    assert (again.facts_computed, again.facts_reused) == (1, 298)

    # a different pixel limit is a different decoder: every fact is computed again
    other = validate_dataset(root, facts_cache=cache, workers=0, max_pixels=10**7)
    assert (other.facts_computed, other.facts_reused) == (299, 0)


def test_parallel_facts_equal_in_process_facts(clean_digits: Path, tmp_path: Path, monkeypatch) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=12)  # 360 files
    damaged = {truncate_png(root), decompression_bomb(root), too_small(root)}
    pools = []

    class Spy(podium.facts.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(podium.facts, "ProcessPoolExecutor", Spy)
    serial = scan_files(root, workers=0)
    assert pools == []
    parallel = scan_files(root, workers=2)
    assert len(pools) == 1 and pools[0]["max_workers"] == 2
    assert pools[0]["mp_context"].get_start_method() == "forkserver"
    pd.testing.assert_frame_equal(serial, parallel)
    bad = serial.loc[~serial["decodable"] | (serial["min_side"] < 8), "path"]
    assert set(bad) == damaged and len(serial) == 361


def test_concurrent_validations_share_the_cache(clean_digits: Path, tmp_path: Path) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=10)
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    cache = tmp_path / "facts.sqlite"
    results, errors = [], []

    def run() -> None:
        try:
            results.append(collect_facts(root, rels, workers=0, cache=cache))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 3
    assert results[0][0] == results[1][0] == results[2][0]
    assert collect_facts(root, rels, workers=0, cache=cache)[1:] == (0, len(rels))


def test_corrupt_facts_cache_is_discarded_and_rebuilt(clean_digits: Path, tmp_path: Path, caplog) -> None:
    root = copy_dataset(clean_digits, tmp_path / "digits", per_class=3)
    cache = tmp_path / "facts.sqlite"
    cache.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="podium.validation"):
        report = validate_dataset(root, facts_cache=cache, workers=0, min_per_class=3)
    assert report.success and report.facts_computed == 90
    assert any("unreadable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert validate_dataset(root, facts_cache=cache, workers=0, min_per_class=3).facts_reused == 90


# ----------------------------------------------------------------------------- cached reports


def test_cached_validation_skips_unchanged_data_and_reruns_on_any_change(tmp_path: Path, monkeypatch) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", counts={"train": 6, "val": 5, "test": 5})
    cache = tmp_path / "cache"
    runs = []
    real = podium.validation.validate_dataset
    monkeypatch.setattr(podium.validation, "validate_dataset", lambda *a, **k: runs.append(a) or real(*a, **k))

    first, reused = validate_dataset_cached(root, cache, "hash-1")
    assert first.success and not reused and len(runs) == 1
    assert (first.facts_computed, first.facts_reused) == (32, 0)
    assert (cache / "validation" / "facts.sqlite").is_file()
    monkeypatch.setattr(podium.facts, "collect_facts", lambda *a, **k: pytest.fail("facts computed"))
    again, reused = validate_dataset_cached(root, cache, "hash-1")
    assert reused and len(runs) == 1  # same files, hash and suite: GE is not run again
    assert again.to_json() == json.loads(json.dumps(first.to_json(), default=str))
    monkeypatch.undo()
    monkeypatch.setattr(podium.validation, "validate_dataset", lambda *a, **k: runs.append(a) or real(*a, **k))

    # anything the outcome depends on runs the suite again: data hash, parameters, classes
    for kwargs in ({"data_hash": "hash-2"}, {"min_per_class": 4}, {"classes": ["a", "b"]}, {"min_side": 4},
                   {"max_pixels": 10**6}):
        report, reused = validate_dataset_cached(root, cache, **{"data_hash": "hash-1", **kwargs})
        assert report.success and not reused, kwargs
        if "max_pixels" not in kwargs:  # same decoder: every fact comes from the facts cache
            assert (report.facts_computed, report.facts_reused) == (0, 32), kwargs
    assert len(runs) == 6

    # a file damaged in place under the same data hash (DVC not re-run) is caught, re-checked alone,
    # and a failing report is never cached: the next call validates again
    culprit = truncate_png(root)
    for _ in range(2):
        report, reused = validate_dataset_cached(root, cache, "hash-1")
        assert not reused and not report.success and culprit in report.summary()
    assert report.facts_computed == 0 and report.facts_reused == 32
    assert len(runs) == 8


def test_a_file_larger_than_any_image_it_could_hold_is_refused_unread(tmp_path: Path) -> None:
    """A small PNG with gigabytes of trailing bytes would be read whole into a worker: refused from its size."""
    path = tmp_path / "padded.png"
    Image.new("L", (8, 8)).save(path)
    limit = podium.facts.max_file_bytes(100)
    with open(path, "ab") as handle:
        handle.truncate(limit + 1)  # sparse: costs no disk
    sha, size, width, _height, _mode, decodable, too_large, error = podium.facts.describe(path, max_pixels=100)
    assert (sha, width, decodable, too_large, size) == (None, None, False, True, limit + 1)
    assert "more than any image of data.max_pixels" in error
    with open(path, "r+b") as handle:  # at the limit it is read and described as usual
        handle.truncate(limit)
    assert podium.facts.describe(path, max_pixels=100)[5:7] == (True, False)
