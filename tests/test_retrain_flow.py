"""The whole retrain flow against real local services: SQLite MLflow, a moto S3 server on
127.0.0.1 (store), DVC on the repository, Prefect's test harness. Then a deployment-side fetch."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from podium.registry.mlflow_registry import ModelRegistry
from podium.registry.release import fetch_release, read_current
from podium.registry.stores import open_store
from tests.conftest import onnx_logits
from tests.flow_helpers import BUCKET, METHODS, REPO, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def first_run(prefect_harness, services):
    from podium.flows.retrain import run_retrain

    config = write_config(services, services["root"] / "config.yaml")
    return run_retrain(str(config), str(REPO)), config


def aliases(services) -> dict[str, str | None]:
    registry = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")
    return {d: getattr(registry.version_by_alias("digits-classifier", d), "version", None) for d in ("cpu-1t", "cpu-onnx")}


def currents(services) -> dict[str, dict | None]:
    store = open_store(f"s3://{BUCKET}/models", services["endpoint"])
    return {d: read_current(store, "digits-classifier", d) for d in ("cpu-1t", "cpu-onnx")}


def test_every_device_gets_a_promoted_published_winner(first_run, services):
    result, _ = first_run
    assert {o.device for o in result.outcomes} == {"cpu-1t", "cpu-onnx"}
    registry = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")
    for outcome in result.outcomes:
        assert outcome.winner and outcome.alias_moved, outcome
        version = registry.version_by_alias("digits-classifier", outcome.device)
        assert version.version == outcome.version
        for tag in ("device", "method", "config", "val_acc", "p50_ms", "flops", "params", "acts", "data_hash",
                    "git_sha", "run_id"):
            assert tag in version.tags, tag
        assert version.tags["data_hash"] == result.data_hash and result.data_hash.endswith(".dir")
        assert str(currents(services)[outcome.device]["version"]) == str(outcome.version)
    for method in ("anchor", *METHODS):  # every method's candidates were measured and reported
        assert f" {method} " in result.report, method


def test_fetched_winner_runs_in_its_runtime_and_matches_pytorch(first_run, services, tmp_path):
    """Each release carries its device runtime's own artifact (``model.pt2`` for torch) next to the ONNX
    graph, and the manifest says which file to run with what; FP32 artifacts compute the winner's
    logits, an INT8 winner is a quantised graph whose accuracy was measured, not copied."""
    from podium.methods.runtimes import get_runtime

    result, _ = first_run
    store = open_store(f"s3://{BUCKET}/models", services["endpoint"])
    assert "int8" in result.report and "@int8-onnxruntime" in result.report  # derived candidates raced
    for device, winner in result.winners.items():
        dest = tmp_path / device
        manifest = fetch_release(store, "digits-classifier", device, dest)
        artifact = manifest["artifact"]
        names = {f["name"] for f in manifest["files"]}
        assert names >= {"model.onnx", "weights.safetensors", "metadata.json", *artifact["files"]}
        assert artifact["runtime"] == {"cpu-1t": "torch", "cpu-onnx": "onnxruntime"}[device]
        if device == "cpu-1t":
            assert artifact["main"] == "model.pt2" and artifact["files"] == ["model.pt2"]
        images = torch.randn(3, 1, *winner.input_size)
        with get_runtime(artifact["runtime"]).open(dest / artifact["main"], threads=1) as session:
            got = session.predict(images.numpy())
        if artifact["precision"] == "fp32":
            with torch.no_grad():
                expected = winner.model.eval()(images).numpy()
            np.testing.assert_allclose(got, expected, atol=1e-4)
            np.testing.assert_allclose(onnx_logits(dest / "model.onnx", images.numpy()), expected, atol=1e-4)
        else:
            import onnx

            graph = onnx.load(str(dest / "model.onnx")).graph
            assert any(n.op_type == "QuantizeLinear" for n in graph.node) and "fp32_val_acc" in winner.metrics
            assert got.shape == (3, 10)


def test_cli_fetch_through_s3(first_run, services, tmp_path):
    dest = tmp_path / "cli"
    out = subprocess.run([sys.executable, "-m", "podium.cli", "fetch", "--model", "digits-classifier",
                          "--device", "cpu-1t", "--dest", str(dest), "--store", f"s3://{BUCKET}/models",
                          "--endpoint-url", services["endpoint"]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (dest / "model.onnx").exists() and (dest / "manifest.json").exists()


def test_rerun_reuses_cached_training_and_keeps_aliases(first_run, services):
    from podium.flows.retrain import run_retrain

    result, config = first_run
    before = aliases(services)
    again = run_retrain(str(config), str(REPO))
    assert sorted(again.cached_methods) == sorted(METHODS)
    assert again.data_hash == result.data_hash
    assert aliases(services) == before
    assert all(not o.alias_moved and "unchanged" in o.reason for o in again.outcomes)


def test_bad_data_stops_the_flow_and_changes_nothing(first_run, services, tmp_path):
    """A corrupted PNG in a DVC-tracked dataset: validation fails, no alias or pointer moves."""
    from podium.flows.retrain import run_retrain
    from podium.validation import DataValidationError

    project = tmp_path / "project"
    shutil.copytree(REPO / "data" / "digits", project / "data" / "digits")
    victim = sorted((project / "data" / "digits" / "train" / "3").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:20])  # truncated
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    config = write_config(services, tmp_path / "bad.yaml")
    raw = yaml.safe_load(config.read_text())
    raw["data"].update({"stage": None})
    config.write_text(yaml.safe_dump(raw))
    before_aliases, before_current = aliases(services), currents(services)
    with pytest.raises(DataValidationError, match="decodable|truncated|3/"):
        run_retrain(str(config), str(project))
    assert aliases(services) == before_aliases
    assert currents(services) == before_current
