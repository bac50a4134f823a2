"""How models, datasets and params land in MLflow (real SQLite backend, no server), and the model card.

The same behaviour through a real tracking server, with a flow run, is tests/test_mlflow_citizen.py.
"""
from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest

from podium.methods.export import export_onnx, save_weights
from podium.methods.families import build
from podium.registry.mlflow_registry import DvcDataset, DvcSource, ModelRegistry, model_files, param_value
from podium.registry.model_card import MAX_CARD_CHARS, model_card

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return ModelRegistry(f"sqlite:///{root}/mlflow.db", root / "artifacts")


def release_metadata(classes: int = 10) -> dict:
    """What tasks/release.py records for a winner, trimmed to what the card reads."""
    return {
        "model": "digits-classifier", "device": "cpu-onnx", "candidate": "scaling-d1w2", "method": "scaling",
        "config": {"depth": 1, "width": 2},
        "artifact": {"runtime": "onnxruntime", "precision": "int8", "main": "model.onnx", "files": ["model.onnx"]},
        "input_spec": {"channels": 1, "height": 32, "width": 32, "mean": [0.1], "std": [0.3],
                       "class_names": [f"c{i}" for i in range(classes)]},
        "preprocessing": {"decode": "PIL; EXIF orientation applied; mode L",
                          "resize": {"size": 36, "shorter_side": True, "longer_side": "floor(size * longer / shorter)",
                                     "interpolation": "bilinear", "library": "PIL Image.resize"},
                          "center_crop": [32, 32], "crop_pct": 0.875, "scale": "pixel / 255", "mean": [0.1],
                          "std": [0.3], "channel_order": "L", "layout": "NCHW", "dtype": "float32"},
        "interface": {"input": {"name": "input", "shape": [-1, 1, 32, 32]},
                      "output": {"name": "logits", "shape": [-1, classes]}},
        "evaluation": {"split": "val", "images": 270},
        "metrics": {"val_acc": 0.9372, "flops": 2_345_678, "params": 45_321, "peak_mem_mb": 21.5},
        "latency": {"p50_ms": 0.412, "p90_ms": 0.47, "p50_low_ms": 0.405, "p50_high_ms": 0.419, "rounds": 12,
                    "noisy": False, "peak_mem_mb": 21.5},
        "device_profile": {"threads": 1, "batch_size": 4, "latency_budget_ms": 5.0, "memory_budget_mb": 256.0},
        "lineage": {"data_hash": "0123456789abcdef0123456789abcdef.dir", "git_sha": "feedc0de" * 5,
                    "run_id": "r123", "digest": "d" * 64},
        "chosen": "most accurate within budget (val_acc 0.9372, p50 0.412 [0.405, 0.419] ms within 5 ms)",
        "promotion": {"promote": True, "reason": "challenger 0.9372 beats champion v3 0.9100 (same validation data)"},
    }


def test_card_states_what_was_measured_and_how_it_was_chosen():
    card = model_card(release_metadata())
    assert card.startswith("# digits-classifier for cpu-onnx\n")
    for needed in ("93.72 % top-1 on 270 val images", "p50 0.412 ms (95 % interval of the median 0.405-0.419 ms)",
                   "p90 0.47 ms", "21.5 MB", "2.35 MFLOPs", "45.32 kparams", "onnxruntime, int8",
                   "Resize the shorter side to 36", "Center-crop to [32, 32]", "input `input` of shape [-1, 1, 32, 32]",
                   "output `logits`", "`0123456789abcdef0123456789abcdef.dir`", "feedc0de" * 5,
                   "beats champion v3", "decision: promote it to champion", "most accurate within budget",
                   "## Intended use and limits", "int8 weights"):
        assert needed in card, needed
    kept = model_card({**release_metadata(), "promotion": {"promote": False, "reason": "champion v3 kept"}})
    assert "champion v3 kept; decision: keep the champion" in kept


