"""The run report's plots are drawn once per content and reused by a re-run with the same results."""
from __future__ import annotations

from pathlib import Path

import podium.tasks.report as report
from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig
from podium.methods.profiling import DeviceProfile
from podium.tasks.common import RunContext


def test_device_plot_is_reused_only_for_the_same_drawing(tmp_path: Path, monkeypatch) -> None:
    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch={"family": "resnet"})],
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="r", git_sha="g")
    device = DeviceProfile(name="cpu", latency_budget_ms=2.0)
    rows = [{"candidate": "a", "method": "m", "val_acc": 0.9, "flops": 1.0, "p50_ms": 1.0, "budget_ms": 2.0,
             "winner": True, "alias": "cpu -> v1"},
            {"candidate": "b", "method": "n", "val_acc": 0.8, "flops": 2.0, "p50_ms": 3.0, "budget_ms": 2.0,
             "winner": False, "alias": ""}]
    drawn = []
    real = report.plot_device
    monkeypatch.setattr(report, "plot_device", lambda *a: drawn.append(a) or real(*a))

    first = report._device_plot(ctx, device, rows, tmp_path / "1.png")
    # a re-run: same results, the alias did not move (not drawn), so the PNG is copied, not drawn
    rerun = [{**r, "alias": ""} for r in rows]
    second = report._device_plot(ctx, device, rerun, tmp_path / "2.png")
    assert len(drawn) == 1 and first.read_bytes() == second.read_bytes() and first.stat().st_size > 1000
    # anything drawn differs: a latency, the winner, the device's budget
    report._device_plot(ctx, device, [{**rows[0], "p50_ms": 1.1}, rows[1]], tmp_path / "3.png")
    report._device_plot(ctx, device, [{**rows[0], "winner": False}, rows[1]], tmp_path / "4.png")
    report._device_plot(ctx, device.model_copy(update={"latency_budget_ms": 3.0}), rows, tmp_path / "5.png")
    assert len(drawn) == 4


def _row(**fields) -> dict:
    p50 = fields.get("p50_ms")
    return {"precision": "fp32", "parent": None, "p90_ms": p50, "peak_mem_mb": 10.0, "p50_low_ms": 0.95 * p50,
            "p50_high_ms": 1.05 * p50, "verdict": "within" if 1.05 * p50 <= 2.0 else "over", "noisy": False,
            "interference": "", "mem_budget_mb": 100.0, "runtime": "onnxruntime", "flops": 1.0, "budget_ms": 2.0,
            "train_images": None, "train_device_s": None, "winner": False, "alias": "", **fields}


def test_the_winner_is_shown_with_what_it_cost_to_get_it() -> None:
    from podium.tasks.release import Outcome

    device = DeviceProfile(name="cpu", latency_budget_ms=2.0)
    rows = [_row(candidate="sd-exit4", method="self_distill", val_acc=0.97, p50_ms=1.0, train_images=45_250.0,
                 train_device_s=61.4, winner=True),
            _row(candidate="anchor-a", method="anchor", val_acc=0.9, flops=2.0, p50_ms=1.5)]
    outcome = Outcome(device="cpu", winner="sd-exit4", version="3", alias_moved=True, reason="beats the champion")
    assert "cost: 45.2k images, 61 device-s" in report.format_table(device, rows, outcome)
    table = report.winners_markdown([outcome], {"cpu": rows})
    assert "| 45.2k images, 61 device-s | v3 |" in table and "| onnxruntime | fp32 |" in table
    assert "| 1.000 [0.950, 1.050] |" in table  # the median with its interval
    assert report.training_cost(rows[1]).startswith("anchor")


def test_the_report_says_what_int8_gained_or_cost_each_method() -> None:
    """INT8 of a model over budget in FP32 brings it within budget: the summary shows the speed-up, the
    accuracy change against its own parent, and the best accuracy within budget with and without INT8."""
    rows = [_row(candidate="big", method="scaling", val_acc=0.95, p50_ms=3.0),
            _row(candidate="small", method="scaling", val_acc=0.90, p50_ms=1.0),
            _row(candidate="big@int8-onnxruntime", method="scaling", precision="int8", parent="big", val_acc=0.94,
                 p50_ms=1.5),
            _row(candidate="small@int8-onnxruntime", method="scaling", precision="int8", parent="small",
                 val_acc=0.90, p50_ms=0.5)]
    (summary,) = report.precision_summary(rows)
    assert summary["models"] == 2 and abs(summary["speedup"] - 2.0) < 1e-9
    assert abs(summary["acc_change_pts"] - (-0.5)) < 1e-9
    assert summary["best_fp32"] == 0.90 and summary["best_with"] == 0.94
    line = report.format_table(DeviceProfile(name="cpu", latency_budget_ms=2.0), rows, None).splitlines()[-1]
    assert line == "int8 for scaling: 2.00x faster, -0.50 pts over 2 model(s); best within budget 0.9000 fp32 -> 0.9400"
