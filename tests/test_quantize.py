"""Derived INT8 candidates: built per runtime from each method's best few FP32 candidates, their accuracy
measured by running the artifact (never copied), measured on the devices that accept them, and reused."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import yaml

from podium.config import parse_config
from podium.methods.base import Candidate
from podium.methods.families import build
from podium.methods.precision import artifact_accuracy
from podium.methods.profiling import DeviceProfile
from podium.methods.train import TrainConfig, cross_entropy_loss, fit
from podium.tasks.common import DatasetRef, RunContext, load_data

REPO = Path(__file__).resolve().parents[1]
INT8_ACCURACY_BOUND = 0.03  # INT8 keeps the digits' validation accuracy within 3 points of FP32
FAST = {"warmup": 1, "round_repeats": 1, "min_rounds": 3, "max_rounds": 3, "latency_budget_ms": 50.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw.update({"store": {"uri": str(root / "store")}, "runtime": {"cache_dir": str(root / "cache"), "device": "cpu"},
                "devices": {"use": ["cpu-1t"], "quantize": {"per_method": 1, "calibration_images": 64}}})
    ctx = RunContext(cfg=parse_config(raw), project_dir=str(REPO), run_id="", git_sha="test")
    ref = DatasetRef(root=str(REPO / "data" / "digits"), data_hash="digits-quantize-test")
    data = load_data(ctx, ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 torch threads on the 2 shared cores train ~5x slower
    candidates = []
    for i, width in enumerate((8, 6, 4)):  # two candidates of one method, one of another
        arch = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [width, 2 * width, 4 * width, 8 * width]}
        model = build(arch, 10, 1)
        fit(model, data.train, cross_entropy_loss(model), TrainConfig(epochs=3, lr=0.1, max_steps=60), name=f"q{i}")
        model.eval()
        acc = artifact_accuracy("torch", model, data, (32, 32))
        candidates.append(Candidate(f"w{width}", "scaling" if i < 2 else "anchor", {"arch": arch}, model, (32, 32),
                                    {"val_acc": acc}, in_chans=1))
    torch.set_num_threads(threads)
    return ctx, ref, data, candidates


def test_int8_candidates_are_derived_measured_and_reused(setup, monkeypatch):
    import podium.tasks.quantize as quantize
    from podium.tasks.profile import profile_candidates
    from podium.tasks.release import choose_winner

    ctx, ref, data, candidates = setup
    ort = DeviceProfile(name="q-ort", runtime="onnxruntime", precisions=("fp32", "int8"), **FAST)
    ov = DeviceProfile(name="q-ov", runtime="openvino", precisions=("fp32", "int8"), **FAST)
    plain = DeviceProfile(name="q-fp32", runtime="onnxruntime", **FAST)
    devices = [ort, ov, plain]
    pool = profile_candidates.fn(ctx, {d.name: candidates for d in devices}, devices)
    derived = quantize.derive_precisions.fn(ctx, ref, pool, devices)

    # per method per_method=1 parent: the more accurate scaling one and the anchor, on each runtime
    best = max(candidates[:2], key=lambda c: c.metrics["val_acc"]).name
    assert sorted(m.name for m in derived) == sorted(f"{n}@int8-{rt}" for n in (best, "w4")
                                                     for rt in ("onnxruntime", "openvino"))
    by_name = {m.name: m for m in pool}
    for member in derived:
        runtime = member.export.runtime
        assert member.precision == "int8" and member.offered_to == (("q-ort",) if runtime == "onnxruntime" else ("q-ov",))
        (stats,) = member.stats.values()
        assert stats.runtime == runtime and stats.precision == "int8" and stats.peak_mem_mb > 0
        artifact = member.export.artifact(runtime)
        assert member.candidate.metrics["val_acc"] == artifact_accuracy(runtime, artifact, data, (32, 32))
        parent = by_name[member.parent].candidate.metrics["val_acc"]
        assert abs(member.candidate.metrics["val_acc"] - parent) <= INT8_ACCURACY_BOUND, member.name
        assert member.candidate.metrics["fp32_val_acc"] == parent
    ort_graph = onnx.load(str(next(m for m in derived if m.export.runtime == "onnxruntime").export.onnx))
    assert any(n.op_type == "QuantizeLinear" for n in ort_graph.graph.node)  # a real QDQ INT8 graph

    # a device's winner comes from FP32 and INT8 alike; a device without int8 never sees derived members
    assert choose_winner(pool + derived, ort, val_images=200).winner is not None
    assert all("q-fp32" not in m.offered_to for m in derived)

    # a rerun reuses every artifact and accuracy: nothing is exported or evaluated again
    monkeypatch.setattr(quantize, "artifact_accuracy", lambda *a, **k: pytest.fail("re-evaluated"))
    again = quantize.derive_precisions.fn(ctx, ref, pool, devices)
    assert [m.export.digest for m in again] == [m.export.digest for m in derived]


def test_parents_are_the_most_accurate_that_could_fit_once_faster(setup):
    from podium.methods.profiling import LatencyStats
    from podium.tasks.profile import ExportedModel, MeasuredCandidate
    from podium.tasks.quantize import quantisation_parents

    _, _, _, candidates = setup
    device = DeviceProfile(name="d", runtime="onnxruntime", precisions=("fp32", "int8"), latency_budget_ms=1.0)

    def member(name: str, acc: float, p50: float) -> MeasuredCandidate:
        cand = Candidate(name, "m", {}, candidates[0].model, (32, 32), {"val_acc": acc}, in_chans=1)
        stats = LatencyStats(p50, p50, p50, 0.0, 3, 1.0, "onnxruntime", 1, 1)
        return MeasuredCandidate(cand, ExportedModel(name, Path("x"), Path("y"), (1, 32, 32)), ("d",), {"d": stats})

    pool = [member("slow-best", 0.99, 5.0), member("a", 0.95, 3.9), member("b", 0.97, 2.0), member("c", 0.90, 0.5)]
    assert [m.name for m in quantisation_parents(pool, device, per_method=2, max_speedup=4.0)] == ["b", "a"]


def test_a_model_the_runtime_cannot_convert_leaves_only_itself_out(setup, monkeypatch, caplog):
    import podium.tasks.quantize as quantize
    from podium.tasks.profile import profile_candidates

    ctx, ref, _, candidates = setup
    device = DeviceProfile(name="q-ort", runtime="onnxruntime", precisions=("fp32", "int8"), **FAST)
    pool = profile_candidates.fn(ctx, {"q-ort": candidates}, [device])
    real = quantize.derive

    def flaky(ctx, ref, parent, *args):
        if parent.name == "w4":
            raise RuntimeError("unsupported operator Foo\nsecond line")
        return real(ctx, ref, parent, *args)

    monkeypatch.setattr(quantize, "derive", flaky)
    derived = quantize.derive_precisions.fn(ctx, ref, pool, [device])
    assert [m.parent for m in derived] == [max(candidates[:2], key=lambda c: c.metrics["val_acc"]).name]
    assert "w4@int8-onnxruntime: not built (RuntimeError: unsupported operator Foo)" in caplog.text
