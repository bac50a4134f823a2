"""Shared by the flow tests: a tiny but complete retrain config and the services it runs against
(SQLite MLflow, a bucket on the moto S3 server, Prefect's test harness). Fixtures are registered
through ``pytest_plugins`` in conftest.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import yaml

from tests.s3_server import reset_s3

REPO = Path(__file__).resolve().parents[1]
BUCKET = "podium-releases"

# Small but real: every stage runs, each training is a few dozen steps.
FAST_TRAIN = {"epochs": 1, "max_steps": 25, "lr": 0.1}
STEPS = {"epochs": 1, "max_steps": 8, "lr": 0.05}
METHODS = {
    "stitching": {"train": {"epochs": 1, "max_steps": 8, "lr": 0.001, "optimizer": "adamw"}},
    "scaling": {"scales": [1, 2], "train": STEPS},
    "self_distill": {"train_baseline": False, "train": STEPS},
    "shrinking": {
        "stem_width": 8, "first_block_width": 8, "unit_widths": [8, 16], "unit_strides": [1, 2],
        "unit_se": [False, True], "unit_acts": ["relu", "hswish"], "head_width": 24, "feature_width": 32,
        "depth_choices": [1, 2], "resolutions": [24, 32], "top_k": 1, "bn_recalibration_images": 64,
        "lut_repeats": 3, "lut_warmup": 1, "lut_max_rounds": 10,
        "phases": [{"name": n, "elastic": e, "max_steps": 2} for n, e in
                   (("full", "none"), ("kernel", "kernel"), ("depth", "depth"), ("width", "width"))],
        "predictor": {"samples": 4, "hidden": 16, "epochs": 10},
        "evolution": {"population": 8, "generations": 2, "parents": 2, "mutation_children": 3,
                      "crossover_children": 3},
        "train": {"lr": 0.01, "optimizer": "adamw"},
    },
}


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def services(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """MLflow (SQLite), an S3 bucket on the moto server, credentials in the environment. Each module
    starts from an empty S3: releases numbered by its own MLflow database must not meet another's."""
    root = tmp_path_factory.mktemp("services")
    reset_s3(s3_endpoint)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
        yield {"root": root, "endpoint": s3_endpoint}


# few short rounds; never "noisy" (a rerun must find the same figures cached)
FAST_MEASUREMENT = {"warmup": 1, "round_repeats": 2, "min_rounds": 3, "max_rounds": 5, "stable_tolerance": 0.5,
                    "max_disturbed": 1.0}


def write_config(services: dict, path: Path, **overrides: Any) -> Path:
    root = services["root"]
    devices = root / "devices.yaml"
    devices.write_text(yaml.safe_dump({"devices": [
        {"name": "cpu-1t", "runtime": "torch", "threads": 1, "batch_size": 1, "latency_budget_ms": 1000,
         **FAST_MEASUREMENT},
        {"name": "cpu-onnx", "runtime": "onnxruntime", "threads": 1, "batch_size": 4, "latency_budget_ms": 1000,
         **FAST_MEASUREMENT, "precisions": ["fp32", "int8"]},
    ]}))
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw.update({
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "mlartifacts"),
                     "experiment": "it"},
        "store": {"uri": f"s3://{BUCKET}/models", "endpoint_url": services["endpoint"]},
        "devices": {"inventory": str(devices), "use": ["cpu-1t", "cpu-onnx"],
                    "quantize": {"per_method": 1, "calibration_images": 64}},
        "runtime": {"cache_dir": str(root / "cache"), "max_workers": 2},
        "methods": METHODS,
    })
    raw["data"]["push"] = False
    for anchor in raw["anchors"]:
        anchor["train"] = FAST_TRAIN
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def one_anchor_config(services: dict, path: Path, seed: int, store_uri: str, device: str) -> Path:
    """A flow run that takes seconds: one tiny anchor (its seed gives a new winner, a new digest), no
    methods, one device, releases under ``store_uri``."""
    anchors = [{"name": "resnet-tiny", "arch": {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]},
                "train": {"epochs": 1, "max_steps": 10, "lr": 0.1, "seed": seed}}]
    write_config(services, path, anchors=anchors, teacher=None, methods={})
    raw = yaml.safe_load(path.read_text())
    raw["store"]["uri"] = store_uri
    raw["devices"]["use"] = [device]
    path.write_text(yaml.safe_dump(raw))
    return path
