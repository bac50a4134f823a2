"""A real `prefect server` on 127.0.0.1 for the session (started the way `podium stack up` starts it),
plus helpers for work pools and process workers against it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from podium.infra.stack import QUIET_ENV, prefect_service, start_service, stop_pid, stop_service
from tests.s3_server import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """{url, env, home}: ``env`` is what a Prefect CLI call or worker needs to use this server. In
    this process, a module points Prefect at it with ``temporary_settings`` (module-scoped, so tests
    elsewhere keep their ephemeral API)."""
    home = tmp_path_factory.mktemp("prefect-server")
    service = prefect_service(home, free_port())
    start_service(service, home, timeout_s=90)
    url = f"{service.url}/api"
    env = {**os.environ, **QUIET_ENV, **service.env, "PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_PROFILES_PATH", None)
    try:
        yield {"url": url, "env": env, "home": home}
    finally:
        stop_service(home, "prefect")


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def create_pool(server: dict, pool: str) -> None:
    subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=server["env"], check=True,
                   capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def start_worker(prefect_server: dict) -> Iterator:
    """``start_worker(pool, log)``: a process worker on ``pool`` (run from the repository), stopped
    with the module."""
    procs: list[subprocess.Popen] = []

    def start(pool: str, log: Path, **env: str) -> subprocess.Popen:
        with open(log, "wb") as out:
            procs.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
                                          env={**prefect_server["env"], **env}, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for proc in procs:
        stop_pid(proc.pid)
        proc.wait(timeout=10)
