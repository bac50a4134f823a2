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


def test_the_winner_is_shown_with_what_it_cost_to_get_it() -> None:
    from podium.tasks.release import Outcome

    device = DeviceProfile(name="cpu", latency_budget_ms=2.0)
    rows = [{"candidate": "sd-exit4", "method": "self_distill", "val_acc": 0.97, "flops": 1.0, "p50_ms": 1.0,
             "budget_ms": 2.0, "train_images": 45_250.0, "train_device_s": 61.4, "winner": True, "alias": ""},
            {"candidate": "anchor-a", "method": "anchor", "val_acc": 0.9, "flops": 2.0, "p50_ms": 1.5,
             "budget_ms": 2.0, "train_images": None, "train_device_s": None, "winner": False, "alias": ""}]
    outcome = Outcome(device="cpu", winner="sd-exit4", version="3", alias_moved=True, reason="beats the champion")
    assert "cost: 45.2k images, 61 device-s" in report.format_table(device, rows, outcome)
    table = report.winners_markdown([outcome], {"cpu": rows})
    assert "| 45.2k images, 61 device-s | v3 |" in table
    assert report.training_cost(rows[1]).startswith("anchor")
