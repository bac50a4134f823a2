"""DVC the DVC way: the default remote lives outside the working tree and is recorded in the committed
``.dvc/config``, so ``git clone`` + ``dvc pull`` (the real ``dvc``) brings back what the pipeline pushed;
``.dvc/config.local`` is never written; what DVC wrote into the repository is listed.

The user's home is a temp folder here (``HOME``), so the default remote ``~/.cache/podium/dvc-remote/<project>``
and everything else DVC writes stay inside the test's temp dirs.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from podium import dvc_ops
from podium.errors import ConfigError
from tests.photos import REPO, make_photo_folder

DVC = Path(sys.executable).with_name("dvc")  # the venv's real `dvc` command
PASSED = {"success": True, "failures": [], "rows": 1, "result": {}}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp HOME (no XDG_CACHE_HOME): the default remote and DVC's user files land under it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Podium Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@podium.invalid")
    return home


def sh(cmd: list, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed in {cwd}:\n{proc.stdout}"
    return proc.stdout


def md5s(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_context(project: Path, **data):
    from podium.config import parse_config
    from podium.tasks.common import RunContext

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["data"].update(path="data/pets", stage=None, **data)
    return RunContext(cfg=parse_config(raw), project_dir=str(project), run_id="r", git_sha="g")


def test_a_clone_pulls_what_the_pipeline_pushed(tmp_path: Path, home: Path) -> None:
    from podium.cli import app
    from podium.tasks.data import push_dataset, repository_writes, version_dataset
    from podium.validation import ValidationReport

    project = tmp_path / "work" / "shelter"
    project.mkdir(parents=True)
    sh(["git", "init", "-q"], project)  # the README's commands, then `podium data import`
    sh([DVC, "init", "-q"], project)
    photos = make_photo_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6, sides=(16, 24),
                               variants=((".png", "RGB"),))

    imported = CliRunner().invoke(app, ["data", "import", str(photos), "--name", "pets", "--project-dir", str(project)])

    assert imported.exit_code == 0, imported.output
    listing = imported.output.split("written:", 1)[1]
    assert "dvc        data/pets.dvc" in listing and "dvc        data/.gitignore" in listing
    assert ".dvc/config: remote.local.url = ~/.cache/podium/dvc-remote/shelter" in listing
    assert ".dvc/config: core.remote = local" in listing
    assert dvc_ops.read_config(project)["remote"] == {"local": {"url": "~/.cache/podium/dvc-remote/shelter"}}
    assert not (project / ".dvc" / "config.local").exists()

    # the pipeline's data step: version, push after validation; the remote exists already, nothing changes
    ctx = run_context(project)
    committed = (project / ".dvc" / "config").read_text()
    ref = version_dataset.fn(ctx)
    assert push_dataset.fn(ctx, ref, ValidationReport(root=ref.root, **PASSED)) == []
    assert (project / ".dvc" / "config").read_text() == committed
    assert not (project / ".dvc" / "config.local").exists()
    remote = home / ".cache" / "podium" / "dvc-remote" / "shelter"
    assert (remote / "files" / "md5" / ref.data_hash[:2] / ref.data_hash[2:]).is_file()
    writes = repository_writes(ctx)
    assert writes["dvc"] == f"data/pets.dvc, data/.gitignore in {project.resolve()} (commit with git)"
    assert writes["dvc remote"] == "local = ~/.cache/podium/dvc-remote/shelter (.dvc/config; a clone runs `dvc pull`)"

    sh(["git", "add", "."], project)
    sh(["git", "commit", "-q", "-m", "pets"], project)
    tracked = sh(["git", "ls-files"], project).split()
    assert {".dvc/config", "data/pets.dvc", "data/.gitignore"} <= set(tracked)
    assert not [path for path in tracked if path.startswith(("data/pets/", ".dvc/cache", ".dvc/tmp"))]

    clone = tmp_path / "elsewhere" / "copy"
    sh(["git", "clone", "-q", project, clone], tmp_path)
    assert not (clone / "data" / "pets").exists()
    sh([DVC, "pull"], clone)
    originals = md5s(project / "data" / "pets")
    assert md5s(clone / "data" / "pets") == originals and len(originals) == 13  # 12 photos, manifest.csv
    assert dvc_ops.dataset_hash(clone, "data/pets") == ref.data_hash

    # `data.dvc_remote` (a team folder here, S3 in production) is recorded as `podium`, and listed
    team = tmp_path / "team-remote"
    ctx = run_context(project, dvc_remote={"url": str(team)})
    assert push_dataset.fn(ctx, ref, ValidationReport(root=ref.root, **PASSED)) == [
        f".dvc/config: remote.podium.url = {team}"]
    assert (team / "files" / "md5" / ref.data_hash[:2] / ref.data_hash[2:]).is_file()
    assert repository_writes(ctx)["dvc remote"] == f"podium = {team} (.dvc/config; a clone runs `dvc pull -r podium`)"
    assert not (project / ".dvc" / "config.local").exists()


def test_a_warm_run_calls_dvc_only_when_the_data_changed(tmp_path: Path, home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Same files, sizes and mtimes as the last run: the recorded md5 is reused and the already pushed
    data is not pushed again (no DVC subprocess at all); one changed image versions and pushes anew."""
    from podium.tasks.data import push_dataset, version_dataset
    from podium.validation import ValidationReport

    project = tmp_path / "shelter"
    project.mkdir()
    sh(["git", "init", "-q"], project)
    sh([DVC, "init", "-q"], project)
    make_photo_folder(project / "data" / "pets", classes=("cat", "dog"), per_class=3, sides=(16, 24),
                      variants=((".png", "RGB"),))
    ctx = run_context(project)
    calls: list[tuple[str, ...]] = []
    real_dvc = dvc_ops.dvc
    monkeypatch.setattr(dvc_ops, "dvc", lambda project_dir, *args: calls.append(args) or real_dvc(project_dir, *args))

    def data_step() -> str:
        ref = version_dataset.fn(ctx)
        push_dataset.fn(ctx, ref, ValidationReport(root=ref.root, **PASSED))
        return ref.data_hash

    first = data_step()
    assert [c[0] for c in calls] == ["add", "remote", "push"]
    calls.clear()
    assert data_step() == first and calls == []  # warm: nothing changed, no DVC call
    image = next((project / "data" / "pets" / "cat").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")  # one image changed
    changed = data_step()
    assert changed != first and [c[0] for c in calls] == ["add", "push"]


def test_unpullable_and_overridden_remotes_are_warned_not_edited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    project = tmp_path / "proj"
    (project / ".dvc").mkdir(parents=True)
    old_style = "[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvcstore\n"  # inside the checkout
    (project / ".dvc" / "config").write_text(old_style)
    local = "['remote \"local\"']\n    url = /mnt/elsewhere\n"
    (project / ".dvc" / "config.local").write_text(local)

    with caplog.at_level(logging.WARNING, logger="podium.dvc"):
        assert dvc_ops.ensure_default_remote(project) == []  # a default exists: nothing is written

    warnings = [r.getMessage() for r in caplog.records]
    assert any("inside the working tree: a git clone cannot `dvc pull` from it" in w for w in warnings)
    assert any("overrides .dvc/config on this machine (remote.local.url = /mnt/elsewhere)" in w for w in warnings)
    assert (project / ".dvc" / "config").read_text() == old_style
    assert (project / ".dvc" / "config.local").read_text() == local
    assert "no default remote" in dvc_ops.describe_remote(tmp_path)  # no .dvc/config at all

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dvc_ops.default_remote_url(project) == f"{(tmp_path / 'xdg').as_posix()}/podium/dvc-remote/proj"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the XDG spec says
    assert dvc_ops.default_remote_url(project) == "~/.cache/podium/dvc-remote/proj"


def test_a_remote_a_clone_cannot_reach_is_a_config_error() -> None:
    from podium.config import parse_config

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["data"]["dvc_remote"] = {"url": "dvcstore"}
    with pytest.raises(ConfigError, match=r"data\.dvc_remote\.url.*must be s3://bucket/path or an absolute folder"):
        parse_config(raw)
