"""Does profile-and-select pick the same winner every time? The same trained candidates, measured afresh.

Candidates: timm ResNets of several widths and depths (``methods.families``), trained briefly on the
bundled digits as the demo reads them (``data/digits``, 32x32, 1 channel; lr 0.1, seed 0, one torch
thread), with val accuracy (``train.evaluate``) and flops (``complexity.count``). Their weights and
ONNX graphs are cached under ``.podium/bench/winner_stability/`` (gitignored), keyed by architecture,
data and epochs; each runtime's artifact is exported there once, on first use
(``ExportedModel.artifact``), and reused by every run.

Devices: the demo's three from the inventory (``infra/devices.yaml``: cpu-1t, cpu-2t-onnx, mcu-tight;
``--devices`` to choose, ``--budget NAME=MS`` to override a latency budget), FP32 only.

One run is the pipeline's profile-and-select stage on the whole pool: per device, one
``profiling.measure_against_budget`` of every candidate's artifact for the device's runtime (a fresh
pinned process, re-measuring budget straddlers; p50s at the device's reference speed, which its first
run sets in a ``tasks.profile.SpeedBook`` kept for the whole bench, as the pipeline's cache keeps it), then
``tasks.release.choose_winner`` on those stats. No latency is reused between runs (peak memory is
probed in the first run and reused: it is not what noise moves). ``--runs``
runs idle, then ``--runs`` beside the background load of ``bench/profiler.py`` (one unpinned busy
process, stopped at the end, also on Ctrl-C).

Printed per device and condition: each run's winner (``name (tie: a, b)`` when the tie rule decided),
its p50 with the median's 95 % interval (without a winner: the fastest candidate's), how many
candidates were within budget, straddling it, over memory and noisy; then ``same winner k/n``: the
most runs that agree with one run, two runs agreeing when their winners are equal or one's winner is
in the other's tie (no winner agrees with no winner). Goal: n/n.

    .venv/bin/python bench/winner_stability.py [--quick] [--runs 5] [--epochs 6] [--devices cpu-1t,...]
        [--budget cpu-1t=5]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from podium.config import load_config
from podium.devices import load_inventory, select_devices
from podium.files import atomic_path
from podium.methods.base import Candidate
from podium.methods.complexity import count
from podium.methods.data import DataBundle
from podium.methods.export import export_onnx, load_weights, save_weights
from podium.methods.families import build
from podium.methods.profiling import (Artifact, DeviceProfile, LatencyStats, measure_against_budget, reference_shape,
                                      shape_text)
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit
from podium.tasks.profile import ExportedModel, MeasuredCandidate, SpeedBook
from podium.tasks.release import Choice, choose_winner

# isort: split
# beside this file: bench/profiler.py's background load, bench/runtimes.py's digits loader
from profiler import exit_on_sigterm, idle_then_loaded, load_average
from runtimes import load


def resnet(layers: list[int], channels: list[int]) -> dict[str, Any]:
    return {"family": "resnet", "layers": layers, "channels": channels}


CANDIDATES: dict[str, dict[str, Any]] = {  # widths and depths around the demo's two anchors
    "r-w4": resnet([1, 1, 1, 1], [4, 8, 16, 32]),
    "r-w8": resnet([1, 1, 1, 1], [8, 16, 32, 64]),
    "r-w12": resnet([1, 1, 1, 1], [12, 24, 48, 96]),
    "r-w16": resnet([1, 1, 1, 1], [16, 32, 64, 128]),  # the demo's resnet-tiny
    "r-w24": resnet([1, 1, 1, 1], [24, 48, 96, 192]),
    "r-d2-w16": resnet([2, 2, 2, 2], [16, 32, 64, 128]),
    "r-w32": resnet([1, 1, 1, 1], [32, 64, 128, 256]),
    "r-d2-w32": resnet([2, 2, 2, 2], [32, 64, 128, 256]),  # the demo's resnet-small
}
QUICK = ("r-w8", "r-w16", "r-w24")  # two within resolution of each other: the tie rule is exercised
CACHE = REPO / ".podium" / "bench" / "winner_stability"
SIZE = 32


def cached_candidate(name: str, arch: dict[str, Any], data: DataBundle, epochs: float
                     ) -> tuple[Candidate, ExportedModel]:
    """``arch`` trained ``epochs`` on ``data`` (seed 0; from the cache when it has it), its ONNX graph and
    weights in its cache folder, with val accuracy and flops."""
    spec = data.input_spec
    key = json.dumps({"arch": arch, "data": data.data_hash, "train": len(data.splits["train"]), "epochs": epochs,
                      "lr": 0.1, "seed": 0, "spec": [spec.channels, *spec.size], "classes": data.num_classes},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    folder = CACHE / f"{name}-{digest[:16]}"
    onnx_path, weights_path = folder / "model.onnx", folder / "weights.safetensors"
    shape = (spec.channels, *spec.size)
    torch.manual_seed(0)
    model: nn.Module = build(arch, data.num_classes, spec.channels)
    if weights_path.exists():
        model = load_weights(model, weights_path)
    else:
        start = time.perf_counter()
        fit(model, data.train, cross_entropy_loss(model),
            TrainConfig(epochs=epochs, lr=0.1, seed=0, log_every_s=1e9), name=name)
        with atomic_path(weights_path) as tmp:
            save_weights(model.eval(), tmp)
        print(f"trained {name}: {epochs:g} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    if not onnx_path.exists():
        with atomic_path(onnx_path) as tmp:
            export_onnx(model, shape, tmp)
    metrics = {"val_acc": evaluate(model, data.val), **count(model, spec.size, spec.channels).as_dict()}
    cand = Candidate(name, "bench", arch, model, tuple(spec.size), metrics, in_chans=spec.channels)
    return cand, ExportedModel(digest, onnx_path, weights_path, shape)


@dataclass
class Outcome:
    """One run's choice on one device."""

    choice: Choice
    stats: dict[str, LatencyStats]
    seconds: float

    @property
    def winner(self) -> str | None:
        return self.choice.winner.name if self.choice.winner else None

    def label(self) -> str:
        if self.winner is None:
            return "none"
        return f"{self.winner} (tie: {', '.join(self.choice.tied)})" if self.choice.tied else self.winner


