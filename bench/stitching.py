"""SN-Net on the bundled digits: accuracy of every stitch after LS vs He init, and after joint training.

Two demo ResNet anchors are trained here first (a few epochs each), then the stitch space is
evaluated four ways: {He, least-squares} initialisation x {before, after} joint training. Every
evaluation recalibrates BN per configuration. The demo ResNets stitch in stages 1-2, as the
reference code stitches CNNs. Run: ``python bench/stitching.py [--epochs N] [--direction slow_to_fast]``
(the paper's Fast-to-Slow vs Slow-to-Fast ablation: run it both ways).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from podium.methods.base import Anchor  # noqa: E402
from podium.methods.families import build  # noqa: E402
from podium.methods.stitching import Stitching, StitchingConfig, pareto_rows  # noqa: E402
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit  # noqa: E402
from tests.conftest import digits_bundle  # noqa: E402

ANCHORS = {
    "small": {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]},
    "large": {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]},
}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table (for logs and benches)."""
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--anchor-epochs", type=float, default=4.0)
    parser.add_argument("--epochs", type=float, default=3.0, help="joint-training epochs")
    parser.add_argument("--direction", choices=["fast_to_slow", "slow_to_fast"], default="fast_to_slow")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    data = digits_bundle()
    anchors = []
    for name, arch in ANCHORS.items():
        torch.manual_seed(0)
        model = build(arch, data.num_classes, data.input_spec.channels)
        fit(model, data.train, cross_entropy_loss(model), TrainConfig(epochs=args.anchor_epochs, lr=0.05), name=name)
        anchors.append(Anchor(name, model.eval(), "trained", arch))
        print(f"anchor {name}: val_acc {evaluate(model, data.val):.4f}", flush=True)

    train = StitchingConfig().train.model_copy(update={"epochs": args.epochs})
    columns: dict[str, dict[str, float]] = {}
    rows_by_name: dict[str, dict] = {}
    for init in ("he", "ls"):
        for trained in (False, True):
            cfg = StitchingConfig(init=init, joint_training=trained, train=train, direction=args.direction)
            start = time.perf_counter()
            space = Stitching(cfg).fit(data, anchors)
            label = f"{init}_{'trained' if trained else 'init'}"
            rows = pareto_rows(space)
            columns[label] = {r["name"]: r["val_acc"] for r in rows}
            for r in rows:
                rows_by_name.setdefault(r["name"], r)
            print(f"{label}: {time.perf_counter() - start:.1f}s", flush=True)
    table = []
    for name, r in sorted(rows_by_name.items(), key=lambda kv: kv[1]["flops"]):
        row = {"config": name, "MFLOPs": round(r["flops"] / 1e6, 2), "params_k": round(r["params"] / 1e3, 1)}
        row.update({label: round(100 * accs[name], 1) for label, accs in columns.items()})
        table.append(row)
    print()
    print(format_table(table, ["config", "MFLOPs", "params_k", "he_init", "ls_init", "he_trained", "ls_trained"]))
    stitches = [t for t in table if "->" in t["config"]]
    for label in columns:
        mean = sum(t[label] for t in stitches) / max(1, len(stitches))
        print(f"mean stitch val acc ({label}): {mean:.1f}%")


if __name__ == "__main__":
    main()
