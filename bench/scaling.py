"""Fast compound scaling benchmark: dwr vs dWr at s in {1, 2, 4, 8}, measured CPU latency.

For each strategy and flops factor: the scaled model's flops, params, acts (methods.complexity),
its measured latency (methods.profiling.measure, PyTorch eager, batch 1) and, over all models,
the Pearson r of latency vs each metric (the paper's runtime analysis, on this machine).
Latency does not depend on the weight values, so models are measured untrained unless
``--train-steps`` is given (then each is trained on the digits and its val accuracy shown).
Members are pycls's rule at each s (the default); ``--match-flops`` searches the rule's s so that
each member's realised flops factor is s, for a comparison at equal flops.

    python bench/scaling.py [--family regnet|efficientnet] [--resolution 32] [--threads 1] [--match-flops]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from podium.methods.families import build  # noqa: E402
from podium.methods.profiling import DeviceProfile, measure  # noqa: E402
from podium.methods.scaling import ScalingConfig, plan_scales, runtime_correlation  # noqa: E402
from podium.tasks.plots import plot_runtime_correlation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["regnet", "efficientnet"], default="regnet")
    parser.add_argument("--resolution", type=int, default=32, help="base resolution (digits base: 32)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--train-steps", type=int, default=0, help="train each model on the digits (0: skip)")
    parser.add_argument("--match-flops", action="store_true", help="search s so realised flops are s x the base's")
    parser.add_argument("--plot", type=Path, default=None, help="write the correlation PNG here")
    args = parser.parse_args()

    torch.set_num_threads(max(1, args.threads))
    profile = DeviceProfile(name="bench-cpu", threads=args.threads, batch_size=args.batch_size,
                            latency_budget_ms=1000.0, warmup=10, round_repeats=5, min_rounds=6, max_rounds=120,
                            max_seconds=args.max_seconds)
    data = None
    if args.train_steps:
        from podium.methods.scaling import Scaling
        from podium.methods.train import TrainConfig
        from tests.conftest import digits_bundle

        data = digits_bundle()

    records, rows = [], []
    # One throwaway measurement first: the first model measured in a process pays one-off start-up cost.
    warm = plan_scales(ScalingConfig(family=args.family, scales=[1]))[0]
    measure(build(warm.arch, num_classes=10, in_chans=1).eval(), (1, warm.resolution, warm.resolution), profile)
    for strategy in ("dwr", "dWr"):
        base_kwargs = {"resolution": args.resolution}
        cfg = ScalingConfig(family=args.family, strategy=strategy, scales=args.scales, match_flops=args.match_flops,
                            base={**ScalingConfig(family=args.family).resolved_base().model_dump(), **base_kwargs})
        start = time.perf_counter()
        plans = plan_scales(cfg)
        accs: dict[float, float] = {}
        if data is not None:
            trained = Scaling(cfg.model_copy(update={"train": TrainConfig(max_steps=args.train_steps, lr=0.1,
                                                                          warmup_steps=5)})).fit(data)
            accs = {c.config["s"]: c.metrics["val_acc"] for c in trained.candidates()}
        print(f"# {strategy}: planned {len(plans)} models in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        for p in plans:
            model = build(p.arch, num_classes=10, in_chans=1).eval()
            stats = measure(model, (1, p.resolution, p.resolution), profile)
            cx = p.complexity
            record = {"name": p.name, "flops": cx.flops, "params": cx.params, "acts": cx.acts, "p50_ms": stats.p50_ms}
            records.append(record)
            rows.append((strategy, p.s, p.flops_factor, p.resolution, p.arch["depths"], p.arch["widths"], cx,
                         stats.p50_ms, stats.iqr_ms, accs.get(p.s)))

    print(f"\nfamily={args.family} base_res={args.resolution} match_flops={args.match_flops} threads={args.threads} "
          f"batch={args.batch_size} torch={torch.__version__}")
    header = (f"{'strategy':8} {'s':>4} {'flops x':>7} {'res':>4} {'depths':>14} {'widths':>20} {'MFLOPs':>8} "
              f"{'params K':>9} {'acts K':>8} {'p50 ms':>7} {'iqr':>6}" + (" val_acc" if data is not None else ""))
    print(header)
    print("-" * len(header))
    for strategy, s, factor, res, depths, widths, cx, p50, iqr, acc in rows:
        line = (f"{strategy:8} {s:>4g} {factor:>7.2f} {res:>4d} {str(depths):>14} {str(widths):>20} "
                f"{cx.flops / 1e6:>8.2f} {cx.params / 1e3:>9.1f} {cx.acts / 1e3:>8.1f} {p50:>7.3f} {iqr:>6.3f}")
        print(line + (f" {acc:7.4f}" if acc is not None else ""))
    print()
    for label, subset in (("all", records), ("dwr", records[:len(records) // 2]), ("dWr", records[len(records) // 2:])):
        corr = runtime_correlation(subset)
        print(f"Pearson r of p50 latency vs  flops {corr['r_flops']:+.3f}  params {corr['r_params']:+.3f}  "
              f"acts {corr['r_acts']:+.3f}   ({label}, n={corr['n']}, best: {corr['best']})")
    if args.plot:
        plot_runtime_correlation(records, args.plot, profile.name)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
