"""The Prefect API a retrain starts for itself when none is configured (no ``PREFECT_API_URL``).

It is Prefect's own API app (``prefect.server.api.server:create_app``, the one its client would start as
the ephemeral server: same settings, same SQLite database under ``PREFECT_HOME``) in a subprocess on a
free loopback port, with two differences, both measured on a warm ``make demo`` (bench/pipeline.py):

- **It starts before the command's heavy imports.** ``podium retrain`` starts it once the config is valid,
  so its boot (4-5 s in its own process) overlaps the imports of Prefect, MLflow and the tasks instead of
  following them.
- **Its tag-concurrency route takes SQLite's write lock first.** Before each task run with tags Prefect
  asks ``/v2/concurrency_limits/increment-with-lease`` for slots. The route reads the limits, then
  updates them, in one deferred transaction; when the server's own event and log writers commit in
  between, SQLite refuses the upgrade at once ("database is locked"), the API answers 503 and the client
  retries after 2 s. That happened 4-6 times in every warm demo (8-12 s of a 28-30 s run). The route's
  transaction begins IMMEDIATE here, which waits (milliseconds) for the writer instead: the fix Prefect's
  own SQLite configuration recommends for read-then-write transactions.

This module imports no Prefect at import time: the command starts the server before paying for the rest
of Prefect.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

from podium.errors import PodiumError

APP_FACTORY = "podium.flows.ephemeral_api:create_app"
STARTUP_TIMEOUT_S = 60.0  # a cold SQLite database runs Prefect's migrations first
STOP_TIMEOUT_S = 5.0


class APIStartError(PodiumError):
    """The run's own Prefect API did not answer."""


def create_app():  # noqa: ANN201 (a FastAPI app; FastAPI is imported only in the server process)
    """The uvicorn factory the subprocess runs: Prefect's app, its slot-acquiring transaction IMMEDIATE."""
    from prefect.server.api import concurrency_limits_v2 as routes
    from prefect.server.api.server import create_app as prefect_app
    from prefect.server.database.configurations import SQLITE_BEGIN_MODE

    acquire = routes._acquire_concurrency_slots  # noqa: SLF001 (tests/test_ephemeral_api.py pins it)

    async def acquire_with_the_write_lock(*args, **kwargs):
        # The transaction's BEGIN is sent at its first statement, inside this call (SQLAlchemy begins
        # lazily): in IMMEDIATE mode SQLite waits for a concurrent writer (busy_timeout) instead of
        # failing the read-then-write upgrade.
        token = SQLITE_BEGIN_MODE.set("IMMEDIATE")
        try:
            return await acquire(*args, **kwargs)
        finally:
            SQLITE_BEGIN_MODE.reset(token)

    routes._acquire_concurrency_slots = acquire_with_the_write_lock  # noqa: SLF001
    return prefect_app()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EphemeralAPI:
    """Prefect's API app in a subprocess of this process: :meth:`start` returns at once, :meth:`wait_ready`
    blocks until it answers, :meth:`stop` ends it (SIGTERM, then SIGKILL after 5 s)."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, env: Mapping[str, str] | None = None) -> EphemeralAPI:
        """Spawn the server with this process's Prefect settings (those made in-process by
        ``temporary_settings`` included, as Prefect passes them to its own) and ``env`` on top."""
        from prefect.settings import get_current_settings

        self.port = _free_port()
        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        server_env = {**os.environ, **settings, **(env or {}),
                      # what Prefect's own ephemeral server runs with: no UI, no background services
                      "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", APP_FACTORY, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env=server_env)
        atexit.register(self.stop)  # a run that fails before its end does not leave the server behind
        return self

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until ``/api/health`` answers 200; a server that exits or stays silent is an ``APIStartError``."""
        if self.process is None:
            raise APIStartError("the run's Prefect API was never started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                raise APIStartError(f"the run's Prefect API (uvicorn {APP_FACTORY}) exited with code {code} "
                                    f"before answering on {self.api_url}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise APIStartError(f"the run's Prefect API did not answer on {self.api_url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


_early: EphemeralAPI | None = None


def start_early() -> None:
    """Start the API now unless Prefect's settings (environment or profile) name one; :func:`take_early`
    hands it to the run. Imports only ``prefect.settings`` (~1 s; the run needs it anyway)."""
    global _early
    from prefect.settings import PREFECT_API_URL

    if _early is None and not PREFECT_API_URL.value():
        _early = EphemeralAPI().start()


def take_early() -> EphemeralAPI | None:
    """The server :func:`start_early` started, once (the caller owns it from then on)."""
    global _early
    api, _early = _early, None
    return api
