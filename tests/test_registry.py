"""MLflow registry client on a real SQLite backend: versions, aliases, champion/challenger rule."""
from __future__ import annotations

import numpy as np
import pytest

from podium.methods.export import export_onnx, save_weights
from podium.methods.families import build
from podium.registry.mlflow_registry import ModelRegistry, model_files
from podium.registry.promotion import decide_promotion

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return ModelRegistry(f"sqlite:///{root}/mlflow.db", root / "artifacts")


def register(registry, tmp_path, val_acc, data_hash="h1"):
    run_id = registry.start_run("exp", "r")
    model = build(TINY, 10, 1).eval()
    onnx_path = export_onnx(model, (1, 16, 16), tmp_path / "m" / "model.onnx")
    weights = save_weights(model, tmp_path / "m" / "weights.safetensors")
    uri = registry.log_model(run_id, "winner", onnx_path, weights, {"arch": TINY}, np.zeros((2, 1, 16, 16), np.float32))
    return registry.register("digits", uri, run_id, {"val_acc": val_acc, "data_hash": data_hash})


def test_versions_aliases_and_download(registry, tmp_path):
    v1 = register(registry, tmp_path, 0.9)
    registry.set_alias("digits", "cpu-1t", v1.version)
    assert registry.version_by_alias("digits", "cpu-1t").version == v1.version
    assert registry.version_by_alias("digits", "gpu") is None
    files = model_files(registry.download_version("digits", v1.version, tmp_path / "dl"))
    assert set(files) == {"model.onnx", "weights.safetensors", "metadata.json"}


def test_champion_challenger_rule(registry, tmp_path):
    champion = register(registry, tmp_path, 0.9, "h1")
    assert decide_promotion(0.95, None, "h1").promote
    assert decide_promotion(0.95, champion, "h1").promote
    kept = decide_promotion(0.90, champion, "h1")
    assert not kept.promote and "kept" in kept.reason and "same validation data" in kept.reason
    # Other data: compare against the champion re-evaluated on this run's data.
    assert not decide_promotion(0.80, champion, "h2", champion_acc_on_data=0.85).promote
    assert decide_promotion(0.90, champion, "h2", champion_acc_on_data=0.85).promote


def test_unusable_tracking_uri_is_one_line():
    from podium.registry.mlflow_registry import RegistryError

    with pytest.raises(RegistryError, match="unusable|failed") as err:
        ModelRegistry("nosuchscheme://x")
    assert "\n" not in str(err.value)


def test_params_and_metrics_are_logged_in_batches(registry):
    """Nested params are flattened with dotted keys; more than one batch (100 params) of each arrives."""
    run_id = registry.start_run("exp", "batches")
    registry.log_params(run_id, {"data": {"size": [32, 32], "path": "d"}, **{f"p{i}": i for i in range(150)}})
    registry.log_metrics(run_id, {f"m{i}": i / 2 for i in range(1200)}, prefix="x.")
    data = registry.client.get_run(run_id).data
    assert data.params["data.size"] == "[32, 32]" and data.params["data.path"] == "d" and len(data.params) == 152
    assert len(data.metrics) == 1200 and data.metrics["x.m3"] == 1.5
