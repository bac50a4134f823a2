"""Dataset validation with Great Expectations: the files on disk, not just the manifest.

:func:`scan_files` lists every image under ``root/{train,val,test}/<label>/`` and builds its facts
table: content sha256, bytes, declared width / height / mode, whether it fully decodes, whether it
declares more than ``max_pixels`` pixels (a decompression bomb: refused from its header, never
decoded). The facts come from :mod:`podium.facts`: computed in parallel processes and cached in
SQLite by file identity, so re-validating an unchanged dataset reads no image and a changed file
re-checks only itself. Derived columns say what no single file can: a content hash seen in more
than one split (``leaked``), the class count of each row's split, each split's labels.

:func:`validate_dataset` runs one ExpectationSuite over that table in an ephemeral GE context (no
files written) and returns a :class:`ValidationReport`; ``raise_for_failures()`` turns failures
into a one-line :class:`DataValidationError` naming example files. Images of any size and of any
mode :mod:`podium.images` can convert are valid. Great Expectations takes seconds to import, so it
is imported inside :func:`validate_dataset`.

:func:`validate_dataset_cached` reuses a passing report when nothing that decides the outcome has
changed: it is keyed on the DVC data hash, a fingerprint of every file under the root (relative path,
size, mtime), the declared classes, the suite's parameters, the validation and decoder source and
the Great Expectations and Pillow versions. A re-run on unchanged data then neither computes facts
nor imports Great Expectations; otherwise the facts cache under ``cache_dir/validation/`` limits the
work to the files that changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from podium import facts as file_facts
from podium.data import SPLITS, class_sort_key, image_files
from podium.errors import DataValidationError
from podium.files import atomic_write_text, load_json
from podium.images import CONVERTIBLE_MODES, DEFAULT_MAX_PIXELS, decoded_channels

log = logging.getLogger("podium.validation")

MAX_EXAMPLES = 5
FACTS_TABLE = ("path", "split", "label", *file_facts.FACT_COLUMNS)


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
    """The outcome of :func:`validate_dataset` for ``root``; ``facts_computed`` files were read and
    decoded, ``facts_reused`` came from the facts cache."""

    root: str
    success: bool
    failures: list[ValidationFailure]
    rows: int
    result: dict[str, Any]  # the GE validation result, JSON-able
    facts_computed: int = 0
    facts_reused: int = 0

    def to_json(self) -> dict[str, Any]:
        """The GE result (JSON-able), plus the dataset root and a short failure list on top."""
        return {"root": self.root, "success": self.success, "rows": self.rows,
                "facts": {"computed": self.facts_computed, "reused": self.facts_reused},
                "failures": [f.line() for f in self.failures], "great_expectations": self.result}

    def summary(self) -> str:
        """One line per failed expectation (empty when the dataset passed)."""
        return "\n".join(f.line() for f in self.failures)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ValidationReport":
        """A passing report back from :meth:`to_json` (failures are never cached, so there are none)."""
        if not doc["success"] or doc.get("failures"):
            raise ValueError("only passing reports are read back")
        counts = doc.get("facts") or {}
        return cls(root=str(doc["root"]), success=True, failures=[], rows=int(doc["rows"]),
                   result=dict(doc["great_expectations"]), facts_computed=int(counts.get("computed", 0)),
                   facts_reused=int(counts.get("reused", 0)))

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(f"dataset {self.root} failed validation: " + "; ".join(
                f.line() for f in self.failures))


def _listing(root: Path) -> list[tuple[str, str, str | None]]:
    """(dataset-relative path, split, label) of every image; raises if a folder is missing."""
    if not root.is_dir():
        raise DataValidationError(f"dataset directory {root} does not exist")
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise DataValidationError(f"dataset {root} has no {', '.join(s + '/' for s in missing)} folder "
                                  f"(expected {root}/{{train,val,test}}/<label>/<image>)")
    listing = []
    for split in SPLITS:
        split_dir = root / split
        for path in image_files(split_dir):
            parts = path.relative_to(split_dir).parts
            listing.append((path.relative_to(root).as_posix(), split, parts[0] if len(parts) > 1 else None))
    return listing


def _scan(root: Path, max_pixels: int, workers: int | None, facts_cache: Path | str | None
          ) -> tuple[pd.DataFrame, int, int]:
    listing = _listing(root)
    facts, computed, reused = file_facts.collect_facts(root, [rel for rel, _, _ in listing], max_pixels,
                                                       workers, facts_cache)
    df = pd.DataFrame.from_records([(*entry, *fact) for entry, fact in zip(listing, facts)], columns=FACTS_TABLE)
    for col in ("size_bytes", "width", "height"):
        df[col] = df[col].astype("Int64")
    for col in ("decodable", "too_large"):
        df[col] = df[col].astype(bool)
    decodable = df["decodable"]
    df["channels"] = df["mode"].map(decoded_channels, na_action="ignore").where(decodable).astype("Int64")
    df["min_side"] = df[["width", "height"]].min(axis=1).where(decodable).astype("Int64")
    splits_per_hash = df.groupby("sha256")["split"].nunique()
    df["leaked"] = df["sha256"].map(splits_per_hash).fillna(0).astype(int) > 1
    df["class_count_in_split"] = df.groupby(["split", "label"])["path"].transform("size").where(
        df["label"].notna()).astype("Int64")
    for split in SPLITS:
        df[f"{split}_label"] = df["label"].where(df["split"] == split)
    return df, computed, reused


def scan_files(root: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
               facts_cache: Path | str | None = None) -> pd.DataFrame:
    """The facts table of ``root``: one row per image under ``root/{split}/``; raises
    DataValidationError if a folder is missing.

    Columns: path (dataset-relative, posix), split, label (null for a file directly in a split
    folder), sha256, size_bytes, width, height, mode, decodable, too_large, error; derived:
    ``channels`` and ``min_side`` (decodable rows only), ``leaked`` (the same bytes in more than
    one split), ``class_count_in_split`` (rows of the row's class in its split) and
    ``<split>_label`` (label, that split's rows only). ``workers`` and ``facts_cache`` as in
    :func:`podium.facts.collect_facts`.
    """
    return _scan(Path(root), max_pixels, workers, facts_cache)[0]


def _expectations(class_set: list[str], min_per_class: int, min_side: int) -> list[Any]:
    import great_expectations.expectations as gxe

    suite: list[Any] = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("path", "label", "split", "sha256")]
    suite += [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=class_set),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="too_large", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=sorted(CONVERTIBLE_MODES)),
        gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=min_side),
        gxe.ExpectColumnValuesToBeInSet(column="leaked", value_set=[False]),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS)),
    ]
    suite += [gxe.ExpectColumnDistinctValuesToContainSet(column=f"{split}_label", value_set=class_set)
              for split in SPLITS]
    suite.append(gxe.ExpectColumnValuesToBeBetween(column="class_count_in_split", min_value=min_per_class))
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
        indices = details.get("partial_unexpected_index_list") or []
        examples = [str(df.at[i, "path"]) for i in indices[:MAX_EXAMPLES] if i in df.index]
        return ValidationFailure(config.type, column, int(details["unexpected_count"]), examples)
    wanted = config.kwargs.get("value_set") or []
    present = set(df[column].dropna().tolist()) if column in df else set()
    missing = [v for v in wanted if v not in present]
    return ValidationFailure(config.type, column, len(missing), [f"missing {v!r}" for v in missing[:MAX_EXAMPLES]])


def validate_dataset(root: Path | str, classes: Sequence[str] | None = None, min_per_class: int = 5, *,
                     min_side: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                     facts_cache: Path | str | None = None) -> ValidationReport:
    """Scan ``root`` and run the expectation suite; never raises for data problems it can report.

    ``classes`` is the declared class set (default: the train split's label folders). Checked:
    non-null fields, labels in the class set, non-empty files, no file above ``max_pixels``
    (reported as such, not as undecodable), decodable files of a convertible mode whose smaller
    side is at least ``min_side``, no identical file in two splits (leakage), every split
    non-empty, every class present in every split with at least ``min_per_class`` examples there.
    ``workers`` / ``facts_cache``: see :func:`podium.facts.collect_facts`. A missing dataset or
    split folder, or no image at all, raises :class:`DataValidationError`.
    """
    root = Path(root)
    df, computed, reused = _scan(root, max_pixels, workers, facts_cache)
    if df.empty:
        raise DataValidationError(f"dataset {root} holds no image files")
    if classes:
        class_set = [str(c) for c in classes]
    else:
        class_set = sorted((p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=class_sort_key)
    # A refused file was never decoded: it fails too_large only, not decodable as well.
    checked = df.assign(decodable=df["decodable"].astype(object).where(~df["too_large"], None))

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (context.data_sources.add_pandas("podium").add_dataframe_asset("files")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="podium-dataset",
                                                   expectations=_expectations(class_set, min_per_class, min_side)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="podium-dataset", data=batch,
                                                                            suite=suite))
    # SUMMARY, not COMPLETE: a million bad rows must not become a million-entry report
    result = definition.run(batch_parameters={"dataframe": checked},
                            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
    failures = [_failure(r, checked) for r in result.results if not r.success]
    report = ValidationReport(root=str(root), success=bool(result.success) and not failures, failures=failures,
                              rows=len(df), result=result.to_json_dict(), facts_computed=computed,
                              facts_reused=reused)
    for row in df.loc[df["error"].notna(), ["path", "error"]].head(MAX_EXAMPLES).itertuples():
        log.warning("%s: %s", row.path, row.error)
    log.info("validated %s: %d files (%d checked, %d from the facts cache), %s", root, len(df), computed, reused,
             "passed" if report.success else f"{len(failures)} failed expectation(s)")
    return report


# ----------------------------------------------------------------------------- cached validation

CACHE_FORMAT = 2


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


def validation_key(root: Path | str, data_hash: str, classes: Sequence[str] | None, min_per_class: int,
                   min_side: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Everything the outcome of :func:`validate_dataset` depends on."""
    import podium.data
    import podium.images

    sources = (__file__, file_facts.__file__, podium.images.__file__, podium.data.__file__)
    code = hashlib.sha256(b"".join(Path(p).read_bytes() for p in sources)).hexdigest()
    doc = {"format": CACHE_FORMAT, "root": str(Path(root).resolve()), "data_hash": data_hash,
           "files": files_fingerprint(root), "classes": [str(c) for c in classes] if classes else None,
           "min_per_class": int(min_per_class), "min_side": int(min_side), "max_pixels": int(max_pixels),
           "code": code, **_suite_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def validate_dataset_cached(root: Path | str, cache_dir: Path | str, data_hash: str,
                            classes: Sequence[str] | None = None, min_per_class: int = 5, *, min_side: int = 8,
                            max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
                            ) -> tuple[ValidationReport, bool]:
    """:func:`validate_dataset`, or the passing report of an identical earlier validation.

    Returns ``(report, reused)``. Reports are kept under ``cache_dir/validation/<key>.json`` (see
    :func:`validation_key`); only passing ones are kept, so a failing dataset is always checked afresh.
    File facts are cached in ``cache_dir/validation/facts.sqlite`` whatever the outcome.
    """
    root = Path(root)
    options = dict(min_side=min_side, max_pixels=max_pixels, workers=workers,
                   facts_cache=Path(cache_dir) / "validation" / "facts.sqlite")
    if not root.is_dir():  # nothing to fingerprint: let validate_dataset say what is wrong
        return validate_dataset(root, classes, min_per_class, **options), False
    key = validation_key(root, data_hash, classes, min_per_class, min_side, max_pixels)
    path = Path(cache_dir) / "validation" / f"{key}.json"
    if path.is_file():
        try:
            report = ValidationReport.from_json(load_json(path))
            log.info("validation of %s reused: files, data hash %s and suite unchanged since it passed",
                     root, data_hash[:12])
            return report, True
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable validation cache entry %s: validating again", path)
    report = validate_dataset(root, classes, min_per_class, **options)
    if report.success:
        atomic_write_text(path, json.dumps(report.to_json(), default=str))
    return report, False
