"""A device's winner rests on intervals, not on one noisy p50: only a candidate whose whole latency
interval is within budget can win, accuracy differences the validation set cannot resolve do not
decide, and ties are broken the same way every time."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from podium.methods.base import Candidate
from podium.methods.profiling import DeviceProfile, LatencyStats
from podium.tasks.profile import ExportedModel, MeasuredCandidate
from podium.tasks.release import accuracy_resolution, choose_winner

DEVICE = DeviceProfile(name="d", runtime="onnxruntime", latency_budget_ms=1.0, memory_budget_mb=64)
VAL = 270  # images: one standard error at 97 % is about 1 point


def member(name: str, acc: float, p50: float, spread: float = 0.05, flops: float = 1e6,
           mem: float = 10.0) -> MeasuredCandidate:
    cand = Candidate(name, "m", {}, torch.nn.Identity(), (8, 8), {"val_acc": acc, "flops": flops}, in_chans=1)
    stats = LatencyStats(p50, p50, p50, 0.0, 50, mem, "onnxruntime", 1, 1, p50_low_ms=p50 * (1 - spread),
                         p50_high_ms=p50 * (1 + spread), rounds=10)
    return MeasuredCandidate(cand, ExportedModel(name, Path("x"), Path("y"), (1, 8, 8)), ("d",), {"d": stats})


def test_the_resolution_is_one_standard_error_and_never_below_one_image():
    assert abs(accuracy_resolution(0.97, 270) - (0.97 * 0.03 / 270) ** 0.5) < 1e-12
    assert accuracy_resolution(1.0, 100) == 0.01


def test_a_clearly_more_accurate_candidate_wins_even_when_slower():
    choice = choose_winner([member("fast", 0.90, 0.3), member("accurate", 0.97, 0.8)], DEVICE, VAL)
    assert choice.winner.name == "accurate" and choice.why.startswith("most accurate within budget")
    assert "0.800 [0.760, 0.840] ms within 1 ms" in choice.why


def test_a_candidate_straddling_the_budget_cannot_win_and_is_reported():
    pool = [member("straddles", 0.99, 0.98, spread=0.1), member("inside", 0.95, 0.5), member("over", 0.995, 1.5),
            member("too-big", 0.999, 0.2, mem=100.0)]
    choice = choose_winner(pool, DEVICE, VAL)
    assert choice.winner.name == "inside" and choice.ambiguous == ("straddles",)
    alone = choose_winner(pool[:1], DEVICE, VAL)
    assert alone.winner is None
    assert alone.why == "no candidate within 1 ms / 64 MB; 1 straddle the budget after re-measuring"


def test_accuracy_within_resolution_and_overlapping_latency_is_a_tie_broken_by_flops_then_name():
    pool = [member("b-cheap", 0.970, 0.50, flops=1e6), member("a-dear", 0.974, 0.52, flops=3e6),
            member("c-cheap", 0.970, 0.51, flops=1e6), member("clearly-worse", 0.90, 0.10)]
    choice = choose_winner(pool, DEVICE, VAL)
    assert choice.winner.name == "b-cheap" and choice.tied == ("a-dear", "c-cheap")
    assert choice.why.startswith("tie of 3 (accuracy within 1.0 pts, latency intervals overlap)")


def test_among_accuracy_contenders_a_measurably_faster_one_wins():
    choice = choose_winner([member("slow", 0.974, 0.9, flops=1e5), member("quick", 0.970, 0.3, flops=9e6)], DEVICE, VAL)
    assert choice.winner.name == "quick" and choice.tied == () and choice.why.startswith("fastest of 2")


def test_noise_inside_the_intervals_never_changes_the_winner():
    """The same candidates re-measured: every p50 moves within its interval; the winner stays."""
    base = [("sd-exit1", 0.9777, 0.27, 1.6e6), ("anchor", 0.9703, 0.33, 2.3e6), ("sd-exit2", 0.9740, 0.29, 2.1e6),
            ("big", 0.9800, 0.95, 9e6), ("tiny", 0.90, 0.05, 2e5)]
    rng = random.Random(0)
    winners = set()
    for _ in range(50):
        pool = []
        for name, acc, p50, flops in base:
            moved = p50 * rng.uniform(0.97, 1.03)
            pool.append(member(name, acc, moved, spread=0.06, flops=flops))
        rng.shuffle(pool)
        winners.add(choose_winner(pool, DEVICE, VAL).winner.name)
    assert len(winners) == 1, winners
