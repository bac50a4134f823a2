"""The profiler measures (never estimates), honours the profile, and agrees across runtimes."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.profiling import DeviceProfile, LatencyStats, measure
from podium.methods.runtimes import get_runtime

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def test_torch_and_onnx_measurements_are_complete(tmp_path):
    model = build(TINY, 10, 1).eval()
    onnx_path = export_onnx(model, (1, 32, 32), tmp_path / "m.onnx")
    for runtime in ("torch", "onnxruntime"):
        profile = DeviceProfile(name="t", runtime=runtime, threads=1, batch_size=2, latency_budget_ms=100,
                                warmup=1, round_repeats=2, min_rounds=3, max_rounds=5, max_seconds=5)
        stats = measure(model, (1, 32, 32), profile, artifact=onnx_path if runtime == "onnxruntime" else None)
        assert stats.runtime == runtime and stats.batch_size == 2 and stats.threads == 1
        assert 5 <= stats.runs <= 10
        assert 0 < stats.p50_ms <= stats.p90_ms and stats.iqr_ms >= 0 and stats.peak_mem_mb >= 0


def test_profile_threads_are_restored():
    before = torch.get_num_threads()
    profile = DeviceProfile(name="t", threads=1, latency_budget_ms=100, warmup=0, round_repeats=1, min_rounds=3,
                            max_rounds=3)
    measure(build(TINY, 10, 1), (1, 16, 16), profile)
    assert torch.get_num_threads() == before


def test_a_measurement_exports_when_no_artifact_is_given():
    """Without an artifact the profiler exports to a temporary folder: ONNX Runtime measures the graph."""
    profile = DeviceProfile(name="t", runtime="onnxruntime", threads=1, latency_budget_ms=100, warmup=0,
                            round_repeats=1, min_rounds=3, max_rounds=3)
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
    real_export, real_measure = profile_task.export_onnx, profile_task.measure_against_budget
    monkeypatch.setattr(profile_task, "export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    monkeypatch.setattr(profile_task, "measure_against_budget",
                        lambda *a, **k: measures.append(1) or real_measure(*a, **k))
    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch=TINY)], store=StoreConfig(uri=str(tmp_path / "store")),
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="r", git_sha="g")
    device = DeviceProfile(name="t", runtime="onnxruntime", threads=1, latency_budget_ms=100, warmup=0,
                           round_repeats=1, min_rounds=3, max_rounds=3, stable_tolerance=0.5,
                           max_disturbed=1.0)  # never "noisy"
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
                           round_repeats=1, min_rounds=3, max_rounds=3)
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


# ------------------------------------------------------------------ isolated, interleaved, with intervals

def test_the_median_interval_is_the_order_statistic_one():
    from podium.methods.profiling import median_interval

    values = [float(v) for v in range(10)]
    assert median_interval(values) == (1.0, 8.0)  # n=10: ranks 2 and 9 (binomial tail 1.1 %)
    assert median_interval(values[:8]) == (0.0, 7.0)  # n=8: the extremes
    low, high = median_interval([float(v) for v in range(100)])
    assert (low, high) == (39.0, 60.0)


def test_candidates_are_timed_in_interleaved_rounds():
    """Each round runs every candidate once, starting one further along, so drift hits them alike."""
    from podium.methods.profiling import time_in_rounds

    order = []
    runs = {name: (lambda name=name: order.append(name)) for name in "abc"}
    profile = DeviceProfile(name="t", latency_budget_ms=1, warmup=0, round_repeats=1, min_rounds=3, max_rounds=3)
    timings = time_in_rounds(runs, profile)
    assert "".join(order) == "abcbcacab"
    assert all(t["rounds"] == 3 and t["p50_low_ms"] <= t["p50_ms"] <= t["p50_high_ms"] for t in timings.values())


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_normalising_to_the_reference_cancels_a_host_that_slows_down():
    """Halfway through, the "host" runs everything 1.8x slower. As timed, the candidate's p50 lands
    somewhere between its two speeds; normalised to the reference timed in the same rounds, it stays at
    its cost relative to the reference (3x) times the device's reference speed."""
    from podium.methods.profiling import time_in_rounds

    calls = {"ref": 0}
    slowdown = lambda: 1.8 if calls["ref"] >= 12 else 1.0  # noqa: E731 - after 4 rounds of 3 reference runs

    def reference():
        calls["ref"] += 1
        _spin(0.0004 * slowdown())

    runs = {"ref": reference, "candidate": lambda: _spin(0.0012 * slowdown())}
    profile = DeviceProfile(name="t", latency_budget_ms=10, warmup=0, round_repeats=3, min_rounds=9, max_rounds=9,
                            reference_ms=0.4)  # the speed the host had before it slowed
    timings = time_in_rounds(runs, profile, reference="ref")
    candidate = timings["candidate"]
    assert candidate["p50_ms"] == pytest.approx(1.2, rel=0.1), candidate  # 3x the reference speed, 0.4 ms
    assert candidate["raw_p50_ms"] > 1.15 * 1.2, candidate  # as timed: mostly at the slow speed
    assert candidate["reference_ms"] == 0.4 and candidate["reference_p50_ms"] == pytest.approx(0.72, rel=0.15)
    assert "host at 1.8" in candidate["interference"], candidate
    assert timings["ref"]["raw_p50_ms"] == timings["ref"]["p50_ms"]  # the reference itself stays as timed


