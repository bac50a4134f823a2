"""Validation of real files on disk: clean digits pass; each kind of damage fails the right expectation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import podium.validation
from podium.validation import DataValidationError, scan_files, validate_dataset, validate_dataset_cached
from tests.data_corpus import BAD_CASES, copy_dataset, export_clean_digits, make_presplit_imagefolder, truncate_png


@pytest.fixture(scope="module")
def clean_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_clean_digits(tmp_path_factory.mktemp("clean") / "digits")


def test_clean_digits_pass(clean_digits: Path) -> None:
    report = validate_dataset(clean_digits)
    assert report.success, report.summary()
    assert report.failures == [] and report.summary() == "" and report.rows == 1797
    report.raise_for_failures()  # no-op
    payload = json.loads(json.dumps(report.to_json()))
    assert payload["success"] is True and payload["great_expectations"]["success"] is True
    assert len(payload["great_expectations"]["results"]) >= 12


def test_scan_reads_files_not_manifest(clean_digits: Path) -> None:
    df = scan_files(clean_digits)
    assert set(df.columns) >= {"path", "label", "split", "sha256", "decodable", "height", "width", "channels",
                               "size_bytes", "leaked"}
    assert df["decodable"].all() and set(df["height"]) == {8} and set(df["channels"]) == {1}
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


def test_declared_classes_are_the_set(tmp_path: Path) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", classes=("a", "b"), counts={"train": 6, "val": 2, "test": 2})
    assert validate_dataset(root, classes=["a", "b"]).success
    # "b" is not declared: its images are unexpected labels.
    report = validate_dataset(root, classes=["a"])
    assert any(f.column == "label" and f.unexpected_count == 10 for f in report.failures), report.summary()
    # a declared class with no train examples at all is named as missing.
    report = validate_dataset(root, classes=["a", "b", "c"])
    missing = [f for f in report.failures if f.column == "train_label"]
    assert missing and missing[0].examples == ["missing 'c'"], report.summary()


def test_min_per_class_threshold(tmp_path: Path) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", counts={"train": 6, "val": 2, "test": 2})
    assert validate_dataset(root, min_per_class=6).success
    report = validate_dataset(root, min_per_class=7)
    assert [f.column for f in report.failures] == ["train_class_count"]
    assert report.failures[0].unexpected_count == 12


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


def test_cached_validation_skips_unchanged_data_and_reruns_on_any_change(tmp_path: Path, monkeypatch) -> None:
    root = make_presplit_imagefolder(tmp_path / "ds", counts={"train": 6, "val": 2, "test": 2})
    cache = tmp_path / "cache"
    runs = []
    real = podium.validation.validate_dataset
    monkeypatch.setattr(podium.validation, "validate_dataset", lambda *a, **k: runs.append(a) or real(*a, **k))

    first, reused = validate_dataset_cached(root, cache, "hash-1")
    assert first.success and not reused and len(runs) == 1
    again, reused = validate_dataset_cached(root, cache, "hash-1")
    assert reused and len(runs) == 1  # same files, hash and suite: GE is not run again
    assert again.to_json() == json.loads(json.dumps(first.to_json(), default=str))

    # anything the outcome depends on runs the suite again: data hash, parameters, classes
    assert not validate_dataset_cached(root, cache, "hash-2")[1]
    assert not validate_dataset_cached(root, cache, "hash-1", min_per_class=6)[1]
    assert not validate_dataset_cached(root, cache, "hash-1", classes=["a", "b"])[1]
    assert len(runs) == 4

    # a file damaged in place under the same data hash (DVC not re-run) is caught, and a failing
    # report is never cached: the next call validates again
    culprit = truncate_png(root)
    for _ in range(2):
        report, reused = validate_dataset_cached(root, cache, "hash-1")
        assert not reused and not report.success and culprit in report.summary()
    assert len(runs) == 6
