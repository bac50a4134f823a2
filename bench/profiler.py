"""How repeatable is the profiler? The same model measured in fresh processes.

A small timm ResNet (``methods.families.build``, random weights) and each registered runtime's
artifact of it (``methods.runtimes``) are measured ``--runs`` times, each time in a new Python process
(a tiny script that builds the model, loads the same safetensors weights, calls
``methods.profiling.measure`` once and prints JSON), for every runtime at 1 and 2 threads, with the profiler's default stopping rule. Per candidate
(runtime x threads) it prints p50 of every run, the spread max/min of those p50s, and the mean wall
time of one ``measure`` call (warm-up + repeats, not process start-up).

    python bench/profiler.py [--runs 5] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from podium.methods.export import load_weights
from podium.methods.families import build
from podium.methods.profiling import DeviceProfile, measure
runtime, threads, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = load_weights(build({arch!r}, num_classes=10, in_chans=3), {weights!r}).eval()
profile = DeviceProfile(name="bench", runtime=runtime, threads=threads, batch_size=1, latency_budget_ms=1000)
start = time.perf_counter()
stats = measure(model, (3, size, size), profile, artifact=Path(sys.argv[4]) if sys.argv[4] else None)
wall = time.perf_counter() - start
print(json.dumps({{"stats": stats.as_dict(), "wall_s": wall}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    args = parser.parse_args()

    import torch

    from podium.methods.export import save_weights
    from podium.methods.families import build
    from podium.methods.runtimes import RUNTIMES

    with tempfile.TemporaryDirectory(prefix="podium-bench-profiler-") as tmp:
        torch.manual_seed(0)
        model = build(ARCH, num_classes=10, in_chans=3).eval()
        weights = save_weights(model, Path(tmp) / "w.safetensors")
        artifacts = {}  # each runtime's own artifact, exported once ("" = the module itself)
        for name, runtime in RUNTIMES.items():
            source = runtime.export(model, (3, args.size, args.size), Path(tmp) / name)
            artifacts[name] = "" if isinstance(source, torch.nn.Module) else str(source)
        script = Path(tmp) / "measure_once.py"
        script.write_text(CHILD.format(repo=str(REPO), arch=ARCH, weights=str(weights)))

        print(f"model: {ARCH} input 3x{args.size}x{args.size}, batch 1, {args.runs} fresh processes each")
        print(f"{'runtime':<12} {'threads':>7}  {'p50 per run (ms)':<44} {'max/min':>7} {'runs/meas':>9} "
              f"{'wall s/measure':>14}")
        for runtime in artifacts:
            for threads in (1, 2):
                p50s, walls, repeats = [], [], []
                for _ in range(args.runs):
                    out = subprocess.run([sys.executable, str(script), runtime, str(threads), str(args.size),
                                          artifacts[runtime]],
                                         capture_output=True, text=True, timeout=300, check=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    p50s.append(row["stats"]["p50_ms"])
                    repeats.append(row["stats"]["runs"])
                    walls.append(row["wall_s"])
                per_run = " ".join(f"{p:.3f}" for p in p50s)
                print(f"{runtime:<12} {threads:>7}  {per_run:<44} {max(p50s) / min(p50s):>7.3f} "
                      f"{statistics.mean(repeats):>9.1f} {statistics.mean(walls):>14.2f}", flush=True)


if __name__ == "__main__":
    main()
