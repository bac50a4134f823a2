"""MLflow used the MLflow way, against a real ``mlflow server --serve-artifacts`` on 127.0.0.1.

One small retrain runs against the server; then a separate process, in a folder of its own (none of
the training checkout's paths are usable there, and it has no S3 credentials), loads the device's
champion with ``mlflow.pyfunc`` and downloads the run's report. Checked: the winner is a logged model
of the retrain run in the run's experiment, registered from it (linked both ways), with the ONNX
graph's signature and an input example of real images; the version's description is the release's
model card, shipped as README.md; the run carries its git commit, its dataset (digest: the DVC md5),
JSON params and a readable name; and every artifact went through the server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from podium.flows.retrain import run_retrain
from podium.infra.stack import mlflow_service, start_service, stop_service
from podium.registry.mlflow_registry import ModelRegistry
from podium.registry.release import fetch_release
from podium.registry.stores import open_store
from podium.tasks.runs import git_sha
from tests.conftest import onnx_logits
from tests.flow_helpers import BUCKET, REPO, one_anchor_config
from tests.s3_server import free_port

pytestmark = pytest.mark.integration
MODEL, DEVICE = "digits-classifier", "cpu-1t"
PREFIX = f"s3://{BUCKET}/citizen"
EXPERIMENT = "citizen"

# Runs in another process and folder: only the tracking server's URL is known there.
CLIENT = textwrap.dedent("""
    import json, os, sys
    import mlflow
    import numpy as np
    from mlflow.models import Model

    tracking_uri, model_uri, run_id = sys.argv[1:4]
    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path="model")
    example = Model.load(local).load_input_example(local)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    (name, images), = example.items()
    out = pyfunc.predict(example)
    logits = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
    np.save("example.npy", images)
    report = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report", dst_path="report")
    spec = lambda schema: [{"name": s.name, "shape": list(s.shape), "dtype": str(s.type)} for s in schema.inputs]
    print(json.dumps({"classes": logits.argmax(axis=1).tolist(), "example_input": name,
                      "inputs": spec(pyfunc.metadata.get_input_schema()),
                      "outputs": spec(pyfunc.metadata.get_output_schema()),
                      "report": sorted(os.listdir(report)), "cwd": os.getcwd()}))
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server proxying artifacts into ``<dir>/mlartifacts`` (as ``podium stack up``).
    It boots (~10-25 s) in a thread while Prefect's harness starts; ``ready()`` waits for it."""
    stack_dir = tmp_path_factory.mktemp("mlflow-server")
    service = mlflow_service(stack_dir, free_port())
    failure: list[BaseException] = []

    def start() -> None:
        try:
            start_service(service, stack_dir, timeout_s=120)
        except BaseException as exc:  # noqa: BLE001 - re-raised by ready()
            failure.append(exc)

    booting = threading.Thread(target=start, daemon=True)
    booting.start()

    def ready() -> None:
        booting.join()
        if failure:
            raise failure[0]

    try:
        yield {"url": service.url, "served": stack_dir / "mlartifacts", "ready": ready}
    finally:
        booting.join()
        stop_service(stack_dir, "mlflow")


@pytest.fixture(scope="module")
def retrained(server, prefect_harness, services):
    """The module's one flow run. Its config keeps write_config's local ``artifact_root`` on purpose:
    with a tracking server a folder of this machine must not be used."""
    server["ready"]()
    path = one_anchor_config(services, services["root"] / "citizen.yaml", seed=0, store_uri=PREFIX, device=DEVICE)
    raw = yaml.safe_load(path.read_text())
    raw["tracking"] = {**raw["tracking"], "uri": server["url"], "experiment": EXPERIMENT}
    # two whole epochs and a progress line per step: the run's training curves have points to plot
    raw["anchors"][0]["train"].update(epochs=2, max_steps=None, log_every_s=1e-6)
    path.write_text(yaml.safe_dump(raw))
    result = run_retrain(str(path), str(REPO))
    client = MlflowClient(tracking_uri=server["url"], registry_uri=server["url"])
    version = client.get_model_version_by_alias(MODEL, DEVICE)
    return {"result": result, "client": client, "version": version, "run": client.get_run(result.run_id),
            "local_root": Path(raw["tracking"]["artifact_root"])}


@pytest.fixture(scope="module")
def other_process(retrained, server, tmp_path_factory):
    """The champion loaded with pyfunc, and the run's report downloaded, by a stranger to this checkout."""
    folder = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", CLIENT, server["url"], f"models:/{MODEL}@{DEVICE}",
                          retrained["result"].run_id], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "folder": folder}


