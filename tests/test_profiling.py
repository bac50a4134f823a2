"""The profiler measures (never estimates), honours the profile, and agrees across runtimes."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.profiling import DeviceProfile, measure
from podium.methods.runtimes import get_runtime

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def test_torch_and_onnx_measurements_are_complete(tmp_path):
    model = build(TINY, 10, 1).eval()
    onnx_path = export_onnx(model, (1, 32, 32), tmp_path / "m.onnx")
    for runtime in ("torch", "onnxruntime"):
        profile = DeviceProfile(name="t", runtime=runtime, threads=1, batch_size=2, latency_budget_ms=100,
                                warmup=1, min_repeats=5, max_repeats=10, max_seconds=5)
        stats = measure(model, (1, 32, 32), profile, artifact=onnx_path if runtime == "onnxruntime" else None)
        assert stats.runtime == runtime and stats.batch_size == 2 and stats.threads == 1
        assert 5 <= stats.runs <= 10
        assert 0 < stats.p50_ms <= stats.p90_ms and stats.iqr_ms >= 0 and stats.peak_mem_mb >= 0


def test_profile_threads_are_restored():
    before = torch.get_num_threads()
    profile = DeviceProfile(name="t", threads=1, latency_budget_ms=100, warmup=0, min_repeats=3, max_repeats=3)
    measure(build(TINY, 10, 1), (1, 16, 16), profile)
    assert torch.get_num_threads() == before


def test_a_measurement_exports_when_no_artifact_is_given():
    """Without an artifact the profiler exports to a temporary folder: ONNX Runtime measures the graph."""
    profile = DeviceProfile(name="t", runtime="onnxruntime", threads=1, latency_budget_ms=100, warmup=0,
                            min_repeats=3, max_repeats=3)
    assert measure(build(TINY, 10, 1).eval(), (1, 16, 16), profile).runtime == "onnxruntime"
    with pytest.raises(TypeError, match="export the module first"):
        get_runtime("onnxruntime").open(build(TINY, 10, 1), threads=1)


def test_an_unknown_runtime_is_a_one_line_config_error():
    with pytest.raises(ValidationError, match="unknown runtime 'tensorrt-9'; known runtimes: torch, .*onnxruntime"):
        DeviceProfile(name="t", runtime="tensorrt-9", latency_budget_ms=1)


def test_candidate_identity_is_the_model_not_its_provenance(tmp_path, monkeypatch):
    """An anchor trained in one run is loaded from the registry in the next: its ``source`` changes,
    its export and measurements must not be redone. Weights, architecture and input size still count."""
    import podium.tasks.profile as profile_task
    from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig, StoreConfig
    from podium.methods.base import Candidate
    from podium.tasks.common import RunContext, candidate_digest

    model = build(TINY, 10, 1).eval()

    def anchor(source, arch=TINY, size=(16, 16), net=model):
        return Candidate("anchor-a", "anchor", {"arch": arch, "source": source}, net, size, {"val_acc": 0.5},
                         in_chans=1)

    trained, loaded = anchor("trained"), anchor("registry:models:/m-anchor-a@current (v1)")
    assert candidate_digest(trained) == candidate_digest(loaded)
    assert candidate_digest(anchor("trained", arch={**TINY, "channels": [8, 16, 32, 65]})) != candidate_digest(trained)
    assert candidate_digest(anchor("trained", size=(24, 24))) != candidate_digest(trained)
    assert candidate_digest(anchor("trained", net=build(TINY, 10, 1).eval())) != candidate_digest(trained)

    exports, measures = [], []
    real_export, real_measure = profile_task.export_onnx, profile_task.measure
    monkeypatch.setattr(profile_task, "export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    monkeypatch.setattr(profile_task, "measure", lambda *a, **k: measures.append(1) or real_measure(*a, **k))
    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch=TINY)], store=StoreConfig(uri=str(tmp_path / "store")),
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="r", git_sha="g")
    device = DeviceProfile(name="t", runtime="onnxruntime", threads=1, latency_budget_ms=100, warmup=0,
                           min_repeats=3, max_repeats=3)
    for cand in (trained, loaded):
        (member,) = profile_task.profile_candidates.fn(ctx, {"t": [cand]}, [device])
        assert member.stats["t"].runs == 3
    assert len(exports) == 1 and len(measures) == 1


def test_a_runtime_artifact_is_exported_once_beside_the_onnx_and_measured_there(tmp_path):
    """An OpenVINO device: the candidate's IR (model.xml + model.bin) is written into its export folder on
    first use, complete or not at all, and the device's stats say openvino."""
    import podium.tasks.profile as profile_task
    from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig, StoreConfig
    from podium.methods.base import Candidate
    from podium.tasks.common import RunContext

    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch=TINY)], store=StoreConfig(uri=str(tmp_path / "store")),
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="r", git_sha="g")
    cand = Candidate("a", "anchor", {}, build(TINY, 10, 1).eval(), (16, 16), {"val_acc": 0.5}, in_chans=1)
    device = DeviceProfile(name="ov", runtime="openvino", threads=1, latency_budget_ms=100, warmup=1,
                           min_repeats=3, max_repeats=3)
    (member,) = profile_task.profile_candidates.fn(ctx, {"ov": [cand]}, [device])
    assert member.stats["ov"].runtime == "openvino" and member.stats["ov"].runs == 3
    folder = member.export.onnx.parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.onnx", "model.xml", "weights.safetensors"]
    xml = (folder / "model.xml").stat().st_mtime_ns
    assert member.export.artifact("openvino", cand.model) == folder / "model.xml"  # reused, not exported again
    assert (folder / "model.xml").stat().st_mtime_ns == xml
    assert member.export.artifact("torch", cand.model) == folder / "model.pt2"  # torch's portable artifact, on demand


def test_a_device_lists_only_precisions_its_runtime_builds():
    assert DeviceProfile(name="q", runtime="onnxruntime", latency_budget_ms=1, precisions=("fp32", "int8")).precisions
    with pytest.raises(ValidationError, match="runtime 'torch' cannot build int8 \\(it supports fp32\\)"):
        DeviceProfile(name="t", runtime="torch", latency_budget_ms=1, precisions=("fp32", "int8"))
    with pytest.raises(ValidationError, match="batch_size 2048: runtime 'executorch' takes batches of at most 1024"):
        DeviceProfile(name="t", runtime="executorch", latency_budget_ms=1, batch_size=2048)
    with pytest.raises(ValidationError, match="list each precision once"):
        DeviceProfile(name="t", runtime="onnxruntime", latency_budget_ms=1, precisions=("int8", "int8"))
