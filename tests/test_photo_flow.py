"""A folder of ordinary photos (JPEG, PNG, WebP, BMP; many sizes and modes) end to end, as a new user
runs it: `podium data import` → DVC → validation → all four methods at 64 px, streamed by loader
worker processes with augmentation on → release. A client that follows the release's recorded
preprocessing with PIL and onnxruntime gets the accuracy the release reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from podium.cli import app
from podium.registry.release import fetch_release
from podium.registry.stores import open_store
from tests.conftest import onnx_logits
from tests.flow_helpers import BUCKET, write_config
from tests.photos import dvc_project, follow_preprocessing, make_photo_folder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def photo_run(prefect_harness, services, tmp_path_factory):
    from podium.flows.retrain import run_retrain

    root = tmp_path_factory.mktemp("photo-project")
    project = dvc_project(root / "project")
    src = make_photo_folder(root / "src", classes=("cat", "dog", "fox"), per_class=40, sides=(48, 200))
    imported = CliRunner().invoke(app, ["data", "import", str(src), "--name", "photos", "--project-dir", str(project)])
    assert imported.exit_code == 0, imported.output
    config = write_config(services, root / "config.yaml")
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"path": "data/photos", "stage": None, "image_size": [64, 64], "batch_size": 16, "min_per_class": 5,
                   "min_side": 32, "num_workers": 2, "cache_mb": 0, "push": False}  # streamed, augmented (defaults)
    raw["devices"]["use"] = ["cpu-onnx"]
    config.write_text(yaml.safe_dump(raw))
    return run_retrain(str(config), str(project)), project


def test_photos_train_every_method_and_release(photo_run, services, tmp_path: Path) -> None:
    result, project = photo_run
    (outcome,) = result.outcomes
    assert outcome.winner and outcome.alias_moved, outcome
    for method in ("anchor", "stitching", "scaling", "self_distill", "shrinking"):
        assert f" {method} " in result.report, method

    store = open_store(f"s3://{BUCKET}/models", services["endpoint"])
    manifest = fetch_release(store, "digits-classifier", "cpu-onnx", tmp_path / "release")
    pre = manifest["preprocessing"]
    assert pre["channel_order"] == "RGB" and pre["crop_pct"] == 0.875 and len(pre["mean"]) == 3
    assert pre["center_crop"] == manifest["input_size"]

    # a deployment team's client: PIL + onnxruntime, nothing of Podium's loaders
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "release" / "model.onnx")).metadata_props}
    assert json.loads(props["podium.preprocessing"]) == pre
    classes = json.loads(props["podium.class_names"])
    val = sorted((project / "data" / "photos" / "val").rglob("*.*"))
    images = np.stack([follow_preprocessing(path, pre) for path in val])
    labels = np.array([classes.index(path.parent.name) for path in val])
    accuracy = float((onnx_logits(tmp_path / "release" / "model.onnx", images).argmax(1) == labels).mean())
    assert abs(accuracy - manifest["metrics"]["val_acc"]) <= 1 / len(val) + 1e-9  # at most one near-tie flips
