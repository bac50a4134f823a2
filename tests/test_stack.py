"""`podium stack up/status/down`: a real MLflow server and Prefect server on free ports of 127.0.0.1."""
from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.s3_server import free_port

pytestmark = pytest.mark.integration


def podium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podium.cli", "stack", *args], capture_output=True, text=True,
                          timeout=300)


def test_stack_up_serves_both_then_down_leaves_no_process(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    mlflow_port, prefect_port = free_port(), free_port()
    ports = ["--dir", str(stack_dir), "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    up = podium("up", *ports, "--timeout", "150")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in up.stdout
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in up.stdout
        assert urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/api/health", timeout=5).status == 200
        pids = {name: int((stack_dir / f"{name}.pid").read_text().split()[0]) for name in ("mlflow", "prefect")}
        tree = [p for pid in pids.values() for p in (psutil.Process(pid), *psutil.Process(pid).children(True))]

        again = podium("up", *ports)  # idempotent: nothing new starts
        assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout
        status = podium("status", "--dir", str(stack_dir))
        assert status.stdout.count("healthy") == 2, status.stdout
        clash = podium("up", "--dir", str(tmp_path / "other"), "--mlflow-port", str(mlflow_port),
                       "--prefect-port", str(free_port()))
        assert clash.returncode == 1
        assert clash.stderr.strip() == (f"error: mlflow: port {mlflow_port} on 127.0.0.1 is already in use "
                                        f"(choose another with --mlflow-port); log {tmp_path / 'other' / 'mlflow.log'}")
    finally:
        down = podium("down", "--dir", str(stack_dir))
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not list(stack_dir.glob("*.pid"))
    for port in (mlflow_port, prefect_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert podium("down", "--dir", str(stack_dir)).stdout.count("not running") == 2


def test_a_server_that_cannot_start_is_one_line_with_its_log(tmp_path: Path) -> None:
    from podium.infra.stack import Service, StackError, start_service

    broken = Service("mlflow", [sys.executable, "-c", "raise SystemExit(3)"], free_port(), "/health")
    with pytest.raises(StackError, match=r"mlflow exited with code 3 while starting; see .*mlflow.log"):
        start_service(broken, tmp_path, timeout_s=30)
    assert not (tmp_path / "mlflow.pid").exists()
