"""Data-parallel training: two gloo processes started by torchrun end with the weights one process
trains with the same global batch (up to float summation order)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.ddp_fit import train
from tests.s3_server import free_port

REPO = Path(__file__).resolve().parents[1]


def torchrun(processes: int, script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PODIUM_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_train_the_single_process_weights(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    run = torchrun(2, REPO / "tests" / "ddp_fit.py", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("ddp-test: epoch 2.00") == 1, run.stderr[-3000:]  # progress from the primary only
    ddp = load_file(str(out))
    single = train().state_dict()
    moved = 0.0
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (tensor - ddp[name]).abs().max().item())
    assert moved < 1e-5


def test_a_method_trains_on_two_processes_from_its_task(tmp_path: Path) -> None:
    """``runtime.processes: 2``: the task runs the method under torchrun and gets its trained space back."""
    import yaml

    from podium.config import parse_config
    from podium.methods.profiling import DeviceProfile
    from podium.tasks.common import DatasetRef, RunContext
    from podium.tasks.distributed import fit_distributed

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw.update({"store": {"uri": str(tmp_path / "store")}, "runtime": {"processes": 2, "device": "cpu"},
                "methods": {"self_distill": {"train_baseline": False, "train": {"epochs": 1, "max_steps": 6}}}})
    ctx = RunContext(cfg=parse_config(raw), project_dir=str(REPO), run_id="", git_sha="test")
    ref = DatasetRef(root=str(REPO / "data" / "digits"), data_hash="digits-test")

    space = fit_distributed(ctx, ref, "self_distill", [], None, "self_distill-ddp-test")

    device = DeviceProfile(name="cpu-1t", runtime="torch", threads=1, batch_size=1, latency_budget_ms=100)
    candidates = list(space.candidates(device))
    assert [c.name for c in candidates] == [f"sd-exit{i}" for i in range(1, len(candidates) + 1)]
    assert all(0.0 <= c.metrics["val_acc"] <= 1.0 for c in candidates)
    assert (tmp_path / "store" / "_checkpoints" / "self_distill-ddp-test").is_dir()  # the primary checkpointed
