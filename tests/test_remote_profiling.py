"""Remote device profiling through a real Prefect server, work pool, deployment and process worker.

One `prefect server` on 127.0.0.1 serves the module. Pool ``edge-pool`` has a process worker (the
"device"); pool ``dark-pool`` has a deployment but no worker (a device that never answers).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig, StoreConfig
from podium.methods.base import Candidate
from podium.methods.profiling import DeviceProfile
from podium.registry.stores import open_store
from podium.tasks.common import RunContext
from podium.tasks.profile import LatencyCache, profile_candidates
from tests.prefect_server import REPO, create_pool, tail

pytestmark = pytest.mark.integration

FAST = dict(warmup=1, round_repeats=2, min_rounds=3, max_rounds=3, max_seconds=1.0, latency_budget_ms=100.0,
            stable_tolerance=0.5, max_disturbed=1.0)  # never "noisy"


@pytest.fixture(scope="module")
def prefect_api(prefect_server: dict, start_worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The profile deployment on two pools of the real Prefect server, and a worker on one of them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from podium.flows.device_profile import deploy_profiler

    worker_log = tmp_path_factory.mktemp("edge-worker") / "worker.log"
    for pool in ("edge-pool", "dark-pool"):
        create_pool(prefect_server, pool)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        for pool in ("edge-pool", "dark-pool"):
            assert deploy_profiler(pool, REPO) == f"profile/{pool}"
        start_worker("edge-pool", worker_log)
        yield {"url": prefect_server["url"], "worker_log": worker_log}


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
                     metrics={"val_acc": 0.5, "flops": 1.0, "params": 1.0, "acts": 1.0}, in_chans=1)


def _profile(ctx: RunContext, offers: dict, devices: list, remote_timeout_s: float) -> tuple[dict, dict]:
    """profile_candidates' records as {device: {candidate: stats}} and {candidate: export}."""
    pool = profile_candidates.fn(ctx, offers, devices, remote_timeout_s=remote_timeout_s)
    stats: dict = {}
    for member in pool:
        for device, measured in member.stats.items():
            stats.setdefault(device, {})[member.name] = measured
    return stats, {m.name: m.export for m in pool}


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
    stats, exports = _profile(ctx, {"edge-onnx": cands}, [edge], remote_timeout_s=100)
    assert set(stats.get("edge-onnx", {})) == {"narrow", "wide"}, tail(prefect_api["worker_log"])
    for s in stats["edge-onnx"].values():
        assert s.runtime == "onnxruntime" and s.batch_size == 2 and s.threads == 1
        assert s.runs >= 3 and 0 < s.p50_ms <= s.p90_ms
    # the models travelled through the store, content-addressed; the answer file was cleaned up
    store = open_store(tmp_path / "store")
    keys = store.list("profiling/")
    for name in ("narrow", "wide"):
        assert f"profiling/{exports[name].digest[:24]}/onnxruntime/model.onnx" in keys
    assert not [k for k in keys if k.startswith("profiling/results/")]
    # cached like local measurements: a second call answers without asking the device
    cache = json.loads((ctx.cache_path / "latency.json").read_text())
    assert len(cache) == 2
    elapsed_first = time.monotonic() - start
    again, _ = _profile(ctx, {"edge-onnx": cands}, [edge], remote_timeout_s=0.5)
    assert {k: v.as_dict() for k, v in again["edge-onnx"].items()} == \
        {k: v.as_dict() for k, v in stats["edge-onnx"].items()}, f"first call took {elapsed_first:.1f}s"


def test_silent_pool_times_out_unprofiled_while_local_device_is_measured(prefect_api, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from prefect.client.orchestration import get_client

    ctx = _ctx(tmp_path)
    local = DeviceProfile(name="here", runtime="onnxruntime", **FAST)
    dark = DeviceProfile(name="dark", runtime="onnxruntime", work_pool="dark-pool", **FAST)
    dim = DeviceProfile(name="dim", runtime="onnxruntime", work_pool="dark-pool", **FAST)
    gone = DeviceProfile(name="gone", runtime="onnxruntime", work_pool="no-such-pool", **FAST)
    cand = _candidate("narrow", 4)
    with caplog.at_level("WARNING", logger="podium.tasks.profile"):
        stats, _ = _profile(ctx, {"here": [cand], "dark": [cand], "dim": [cand], "gone": [cand]},
                            [dark, local, dim, gone], remote_timeout_s=8)
    waits = [r.created for r in caplog.records if "no answer" in r.getMessage()]
    assert len(waits) == 2 and abs(waits[0] - waits[1]) < 6  # the two silent devices were awaited together
    assert set(stats) == {"here"} and set(stats["here"]) == {"narrow"}
    text = caplog.text
    assert "dark (work pool dark-pool) unprofiled: no answer" in text
    assert "dim (work pool dark-pool) unprofiled: no answer" in text
    assert "gone (work pool no-such-pool) unprofiled: could not run profile/no-such-pool" in text
    # the abandoned run is cancelled, so a worker that shows up later does not spend the device on it
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    dark_runs = [r for r in runs if "device:dark" in r.tags]
    assert dark_runs and all(r.state.name == "Cancelled" for r in dark_runs)
    assert LatencyCache(ctx.cache_path / "latency.json").entries  # the local measurement is cached


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_a_remote_device_measures_its_own_runtimes_artifact(tmp_path: Path, runtime: str) -> None:
    """The device-side function, no server: a torch device measures the ``model.pt2`` program, an OpenVINO
    device the IR pair, each labelled with its own runtime; a file whose sha256 differs is refused."""
    from podium.flows.device_profile import ProfileRequestError, measure_models
    from podium.files import sha256_file
    from podium.methods.runtimes import get_runtime

    store = open_store(tmp_path / "store")
    rt = get_runtime(runtime)
    files = []
    for path in rt.artifact_files(rt.export(Tiny(4).eval(), (1, 8, 8), tmp_path / "export")):
        store.put_file(f"profiling/x/{path.name}", path)
        files.append({"key": f"profiling/x/{path.name}", "name": path.name, "sha256": sha256_file(path)})
    device = DeviceProfile(name=f"remote-{runtime}", runtime=runtime, threads=1, batch_size=1, work_pool="p", **FAST)
    model = {"name": "m", "runtime": runtime, "main": rt.artifact_name, "files": files, "input_shape": [1, 8, 8]}
    out = measure_models(device, [model], store)
    assert out["m"]["runtime"] == runtime and out["m"]["runs"] >= 3 and out["m"]["peak_mem_mb"] > 0
    tampered = {**model, "files": [{**files[0], "sha256": "0" * 64}, *files[1:]]}
    with pytest.raises(ProfileRequestError, match="sha256"):
        measure_models(device, [tampered], store)
    with pytest.raises(ProfileRequestError, match="is a onnxruntime artifact"):
        measure_models(device, [{**model, "runtime": "onnxruntime"}], store)
