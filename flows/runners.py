"""The task runner a retrain uses, from the config's ``runtime`` section: threads or a Dask cluster."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from podium.config import ConfigError, RuntimeConfig


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Fail before any work, in one line, when nothing answers at the scheduler's address (Dask itself
    would only time out after 30 s, mid-run)."""
    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(address)
        socket.create_connection((host, port), timeout=timeout_s).close()
    except (ValueError, OSError) as exc:
        raise ConfigError(f"runtime.dask_address {address}: no Dask scheduler answers ({exc})") from None


def build_task_runner(runtime: RuntimeConfig) -> TaskRunner:
    """``threads``: a thread pool in this process. ``dask``: the scheduler at ``dask_address``, else a
    temporary LocalCluster of ``max_workers`` single-threaded worker processes (torch gets
    cores / workers threads in each: Dask's nanny would otherwise pin OMP_NUM_THREADS to 1)."""
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=runtime.max_workers)
    from prefect_dask import DaskTaskRunner

    if runtime.dask_address:
        check_scheduler(runtime.dask_address)
        return DaskTaskRunner(address=runtime.dask_address)
    threads = str(runtime.training_threads)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": runtime.max_workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None, "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}})


@contextmanager
def shared_api(runtime: RuntimeConfig) -> Iterator[None]:
    """Without ``PREFECT_API_URL`` (ephemeral mode), start the ephemeral API here and hand its URL to
    the run's context: Dask worker processes otherwise each start a private server of their own on the
    same SQLite database (slow, and they contend for its lock). Threads share this process's API."""
    if runtime.task_runner != "dask" or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance Prefect's ephemeral client would start
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield
