"""Scale-out: the retrain flow's tasks on a real Dask cluster of worker processes (prefect-dask)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from podium.config import ConfigError, RuntimeConfig
from podium.flows.runners import build_task_runner
from tests.flow_helpers import METHODS, REPO, write_config

pytestmark = pytest.mark.integration
SCALEOUT_METHODS = {m: METHODS[m] for m in ("scaling", "self_distill")}  # two trainings to fan out


@pytest.fixture(scope="module")
def dask_cluster(services: dict) -> Iterator:
    """Two single-threaded worker processes; started after ``services`` so they inherit its S3 credentials."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def test_retrain_runs_its_trainings_in_dask_worker_processes(prefect_harness, services, dask_cluster) -> None:
    from distributed import Client, get_task_stream

    from podium.flows.retrain import run_retrain
    from podium.registry.mlflow_registry import ModelRegistry

    config = write_config(services, services["root"] / "dask.yaml", methods=SCALEOUT_METHODS,
                          runtime={"task_runner": "dask", "dask_address": dask_cluster.scheduler_address,
                                   "cache_dir": str(services["root"] / "cache"), "max_workers": 2})
    with Client(dask_cluster.scheduler_address, set_as_default=False) as client:
        worker_pids = set(client.run(os.getpid).values())
        with get_task_stream(client=client) as stream:
            result = run_retrain(str(config), str(REPO))
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    ran_on = {}
    for record in stream.data:
        ran_on.setdefault(record["key"].split("-")[0], set()).add(record["worker"])
    assert len(ran_on.get("train_method", ())) == len(SCALEOUT_METHODS) == 2, stream.data  # both workers trained
    registry = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")
    for outcome in result.outcomes:
        assert outcome.winner and outcome.alias_moved, outcome
        assert registry.version_by_alias("digits-classifier", outcome.device).version == outcome.version
    assert {c.method for c in result.winners.values()} <= {"anchor", *SCALEOUT_METHODS}


def test_local_cluster_shares_the_cores_out_among_its_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No address: a temporary LocalCluster of max_workers processes, torch threads = cores / workers."""
    def probe() -> tuple[int, int]:  # runs in each worker
        import torch

        return os.getpid(), torch.get_num_threads()

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with build_task_runner(RuntimeConfig(task_runner="dask", max_workers=2)) as runner:
        answers = runner.client.run(probe)
    assert len({pid for pid, _ in answers.values()} - {os.getpid()}) == 2
    assert {threads for _, threads in answers.values()} == {RuntimeConfig(max_workers=2).training_threads} == {2}


def test_threads_stay_the_default_and_an_unreachable_scheduler_is_one_line() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(build_task_runner(RuntimeConfig()), ThreadPoolTaskRunner)
    with pytest.raises(ConfigError, match=r"runtime.dask_address tcp://127.0.0.1:9: no Dask scheduler answers"):
        build_task_runner(RuntimeConfig(task_runner="dask", dask_address="tcp://127.0.0.1:9"))