def test_pyfunc_elsewhere_predicts_what_the_release_predicts(other_process, services, tmp_path):
    assert Path(other_process["cwd"]).resolve() == other_process["folder"].resolve()
    release = tmp_path / "release"
    fetch_release(open_store(PREFIX, services["endpoint"]), MODEL, DEVICE, release)
    images = np.load(other_process["folder"] / "example.npy")
    assert images.dtype == np.float32 and images.ndim == 4 and len(images) >= 2
    assert images.std() > 0.1 and not np.allclose(images[0], images[1])  # real, different images, not zeros
    released = onnx_logits(release / "model.onnx", images).argmax(axis=1).tolist()
    assert other_process["classes"] == released
    assert other_process["report"], "the run's report did not download through the server"


def test_signature_is_the_graphs_and_the_example_feeds_it(other_process, services, tmp_path):
    release = tmp_path / "release"
    fetch_release(open_store(PREFIX, services["endpoint"]), MODEL, DEVICE, release)
    graph = onnx.load(str(release / "model.onnx"))
    (inp,), (out,) = other_process["inputs"], other_process["outputs"]
    assert inp["name"] == graph.graph.input[0].name == other_process["example_input"]
    assert inp["dtype"] == "float32" and inp["shape"][0] == -1 and len(inp["shape"]) == 4
    assert out["name"] == graph.graph.output[0].name and out["shape"] == [-1, 10]  # logits of the 10 digits


def test_version_is_registered_from_a_logged_model_of_the_run(retrained):
    client, version, run = retrained["client"], retrained["version"], retrained["run"]
    model_id = ModelRegistry.model_id_of(version)
    assert model_id and version.source == f"models:/{model_id}" and version.run_id == run.info.run_id
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == run.info.experiment_id
    assert logged.experiment_id != "0" and client.get_experiment(logged.experiment_id).name == EXPERIMENT
    assert {"name": MODEL, "version": str(version.version)} in [
        {"name": e["name"], "version": str(e["version"])} for e in json.loads(logged.tags["mlflow.modelVersions"])]
    assert model_id in [m.model_id for m in run.outputs.model_outputs]  # the run lists it: "Logged models (1)"
    assert logged.params["device"] == DEVICE


def test_description_is_the_model_card_shipped_with_the_release(retrained, services, tmp_path):
    version = retrained["version"]
    card = version.description
    assert card.startswith(f"# {MODEL} for {DEVICE}")
    for needed in ("Accuracy", "p50", "p90", "95 % interval", "Peak memory", "FLOPs", "params", "Center-crop",
                   retrained["result"].data_hash, "no champion yet", "promote it to champion", "Intended use"):
        assert needed in card, needed
    assert git_sha(REPO) in card
    release = tmp_path / "release"
    manifest = fetch_release(open_store(PREFIX, services["endpoint"]), MODEL, DEVICE, release)
    assert "README.md" in {f["name"] for f in manifest["files"]}
    assert (release / "README.md").read_text() == card


def test_run_is_readable(retrained):
    run, result = retrained["run"], retrained["result"]
    assert run.data.tags["mlflow.source.git.commit"] == git_sha(REPO) != "unknown"
    assert run.info.run_name.startswith("citizen data ") and result.data_hash[:8] in run.info.run_name
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == result.data_hash and dataset_input.dataset.source_type == "dvc"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert json.loads(dataset_input.dataset.profile)["images"]["val"] > 0
    assert run.data.params["data.push"] == "false" and json.loads(run.data.params["data.image_size"])


def test_training_is_a_curve_per_step_and_per_epoch(retrained):
    """Loss and images/s at every progress line of the anchor's fit, its validation accuracy after each
    epoch: histories the MLflow UI plots as curves, not single bars."""
    client, run_id = retrained["client"], retrained["result"].run_id
    prefix = "train.anchor-resnet-tiny"
    loss = client.get_metric_history(run_id, f"{prefix}.loss")
    assert len(loss) >= 10 and [m.step for m in loss] == sorted({m.step for m in loss}), loss[:3]
    assert len(client.get_metric_history(run_id, f"{prefix}.images_per_s")) == len(loss)
    val_acc = client.get_metric_history(run_id, f"{prefix}.val_acc")
    assert [m.step for m in val_acc] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in val_acc)


def test_artifacts_went_through_the_server(retrained, server):
    run, client, version = retrained["run"], retrained["client"], retrained["version"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert client.get_logged_model(ModelRegistry.model_id_of(version)).artifact_location.startswith("mlflow-artifacts:/")
    assert any(server["served"].rglob("MLmodel")) and any(server["served"].rglob("winners.md"))
    assert not retrained["local_root"].exists()  # the config's local artifact_root was not used
