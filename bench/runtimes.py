"""Every runtime available here, FP32 and INT8, on the same three trained candidates: one table.

Three small, different models (a timm ResNet, a RegNetX and an EfficientNet-like from the families
registry, three sizes) are trained briefly on the bundled digits (``data/digits``, upscaled to 32 px;
``--data data/digits-hard`` or any ImageFolder with train/val/test for harder data); their weights are
cached under ``.podium/bench/runtimes/`` (gitignored), keyed by architecture, data and training. Then,
for every runtime in ``available_runtimes()`` and every precision it builds here (fp32, fp16, int8;
INT8 calibrated on ``calibration_batches(data, size, 256)``), each candidate is exported and:

- measured by the project's profiler (``profiling.measure``: p50, p90, peak memory of load + first batch);
- scored on the validation split in its own runtime (``precision.artifact_accuracy``);
- for a non-FP32 row, compared with the same runtime's FP32 row: speed-up (FP32 p50 / p50) and
  accuracy change in points;
- timed a second way in the same run, beside the profiler's p50 (``ref p50``): ONNX Runtime's own
  profiling for ONNX Runtime (``enable_profiling``; median duration of the ``model_run`` events, and of
  the per-run sum of its node events: both include the profiler's own per-node cost),
  ``torch.utils.benchmark.Timer.blocked_autorange`` (median) on the session's run call elsewhere.

Batch 1 and 1 thread by default (``--batch``, ``--threads``). The load average is printed with the results.
``--quick`` (a smoke run, a minute or two) benches the first candidate only, trained 3 epochs instead of 8,
INT8 calibrated on 64 images, with shorter timings. ExecuTorch's export (a lowering per precision) is
what the default run spends most of its time on.

    .venv/bin/python bench/runtimes.py [--quick] [--threads 1] [--batch 1] [--epochs 8] [--data PATH]
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from torch import nn

from podium.methods.data import DataBundle
from podium.methods.export import load_weights, save_weights
from podium.methods.families import build
from podium.methods.precision import artifact_accuracy, calibration_batches
from podium.methods.profiling import DeviceProfile, measure
from podium.methods.runtimes import available_runtimes, get_runtime
from podium.methods.scaling.config import EfficientNetBase, RegNetBase
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit

CANDIDATES: dict[str, dict[str, Any]] = {  # three families, three sizes
    "resnet-tiny": {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]},
    "regnetx-small": RegNetBase().arch(),
    "effnet-small": EfficientNetBase().arch(),
}
CACHE = REPO / ".podium" / "bench" / "runtimes"
PRECISIONS = ("fp32", "fp16", "int8")
LIBRARIES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def library_version(runtime: str) -> str:
    """The version of the library behind ``runtime`` (``onnxruntime-cuda`` -> onnxruntime's)."""
    package = LIBRARIES.get(runtime, LIBRARIES.get(runtime.split("-")[0], runtime.split("-")[0]))
    for name in (package, f"{package}-gpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "version unknown"


def load(path: Path | None, size: int, batch: int) -> DataBundle:
    """The ImageFolder at ``path`` (default: the bundled digits; the hard digits are exported if missing),
    loaded as ``bench/fidelity.py`` loads it."""
    from podium.config import DataConfig
    from podium.data import load_bundle
    from podium.files import files_digest
    from podium.hard_digits import export_digits_hard

    path = path or REPO / "data" / "digits"
    if path.resolve() == (REPO / "data" / "digits-hard").resolve() and not (path / "manifest.csv").exists():
        print(f"exporting the hard digits to {path}", flush=True)
        export_digits_hard(path)
    cfg = DataConfig(path=str(path), stage=None, image_size=(size, size), batch_size=batch, crop_pct=1.0,
                     augment={"enabled": False})
    return load_bundle(path, cfg, files_digest(sorted(path.rglob("manifest.csv")) or [path]))


def trained(name: str, arch: dict[str, Any], data: DataBundle, epochs: float) -> nn.Module:
    """``arch`` trained ``epochs`` on ``data`` (seed 0), from the weights cache when it has them."""
    key = json.dumps({"arch": arch, "data": data.data_hash, "train": len(data.splits["train"]), "epochs": epochs,
                      "spec": [data.input_spec.channels, *data.input_spec.size], "classes": data.num_classes},
                     sort_keys=True)
    weights = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    torch.manual_seed(0)
    model = build(arch, data.num_classes, data.input_spec.channels)
    if weights.exists():
        return load_weights(model, weights).eval()
    start = time.perf_counter()
    fit(model, data.train, cross_entropy_loss(model), TrainConfig(epochs=epochs, lr=0.1, log_every_s=1e9), name=name)
    save_weights(model.eval(), weights)
    print(f"trained {name}: {epochs:g} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def ort_profiled_p50(runtime: str, artifact: Path, batch: np.ndarray, threads: int, runs: int, warmup: int = 10
                     ) -> tuple[float, float]:
    """ONNX Runtime's own profiler, same session options as the runtime's: the median ``model_run`` duration
    (ms) and the median per-run sum of its node (kernel) events (ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="podium-ortprof-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(artifact), options, providers=get_runtime(runtime).providers())
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["dur"]) for e in trace if e.get("cat") == "Session" and e["name"] == "model_run")
    starts = [ts for ts, _ in model_runs]
    kernels = [0.0] * len(model_runs)
    for e in trace:
        if e.get("cat") == "Node" and starts and e["ts"] >= starts[0]:
            kernels[bisect.bisect_right(starts, e["ts"]) - 1] += e["dur"]
    return (statistics.median(d / 1e3 for _, d in model_runs[warmup:]),
            statistics.median(k / 1e3 for k in kernels[warmup:]))


def benchmark_p50(runtime: str, source: Any, batch: np.ndarray, threads: int, min_run_time: float) -> float:
    """``torch.utils.benchmark``'s median (ms) of the runtime session's run call (what the profiler times)."""
    from torch.utils import benchmark

    with get_runtime(runtime).open(source, threads) as session:
        prepared = session.prepare(batch)
        session.run(prepared)
        timer = benchmark.Timer(stmt="run(x)", globals={"run": session.run, "x": prepared}, num_threads=threads)
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def bench_row(cand: str, model: nn.Module, runtime: str, precision: str, data: DataBundle, folder: Path,
              calibration: list[np.ndarray], profile: DeviceProfile, ref_time: float) -> dict[str, Any]:
    """One table row: export, profile, accuracy and the reference timing of ``cand`` on ``runtime`` in ``precision``."""
    rt = get_runtime(runtime)
    size = tuple(data.input_spec.size)
    shape = (data.input_spec.channels, *size)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    source: Any = model
    if not (rt.runs_module and precision == "fp32"):  # torch FP32 runs the module itself, as the pipeline does
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars
            source = rt.export(model, shape, folder / cand / runtime / precision, precision,
                               calibration if precision == "int8" else ())
    export_s = lap()
    stats = measure(model, shape, profile, artifact=source, runtime=runtime, precision=precision)
    measure_s = lap()
    acc = artifact_accuracy(runtime, source, data, size, threads=profile.threads)
    acc_s = lap()
    batch = np.random.default_rng(0).standard_normal((profile.batch_size, *shape), dtype=np.float32)
    if runtime.startswith("onnxruntime"):
        ref, kernels = ort_profiled_p50(runtime, source, batch, profile.threads, runs=max(50, stats.runs))
        ref_source = f"ort profiling model_run (kernels alone {kernels:.3f})"
    else:
        ref, ref_source = benchmark_p50(runtime, source, batch, profile.threads, ref_time), "torch.utils.benchmark"
    return {"p50": stats.p50_ms, "p90": stats.p90_ms, "mem": stats.peak_mem_mb, "runs": stats.runs, "acc": acc,
            "ref": ref, "ref_source": ref_source,
            "seconds": f"export {export_s:.0f} s, measure {measure_s:.0f} s, accuracy {acc_s:.0f} s, ref {lap():.0f} s"}


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'candidate':<14} {'params':>7} {'runtime':<12} {'prec':<5} {'p50 ms':>8} {'p90 ms':>8} {'peak MB':>8} "
              f"{'val acc':>8} {'speed-up':>8} {'d acc':>7} {'ref p50':>8} {'p50/ref':>7}  ref source")
    lines = [header, "-" * len(header)]
    fp32 = {(r["cand"], r["runtime"]): r for r in rows if r["prec"] == "fp32" and "error" not in r}
    for r in rows:
        head = f"{r['cand']:<14} {r['params'] / 1e3:6.0f}k {r['runtime']:<12} {r['prec']:<5}"
        if "error" in r:
            lines.append(f"{head} ERROR {r['error']}")
            continue
        base = fp32.get((r["cand"], r["runtime"]))
        relative = base is not None and r["prec"] != "fp32"
        speed = f"{base['p50'] / r['p50']:7.2f}x" if relative else f"{'':>8}"
        delta = f"{100 * (r['acc'] - base['acc']):+7.2f}" if relative else f"{'':>7}"
        lines.append(f"{head} {r['p50']:8.3f} {r['p90']:8.3f} {r['mem']:8.1f} {100 * r['acc']:7.2f}% {speed} {delta} "
                     f"{r['ref']:8.3f} {r['p50'] / r['ref']:7.2f}  {r['ref_source']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder with train/val/test (default: data/digits)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one candidate (unless --only), fewer epochs and images, shorter timings")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs per candidate (default 8, quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="inference threads of every session")
    parser.add_argument("--batch", type=int, default=1, help="inference batch size")
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--calibration", type=int, default=None, help="INT8 calibration images (default 256, quick 64)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CANDIDATES)} (default: all; "
                        f"quick: {next(iter(CANDIDATES))})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("podium").setLevel(logging.WARNING)
    began = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else (3.0 if args.quick else 8.0)
    calib_images = args.calibration or (64 if args.quick else 256)
    profile = DeviceProfile(name="bench", threads=args.threads, batch_size=args.batch, latency_budget_ms=6e5,
                            max_seconds=1.5 if args.quick else 4.0)
    ref_time = 0.5 if args.quick else 2.0

    runtimes = available_runtimes()
    print(f"load average {load_average()}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print("runtimes: " + "; ".join(f"{n} ({library_version(n)}; {', '.join(get_runtime(n).precisions)})"
                                   for n in runtimes))
    data = load(args.data, args.size, 64)
    if args.quick:
        data = data.subset(train=min(3000, len(data.splits["train"])), val=min(600, len(data.splits["val"])))
    print(f"data: {', '.join(f'{s} {len(v)}' for s, v in data.splits.items())} images, {data.num_classes} classes, "
          f"{args.size} px; {epochs:g} epochs per candidate; INT8 calibrated on {calib_images} training images; "
          f"inference batch {args.batch}, {args.threads} thread(s)", flush=True)

    only = args.only or (next(iter(CANDIDATES)) if args.quick else ",".join(CANDIDATES))
    models = {name: trained(name, CANDIDATES[name], data, epochs) for name in only.split(",")}
    for name, model in models.items():
        print(f"{name}: val {100 * evaluate(model, data.val):.2f}% (eager, before export)", flush=True)
    size = tuple(data.input_spec.size)
    calibration = calibration_batches(data, size, calib_images)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="podium-bench-runtimes-") as tmp:
        for runtime in runtimes:
            precisions = [p for p in PRECISIONS if p in get_runtime(runtime).precisions]
            for name, model in models.items():
                for precision in precisions:
                    row = {"cand": name, "params": sum(p.numel() for p in model.parameters()), "runtime": runtime,
                           "prec": precision}
                    try:
                        row |= bench_row(name, model, runtime, precision, data, Path(tmp), calibration, profile,
                                         ref_time)
                        print(f"  {name} {runtime} {precision}: p50 {row['p50']:.3f} ms, acc "
                              f"{100 * row['acc']:.2f}% ({row['seconds']})", flush=True)
                    except Exception as exc:  # noqa: BLE001 - one failed row must not end the bench
                        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                        print(f"  {name} {runtime} {precision}: {row['error']}", flush=True)
                    rows.append(row)
    print()
    print(format_table(rows))
    print("\nspeed-up: same runtime's FP32 p50 / this p50; d acc: accuracy change vs FP32 in points; "
          "ref p50: the second timing of the same run (see ref source)")
    print(f"load average {load_average()}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