def agree(a: Outcome, b: Outcome) -> bool:
    """Same winner, or one's winner is in the other's tie (no winner agrees only with no winner)."""
    return a.winner == b.winner or (a.winner is not None and b.winner is not None
                                    and (a.winner in b.choice.tied or b.winner in a.choice.tied))


def same_winner(outcomes: list[Outcome]) -> int:
    """The most runs that agree with one run (itself included)."""
    return max((sum(agree(a, b) for b in outcomes) for a in outcomes), default=0)


PEAKS: dict[tuple[str, str], float] = {}  # (device, candidate) -> peak MB: probed in the first run only


def profile_and_select(members: list[tuple[Candidate, ExportedModel]], device: DeviceProfile, val_images: int,
                       speeds: SpeedBook) -> Outcome:
    """The pipeline's stage for one device: every candidate's latency measured afresh, at the device's
    reference speed (the first run sets it, as the pipeline's cache does; peak memory, which noise does
    not move, probed once), then the winner chosen."""
    start = time.perf_counter()
    artifacts = [Artifact(c.name, e.artifact(device.runtime, c.model), e.input_shape) for c, e in members]
    first = not any(key[0] == device.name for key in PEAKS)
    reference_input = reference_shape([a.input_shape for a in artifacts])
    device = speeds.with_speed(device, shape_text(reference_input))
    stats = measure_against_budget(artifacts, device, memory=first, reference_input=reference_input)
    speeds.record(device, stats)
    for name, s in stats.items():
        PEAKS.setdefault((device.name, name), s.peak_mem_mb)
        stats[name] = dataclasses.replace(s, peak_mem_mb=PEAKS[(device.name, name)])
    pool = [MeasuredCandidate(c, e, (device.name,), {device.name: stats[c.name]}) for c, e in members]
    return Outcome(choose_winner(pool, device, val_images), stats, time.perf_counter() - start)


