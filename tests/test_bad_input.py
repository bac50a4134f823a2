"""The permanent bad-input suite (issue 22, points 6-8): untrusted input files, configs that must run
once they validate, paths that stay where they are meant to. Every input goes through the real CLI
(in-process, as the other CLI tests do) and must end in exit 1, exactly one ``error:`` line naming
the problem, no traceback, and nothing changed: the config, the source folders and the project
directory are compared byte for byte, and no database or cache appears. Nothing here trains."""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.errors import DataValidationError
from tests.data_corpus import make_flat_imagefolder, make_presplit_imagefolder
from tests.photos import dvc_project, local_remote, png_bomb

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
INVENTORY = REPO / "infra" / "devices.yaml"


def snapshot(*roots: Path) -> dict[str, object]:
    """Every path below ``roots`` with its bytes (files) or its target (links): any change shows."""
    seen: dict[str, object] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                if path.is_symlink():
                    seen[str(path)] = f"-> {os.readlink(path)}"
                elif path.is_file():
                    seen[str(path)] = path.read_bytes()
                else:
                    seen[str(path)] = "dir"
    return seen


def one_error(args: list[str], *expected: str) -> str:
    """Run ``podium ARGS``; assert exit 1, one ``error:`` line on stderr containing ``expected``, no traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a handled error, not a crash
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in errors[0], errors[0]
    print(f"bad input: podium {args[0]} -> {errors[0]}")  # the catalogue of lines, with pytest -s
    return errors[0]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder, also the working directory: whatever a command creates shows up in it."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # retrain must not get this far
    return folder


def demo_with(tmp_path: Path, mutate: Callable[[dict], None]) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    mutate(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_rejected(args: list[str], config: Path, project: Path, *expected: str) -> None:
    """``args`` fails with one line and leaves the config and the project exactly as they were."""
    before = snapshot(project), config.read_bytes() if config.is_file() else None
    one_error(args, *expected)
    assert (snapshot(project), config.read_bytes() if config.is_file() else None) == before


# ----------------------------------------------------------------------------- 7. a config that validates, runs

CONFIG_MISTAKES = {
    "zero epochs": (lambda r: r["anchors"][0]["train"].update(epochs=0), "anchors.0.train.epochs"),
    "negative lr": (lambda r: r["anchors"][1]["train"].update(lr=-0.1), "anchors.1.train.lr"),
    "zero steps in a method": (lambda r: r["methods"]["stitching"].update(train={"max_steps": 0}),
                               "methods.stitching.train.max_steps"),
    "zero image side": (lambda r: r["data"].update(image_size=[0, 32]), "data.image_size.0"),
    "huge image side": (lambda r: r["data"].update(image_size=[100_000, 32]), "data.image_size.0"),
    "zero batch": (lambda r: r["data"].update(batch_size=0), "data.batch_size"),
    "repeated class": (lambda r: r["data"].update(classes=["0", "1", "0"]), "data.classes"),
    "one class": (lambda r: r["data"].update(classes=["0"]), "data.classes"),
    "no devices": (lambda r: r["devices"].update(use=[]), "devices.use"),
    "repeated device": (lambda r: r["devices"].update(use=["cpu-1t", "cpu-1t"]), "devices.use"),
    "unknown family": (lambda r: r["anchors"][0]["arch"].update(family="resnut"), "anchors.0.arch",
                       "unknown model family 'resnut'"),
    "unknown block type": (lambda r: r["anchors"][0]["arch"].update(block="triple"), "anchors.0.arch", "triple"),
    "zero width": (lambda r: r["anchors"][1]["arch"].update(channels=[0, 64, 128, 256]), "anchors.1.arch",
                   "without weights"),
    "unknown builder argument": (lambda r: r["anchors"][0]["arch"].update(wings=2), "anchors.0.arch", "wings"),
    "unbuildable method backbone": (lambda r: r["methods"]["self_distill"].update(backbone={"family": "nope"}),
                                    "methods.self_distill.backbone"),
}


@pytest.mark.parametrize("name", CONFIG_MISTAKES)
def test_a_config_that_cannot_run_fails_validate(name: str, tmp_path: Path, project: Path) -> None:
    """Ranges, unique lists and architectures built on the meta device: `podium validate` names the field."""
    mutate, *expected = CONFIG_MISTAKES[name]
    config = demo_with(tmp_path, mutate)
    assert_rejected(["validate", "--config", str(config), "--project-dir", str(project)], config, project,
                    str(config), *expected)


@pytest.mark.parametrize("name", ["zero epochs", "unknown block type"])
def test_retrain_refuses_the_same_configs_before_creating_anything(name: str, tmp_path: Path, project: Path) -> None:
    """Checked before retrain starts: no Prefect home, no MLflow database, no cache in the project."""
    mutate, *expected = CONFIG_MISTAKES[name]
    config = demo_with(tmp_path, mutate)
    assert_rejected(["retrain", "--config", str(config), "--project-dir", str(project)], config, project, *expected)
    assert not (tmp_path / "prefect-home").exists()


def test_repeated_yaml_keys_are_refused(tmp_path: Path, project: Path) -> None:
    """yaml.safe_load keeps the last of two equal keys silently; a config must say what it means once."""
    config = tmp_path / "cfg.yaml"
    config.write_text(DEMO.read_text() + "model_name: another-model\n")
    assert_rejected(["validate", "--config", str(config)], config, project, "repeated key 'model_name'")
    nested = tmp_path / "nested.yaml"
    nested.write_text(DEMO.read_text().replace("  batch_size: 64\n", "  batch_size: 64\n  batch_size: 8\n"))
    assert_rejected(["validate", "--config", str(nested)], nested, project, "repeated key 'batch_size'")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_models_never_creates_a_tracking_database(tmp_path: Path, project: Path) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    config = demo_with(tmp_path, lambda r: r["tracking"].update(uri=f"sqlite:///{missing}"))
    assert_rejected(["models", "--config", str(config)], config, project, str(missing), "does not exist")
    assert not missing.parent.exists()
    folder = demo_with(tmp_path, lambda r: r["tracking"].update(uri=f"file://{tmp_path / 'no-mlruns'}"))
    assert_rejected(["models", "--config", str(folder)], folder, project, "does not exist")
    assert not (tmp_path / "no-mlruns").exists()


def test_models_against_an_unreachable_server_fails_within_seconds(tmp_path: Path, project: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    config = demo_with(tmp_path, lambda r: r["tracking"].update(uri=uri))
    start = time.monotonic()
    assert_rejected(["models", "--config", str(config)], config, project, uri, "unreachable")
    assert time.monotonic() - start < 10
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # bounded for that command only


# ----------------------------------------------------------------------------- 8. paths stay where they are meant to

ESCAPING_PATHS = {
    "store.uri": lambda r: r["store"].update(uri="../shared/store"),
    "runtime.cache_dir": lambda r: r["runtime"].update(cache_dir="cache/../../elsewhere"),
    "devices.inventory": lambda r: r["devices"].update(inventory="../devices.yaml"),
    "data.path": lambda r: r["data"].update(path="../data/digits"),
}


@pytest.mark.parametrize("field", ESCAPING_PATHS)
def test_a_relative_path_out_of_the_project_is_refused(field: str, tmp_path: Path, project: Path) -> None:
    config = demo_with(tmp_path, ESCAPING_PATHS[field])
    assert_rejected(["validate", "--config", str(config), "--project-dir", str(project)], config, project,
                    field, "climbs out of the project")


def test_absolute_paths_and_uris_point_outside_on_purpose(tmp_path: Path) -> None:
    from podium.config import load_config

    cfg = load_config(demo_with(tmp_path, lambda r: (r["store"].update(uri=str(tmp_path / "store")),
                                                     r["runtime"].update(cache_dir=str(tmp_path / "cache")),
                                                     r["devices"].update(inventory=str(INVENTORY)))))
    assert (cfg.store.uri, cfg.runtime.cache_dir) == (str(tmp_path / "store"), str(tmp_path / "cache"))
    assert load_config(demo_with(tmp_path, lambda r: r["store"].update(uri="s3://bucket/../prefix"))).store.uri


# ----------------------------------------------------------------------------- 6. input files are untrusted

HOSTILE_YAML = {
    "too large": ("# padding\n" * 120_000, "larger than"),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12)), "aliases"),
    "deep nesting": ("data: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper"),
    "not utf-8": (b"model_name: \xff\xfe\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", HOSTILE_YAML)
def test_hostile_config_files_are_bounded(name: str, tmp_path: Path, project: Path) -> None:
    content, expected = HOSTILE_YAML[name]
    config = tmp_path / "cfg.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_rejected(["validate", "--config", str(config)], config, project, str(config), expected)


def test_a_directory_or_a_bad_inventory_as_input(tmp_path: Path, project: Path) -> None:
    assert_rejected(["validate", "--config", str(tmp_path)], tmp_path / "none", project, "is a directory")
    inventory = tmp_path / "devices.yaml"
    inventory.write_text(INVENTORY.read_text() + "devices: []\n")
    config = demo_with(tmp_path, lambda r: r["devices"].update(inventory=str(inventory)))
    assert_rejected(["validate", "--config", str(config)], config, project, str(inventory), "repeated key 'devices'")


def _source_with_link(tmp_path: Path, link: Callable[[Path, Path], None]) -> Path:
    src = make_flat_imagefolder(tmp_path / "src", per_class=6)
    outside = make_flat_imagefolder(tmp_path / "private", classes=("secret",), per_class=2)
    link(src, outside)
    return src


LINKS_OUT = {
    "file": lambda src, outside: (src / "cat" / "stolen.png").symlink_to(outside / "secret" / "000.png"),
    "folder": lambda src, outside: (src / "owl").symlink_to(outside / "secret", target_is_directory=True),
}


@pytest.mark.parametrize("kind", LINKS_OUT)
def test_import_never_follows_a_link_out_of_the_source(kind: str, tmp_path: Path, project: Path) -> None:
    src = _source_with_link(tmp_path, LINKS_OUT[kind])
    (project / ".dvc").mkdir()  # enough for import to reach its checks; nothing may be tracked
    before = snapshot(src, tmp_path / "private")
    assert_rejected(["data", "import", str(src), "--name", "pets", "--project-dir", str(project)],
                    tmp_path / "none", project, "leads outside the ImageFolder source", "symbolic link")
    assert snapshot(src, tmp_path / "private") == before
    assert not (project / "data").exists()


def _dataset_with(project: Path, tmp_path: Path, write_bad: Callable[[Path], None]) -> Path:
    """A valid pre-split dataset under the project with one bad file written into train/a/, and its config."""
    root = make_presplit_imagefolder(project / "data" / "ds", counts={"train": 5, "val": 5, "test": 5})
    write_bad(root / "train" / "a")
    return demo_with(tmp_path, lambda r: r["data"].update(path="data/ds", stage=None, num_workers=0))


BAD_IMAGES = {
    "32-bit integer": lambda d: Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 10**7).save(d / "i.tif"),
    "float beyond [0, 1]": lambda d: Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(d / "f.tif"),
    "huge below Pillow's limit": lambda d: png_bomb(d / "huge.png", 9000, 9000),  # 81 MP < Pillow's 89 MP
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_high_depth_and_huge_images_fail_validation(name: str, tmp_path: Path, project: Path) -> None:
    """Never clipped to 0/255, never decoded when too large: validation names the expectation and file."""
    config = _dataset_with(project, tmp_path, BAD_IMAGES[name])
    before = snapshot(project / "data")
    error = one_error(["validate", "--config", str(config), "--project-dir", str(project)], "failed validation")
    assert ("too_large" if name.startswith("huge") else "decodable") in error
    assert snapshot(project / "data") == before


def test_nothing_is_pushed_before_validation_passed(tmp_path: Path) -> None:
    """Versioning no longer pushes; the push task takes validation's report and refuses a failing one."""
    from podium.config import parse_config
    from podium.tasks.common import RunContext
    from podium.tasks.data import push_dataset, version_dataset
    from podium.validation import ValidationFailure, ValidationReport

    project = dvc_project(tmp_path / "proj")
    make_presplit_imagefolder(project / "data" / "ds")
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"].update(path="data/ds", stage=None)
    ctx = RunContext(cfg=parse_config(raw), project_dir=str(project), run_id="r", git_sha="g")
    remote = local_remote(project)  # the default remote dvc_project configures

    ref = version_dataset.fn(ctx)
    assert ref.data_hash.endswith(".dir") and not remote.exists()
    failed = ValidationReport(root=ref.root, success=False, rows=1, result={},
                              failures=[ValidationFailure("expect_column_values_to_be_in_set", "decodable", 1)])
    with pytest.raises(DataValidationError, match="failed validation"):
        push_dataset.fn(ctx, ref, failed)
    assert not remote.exists()
    push_dataset.fn(ctx, ref, ValidationReport(root=ref.root, success=True, failures=[], rows=1, result={}))
    assert any(p.is_file() for p in remote.rglob("*"))  # the same call pushes once validation passed


def test_json_documents_are_bounded_before_parsing(tmp_path: Path) -> None:
    """The helper manifests, current.json and cached reports go through: size and depth capped."""
    from podium.files import load_json, parse_json

    assert parse_json(b'{"files": [{"name": "model.onnx"}]}') == {"files": [{"name": "model.onnx"}]}
    with pytest.raises(ValueError, match="nests deeper than 64"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    big = tmp_path / "current.json"
    big.write_bytes(b'{"pad": "' + b"x" * 2_000 + b'"}')
    with pytest.raises(ValueError, match="larger than 1,000 bytes"):
        load_json(big, max_bytes=1_000)
