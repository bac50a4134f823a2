"""Data tasks: version the dataset with DVC, validate it with Great Expectations, and only then push it
to the DVC remote (data that failed validation never leaves the machine)."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from podium import dvc_ops
from podium.errors import DataError
from podium.files import atomic_write_text
from podium.tasks.common import TRANSIENT_RETRIES, DatasetRef, RunContext, read_cache
from podium.validation import ValidationReport, validate_dataset_cached

log = logging.getLogger("podium.tasks.data")

PODIUM_REMOTE = "podium"  # the DVC remote ``data.dvc_remote`` is recorded as


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="version-dataset", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def version_dataset(ctx: RunContext) -> DatasetRef:
    """Reproduce the dataset's DVC stage (a no-op when up to date), return its md5 (nothing pushed)."""
    cfg = ctx.cfg.data
    project = ctx.project_path
    state = DvcState(ctx)
    data_hash = state.unchanged_hash()
    if data_hash is not None:
        log.info("dataset %s: same files, sizes and mtimes as the last run, DVC md5 %s (no DVC call)",
                 cfg.path, data_hash)
    else:
        if cfg.stage:
            dvc_ops.reproduce(project, cfg.stage)
        else:  # a dataset tracked with `dvc add` (e.g. `podium data import`): re-hash what is on disk
            dvc_ops.track(project, cfg.path)
        data_hash = dvc_ops.dataset_hash(project, cfg.path)
        state.versioned(data_hash)
    log.info("dataset %s at DVC md5 %s; DVC keeps it in git as %s (commit them)", cfg.path, data_hash,
             ", ".join(dvc_ops.repository_files(project, cfg.path, cfg.stage)) or "nothing")
    classes = tuple(cfg.classes) if cfg.classes else None
    return DatasetRef(root=str(project / cfg.path), data_hash=data_hash, classes=classes)


@task(name="validate-dataset", cache_policy=NO_CACHE)
def validate_data(ctx: RunContext, ref: DatasetRef) -> ValidationReport:
    """Run the expectation suite; the result is an MLflow artifact either way; failures stop the flow,
    so the passing report returned is what :func:`push_dataset` asks for.

    A report that passed on the same files, data hash, classes and suite is reused (see
    :func:`podium.validation.validate_dataset_cached`): the run's artifact is that report."""
    report, reused = validate_dataset_cached(Path(ref.root), ctx.cache_path, ref.data_hash,
                                             classes=list(ref.classes) if ref.classes else None,
                                             min_per_class=ctx.cfg.data.min_per_class,
                                             min_side=ctx.cfg.data.min_side, max_pixels=ctx.cfg.data.max_pixels,
                                             workers=ctx.cfg.data.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "validation.json"
        path.write_text(json.dumps(report.to_json(), indent=2, default=str))
        ctx.registry.log_artifact(ctx.run_id, path, "data")
    ctx.registry.set_run_tags(ctx.run_id, {"data_validation": "passed" if report.success else "failed",
                                           **({"data_validation_reused": "true"} if reused else {})})
    if not report.success:
        for line in report.summary().splitlines():
            log.error("validation failed: %s", line)
    report.raise_for_failures()
    return report


@task(name="push-dataset", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def push_dataset(ctx: RunContext, ref: DatasetRef, validated: ValidationReport) -> list[str]:
    """``dvc push`` the dataset (``data.push``) to ``data.dvc_remote`` (remote ``podium``) or the
    repository's default remote (``local`` in the user's cache when it has none); ``validated`` is
    :func:`validate_data`'s passing report, so nothing unvalidated is ever pushed.

    The remote is recorded in the committed ``.dvc/config`` (a clone pulls from it); the changes made
    there are logged and returned, one line each. ``.dvc/config.local`` is never written."""
    validated.raise_for_failures()
    cfg = ctx.cfg.data
    if not cfg.push:
        return []
    if cfg.dvc_remote is not None:
        changes = dvc_ops.configure_remote(ctx.project_path, PODIUM_REMOTE, cfg.dvc_remote.url,
                                           cfg.dvc_remote.endpoint_url)
    else:
        changes = dvc_ops.ensure_default_remote(ctx.project_path)
    state, remote = DvcState(ctx), _remote(ctx)
    if not changes and state.pushed(remote) == ref.data_hash:
        log.info("dataset %s (DVC md5 %s) already pushed to %s by an earlier run (no DVC call)",
                 cfg.path, ref.data_hash, remote)
        return []
    dvc_ops.push(ctx.project_path, PODIUM_REMOTE if cfg.dvc_remote is not None else None)
    state.record_push(remote, ref.data_hash)
    log.info("dataset %s (DVC md5 %s) pushed to %s", cfg.path, ref.data_hash, remote)
    return [str(change) for change in changes]


class DvcState:
    """What the last run left DVC looking at (``<cache>/dvc_state.json``): the workspace fingerprint
    (:func:`podium.dvc_ops.workspace_fingerprint`) with the md5 it versioned to, and the md5 pushed to
    each remote. A warm run with the same fingerprint reuses the md5 and skips ``dvc repro``/``add``
    (2-4 s of subprocess each), and ``dvc push`` when that md5 already went to that remote."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.path = ctx, ctx.cache_path / "dvc_state.json"
        self.entries = read_cache(self.path)

    def _fingerprint(self) -> str:
        cfg = self.ctx.cfg.data
        return dvc_ops.workspace_fingerprint(self.ctx.project_path, cfg.path, cfg.stage)

    def unchanged_hash(self) -> str | None:
        data_hash = self.entries.get("data_hash")
        fresh = isinstance(data_hash, str) and self.entries.get("fingerprint") == self._fingerprint()
        return data_hash if fresh else None

    def versioned(self, data_hash: str) -> None:
        pushed = self.entries.get("pushed") if self.entries.get("data_hash") == data_hash else None
        self._write({"fingerprint": self._fingerprint(), "data_hash": data_hash,
                     "pushed": pushed if isinstance(pushed, dict) else {}})

    def pushed(self, remote: str) -> str | None:
        pushed = self.entries.get("pushed")
        return pushed.get(remote) if isinstance(pushed, dict) else None

    def record_push(self, remote: str, data_hash: str) -> None:
        pushed = self.entries.get("pushed") if isinstance(self.entries.get("pushed"), dict) else {}
        self._write({**self.entries, "pushed": {**pushed, remote: data_hash}})

    def _write(self, entries: dict) -> None:
        self.entries = entries
        atomic_write_text(self.path, json.dumps(entries, indent=1))


def _remote(ctx: RunContext) -> str:
    return dvc_ops.describe_remote(ctx.project_path, PODIUM_REMOTE if ctx.cfg.data.dvc_remote is not None else None)


def repository_writes(ctx: RunContext) -> dict[str, str]:
    """For a run's ``written:`` listing: the DVC files the data step keeps in the repository (to commit
    with git) and, when it pushes, the remote ``.dvc/config`` records for it."""
    cfg = ctx.cfg.data
    try:
        files = dvc_ops.repository_files(ctx.project_path, cfg.path, cfg.stage)
        writes = {"dvc": f"{', '.join(files) or 'nothing'} in {ctx.project_path.resolve()} (commit with git)"}
        if cfg.push:
            writes["dvc remote"] = _remote(ctx)
    except DataError as exc:  # a listing never fails a finished run
        writes = {"dvc": f"unknown: {exc}"}
    return writes