def test_card_of_a_huge_class_list_fits_a_version_description():
    card = model_card(release_metadata(classes=1000))
    assert len(card) <= MAX_CARD_CHARS and "and 980 more (metadata.json)" in card
    sparse = model_card({"model": "m", "device": "d", "latency": {"p50_ms": math.nan}})  # nothing measured: no crash
    assert "not measured" in sparse


def test_params_are_json_and_strings_stay_strings():
    assert [param_value(v) for v in (None, True, [1, 2], {"b": 1, "a": "x"}, "plain", 0.5)] == [
        "null", "true", "[1, 2]", '{"a": "x", "b": 1}', "plain", "0.5"]


def test_with_a_server_a_local_artifact_root_gives_way_to_the_servers(tmp_path):
    assert ModelRegistry("http://127.0.0.1:9", "/home/me/mlartifacts").artifact_location() is None
    assert ModelRegistry("http://127.0.0.1:9", "file:///home/me/mlartifacts").artifact_location() is None
    assert ModelRegistry("http://127.0.0.1:9").artifact_location() is None
    assert ModelRegistry("http://127.0.0.1:9", "s3://bucket/artifacts").artifact_location() == "s3://bucket/artifacts"
    assert ModelRegistry("http://127.0.0.1:9", "mlflow-artifacts:/x").artifact_location() == "mlflow-artifacts:/x"
    database = f"sqlite:///{tmp_path / 'x.db'}"  # opening it creates the file: not in the checkout
    assert ModelRegistry(database, "/srv/mlartifacts").artifact_location() == "file:///srv/mlartifacts"


def test_logged_model_belongs_to_its_run_and_lists_its_version(registry, tmp_path):
    run_id = registry.start_run("logging", "r")
    model = build(TINY, 10, 1).eval()
    onnx_path = export_onnx(model, (1, 16, 16), tmp_path / "model.onnx")
    weights = save_weights(model, tmp_path / "weights.safetensors")
    example = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    uri = registry.log_model(run_id, "winner", onnx_path, weights, {"arch": TINY}, example, card="# card\n",
                             params={"device": "cpu-1t"})
    version = registry.register("logging-model", uri, run_id, {"k": "v"}, description="# card\n")

    model_id = registry.model_id_of(version)
    assert uri == f"models:/{model_id}" and version.source == uri and version.description == "# card\n"
    logged = registry.client.get_logged_model(model_id)
    run = registry.client.get_run(run_id)
    assert logged.experiment_id == run.info.experiment_id != "0" and logged.source_run_id == run_id
    assert logged.params == {"device": "cpu-1t"} and logged.status.name == "READY"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "logging-model", "version": version.version}]
    assert [m.model_id for m in run.outputs.model_outputs] == [model_id]

    info = mlflow.models.get_model_info(uri)
    (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inp.name, inp.shape, str(inp.type)) == ("input", (-1, 1, 16, 16), "float32")
    assert (out.name, out.shape) == ("logits", (-1, 10))
    files = model_files(registry.download_version("logging-model", version.version, tmp_path / "dl"))
    assert files["README.md"].read_text() == "# card\n"


def test_dataset_input_carries_the_dvc_md5(registry):
    run_id = registry.start_run("logging", "data")
    md5 = "0123456789abcdef0123456789abcdef.dir"
    source = DvcSource(path="data/digits", md5=md5, git_commit="abc", stage="export_digits")
    for _ in range(2):  # logged twice: one input
        registry.log_dataset(run_id, DvcDataset(source, "digits", profile={"images": {"val": 3}}))
    (entry,) = registry.client.get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.digest == md5 and entry.dataset.name == "digits" and entry.dataset.source_type == "dvc"
    assert json.loads(entry.dataset.source) == {"path": "data/digits", "md5": md5, "git_commit": "abc", "remote": None,
                                                "stage": "export_digits"}
    assert json.loads(entry.dataset.profile) == {"images": {"val": 3}}