def test_each_block_is_normalised_by_the_reference_block_timed_just_before_it():
    """A model's block is divided by the reference block timed next to it, not by the round's or the
    process's; a disturbed reference round disturbs the model's."""
    from podium.methods.profiling import _Track, normalise_to_reference

    reference = _Track(lambda: None, [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]], ["", "waiting", ""])
    model = _Track(lambda: None, [[3.0, 3.0], [6.0, 6.0], [6.0, 6.0]], ["", "", ""], nearby_reference=[1.0, 2.0, 2.0])
    normalised = normalise_to_reference(model, reference, 1.0)
    assert normalised.samples == [[3.0, 3.0]] * 3 and normalised.disturbed == ["", "waiting", ""]
    assert normalise_to_reference(model, reference, None).samples == [[6.0, 6.0]] * 3  # at its own speed, 2.0


def test_a_host_that_slows_within_a_long_round_is_cancelled_by_a_reference_timed_every_few_models():
    """Rounds of a lookup table's many models outlast the host's speed. Here the host runs 1.8x slower
    for the second three model blocks of every round; every model costs 2x the reference. One reference
    block per round leaves the models that fall in the slow half (a different half each round, the
    order rotates) up to 1.8x off; a reference timed every 3 models puts every one at 2x."""
    from podium.methods.profiling import time_in_rounds

    blocks = {"model": 0}
    repeats = 3
    slow = lambda: 1.8 if (blocks["model"] // (3 * repeats)) % 2 else 1.0  # noqa: E731

    def model():
        _spin(0.0008 * slow())
        blocks["model"] += 1

    runs = {"ref": lambda: _spin(0.0004 * slow()), **{f"m{i}": model for i in range(6)}}
    profile = DeviceProfile(name="t", latency_budget_ms=10, warmup=0, round_repeats=repeats, min_rounds=6,
                            max_rounds=6, reference_ms=0.4)
    local = time_in_rounds(runs, profile, reference="ref", reference_every=3)
    assert all(local[f"m{i}"]["p50_ms"] == pytest.approx(0.8, rel=0.1) for i in range(6)), local
    blocks["model"] = 0
    per_round = time_in_rounds(runs, profile, reference="ref")
    assert max(per_round[f"m{i}"]["p50_ms"] for i in range(6)) > 1.15 * 0.8, per_round


def test_the_speed_book_keeps_the_first_clean_reference_speed_per_device(tmp_path):
    from podium.tasks.profile import SpeedBook

    book = SpeedBook(tmp_path / "device_speed.json")
    one = DeviceProfile(name="a", runtime="onnxruntime", latency_budget_ms=1)
    two = one.model_copy(update={"threads": 2})
    stats = LatencyStats(1.0, 1.1, 1.0, 0.1, 50, 5.0, "onnxruntime", 1, 1, reference_ms=0.3, reference_p50_ms=0.3,
                         reference_input="1x32x32")
    assert book.record(one, {"m": dataclasses.replace(stats, noisy=True)}) == one  # noisy: sets nothing
    assert book.with_speed(one, "1x32x32").reference_ms is None
    assert book.record(one, {"m": stats}).reference_ms == 0.3
    later = dataclasses.replace(stats, reference_ms=0.5)
    assert book.record(book.with_speed(one, "1x32x32"), {"m": later}).reference_ms == 0.3  # the first one stays
    again = SpeedBook(tmp_path / "device_speed.json")
    assert again.with_speed(one, "1x32x32").reference_ms == 0.3
    # another thread count, or the reference at another input, is another speed
    assert again.with_speed(two, "1x32x32").reference_ms is None and again.with_speed(one, "3x64x64").reference_ms is None
    configured = one.model_copy(update={"reference_ms": 0.9})
    assert again.with_speed(configured, "1x32x32").reference_ms == 0.9  # the device's own config wins


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    """A small and a four-times-wider ResNet, as ONNX."""
    folder = tmp_path_factory.mktemp("pair")
    small = export_onnx(build(TINY, 10, 1).eval(), (1, 32, 32), folder / "small.onnx")
    wide = {**TINY, "channels": [32, 64, 128, 256]}
    large = export_onnx(build(wide, 10, 1).eval(), (1, 32, 32), folder / "large.onnx")
    return small, large


def test_isolated_measurement_is_pinned_and_ranks_models_by_cost(onnx_pair):
    import os

    from podium.methods.profiling import Artifact, measure_isolated

    small, large = onnx_pair
    device = DeviceProfile(name="t", runtime="onnxruntime", latency_budget_ms=100, warmup=2, min_rounds=5,
                           max_rounds=10)
    stats = measure_isolated([Artifact("small", small, (1, 32, 32)), Artifact("large", large, (1, 32, 32))], device)
    assert stats["small"].p50_ms < stats["large"].p50_ms
    last = str(sorted(os.sched_getaffinity(0))[-1])
    assert all(s.cores == last and s.rounds >= 5 and s.p50_low_ms <= s.p50_ms <= s.p50_high_ms and s.peak_mem_mb > 0
               for s in stats.values())
    # no speed given: reported at this process's own reference speed, so close to what it timed (loose: the
    # median of per-round ratios is not the ratio of medians on a loaded machine; a lost factor is 4x off)
    assert all(s.reference_ms > 0 and s.p50_ms == pytest.approx(s.raw_p50_ms, rel=0.5) for s in stats.values())
    # at a given speed (four times this process's), the same model is reported four times as slow
    at_speed = device.model_copy(update={"reference_ms": 4 * stats["small"].reference_p50_ms})
    (scaled,) = measure_isolated([Artifact("small", small, (1, 32, 32))], at_speed, memory=False).values()
    assert scaled.p50_ms == pytest.approx(4 * scaled.raw_p50_ms * stats["small"].reference_p50_ms
                                          / scaled.reference_p50_ms, rel=0.5), scaled


def test_a_busy_core_is_detected_and_the_measurement_marked_noisy(onnx_pair):
    """A CPU-bound process pinned to the measurement's core keeps it waiting: rounds longer than a
    scheduler time slice are all disturbed, more rounds do not help, and the stats say so instead of
    passing for clean numbers. (Shorter rounds often fit between the other process's slices: those
    undisturbed rounds are what the statistics then use.)"""
    import os
    import subprocess
    import sys

    from podium.methods.profiling import Artifact, measure_isolated

    core = sorted(os.sched_getaffinity(0))[-1]
    burn = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    burner = subprocess.Popen([sys.executable, "-c", burn])
    try:
        device = DeviceProfile(name="t", runtime="onnxruntime", latency_budget_ms=100, warmup=1, round_repeats=300,
                               min_rounds=3, max_rounds=5, cores=(core,))
        (stats,) = measure_isolated([Artifact("small", onnx_pair[0], (1, 32, 32))], device, memory=False).values()
    finally:
        burner.kill()
        burner.wait()
    assert stats.noisy and "rounds disturbed" in stats.interference, stats


def test_only_candidates_straddling_the_budget_are_measured_again(monkeypatch):
    import podium.methods.profiling as profiling
    from podium.methods.profiling import Artifact, LatencyStats

    def stats(p50, low, high):
        return LatencyStats(p50, p50, p50, 0.0, 10, 1.0, "onnxruntime", 1, 1, p50_low_ms=low, p50_high_ms=high)

    first = {"clear": stats(0.5, 0.45, 0.55), "straddles": stats(0.98, 0.9, 1.1), "over": stats(2.0, 1.9, 2.1)}
    calls = []

    def fake(artifacts, profile, memory=True, reference_input=None):  # noqa: ARG001
        calls.append(([a.name for a in artifacts], profile.min_rounds, profile.reference_ms))
        return first if len(calls) == 1 else {"straddles": stats(0.97, 0.95, 0.99)}

    first = {name: dataclasses.replace(s, reference_ms=0.25) for name, s in first.items()}
    monkeypatch.setattr(profiling, "measure_isolated", fake)
    device = DeviceProfile(name="t", runtime="onnxruntime", latency_budget_ms=1.0, min_rounds=10, max_rounds=20)
    got = profiling.measure_against_budget([Artifact(n, Path(n), (1, 8, 8)) for n in first], device)
    # the second process reports at the first one's reference speed: one scale for both
    assert calls == [(["clear", "straddles", "over"], 10, None), (["straddles"], 20, 0.25)]
    assert got["straddles"].budget_verdict(1.0) == "within" and "re-measured" in got["straddles"].interference
    assert [got[n].budget_verdict(1.0) for n in ("clear", "over")] == ["within", "over"]


def test_a_noisy_measurement_is_kept_flagged_and_never_replaces_a_clean_one(tmp_path):
    """A warm run measures nothing again: a noisy figure is reused as noisy (never as a clean number)."""
    from podium.tasks.profile import LatencyCache

    cache = LatencyCache(tmp_path / "latency.json")
    clean = LatencyStats(1.0, 1.1, 1.0, 0.1, 50, 5.0, "onnxruntime", 1, 1, p50_low_ms=0.98, p50_high_ms=1.02)
    noisy = dataclasses.replace(clean, p50_ms=1.4, noisy=True, interference="40/40 rounds disturbed")
    cache.put("clean", clean)
    cache.put("noisy", noisy)
    cache.put("clean", noisy)
    again = LatencyCache(tmp_path / "latency.json")
    assert again.get("noisy").noisy and again.get("noisy").interference == "40/40 rounds disturbed"
    assert (again.get("clean").p50_ms, again.get("clean").noisy) == (1.0, False)
    again.put("noisy", clean)  # a clean figure replaces a noisy one
    assert not LatencyCache(tmp_path / "latency.json").get("noisy").noisy
