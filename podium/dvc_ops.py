"""DVC operations Podium needs: reproduce the data stage, read its md5, track, push, configure remotes.

DVC runs as a subprocess (``python -m dvc`` with the interpreter running Podium) in the project
directory, because a stage's ``cmd`` starts ``python``: putting ``dirname(sys.executable)`` first
on PATH makes that the same interpreter (the venv's), whatever shell PATH the user has.
The environment also turns analytics off and pins the site cache inside the repository's
``.dvc/tmp``. Every failure becomes a :class:`podium.errors.DataError` carrying DVC's own error line.

Remotes are recorded the DVC way, in the committed ``.dvc/config``, so that ``git clone`` +
``dvc pull`` finds the data. A repository without a default remote gets ``local``, a folder in the
user's cache (:func:`default_remote_url`): outside every working tree, so a clone on this machine
pulls from it. Podium never writes ``.dvc/config.local`` (the per-machine file, for credentials);
every setting it changes is logged at INFO and returned, for the command to list.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from podium.errors import DataError, first_line
from podium.files import MAX_YAML_BYTES, load_yaml

log = logging.getLogger("podium.dvc")

PROJECT_CONFIG = ".dvc/config"  # committed: the remotes a clone pulls from
LOCAL_CONFIG = ".dvc/config.local"  # git-ignored, per machine (credentials): read, never written
DEFAULT_REMOTE = "local"  # the name Podium gives the default remote it adds
_URL_SCHEME = re.compile(r"^\w+://")


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
                          stderr=subprocess.STDOUT, text=True, check=False)
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


def workspace_fingerprint(project_dir: Path | str, data_path: Path | str, stage: str | None = None) -> str:
    """A digest of what DVC would look at to version ``data_path``: the path, size, mtime and inode of
    every file of the stage's deps and outs (or of the data and its ``.dvc`` file), and ``dvc.yaml``,
    ``dvc.lock`` and ``params.yaml``. Equal digests mean DVC would find nothing to do (it decides from
    the same stat fields in its own state database), so a run can skip its subprocesses."""
    project_dir = Path(project_dir)
    rel = _relative(project_dir, data_path)
    paths = ["dvc.yaml", "dvc.lock", "params.yaml"]
    if stage:
        spec = ((_dvc_yaml(project_dir / "dvc.yaml") or {}).get("stages") or {}).get(stage) or {}
        paths += [str(p) for p in [*spec.get("deps", []), *spec.get("outs", [])] if isinstance(p, str)]
    else:
        paths += [rel, f"{rel}.dvc"]
    digest = hashlib.sha256(f"{stage}|{rel}".encode())
    for name in sorted(set(paths)):
        root = project_dir / name
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:  # absent: that too is part of the state
                digest.update(f"{f.relative_to(project_dir)}|-\n".encode())
                continue
            digest.update(f"{f.relative_to(project_dir)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode())
    return digest.hexdigest()


def track(project_dir: Path | str, data_path: Path | str) -> str:
    """``dvc add data_path`` (writes ``<data_path>.dvc``, git-ignores the data); returns its md5."""
    rel = _relative(Path(project_dir), data_path)
    dvc(project_dir, "add", rel)
    return dataset_hash(project_dir, rel)


def repository_files(project_dir: Path | str, data_path: Path | str, stage: str | None = None) -> list[str]:
    """The files DVC keeps in the repository for ``data_path``, the ones to commit with git (those that
    exist, relative to the project): ``dvc.lock`` for a stage's output, else ``<data_path>.dvc``, and the
    ``.gitignore`` beside the data that keeps the data itself out of git."""
    project_dir = Path(project_dir)
    rel = _relative(project_dir, data_path)
    candidates = ["dvc.lock" if stage else f"{rel}.dvc", posixpath.join(posixpath.dirname(rel), ".gitignore")]
    return [name for name in candidates if (project_dir / name).is_file()]


def push(project_dir: Path | str, remote: str | None = None) -> str:
    """``dvc push`` to ``remote`` (default: the repository's default remote)."""
    out = dvc(project_dir, "push", *(["-r", remote] if remote else []))
    log.info("dvc push %s: %s", remote or "(default remote)", (out.strip().splitlines() or ["done"])[-1])
    return out


# ----------------------------------------------------------------------------- remotes


@dataclass(frozen=True)
class ConfigChange:
    """One setting Podium wrote to the committed DVC config, named as ``dvc config`` names it."""

    setting: str  # core.remote, remote.local.url, remote.podium.endpointurl
    value: str | None  # None: removed
    previous: str | None = None

    def __str__(self) -> str:
        was = f" (was {self.previous})" if self.previous is not None else ""
        return f"{PROJECT_CONFIG}: {self.setting} {'unset' if self.value is None else '= ' + self.value}{was}"


def read_config(project_dir: Path | str, local: bool = False) -> dict:
    """``.dvc/config`` (or ``.dvc/config.local``) as DVC reads it, keys lower-cased, remotes by name:
    ``{"core": {...}, "remote": {name: {"url": ...}}}``; ``{"remote": {}}`` when the file is absent."""
    from configobj import ConfigObj, ConfigObjError

    path = Path(project_dir) / (LOCAL_CONFIG if local else PROJECT_CONFIG)
    conf: dict = {"remote": {}}
    if not path.is_file():
        return conf
    try:
        sections = ConfigObj(str(path), encoding="utf-8", interpolation=False).dict()
    except (ConfigObjError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable DVC config ({first_line(exc)})") from None
    for section, values in sections.items():
        options = {str(k).lower(): v for k, v in values.items()} if isinstance(values, dict) else values
        named = re.fullmatch(r'\s*remote\s*"(.*)"\s*', section.lower())
        if named:
            conf["remote"][named.group(1)] = options
        else:
            conf[section.lower()] = options
    return conf


def default_remote_url(project_dir: Path | str) -> str:
    """Where Podium puts a repository's default local remote: ``~/.cache/podium/dvc-remote/<project>``
    (written with the ``~``, which DVC expands: the same committed line works for every user), or
    ``$XDG_CACHE_HOME/podium/dvc-remote/<project>`` when that is set to an absolute path."""
    name = Path(project_dir).resolve().name or "project"
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).as_posix() if os.path.isabs(cache) else "~/.cache"
    return f"{base.rstrip('/')}/podium/dvc-remote/{name}"


def remote_folder(project_dir: Path | str, url: str) -> Path | None:
    """The folder a local remote's url names, resolved as DVC does (``~`` expanded, a relative url
    against ``.dvc/``); None for a URL (s3://...)."""
    if _URL_SCHEME.match(url):
        return None
    path = Path(os.path.expanduser(url))
    return (path if path.is_absolute() else Path(project_dir).resolve() / ".dvc" / path).resolve()


def _warn_if_unpullable(project_dir: Path, name: str, url: str) -> None:
    """A local remote inside the working tree is git-ignored or committed by mistake: a clone has neither."""
    folder = remote_folder(project_dir, url)
    root = project_dir.resolve()
    if folder is not None and (folder == root or root in folder.parents):
        log.warning("DVC remote %r is %s, inside the working tree: a git clone cannot `dvc pull` from it; "
                    "point it outside: `dvc remote modify --project %s url '%s'`, then `dvc push`",
                    name, folder, name, default_remote_url(project_dir))


def _warn_if_shadowed(project_dir: Path, name: str) -> None:
    """``.dvc/config.local`` wins over ``.dvc/config`` on this machine: say so where it overrides ``name``."""
    committed, local = read_config(project_dir), read_config(project_dir, local=True)
    overrides = []
    local_default = local.get("core", {}).get("remote")
    if local_default and local_default != committed.get("core", {}).get("remote"):
        overrides.append(f"core.remote = {local_default}")
    for option, value in local["remote"].get(name, {}).items():
        if option in ("url", "endpointurl") and value != committed["remote"].get(name, {}).get(option):
            overrides.append(f"remote.{name}.{option} = {value}")
    if overrides:
        log.warning("%s overrides %s on this machine (%s): this machine pushes there, a clone pulls what %s "
                    "says; `dvc config --local --unset ...` removes an override", project_dir / LOCAL_CONFIG,
                    PROJECT_CONFIG, "; ".join(overrides), PROJECT_CONFIG)


def _report(project_dir: Path, changes: list[ConfigChange]) -> list[ConfigChange]:
    for change in changes:
        log.info("DVC config changed in %s: %s", project_dir, change)
    return changes


def ensure_default_remote(project_dir: Path | str) -> list[ConfigChange]:
    """Give the repository a default remote in ``.dvc/config`` when it has none: ``local`` at
    :func:`default_remote_url` (or the existing remote ``local`` made the default). Returns what changed
    (nothing when the committed config already names a default; one inside the working tree is warned
    about, not moved: its data would stay behind)."""
    project_dir = Path(project_dir).resolve()
    committed = read_config(project_dir)
    name = committed.get("core", {}).get("remote")
    changes: list[ConfigChange] = []
    if not name:
        name = DEFAULT_REMOTE
        existing = committed["remote"].get(name, {}).get("url")
        if existing:
            dvc(project_dir, "remote", "default", "--project", name)
        else:
            url = default_remote_url(project_dir)
            dvc(project_dir, "remote", "add", "--project", "--default", name, url)
            changes.append(ConfigChange(f"remote.{name}.url", url))
        changes.append(ConfigChange("core.remote", name))
    url = read_config(project_dir)["remote"].get(name, {}).get("url")
    if url:
        _warn_if_unpullable(project_dir, name, url)
    _warn_if_shadowed(project_dir, name)
    return _report(project_dir, changes)


def check_remote_url(url: str) -> str:
    """``url`` if DVC can push there from any clone: s3://bucket/path or an absolute (or ``~``) folder."""
    if url.startswith("s3://") and len(url) > len("s3://"):
        return url
    if not _URL_SCHEME.match(url) and os.path.isabs(os.path.expanduser(url)):
        return url
    raise DataError(f"DVC remote url {url!r} must be s3://bucket/path or an absolute folder (a relative one "
                    "resolves inside .dvc/, where a clone finds nothing)")


def configure_remote(project_dir: Path | str, name: str, url: str,
                     endpoint_url: str | None = None) -> list[ConfigChange]:
    """Record remote ``name`` (``url``, and ``endpoint_url`` for S3) in the committed ``.dvc/config``,
    writing only what differs; returns what changed. Credentials stay out of it: they come from the
    ``AWS_*`` environment, the AWS config, or what the user puts in ``.dvc/config.local``."""
    project_dir = Path(project_dir).resolve()
    check_remote_url(url)
    current = read_config(project_dir)["remote"].get(name)
    changes: list[ConfigChange] = []
    if current is None:
        dvc(project_dir, "remote", "add", "--project", name, url)
        changes.append(ConfigChange(f"remote.{name}.url", url))
        current = {"url": url}
    elif current.get("url") != url:  # modify, not `add --force`: that would drop the user's other options
        dvc(project_dir, "remote", "modify", "--project", name, "url", url)
        changes.append(ConfigChange(f"remote.{name}.url", url, current.get("url")))
    if endpoint_url and current.get("endpointurl") != endpoint_url:
        dvc(project_dir, "remote", "modify", "--project", name, "endpointurl", endpoint_url)
        changes.append(ConfigChange(f"remote.{name}.endpointurl", endpoint_url, current.get("endpointurl")))
    elif not endpoint_url and current.get("endpointurl"):
        dvc(project_dir, "remote", "modify", "--project", "--unset", name, "endpointurl")
        changes.append(ConfigChange(f"remote.{name}.endpointurl", None, current["endpointurl"]))
    _warn_if_unpullable(project_dir, name, url)
    _warn_if_shadowed(project_dir, name)
    return _report(project_dir, changes)


def describe_remote(project_dir: Path | str, name: str | None = None) -> str:
    """Remote ``name`` (default: the default remote) as ``.dvc/config`` records it, and how a clone pulls."""
    committed = read_config(project_dir)
    chosen = name or committed.get("core", {}).get("remote")
    url = committed["remote"].get(chosen, {}).get("url") if chosen else None
    if not url:
        return f"no {'remote ' + repr(name) if name else 'default remote'} in {PROJECT_CONFIG}"
    pull = "dvc pull" if chosen == committed.get("core", {}).get("remote") else f"dvc pull -r {chosen}"
    folder = remote_folder(project_dir, url)
    where = f", i.e. {folder}" if folder is not None and not os.path.isabs(os.path.expanduser(url)) else ""
    return f"{chosen} = {url}{where} ({PROJECT_CONFIG}; a clone runs `{pull}`)"
