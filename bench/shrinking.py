"""Bench: Once-for-All progressive shrinking on the bundled digits (CPU).

Prints, for a handful of sub-networks, the accuracy of the shrunk supernet's sub-net (extracted,
BN-recalibrated, no fine-tuning) vs the same architecture trained from scratch on the same training
images (the split less the accuracy predictor's hold-out) for the same number of optimiser steps as
the whole progressive-shrinking schedule; the accuracy predictor's error (on held-out sub-networks)
and how well it ranks sub-networks by their real ``val`` accuracy; the latency predictor's error (its
lookup table measured on this machine) against measured full-network latency; and the search
winner's latency vs the device budget.

    python bench/shrinking.py [--subnets 4] [--latency-samples 12] [--epoch-scale 1.0]
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from podium.methods.profiling import DeviceProfile  # noqa: E402
from podium.methods.shrinking import OFASupernet, OpenSpace, Shrinking, ShrinkingConfig, describe_space, extract_subnet  # noqa: E402
from podium.methods.train import evaluate, fit  # noqa: E402
from tests.conftest import digits_bundle  # noqa: E402


def scratch_accuracy(cfg: ShrinkingConfig, arch, data, steps: int) -> float:
    """The same architecture, freshly initialised, trained alone with CE for ``steps`` steps on
    ``data``'s training split read at its resolution; val accuracy."""
    torch.manual_seed(cfg.seed)
    net = extract_subnet(OFASupernet(cfg, data.input_spec.channels, data.num_classes), arch).train()
    size = (arch.resolution, arch.resolution)

    def loss_fn(images, labels, _step):
        return F.cross_entropy(net(images), labels, label_smoothing=cfg.label_smoothing)

    fit(net, data.train_loader(size), loss_fn, cfg.train.model_copy(update={"epochs": 1e6, "max_steps": steps}),
        name="scratch")
    return evaluate(net, data.eval_loader("val", size))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subnets", type=int, default=4)
    parser.add_argument("--latency-samples", type=int, default=12)
    parser.add_argument("--predictor-samples", type=int, default=None)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every phase's epochs (busy machines)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    cfg = ShrinkingConfig()
    cfg = cfg.model_copy(update={"phases": [p.model_copy(update={"epochs": p.epochs * args.epoch_scale})
                                            for p in cfg.phases]})
    if args.predictor_samples:
        cfg = cfg.model_copy(update={"predictor": cfg.predictor.model_copy(update={"samples": args.predictor_samples})})
    data = digits_bundle()
    print(describe_space(cfg)["summary"])
    print(describe_space(ShrinkingConfig.model_validate({"recipe": "paper"}))["summary"])

    start = time.perf_counter()
    space = Shrinking(cfg).fit(data)
    fit_s = time.perf_counter() - start
    steps = sum(h["steps"] for h in space.history)
    print(f"\nfit: {fit_s:.1f}s (phases {' '.join(h['phase'] + ':' + str(h['steps']) for h in space.history)}, "
          f"{steps} steps; accuracy predictor {space.predictor_report})")

    full = OpenSpace.full(cfg)
    units = len(cfg.unit_widths)
    rng = random.Random(123)
    archs = [full.uniform(units, "max"), full.uniform(units, "mid"), full.uniform(units, "min")]
    archs += [full.sample(units, rng) for _ in range(max(0, args.subnets - 3))]
    print(f"\n{'sub-network':58s} {'shrunk':>7s} {'scratch':>8s} {'predicted':>9s}   "
          f"(val acc; scratch = same arch, {steps} steps)")
    shrunk_accs, predicted = [], space.predict_acc(archs[: args.subnets])
    for arch, pred in zip(archs[: args.subnets], predicted):
        shrunk_accs.append(space.evaluate_arch(arch))
        scratch = scratch_accuracy(cfg, arch, space.data, steps)  # the training images the supernet saw
        print(f"{arch.name:58s} {shrunk_accs[-1]:7.3f} {scratch:8.3f} {pred:9.3f}")
    if len(shrunk_accs) > 2 and np.std(shrunk_accs) > 0 and np.std(predicted) > 0:
        print(f"accuracy predictor (fitted on the hold-out) vs val: Pearson "
              f"{np.corrcoef(shrunk_accs, predicted)[0, 1]:.3f}")

    device = DeviceProfile(name="cpu-1t", threads=1, batch_size=1, latency_budget_ms=1000.0)
    table = space.latency_table(device)
    # the test set: random sub-networks, none of them the table's calibration networks
    calibration = {a.name for a in space.calibration_archs()}
    lat_archs = []
    while len(lat_archs) < args.latency_samples:
        arch = full.sample(units, rng)
        if arch.name not in calibration and arch.name not in {a.name for a in lat_archs}:
            lat_archs.append(arch)
    measured_ms = table.measure_archs(lat_archs)  # one pinned process, interleaved, like the table itself
    rows, errors = [], []
    for arch, measured in zip(lat_archs, measured_ms):
        predicted = table.predict(arch)
        errors.append(abs(predicted - measured) / measured * 100)
        rows.append((arch.name, predicted, measured, errors[-1]))
    print(f"\nlatency predictor on this machine ({device.name}: torch, 1 thread, batch 1, pinned; "
          f"{len(table.table)} lookup-table entries, calibrated on {len(calibration)} networks not in this list)")
    for name, p, m, e in rows:
        print(f"  {name:58s} predicted {p:6.2f} ms  measured {m:6.2f} ms  err {e:5.1f}%")
    print(f"  median |error| {statistics.median(errors):.1f}%   worst |error| {max(errors):.1f}%   "
          "(goal <= 3 %, <= 10 %)")

    smallest, largest = (table.predict(full.uniform(units, w)) for w in ("min", "max"))
    budget = round(smallest + 0.4 * (largest - smallest), 2)
    device = device.model_copy(update={"latency_budget_ms": budget})
    start = time.perf_counter()
    cands = list(space.candidates(device))
    print(f"\nsearch on {device.name} under {budget:.2f} ms (smallest {smallest:.2f}, largest {largest:.2f} ms "
          f"predicted): {time.perf_counter() - start:.1f}s")
    for c in cands:
        m = c.metrics
        print(f"  {c.name:58s} val {m['val_acc']:.3f} (pred {m['predicted_acc']:.3f})  "
              f"latency predicted {m['predicted_latency_ms']:.2f} ms  measured {m['p50_ms']:.2f} ms  "
              f"{'<=' if m['p50_ms'] <= budget else '>'} budget  flops {m['flops'] / 1e6:.2f}M")


if __name__ == "__main__":
    main()
