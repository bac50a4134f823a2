"""Dataset validation with Great Expectations: the files on disk, not just the manifest.

:func:`scan_files` reads every file under ``root/{train,val,test}/<label>/`` into a dataframe
(path, label, split, sha256, decodable, height, width, channels, size_bytes, plus derived
columns), so an image corrupted or swapped after export is caught. :func:`validate_dataset`
runs one ExpectationSuite over it in an ephemeral GE context (no files written) and returns a
:class:`ValidationReport`; ``raise_for_failures()`` turns failures into a one-line
:class:`DataValidationError`.

Great Expectations takes seconds to import, so it is imported inside :func:`validate_dataset`.

:func:`validate_dataset_cached` reuses a passing report when nothing that decides the outcome has
changed: it is keyed on the DVC data hash, a fingerprint of every file under the root (relative path,
size, mtime), the declared classes, ``min_per_class``, this module's and :mod:`podium.data`'s source,
and the Great Expectations and Pillow versions. A re-run on unchanged data then neither scans the
files nor imports Great Expectations; any change to a file, the suite or its parameters runs it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from PIL import Image

from podium.data import SPLITS, class_sort_key, decoded_channels, image_files
from podium.errors import DataValidationError
from podium.files import atomic_write_text, sha256_bytes

log = logging.getLogger("podium.validation")

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ValidationFailure:
    """One failed expectation. ``examples`` are dataset-relative paths of offending files, or for
    set expectations (a split or class with no examples at all) the missing values."""

    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f"({self.column})" if self.column else ""
        example = f", e.g. {', '.join(self.examples[:2])}" if self.examples else ""  # 2: both ends of a duplicate
        return f"{self.expectation}{where}: {self.unexpected_count} unexpected{example}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset` for ``root``."""

    root: str
    success: bool
    failures: list[ValidationFailure]
    rows: int
    result: dict[str, Any]  # the GE validation result, JSON-able

    def to_json(self) -> dict[str, Any]:
        """The GE result (JSON-able), plus the dataset root and a short failure list on top."""
        return {"root": self.root, "success": self.success, "rows": self.rows,
                "failures": [f.line() for f in self.failures], "great_expectations": self.result}

    def summary(self) -> str:
        """One line per failed expectation (empty when the dataset passed)."""
        return "\n".join(f.line() for f in self.failures)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ValidationReport":
        """A passing report back from :meth:`to_json` (failures are never cached, so there are none)."""
        if not doc["success"] or doc.get("failures"):
            raise ValueError("only passing reports are read back")
        return cls(root=str(doc["root"]), success=True, failures=[], rows=int(doc["rows"]),
                   result=dict(doc["great_expectations"]))

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(f"dataset {self.root} failed validation: " + "; ".join(
                f.line() for f in self.failures))


def _describe_file(path: Path) -> dict[str, Any]:
    """Hash and fully decode one file. ``verify()`` checks the PNG chunk CRCs (bit flips) and
    ``load()`` decodes every pixel (truncation); an image must pass both to be decodable."""
    data = path.read_bytes()
    row: dict[str, Any] = {"sha256": sha256_bytes(data), "size_bytes": len(data), "decodable": False,
                           "height": None, "width": None, "channels": None}
    try:
        import io

        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            row.update(decodable=True, width=img.size[0], height=img.size[1], channels=decoded_channels(img.mode))
    except Exception:
        pass
    return row


def scan_files(root: Path | str) -> pd.DataFrame:
    """One row per file under ``root/{split}/``; raises DataValidationError if a folder is missing.

    Files placed directly in a split folder (no label folder) get a null label. Derived columns:
    ``leaked`` (the same bytes appear in more than one split), ``train_label`` (label, train rows
    only) and ``train_class_count`` (train examples of the row's class, train rows only).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"dataset directory {root} does not exist")
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise DataValidationError(f"dataset {root} has no {', '.join(s + '/' for s in missing)} folder "
                                  f"(expected {root}/{{train,val,test}}/<label>/<image>)")
    records = []
    for split in SPLITS:
        split_dir = root / split
        for path in image_files(split_dir):
            parts = path.relative_to(split_dir).parts
            records.append({"path": path.relative_to(root).as_posix(), "split": split,
                            "label": parts[0] if len(parts) > 1 else None, **_describe_file(path)})
    columns = ["path", "label", "split", "sha256", "decodable", "height", "width", "channels", "size_bytes"]
    df = pd.DataFrame.from_records(records, columns=columns)
    for col in ("height", "width", "channels", "size_bytes"):
        df[col] = df[col].astype("Int64")
    df["decodable"] = df["decodable"].astype(bool)
    splits_per_hash = df.groupby("sha256")["split"].nunique()
    df["leaked"] = df["sha256"].map(splits_per_hash).fillna(0).astype(int) > 1
    is_train = df["split"] == "train"
    df["train_label"] = df["label"].where(is_train)
    counts = df.loc[is_train, "label"].value_counts()
    df["train_class_count"] = df["label"].map(counts).where(is_train).astype("Int64")
    return df


def _mode(series: pd.Series) -> Any:
    values = series.dropna()
    return Counter(values.tolist()).most_common(1)[0][0] if len(values) else None


def _expectations(df: pd.DataFrame, class_set: list[str], min_per_class: int) -> list[Any]:
    """The suite. Shape consistency is "every image has the most common value", so the report
    names the odd images out rather than just saying "2 distinct heights"."""
    import great_expectations.expectations as gxe

    suite: list[Any] = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("path", "label", "split", "sha256")]
    suite += [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=class_set),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
    ]
    for col in ("height", "width", "channels"):
        common = _mode(df.loc[df["decodable"], col])
        if common is not None:
            suite.append(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[int(common)]))
    suite += [
        gxe.ExpectColumnValuesToBeInSet(column="leaked", value_set=[False]),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnDistinctValuesToContainSet(column="train_label", value_set=class_set),
        gxe.ExpectColumnValuesToBeBetween(column="train_class_count", min_value=min_per_class),
    ]
    return suite


def _exception_message(info: Any) -> str | None:
    """GE's exception_info is either one {raised_exception, exception_message} dict or a dict of
    them keyed by metric; the first message raised, if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "expectation raised")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "expectation raised")
    return None


