"""The retrain flow as a deployment: a real `prefect server`, a process work pool, a process worker
running the flow from this checkout, and a winner promoted in the MLflow registry."""
from __future__ import annotations

import os

import pytest

from tests.flow_helpers import METHODS, REPO, write_config
from tests.prefect_server import create_pool, tail

pytestmark = pytest.mark.integration
POOL = "retrain-pool"


def test_deployed_retrain_runs_on_a_process_worker_and_promotes(prefect_server, start_worker, services) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from podium.flows.retrain import retrain
    from podium.registry.mlflow_registry import ModelRegistry

    config = write_config(services, services["root"] / "deployed.yaml", methods={"scaling": METHODS["scaling"]})
    worker_log = services["root"] / "worker.log"
    create_pool(prefect_server, POOL)
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # set by ``services``
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        retrain.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain").deploy(
            name="it", work_pool_name=POOL, print_next_steps=False,
            parameters={"config_path": str(config), "project_dir": str(REPO)})
        start_worker(POOL, worker_log, **aws)
        flow_run = run_deployment(name="retrain/it", timeout=420, poll_interval=2)
    assert flow_run.state is not None and flow_run.state.is_completed(), \
        f"{flow_run.state}\n{tail(worker_log)}"
    registry = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")
    promoted = [registry.version_by_alias("digits-classifier", d) for d in ("cpu-1t", "cpu-onnx")]
    assert all(v is not None and v.tags["promotion"] == "promoted" for v in promoted), promoted
    run_ids = {v.tags["run_id"] for v in promoted}
    assert len(run_ids) == 1 and registry.client.get_run(run_ids.pop()).data.tags.get("completed") == "true"
