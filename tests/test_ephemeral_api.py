"""The Prefect API a retrain starts for itself (``flows.ephemeral_api``, ``flows.runners.run_api``): tagged
task runs get their slots without the 503-and-2-s-retry that Prefect's own ephemeral SQLite server
answers when its writers commit mid-transaction, the run's logs reach the API before it stops, and a
server that cannot start is a one-line error."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from podium.flows import ephemeral_api
from podium.flows.runners import run_api

pytestmark = pytest.mark.integration
TAGGED_TASKS = 24  # distinct tag sets: each asks the API for slots (Prefect's no-limit cache is per set)


class _Statuses(logging.Handler):
    """Status lines of the HTTP requests this process sends (httpx logs each at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _tagged_flow_in_own_api(home: Path) -> tuple[list[str], str]:
    from prefect import flow, get_run_logger, tags, task
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    @task
    def step(i: int) -> int:
        get_run_logger().info("step %d", i)  # logs and events: the server's writers work meanwhile
        return i

    @flow(name="tagged-steps")
    def tagged_steps() -> int:
        total = 0
        for i in range(TAGGED_TASKS):
            with tags("podium", f"step:{i}"):
                total += step(i)
        return total

    statuses, httpx_logger = _Statuses(), logging.getLogger("httpx")
    level = httpx_logger.level
    httpx_logger.addHandler(statuses)
    httpx_logger.setLevel(logging.INFO)
    try:
        with temporary_settings(updates={PREFECT_HOME: str(home)}):
            with run_api():
                url = PREFECT_API_URL.value()
                assert tagged_steps() == sum(range(TAGGED_TASKS))
    finally:
        httpx_logger.removeHandler(statuses)
        httpx_logger.setLevel(level)
    return statuses.lines, url


def test_tagged_task_runs_get_their_slots_without_a_retry_and_the_logs_arrive_before_the_api_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    lines, url = _tagged_flow_in_own_api(tmp_path / "prefect")
    slot_calls = [line for line in lines if "concurrency_limits/increment-with-lease" in line]
    assert len(slot_calls) >= TAGGED_TASKS // 2, lines[-20:]  # the calls happened (new tag sets)
    # Prefect's own app answered 4-6 of a warm demo's ~13 such calls with 503 (then waited 2 s each)
    assert not [line for line in slot_calls if " 503 " in line], slot_calls
    assert url.startswith("http://127.0.0.1:")

    # the server is gone; a new one on the same database has the run and its last log lines
    api = ephemeral_api.EphemeralAPI().start({"PREFECT_HOME": str(tmp_path / "prefect")})
    try:
        api.wait_ready()
        import httpx

        with httpx.Client(base_url=api.api_url, timeout=30) as client:
            (run,) = client.post("/flow_runs/filter", json={}).json()
            assert run["state"]["type"] == "COMPLETED"
            logs = client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                     "limit": 200}).json()
        messages = [entry["message"] for entry in logs]
        assert f"step {TAGGED_TASKS - 1}" in messages
        assert any("Finished in state Completed" in m for m in messages), messages[-5:]
    finally:
        api.stop()


def test_the_slot_route_the_server_wraps_is_still_prefects(tmp_path: Path) -> None:
    """``create_app`` replaces ``_acquire_concurrency_slots`` in Prefect's route module: a Prefect that
    renamed it must fail here, not quietly serve the 503s again. Run in a fresh interpreter (the
    replacement is process-wide)."""
    code = ("from prefect.server.api import concurrency_limits_v2 as r; before = r._acquire_concurrency_slots; "
            "from podium.flows.ephemeral_api import create_app; create_app(); "
            "after = r._acquire_concurrency_slots; "
            "assert after is not before and after.__name__ == 'acquire_with_the_write_lock', after")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PREFECT_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_server_that_exits_before_answering_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ephemeral_api, "APP_FACTORY", "podium.no_such_module:create_app")
    api = ephemeral_api.EphemeralAPI().start()
    with pytest.raises(ephemeral_api.APIStartError, match=r"exited with code \d+ before answering"):
        api.wait_ready(timeout_s=60)
    api.stop()
    assert api.process is None
