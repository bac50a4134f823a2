"""Remote device profiling through a real Prefect server, work pool, deployment and process worker.

One `prefect server` on 127.0.0.1 serves the module. Pool ``edge-pool`` has a process worker (the
"device"); pool ``dark-pool`` has a deployment but no worker (a device that never answers).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from methods.base import Candidate
from methods.export import export_onnx
from methods.profiling import DeviceProfile
from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig, StoreConfig
from registry.store import open_store
from tasks.common import RunContext
from tasks.profile import LatencyCache, profile_candidates

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
FAST = dict(warmup=1, min_repeats=3, max_repeats=6, max_seconds=1.0, latency_budget_ms=100.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real Prefect server, the profile deployment on two pools, and a worker on one of them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.device_profile import deploy_profiler

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "INFO", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_PROFILES_PATH", None)
    procs: list[subprocess.Popen] = []
    server_log, worker_log = home / "server.log", home / "worker.log"
    try:
        procs.append(subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=open(server_log, "wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prefect server did not start:\n{_tail(server_log)}")
                time.sleep(0.5)
        for pool in ("edge-pool", "dark-pool"):
            subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                           capture_output=True, timeout=60)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            for pool in ("edge-pool", "dark-pool"):
                assert deploy_profiler(pool, REPO) == f"profile/{pool}"
            procs.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "edge-pool", "--type", "process"],
                                          env=env, cwd=REPO, stdout=open(worker_log, "wb"),
                                          stderr=subprocess.STDOUT))
            yield {"url": url, "worker_log": worker_log}
    finally:
        for proc in reversed(procs):
            _stop(proc)


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _candidate(name: str, width: int) -> Candidate:
    torch.manual_seed(width)
    return Candidate(name=name, method="test", config={"width": width}, model=Tiny(width).eval(), input_size=(8, 8),
                     metrics={"val_acc": 0.5, "flops": 1.0, "params": 1.0, "acts": 1.0})


def _ctx(tmp_path: Path) -> RunContext:
    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch={"family": "timm", "name": "resnet10t"})],
                       store=StoreConfig(uri=str(tmp_path / "store")),
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    return RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="test-run", git_sha="test")


def test_remote_device_is_profiled_through_its_work_pool(prefect_api, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    edge = DeviceProfile(name="edge-onnx", runtime="onnxruntime", threads=1, batch_size=2, work_pool="edge-pool",
                         **FAST)
    cands = [_candidate("narrow", 4), _candidate("wide", 16)]
    start = time.monotonic()
    stats, exports = profile_candidates.fn(ctx, {"edge-onnx": cands}, [edge], channels=1, remote_timeout_s=100)
    assert set(stats.get("edge-onnx", {})) == {"narrow", "wide"}, _tail(prefect_api["worker_log"])
    for s in stats["edge-onnx"].values():
        assert s.runtime == "onnxruntime" and s.batch_size == 2 and s.threads == 1
        assert s.runs >= 3 and 0 < s.p50_ms <= s.p90_ms
    # the models travelled through the store, content-addressed; the answer file was cleaned up
    store = open_store(tmp_path / "store")
    keys = store.list("profiling/")
    for name in ("narrow", "wide"):
        assert f"profiling/{exports[name].digest[:24]}/model.onnx" in keys
    assert not [k for k in keys if k.startswith("profiling/results/")]
    # cached like local measurements: a second call answers without asking the device
    cache = json.loads((ctx.cache_path / "latency.json").read_text())
    assert len(cache) == 2
    elapsed_first = time.monotonic() - start
    again, _ = profile_candidates.fn(ctx, {"edge-onnx": cands}, [edge], channels=1, remote_timeout_s=0.5)
    assert {k: v.as_dict() for k, v in again["edge-onnx"].items()} == \
        {k: v.as_dict() for k, v in stats["edge-onnx"].items()}, f"first call took {elapsed_first:.1f}s"


def test_silent_pool_times_out_unprofiled_while_local_device_is_measured(prefect_api, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from prefect.client.orchestration import get_client

    ctx = _ctx(tmp_path)
    local = DeviceProfile(name="here", runtime="onnxruntime", **FAST)
    dark = DeviceProfile(name="dark", runtime="onnxruntime", work_pool="dark-pool", **FAST)
    gone = DeviceProfile(name="gone", runtime="onnxruntime", work_pool="no-such-pool", **FAST)
    cand = _candidate("narrow", 4)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="podium.tasks.profile"):
        stats, _ = profile_candidates.fn(ctx, {"here": [cand], "dark": [cand], "gone": [cand]},
                                         [dark, local, gone], channels=1, remote_timeout_s=4)
    assert time.monotonic() - start < 45
    assert set(stats) == {"here"} and set(stats["here"]) == {"narrow"}
    text = caplog.text
    assert "dark (work pool dark-pool) unprofiled: no answer" in text
    assert "gone (work pool no-such-pool) unprofiled: could not run profile/no-such-pool" in text
    # the abandoned run is cancelled, so a worker that shows up later does not spend the device on it
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    dark_runs = [r for r in runs if "device:dark" in r.tags]
    assert dark_runs and all(r.state.name == "Cancelled" for r in dark_runs)
    assert LatencyCache(ctx.cache_path / "latency.json").entries  # the local measurement is cached


def test_torch_device_is_measured_on_the_onnx_graph_and_labelled_so(tmp_path: Path) -> None:
    """The device-side function, no server: a torch device gets ONNX Runtime stats, honestly labelled."""
    from flows.device_profile import ProfileRequestError, measure_models

    store = open_store(tmp_path / "store")
    onnx = export_onnx(Tiny(4).eval(), (1, 8, 8), tmp_path / "m.onnx")
    store.put_file("profiling/x/model.onnx", onnx)
    device = DeviceProfile(name="remote-torch", runtime="torch", threads=1, batch_size=1, work_pool="p", **FAST)
    out = measure_models(device, [{"name": "m", "onnx": "profiling/x/model.onnx", "input_shape": [1, 8, 8]}], store)
    assert out["m"]["runtime"] == "onnxruntime" and out["m"]["runs"] >= 3
    with pytest.raises(ProfileRequestError, match="sha256"):
        measure_models(device, [{"name": "m", "onnx": "profiling/x/model.onnx", "onnx_sha256": "0" * 64,
                                 "input_shape": [1, 8, 8]}], store)