def _failure(result: Any, df: pd.DataFrame) -> ValidationFailure:
    config = result.expectation_config
    column = config.kwargs.get("column")
    details = result.result or {}
    error = _exception_message(result.exception_info)
    if error:  # the expectation itself could not run (GE error): report it rather than a bogus count
        return ValidationFailure(config.type, column, 0, [f"error: {error}".splitlines()[0]])
    if "unexpected_count" in details:
        indices = details.get("unexpected_index_list") or details.get("partial_unexpected_index_list") or []
        examples = [str(df.at[i, "path"]) for i in indices[:MAX_EXAMPLES] if i in df.index]
        return ValidationFailure(config.type, column, int(details["unexpected_count"]), examples)
    wanted = config.kwargs.get("value_set") or []
    present = set(df[column].dropna().tolist()) if column in df else set()
    missing = [v for v in wanted if v not in present]
    return ValidationFailure(config.type, column, len(missing), [f"missing {v!r}" for v in missing[:MAX_EXAMPLES]])


def validate_dataset(root: Path | str, classes: Sequence[str] | None = None, min_per_class: int = 5
                     ) -> ValidationReport:
    """Scan ``root`` and run the expectation suite; never raises for data problems it can report.

    ``classes`` is the declared class set (default: the train split's label folders). Checked:
    non-null fields, labels in the class set, non-empty and decodable files, one height / width /
    channel count, no identical file in two splits (leakage), every split non-empty, every class
    present in train with at least ``min_per_class`` examples. A missing dataset or split folder,
    or no image at all, raises :class:`DataValidationError` (there is nothing to validate).
    """
    root = Path(root)
    df = scan_files(root)
    if df.empty:
        raise DataValidationError(f"dataset {root} holds no image files")
    if classes:
        class_set = [str(c) for c in classes]
    else:
        class_set = sorted((p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=class_sort_key)

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (context.data_sources.add_pandas("podium").add_dataframe_asset("files")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="podium-dataset",
                                                   expectations=_expectations(df, class_set, min_per_class)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="podium-dataset", data=batch,
                                                                            suite=suite))
    result = definition.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
    failures = [_failure(r, df) for r in result.results if not r.success]
    report = ValidationReport(root=str(root), success=bool(result.success) and not failures, failures=failures,
                              rows=len(df), result=result.to_json_dict())
    log.info("validated %s: %d files, %s", root, len(df), "passed" if report.success else
             f"{len(failures)} failed expectation(s)")
    return report


# ----------------------------------------------------------------------------- cached validation

CACHE_FORMAT = 1


def files_fingerprint(root: Path | str) -> str:
    """sha256 over (relative path, size, mtime in ns) of every file below ``root``: any file added,
    removed, rewritten or touched changes it. Cheap (one ``stat`` per file, nothing read)."""
    root = Path(root)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            st = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _suite_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import PIL

    try:
        gx_version = version("great_expectations")
    except PackageNotFoundError:
        gx_version = "unknown"
    return {"great_expectations": gx_version, "pillow": PIL.__version__}


def validation_key(root: Path | str, data_hash: str, classes: Sequence[str] | None, min_per_class: int) -> str:
    """Everything the outcome of :func:`validate_dataset` depends on."""
    import podium.data

    code = hashlib.sha256(Path(__file__).read_bytes() + Path(podium.data.__file__).read_bytes()).hexdigest()
    doc = {"format": CACHE_FORMAT, "root": str(Path(root).resolve()), "data_hash": data_hash,
           "files": files_fingerprint(root), "classes": [str(c) for c in classes] if classes else None,
           "min_per_class": int(min_per_class), "code": code, **_suite_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def validate_dataset_cached(root: Path | str, cache_dir: Path | str, data_hash: str,
                            classes: Sequence[str] | None = None, min_per_class: int = 5
                            ) -> tuple[ValidationReport, bool]:
    """:func:`validate_dataset`, or the passing report of an identical earlier validation.

    Returns ``(report, reused)``. Reports are kept under ``cache_dir/validation/<key>.json`` (see
    :func:`validation_key`); only passing ones are kept, so a failing dataset is always checked afresh.
    """
    root = Path(root)
    if not root.is_dir():  # nothing to fingerprint: let validate_dataset say what is wrong
        return validate_dataset(root, classes, min_per_class), False
    path = Path(cache_dir) / "validation" / f"{validation_key(root, data_hash, classes, min_per_class)}.json"
    if path.is_file():
        try:
            report = ValidationReport.from_json(json.loads(path.read_text()))
            log.info("validation of %s reused: files, data hash %s and suite unchanged since it passed",
                     root, data_hash[:12])
            return report, True
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable validation cache entry %s: validating again", path)
    report = validate_dataset(root, classes, min_per_class)
    if report.success:
        atomic_write_text(path, json.dumps(report.to_json(), default=str))
    return report, False
