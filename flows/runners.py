"""The task runner a retrain uses, from the config's ``runtime`` section: threads or a Dask cluster."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
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
def run_api() -> Iterator[None]:
    """Without ``PREFECT_API_URL``: the run's own Prefect API (``flows.ephemeral_api``: the one the command
    started early, else one started here) for the whole run, its URL in the run's settings, so the flow,
    its threads and Dask worker processes all talk to it (each worker would otherwise start a private
    server on the same SQLite database). Stopped at the end, once the logs and events are sent."""
    from podium.flows import ephemeral_api

    early = ephemeral_api.take_early()
    if PREFECT_API_URL.value():
        if early is not None:
            early.stop()  # a profile configures a server: the early one is not needed
        yield
        return
    api = early or ephemeral_api.EphemeralAPI().start()
    try:
        api.wait_ready()
        # no UI link in the logs (as with Prefect's ephemeral API): this server serves no UI and ends with the run
        with temporary_settings(updates={PREFECT_API_URL: api.api_url, PREFECT_UI_URL: ""}):
            try:
                yield
            finally:
                _send_pending_logs_and_events()
    finally:
        api.stop()


def _send_pending_logs_and_events() -> None:
    """What Prefect's test harness does before it stops its server: the log and event workers send what
    they hold (the flow's last state and log lines) while the API still answers."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=10)
    finally:
        EventsWorker.drain_all(timeout=10)
