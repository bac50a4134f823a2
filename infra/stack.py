"""A local stack of real services: an MLflow server and a Prefect server as background processes.

``podium stack up`` starts both on 127.0.0.1 with their state under ``.podium/stack/`` (MLflow:
SQLite backend and proxied local artifacts; Prefect: its own ``PREFECT_HOME``), one pid file and
one log per service, and waits until each answers its health endpoint. ``podium stack down`` stops
them (SIGTERM to each server and its workers, then SIGKILL). Both are idempotent. The production topology
(PostgreSQL, S3, Dask, one work pool per device) is ``infra/docker-compose.yml``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from podium.errors import StackError

HOST = "127.0.0.1"
DEFAULT_DIR = Path(".podium/stack")
MLFLOW_PORT, PREFECT_PORT = 5000, 4200
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false"}


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    port: int
    health_path: str
    env: dict[str, str] = field(default_factory=dict)
    host: str = HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.url + self.health_path


def _tool(name: str) -> str:
    """The console script installed beside this Python (the project's virtual environment)."""
    return str(Path(sys.executable).with_name(name))


def mlflow_service(stack_dir: Path, port: int = MLFLOW_PORT) -> Service:
    stack_dir = stack_dir.resolve()
    return Service("mlflow", [
        _tool("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{stack_dir / 'mlflow.db'}",
        "--artifacts-destination", str(stack_dir / "mlartifacts"), "--serve-artifacts"], port, "/health")


def prefect_service(stack_dir: Path, port: int = PREFECT_PORT) -> Service:
    home = stack_dir.resolve() / "prefect"
    return Service("prefect", [_tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                   port, "/api/health", env={"PREFECT_HOME": str(home)})


def stack_services(stack_dir: Path = DEFAULT_DIR, mlflow_port: int = MLFLOW_PORT,
                   prefect_port: int = PREFECT_PORT) -> list[Service]:
    return [mlflow_service(stack_dir, mlflow_port), prefect_service(stack_dir, prefect_port)]


def stack_env(services: list[Service]) -> dict[str, str]:
    """What a shell (or a worker) exports to use the stack."""
    urls = {s.name: s.url for s in services}
    return {"MLFLOW_TRACKING_URI": urls["mlflow"], "PREFECT_API_URL": urls["prefect"] + "/api"}


# ------------------------------------------------------------------------------ processes

def _pid_file(stack_dir: Path, name: str) -> Path:
    return stack_dir / f"{name}.pid"


def log_file(stack_dir: Path, name: str) -> Path:
    return stack_dir / f"{name}.log"


def running(stack_dir: Path, name: str) -> tuple[int, str] | None:
    """(pid, url) from ``name``'s pid file when that process is alive and is still that service."""
    try:
        pid_text, url = _pid_file(stack_dir, name).read_text().split()[:2]
        pid = int(pid_text)
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return (pid, url) if name in cmdline else None  # a recycled pid belongs to something else


def healthy(health_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _wait_healthy(service: Service, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(service.health_url):
        if proc.poll() is not None:
            raise StackError(f"{service.name} exited with code {proc.returncode} while starting; see {log}")
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} did not answer {service.health_url} within {timeout_s:.0f} s; "
                             f"see {log}")
        time.sleep(0.5)


def start_service(service: Service, stack_dir: Path, timeout_s: float = 120.0) -> tuple[int, bool]:
    """Start ``service`` in the background unless it already runs; returns (pid, started now)."""
    stack_dir.mkdir(parents=True, exist_ok=True)
    log = log_file(stack_dir, service.name)
    found = running(stack_dir, service.name)
    if found is not None:
        pid, url = found
        if url != service.url:
            raise StackError(f"{service.name} already runs (pid {pid}) at {url}, not {service.url}: "
                             "`podium stack down` first")
        if healthy(service.health_url):
            return pid, False
        raise StackError(f"{service.name} (pid {pid}) runs but does not answer {service.health_url}: "
                         f"`podium stack down` first; see {log}")
    _pid_file(stack_dir, service.name).unlink(missing_ok=True)  # stale: its process is gone
    if port_taken(service.host, service.port):
        raise StackError(f"{service.name}: port {service.port} on {service.host} is already in use "
                         f"(choose another with --{service.name}-port); log {log}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(service.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **QUIET_ENV, **service.env}, cwd=stack_dir,
                                start_new_session=True)  # not killed with the shell that started it
    _pid_file(stack_dir, service.name).write_text(f"{proc.pid} {service.url}\n")
    try:
        _wait_healthy(service, proc, log, timeout_s)
    except StackError:
        stop_pid(proc.pid)
        _pid_file(stack_dir, service.name).unlink(missing_ok=True)
        raise
    return proc.pid, True


def stop_pid(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM ``pid`` and its descendants (servers run workers), wait up to ``grace_s``, then SIGKILL
    what is left."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in procs:
            try:
                proc.send_signal(sig)  # psutil checks the pid was not recycled meanwhile
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            return
    raise StackError(f"process {pid} survived SIGKILL")


def stop_service(stack_dir: Path, name: str) -> int | None:
    """Stop ``name`` if it runs; returns the pid stopped (None when it was not running)."""
    found = running(stack_dir, name)
    if found is not None:
        stop_pid(found[0])
    _pid_file(stack_dir, name).unlink(missing_ok=True)
    return found[0] if found else None


def up(services: list[Service], stack_dir: Path, timeout_s: float = 120.0) -> list[str]:
    """Start every service (a failure stops the ones this call started); one line per service."""
    lines, started = [], []
    try:
        for service in services:
            pid, new = start_service(service, stack_dir, timeout_s)
            if new:
                started.append(service.name)
            lines.append(f"{service.name:<8} {'started' if new else 'already running'} (pid {pid}) at {service.url}, "
                         f"log {log_file(stack_dir, service.name)}")
    except StackError:
        for name in started:
            stop_service(stack_dir, name)
        raise
    return lines


def down(services: list[Service], stack_dir: Path) -> list[str]:
    lines = []
    for service in reversed(services):
        pid = stop_service(stack_dir, service.name)
        lines.append(f"{service.name:<8} {'stopped (pid %d)' % pid if pid else 'not running'}")
    return lines


def status(services: list[Service], stack_dir: Path) -> list[str]:
    lines = []
    for service in services:
        found = running(stack_dir, service.name)
        if found is None:
            lines.append(f"{service.name:<8} not running")
            continue
        pid, url = found
        health = "healthy" if healthy(url + service.health_path) else f"NOT answering {url + service.health_path}"
        lines.append(f"{service.name:<8} running (pid {pid}) at {url}, {health}")
    return lines
