"""DVC operations Podium needs: reproduce the data stage, read its md5, track, push, configure S3.

DVC runs as a subprocess (``python -m dvc`` with the interpreter running Podium) in the project
directory, because a stage's ``cmd`` starts ``python``: putting ``dirname(sys.executable)`` first
on PATH makes that the same interpreter (the venv's), whatever shell PATH the user has.
The environment also turns analytics off and pins the site cache inside the repository's
``.dvc/tmp`` (nothing written outside the project, no network needed for local remotes).
Every failure becomes a :class:`podium.data.DataError` carrying DVC's own one-line error.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from podium.errors import DataError
from podium.files import MAX_YAML_BYTES, load_yaml

log = logging.getLogger("podium.dvc")


def _env(project_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("DVC_SITE_CACHE_DIR", str(project_dir / ".dvc" / "tmp" / "site_cache"))
    return env


def _error_line(output: str) -> str:
    """DVC's first ``ERROR:`` line (else the last non-empty line) without its prefix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ERROR"):
            return line.split(":", 1)[-1].strip()
    return lines[-1] if lines else "no output"


def dvc(project_dir: Path | str, *args: str) -> str:
    """Run ``dvc ARGS`` in ``project_dir``; returns its output, raises DataError with DVC's error line."""
    project_dir = Path(project_dir).resolve()
    if not (project_dir / ".dvc").is_dir():
        raise DataError(f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there")
    cmd = [sys.executable, "-m", "dvc", *args]
    log.debug("running %s in %s", " ".join(cmd), project_dir)
    proc = subprocess.run(cmd, cwd=project_dir, env=_env(project_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise DataError(f"dvc {' '.join(args)} failed in {project_dir}: {_error_line(proc.stdout)}")
    return proc.stdout


def _relative(project_dir: Path, data_path: Path | str) -> str:
    """``data_path`` as DVC writes it: relative to the project, posix separators, no trailing slash."""
    path = Path(data_path)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(project_dir.resolve())
        except ValueError:
            raise DataError(f"{data_path} is outside the project {project_dir}") from None
    return path.as_posix().rstrip("/")


def reproduce(project_dir: Path | str, stage: str | None = None) -> str:
    """``dvc repro [stage]``: re-run what changed (a no-op when up to date); returns DVC's output."""
    out = dvc(project_dir, "repro", *([stage] if stage else []))
    log.info("dvc repro %s: %s", stage or "(all)", (out.strip().splitlines() or ["done"])[-1])
    return out


def _dvc_yaml(path: Path) -> dict:
    """``dvc.lock`` or a ``.dvc`` file, bounded like every file Podium parses (a lock lists one entry per
    stage, not per file: well under the cap)."""
    try:
        doc = load_yaml(path, max_bytes=MAX_YAML_BYTES * 16)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    if doc is not None and not isinstance(doc, dict):
        raise DataError(f"{path}: not a DVC file (expected a mapping)")
    return doc


def dataset_hash(project_dir: Path | str, data_path: Path | str) -> str:
    """The DVC md5 of a directory output (``<md5>.dir``), from ``dvc.lock`` or ``<data_path>.dvc``."""
    project_dir = Path(project_dir)
    rel = _relative(project_dir, data_path)
    lock = project_dir / "dvc.lock"
    if lock.is_file():
        stages = (_dvc_yaml(lock) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path", "").rstrip("/") == rel and out.get("md5"):
                    return str(out["md5"])
    dvc_file = project_dir / f"{rel}.dvc"
    if dvc_file.is_file():
        for out in (_dvc_yaml(dvc_file) or {}).get("outs", []):
            if out.get("md5"):
                return str(out["md5"])
    raise DataError(f"no DVC md5 for {rel} in {project_dir}: run `dvc repro` (a stage output) "
                    f"or `podium data import` / `dvc add {rel}`")


def track(project_dir: Path | str, data_path: Path | str) -> str:
    """``dvc add data_path`` (writes ``<data_path>.dvc``, git-ignores the data); returns its md5."""
    rel = _relative(Path(project_dir), data_path)
    dvc(project_dir, "add", rel)
    return dataset_hash(project_dir, rel)


def push(project_dir: Path | str, remote: str | None = None) -> str:
    """``dvc push`` to ``remote`` (default: the repository's default remote)."""
    out = dvc(project_dir, "push", *(["-r", remote] if remote else []))
    log.info("dvc push %s: %s", remote or "(default remote)", (out.strip().splitlines() or ["done"])[-1])
    return out


def configure_s3_remote(project_dir: Path | str, name: str, url: str, endpoint_url: str | None = None) -> None:
    """Add (or update) an S3 remote in ``.dvc/config.local`` (git-ignored: machine-specific, may hold
    credentials). Credentials themselves come from the ``AWS_*`` environment or the AWS config."""
    if not url.startswith("s3://"):
        raise DataError(f"DVC remote url {url!r} must start with s3://")
    dvc(project_dir, "remote", "add", "--local", "--force", name, url)
    if endpoint_url:
        dvc(project_dir, "remote", "modify", "--local", name, "endpointurl", endpoint_url)
