"""Shared fixtures. Method tests use the bundled digits straight from scikit-learn (no files)."""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

import numpy as np
import pytest
import torch

from podium.methods.data import DataBundle

torch.set_num_threads(2)


def digits_bundle(image_size: tuple[int, int] = (32, 32), batch_size: int = 64, seed: int = 0) -> DataBundle:
    """The 1,797 scikit-learn digits, split 70/15/15 with a fixed seed, as a DataBundle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    order = np.random.default_rng(seed).permutation(len(images))
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    splits = {name: (images[idx], digits.target[idx]) for name, idx in parts.items()}
    return DataBundle.from_arrays(splits, [str(c) for c in range(10)], image_size, batch_size,
                                  data_hash="sklearn-digits", seed=seed)


def pt2_logits(model, shape: tuple[int, int, int], images: np.ndarray, folder) -> np.ndarray:
    """Logits of ``model``'s ``torch.export`` program (the torch runtime's release artifact) on a batch."""
    from podium.methods.runtimes import get_runtime

    runtime = get_runtime("torch")
    with runtime.open(runtime.export(model, shape, folder), threads=1) as session:
        return session.predict(images)


def onnx_logits(path, images: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX file on a batch, through the runtime every measurement uses."""
    from podium.methods.runtimes import get_runtime

    with get_runtime("onnxruntime").open(path, threads=1) as session:
        return session.predict(images)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return digits_bundle()

# S3 fixtures (a real moto server on 127.0.0.1) live in tests/s3_server.py; the flow tests' config,
# services and Prefect fixtures in tests/flow_helpers.py and tests/prefect_server.py.
pytest_plugins = ["tests.s3_server", "tests.flow_helpers", "tests.prefect_server"]
