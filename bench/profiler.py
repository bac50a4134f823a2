"""How repeatable is the profiler? The same model measured in fresh pinned processes, idle and under load.

A small timm ResNet (``methods.families.build``, random weights, input 3x``--size``x``--size``) is
exported once to each available runtime's own artifact (``methods.runtimes``: ``model.onnx``,
``model.xml``, ``model.pt2``, ``model.pte``). Then, for every runtime x threads (1 and 2) x condition,
``profiling.measure_isolated`` is called ``--runs`` times on that artifact alone (batch 1, the
profiler's default stopping rule, no memory probe): every call is its own fresh Python process pinned
with ``os.sched_setaffinity`` to the last ``threads`` allowed cores, as the pipeline measures a device.

The two conditions: ``idle`` (nothing started by this bench) and ``load``: one unpinned busy process
(``python -c "while True: pass"``, one core's worth of work) that this bench starts after all idle rows
and kills at the end (in a ``finally``, also on Ctrl-C or SIGTERM). The idle rows all run first.

Every p50 is reported the way the pipeline reports it: normalised to the reference network timed in the
same rounds, at the device's reference speed (``tasks.profile.SpeedBook``, one book for the whole bench:
the first idle process of a runtime x threads sets it, the loaded rows use it too).

Per row it prints p50 of every run, the spread max/min of those p50s (goal: <= 1.05 idle, <= 1.15
under load) and of the raw p50s as timed, the mean half-width of the median's 95 % interval relative to
p50, whether all runs' intervals share a point (``common``: selection would treat the runs' p50s as a
tie), the share of runs the profiler flagged ``noisy``, the mean rounds and the mean wall time of one
call (process start included).
The load average is printed before and after, with the cores each thread count was pinned to.

    .venv/bin/python bench/profiler.py [--runs 5] [--size 64] [--runtimes onnxruntime,openvino]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}
THREADS = (1, 2)
GOAL = {"idle": 1.05, "load": 1.15}  # max/min of p50 across fresh processes


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def idle_then_loaded(run_condition) -> None:
    """``run_condition("idle")``, then ``run_condition("load")`` beside :func:`background_load`."""
    run_condition("idle")
    with background_load() as busy:
        print(f"background load: pid {busy.pid} (unpinned busy loop); load average {load_average()}", flush=True)
        run_condition("load")
    print(f"background load stopped; load average {load_average()}")


@contextlib.contextmanager
def background_load(settle_s: float = 1.0) -> Iterator[subprocess.Popen]:
    """One unpinned busy process (one core's worth of work) for the duration of the block, always killed."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)  # let it get scheduled before the first measurement
        yield proc
    finally:
        proc.kill()
        proc.wait()


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so ``finally`` blocks (the background load's) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def measure_row(runtime: str, artifact: Path, shape: tuple[int, int, int], threads: int, runs: int,
                speeds: Any) -> dict[str, Any]:
    """``runs`` fresh-process measurements of ``artifact``: p50s, interval half-widths, noisy flags. Each
    p50 is at the device's reference speed from ``speeds`` (a ``tasks.profile.SpeedBook``), as the
    pipeline reports it; the first measurement of a device sets that speed."""
    from podium.methods.profiling import Artifact, DeviceProfile, measure_isolated, shape_text

    row: dict[str, Any] = {"p50": [], "raw": [], "low": [], "high": [], "half": [], "noisy": [], "rounds": [],
                           "wall": [], "cores": ""}
    for _ in range(runs):
        profile = speeds.with_speed(DeviceProfile(name="bench", runtime=runtime, threads=threads, batch_size=1,
                                                  latency_budget_ms=1000), shape_text(shape))
        start = time.perf_counter()
        stats = measure_isolated([Artifact("model", artifact, shape)], profile, memory=False)["model"]
        row["wall"].append(time.perf_counter() - start)
        speeds.record(profile, {"model": stats})
        row["raw"].append(stats.raw_p50_ms)
        row["p50"].append(stats.p50_ms)
        row["low"].append(stats.p50_low_ms)
        row["high"].append(stats.p50_high_ms)
        row["half"].append((stats.p50_high_ms - stats.p50_low_ms) / 2 / stats.p50_ms)
        row["noisy"].append(stats.noisy)
        row["rounds"].append(stats.rounds)
        row["cores"] = stats.cores
    return row


def format_row(runtime: str, threads: int, condition: str, row: dict[str, Any], per_run_width: int) -> str:
    head = f"{runtime:<12} {threads:>7} {condition:<9}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    spread, raw_spread = max(row["p50"]) / min(row["p50"]), max(row["raw"]) / min(row["raw"])
    per_run = " ".join(f"{p:.3f}" for p in row["p50"])
    noisy = f"{sum(row['noisy'])}/{len(row['noisy'])}"
    common = "yes" if max(row["low"]) <= min(row["high"]) else "no"
    goal = "n/a" if len(row["p50"]) < 2 else ("ok" if spread <= GOAL[condition] else "miss")
    half = 100 * statistics.mean(row["half"])
    return (f"{head} {per_run:<{per_run_width}} {spread:>7.3f} {raw_spread:>7.3f} {half:>8.1f}% "
            f"{common:>6} {noisy:>6} {statistics.mean(row['rounds']):>7.1f} {statistics.mean(row['wall']):>7.1f} "
            f"{goal:>4} (<= {GOAL[condition]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per runtime x threads x condition")
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--runtimes", default=None, help="comma-separated subset of the available runtimes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("podium").setLevel(logging.WARNING)
    exit_on_sigterm()
    began = time.perf_counter()

    import torch

    from podium.methods.families import build
    from podium.methods.runtimes import available_runtimes, get_runtime
    from podium.tasks.profile import SpeedBook

    available = available_runtimes()
    runtimes = args.runtimes.split(",") if args.runtimes else list(available)
    missing = [r for r in runtimes if r not in available]
    if missing:
        parser.error(f"runtime(s) {', '.join(missing)} not available here (available: {', '.join(available)})")
    shape = (3, args.size, args.size)
    print(f"load average before {load_average()}; {os.cpu_count()} CPUs, allowed {sorted(os.sched_getaffinity(0))}")
    print(f"model: {ARCH} (random weights), input {'x'.join(map(str, shape))}, batch 1; {args.runs} fresh "
          f"pinned processes per row (measure_isolated, default stopping rule, memory=False)", flush=True)

    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="podium-bench-profiler-") as tmp:
        speeds = SpeedBook(Path(tmp) / "device_speed.json")  # one book: the load rows use the idle calibration
        torch.manual_seed(0)
        model = build(ARCH, num_classes=10, in_chans=3).eval()
        artifacts: dict[str, Path] = {}
        for runtime in runtimes:  # each runtime's own artifact, exported once
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                artifacts[runtime] = Path(get_runtime(runtime).export(model, shape, Path(tmp) / runtime))
            print(f"exported {runtime}: {artifacts[runtime].name} in {time.perf_counter() - start:.1f} s", flush=True)

        def run_condition(condition: str) -> None:
            for runtime in runtimes:
                for threads in THREADS:
                    try:
                        row = measure_row(runtime, artifacts[runtime], shape, threads, args.runs, speeds)
                    except Exception as exc:  # noqa: BLE001 - one failed row must not end the bench
                        row = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}
                    rows[(runtime, threads, condition)] = row
                    done = (f"p50 {' '.join(f'{p:.3f}' for p in row['p50'])} ms" if "error" not in row
                            else row["error"])
                    print(f"  {condition} {runtime} {threads}t: {done}", flush=True)

        idle_then_loaded(run_condition)

    width = max([len("p50 per run (ms)")] + [len(" ".join(f"{p:.3f}" for p in r["p50"])) for r in rows.values()
                                               if "error" not in r])
    header = (f"{'runtime':<12} {'threads':>7} {'condition':<9} {'p50 per run (ms)':<{width}} {'max/min':>7} "
              f"{'raw':>7} {'±interval':>9} {'common':>6} {'noisy':>6} {'rounds':>7} {'wall s':>7} goal")
    print()
    print(header)
    print("-" * len(header))
    for condition in ("idle", "load"):
        for runtime in runtimes:
            for threads in THREADS:
                print(format_row(runtime, threads, condition, rows[(runtime, threads, condition)], width))
    pinned = {threads: next((r["cores"] for (rt, t, _), r in rows.items() if t == threads and r.get("cores")), "?")
              for threads in THREADS}
    print("\nmax/min: of the p50s as reported (normalised to the reference network timed in the same rounds, "
          "at the speed the row's first process measured: tasks.profile.SpeedBook); raw: of the p50s as timed")
    print("±interval: mean half-width of the median's 95 % interval / p50; common: whether all runs' intervals "
          "share a point (the runs would tie in selection); noisy: runs the profiler flagged noisy; "
          "rounds: mean rounds the statistics came from; wall s: mean seconds per measure_isolated call "
          "(fresh process included)")
    print("cores pinned: " + "; ".join(f"{t} thread(s) -> {c}" for t, c in pinned.items()))
    print(f"load average after {load_average()}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
