"""How trainings share the CPU: a thread budget that pool threads really obey, trainings submitted
longest first, and model inits that stay the seed's when built side by side in threads."""
from __future__ import annotations

import json
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from podium.config import RuntimeConfig
from podium.methods.checkpoint import TrainingEnv, training_env
from podium.methods.families import build
from podium.methods.train import seeded
from podium.tasks.train import TrainingTimes


def _cores_used_by_matmuls() -> float:
    """Process CPU-seconds per wall-second while this thread multiplies matrices (MKL)."""
    a = torch.randn(1024, 1024)
    a @ a  # warm-up: MKL's pool exists before timing
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(20):
        a @ a
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall


def test_a_pool_thread_trains_within_its_budget() -> None:
    """torch.set_num_threads in one thread does not reach a pool worker: MKL there ran on every core
    while torch.get_num_threads() said 1. Inside a training env with threads=1 it uses one core."""
    def in_budget() -> tuple[int, float, int]:
        with training_env(TrainingEnv(device="cpu", threads=1)):
            inside = torch.get_num_threads()
            used = _cores_used_by_matmuls()
        return inside, used, torch.get_num_threads()

    before = torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        inside, used, after = pool.submit(in_budget).result()
    assert inside == 1
    assert used < 1.3, f"{used:.2f} cores busy with a budget of one thread"
    assert after == before or os.cpu_count() == 1  # the worker's own setting is back on leaving


def test_the_cores_are_shared_out_among_concurrent_trainings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [RuntimeConfig(max_workers=n).training_threads for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_trainings_are_submitted_longest_first_and_never_timed_ones_lead(tmp_path: Path) -> None:
    times = TrainingTimes(tmp_path)
    methods = ["stitching", "scaling", "self_distill", "shrinking"]
    assert times.longest_first(methods) == methods  # no history: config order
    for method, wall_s in {"stitching": 10.6, "scaling": 50.3, "self_distill": 11.9}.items():
        times.record(method, wall_s, key=f"{method}-k")
    assert times.longest_first(methods) == ["shrinking", "scaling", "self_distill", "stitching"]
    times.record("shrinking", 55.9, key="shrinking-k")
    assert times.longest_first(methods) == ["shrinking", "scaling", "self_distill", "stitching"]
    assert json.loads(times.path.read_text())["scaling"] == {"wall_s": 50.3, "training_key": "scaling-k"}
    times.path.write_text("{not json")
    assert times.longest_first(methods) == methods  # unreadable history: config order, no error


def test_models_built_side_by_side_get_their_seeds_weights() -> None:
    """Builds draw from torch's one global generator; two threads building at once interleaved their
    draws, so a seed gave different weights from run to run."""
    arch = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}

    def weights(seed: int) -> torch.Tensor:
        with seeded(seed):
            model = build(arch, num_classes=10, in_chans=1)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = {seed: weights(seed) for seed in (0, 1)}
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(weights, [0, 1] * 6))
    for i, got in enumerate(built):
        assert torch.equal(got, reference[i % 2]), f"build {i} (seed {i % 2}) drew other weights"