def run_line(index: int, device: DeviceProfile, out: Outcome) -> str:
    verdicts = [s.budget_verdict(device.latency_budget_ms) for s in out.stats.values()]
    fits = sum(s.peak_mem_mb <= device.memory_budget_mb for s in out.stats.values())
    counts = (f"{verdicts.count('within')}/{len(verdicts)} within, {verdicts.count('ambiguous')} straddle, "
              f"{len(verdicts) - fits} over memory, {sum(s.noisy for s in out.stats.values())} noisy; "
              f"{out.seconds:.0f} s")
    if out.winner is None:
        name, fastest = min(out.stats.items(), key=lambda item: item[1].p50_ms)
        return f"    run {index}: {'none':<34} {'fastest ' + name:<30} p50 {fastest.interval_text():<26} {counts}"
    stats = out.stats[out.winner]
    noisy = " noisy" if stats.noisy else ""
    return f"    run {index}: {out.label():<34} {'':<30} p50 {stats.interval_text():<26} {counts}{noisy}"


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, ms = item.partition("=")
        try:
            budgets[name] = float(ms)
        except ValueError:
            raise SystemExit(f"--budget {item!r}: expected NAME=MS") from None
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {len(QUICK)} candidates ({', '.join(QUICK)}), 3 epochs")
    parser.add_argument("--runs", type=int, default=5, help="runs per condition (idle, then under load)")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs per candidate (default 6, quick 3)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CANDIDATES)}")
    parser.add_argument("--devices", default=",".join(load_config(REPO / "configs/demo.yaml").devices.use), help="comma-separated device names from the inventory")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=MS",
                        help="override a device's latency budget (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("podium").setLevel(logging.WARNING)
    exit_on_sigterm()
    began = time.perf_counter()
    torch.set_num_threads(1)

    budgets = parse_budgets(args.budget)
    devices = select_devices(load_inventory(), args.devices.split(","), "--devices")
    unknown = sorted(set(budgets) - {d.name for d in devices})
    if unknown:
        parser.error(f"--budget for device(s) not benched: {', '.join(unknown)}")
    devices = [d.model_copy(update={"latency_budget_ms": budgets[d.name]}) if d.name in budgets else d
               for d in devices]
    epochs = args.epochs if args.epochs is not None else (3.0 if args.quick else 6.0)
    names = args.only.split(",") if args.only else list(QUICK if args.quick else CANDIDATES)

    print(f"load average {load_average()}; {os.cpu_count()} CPUs, allowed {sorted(os.sched_getaffinity(0))}")
    data = load(None, SIZE, 64)
    val_images = len(data.dataset("val"))
    print(f"data: {', '.join(f'{s} {len(v)}' for s, v in data.splits.items())} images, {data.num_classes} classes, "
          f"{SIZE} px, {data.input_spec.channels} channel; {epochs:g} epochs per candidate", flush=True)
    members = [cached_candidate(n, CANDIDATES[n], data, epochs) for n in names]
    print(f"\n{'candidate':<10} {'val acc':>8} {'Mflops':>8} {'params':>8}")
    for cand, _ in members:
        m = cand.metrics
        print(f"{cand.name:<10} {100 * m['val_acc']:7.2f}% {m['flops'] / 1e6:8.2f} {m['params'] / 1e3:7.0f}k")
    print()
    for device in devices:  # export each runtime's artifact before any timing (once; cached with the ONNX)
        start = time.perf_counter()
        for cand, exported in members:
            exported.artifact(device.runtime, cand.model)
        print(f"{device.name}: {device.runtime}, {device.threads} thread(s), batch {device.batch_size}, "
              f"budget {device.latency_budget_ms:g} ms / {device.memory_budget_mb:g} MB "
              f"(artifacts ready in {time.perf_counter() - start:.0f} s)", flush=True)

    results: dict[tuple[str, str], list[Outcome]] = {(d.name, c): [] for d in devices for c in ("idle", "load")}
    speed_file = Path(tempfile.mkdtemp(prefix="podium-bench-speed-")) / "device_speed.json"
    speeds = SpeedBook(speed_file)  # one book for every run, like the pipeline's cache; fresh per bench

    def run_condition(condition: str) -> None:
        for index in range(1, args.runs + 1):
            for device in devices:
                out = profile_and_select(members, device, val_images, speeds)
                results[(device.name, condition)].append(out)
                print(f"  {condition} run {index} {device.name}: {out.label()} ({out.seconds:.0f} s)", flush=True)

    idle_then_loaded(run_condition)

    for device in devices:
        print(f"\n{device.name} ({device.runtime}, {device.threads} thread(s), batch {device.batch_size}, "
              f"budget {device.latency_budget_ms:g} ms / {device.memory_budget_mb:g} MB)")
        for condition in ("idle", "load"):
            outcomes = results[(device.name, condition)]
            print(f"  {condition}:")
            for index, out in enumerate(outcomes, 1):
                print(run_line(index, device, out))
            first = outcomes[0].choice.why if outcomes else ""
            print(f"    run 1 why: {first}")

    print(f"\n{'device':<13} {'condition':<9} {'same winner':>11}  goal  winners")
    for device in devices:
        rows = [("idle", results[(device.name, "idle")]), ("load", results[(device.name, "load")]),
                ("both", results[(device.name, "idle")] + results[(device.name, "load")])]
        for condition, outcomes in rows:
            k, n = same_winner(outcomes), len(outcomes)
            winners = ", ".join(sorted({o.winner or "none" for o in outcomes}))
            note = "  (no winner in any run: says nothing about stability; see --budget)" if all(
                o.winner is None for o in outcomes) else ""
            print(f"{device.name:<13} {condition:<9} {f'{k}/{n}':>11}  {'ok' if k == n else 'miss':<4}  "
                  f"{winners}{note}")
    print("reference speeds (ms, set by each device's first run): "
          + ", ".join(f"{d.name} {speeds.with_speed(d, shape_text(members[0][1].input_shape)).reference_ms}"
                      for d in devices))
    shutil.rmtree(speed_file.parent, ignore_errors=True)
    print(f"\nload average {load_average()}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
