"""Bench: Once-for-All progressive shrinking on the bundled digits (CPU).

Prints, for a handful of sub-networks, the accuracy of the shrunk supernet's sub-net (extracted,
BN-recalibrated, no fine-tuning) vs the same architecture trained from scratch on the same training
images (the split less the accuracy predictor's hold-out) for the same number of optimiser steps as
the whole progressive-shrinking schedule; the accuracy predictor's error (on held-out sub-networks)
and how well it ranks sub-networks by their real ``val`` accuracy; per local device,
the latency predictor's error against whole sub-networks measured in the lookup table's own pinned
process (beside its entries) and again in a later process; and the search winner's latency vs the
device budget.

The latency rows default to the demo's devices (``configs/demo.yaml``); ``--devices all`` takes
every local one. The others' tables are slow to build: OpenVINO's took 244 s (11 of 12 test networks
noisy), and ExecuTorch lowers each of the table's 160 models (15-35 s apiece).

    python bench/shrinking.py [--subnets 4] [--latency-samples 12] [--epoch-scale 1.0] [--devices a,b|all]
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from podium.config import load_config  # noqa: E402
from podium.devices import load_inventory, select_devices  # noqa: E402
from podium.errors import DeviceError  # noqa: E402
from podium.methods.runtimes import available_runtimes  # noqa: E402
from podium.methods.shrinking import OFASupernet, OpenSpace, Shrinking, ShrinkingConfig, describe_space, extract_subnet  # noqa: E402
from podium.methods.shrinking.latency import LatencyTable  # noqa: E402
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


def local_devices(parser: argparse.ArgumentParser, names: str) -> list:
    """The inventory's devices named (``all``: every one whose runtime is here), measured on this machine."""
    inventory = load_inventory()
    if names == "all":
        return [d for d in inventory.values() if not d.work_pool and d.runtime in available_runtimes()]
    try:
        devices = select_devices(inventory, names.split(","), "--devices")
    except DeviceError as exc:
        parser.error(str(exc))
    if remote := [d.name for d in devices if d.work_pool]:
        parser.error(f"--devices: {', '.join(remote)} measure on their work pool's hardware, not here")
    return devices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subnets", type=int, default=4)
    parser.add_argument("--latency-samples", type=int, default=12)
    parser.add_argument("--predictor-samples", type=int, default=None)
    parser.add_argument("--devices", default=",".join(load_config(REPO / "configs/demo.yaml").devices.use),
                        help="comma-separated inventory names, or 'all': every local one (default: the demo's)")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every phase's epochs (busy machines)")
    args = parser.parse_args()
    devices = local_devices(parser, args.devices)  # before the training: a wrong name fails at once
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

    calibration = space.calibration_archs()
    test_archs = []
    while len(test_archs) < args.latency_samples:  # random sub-networks, none of them a calibration network
        arch = full.sample(units, rng)
        if arch.name not in {a.name for a in calibration + test_archs}:
            test_archs.append(arch)
    print(f"\nlatency predictor per local device: {len(test_archs)} random sub-networks, measured in the table's "
          f"own pinned process (interleaved with its entries and {len(calibration)} calibration networks), and "
          "again in a later process")
    print(f"  {'device':18s} {'runtime':11s} {'thr':>3s} {'bs':>3s} {'entries':>7s} {'table s':>7s} "
          f"{'median':>7s} {'worst':>6s} {'meas ±':>7s} {'noisy':>5s} {'later: median':>13s} {'worst':>6s} {'shift':>11s}  fit")
    tables = []
    for device in devices:
        table = LatencyTable(space.supernet, device, space.cfg, space.space)
        start = time.perf_counter()
        stats = table.measure_stats(table.supernet.all_layer_specs(table.space), calibration + test_archs)
        took = time.perf_counter() - start
        table.calibrate(calibration, [s.p50_ms for s in stats[: len(calibration)]])
        predicted = np.array([table.predict(a) for a in test_archs])
        beside = np.array([s.p50_ms for s in stats[len(calibration):]])
        own_interval = np.median([(s.p50_high_ms - s.p50_low_ms) / 2 / s.p50_ms * 100 for s in stats[len(calibration):]])
        noisy = sum(s.noisy for s in stats[len(calibration):])
        later = np.array(table.measure_archs(test_archs))
        err, err_later = np.abs(predicted - beside) / beside * 100, np.abs(predicted - later) / later * 100
        shift = later / beside
        tables.append(table)
        print(f"  {device.name:18s} {device.runtime:11s} {device.threads:3d} {device.batch_size:3d} "
              f"{len(table.table):7d} {took:7.1f} {np.median(err):6.1f}% {err.max():5.1f}% {own_interval:6.1f}% "
              f"{noisy:2d}/{len(test_archs):<2d} "
              f"{np.median(err_later):12.1f}% {err_later.max():5.1f}% {shift.min():5.2f}-{shift.max():.2f}x  {table.fit}")
    print("  goal: median <= 3 %, worst <= 10 % (beside the table); 'meas ±': median half-width of the test "
          "networks' own 95 % intervals (the error cannot be resolved below it); noisy: test networks the profiler "
          "flagged; 'shift' = later process / table's process")
    if not tables:
        return
    device, table = devices[0], tables[0]
    space.latency_tables[device.name] = table  # the search below reads this table, not a re-measured one

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
