"""The profiler measures (never estimates), honours the profile, and agrees across runtimes."""
from __future__ import annotations

import torch

from methods.export import export_onnx, onnx_logits
from methods.families import build
from methods.profiling import DeviceProfile, measure

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def test_torch_and_onnx_measurements_are_complete(tmp_path):
    model = build(TINY, 10, 1).eval()
    onnx_path = export_onnx(model, (1, 32, 32), tmp_path / "m.onnx")
    for runtime in ("torch", "onnxruntime"):
        profile = DeviceProfile(name="t", runtime=runtime, threads=1, batch_size=2, latency_budget_ms=100,
                                warmup=1, min_repeats=5, max_repeats=10, max_seconds=5)
        stats = measure(model, (1, 32, 32), profile, onnx_path=onnx_path)
        assert stats.runtime == runtime and stats.batch_size == 2 and stats.threads == 1
        assert 5 <= stats.runs <= 10
        assert 0 < stats.p50_ms <= stats.p90_ms and stats.iqr_ms >= 0 and stats.peak_mem_mb >= 0


def test_profile_threads_are_restored():
    before = torch.get_num_threads()
    profile = DeviceProfile(name="t", threads=1, latency_budget_ms=100, warmup=0, min_repeats=3, max_repeats=3)
    measure(build(TINY, 10, 1), (1, 16, 16), profile)
    assert torch.get_num_threads() == before


def test_onnx_export_matches_pytorch(tmp_path):
    model = build(TINY, 10, 1).eval()
    x = torch.randn(3, 1, 32, 32)
    path = export_onnx(model, (1, 32, 32), tmp_path / "m.onnx")
    assert torch.allclose(torch.from_numpy(onnx_logits(path, x.numpy())), model(x), atol=1e-4)
