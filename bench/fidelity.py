"""Does each method reproduce its paper's effect? One table: the paper's comparison, ours, and whether the sign matches.

On the hard digits (``data/digits-hard``, the ``export_digits_hard`` DVC stage, exported here if
missing) or any ImageFolder (``--data PATH`` with train/val/test splits):

- SN-Net: least-squares vs He init of the stitching layers, before and after joint training; Fast-to-Slow
  vs Slow-to-Fast (mean val accuracy over the stitches, anchors excluded).
- Once-for-All: the progressive-shrinking sub-networks (largest, middle, smallest; BN-recalibrated, no
  fine-tuning) vs the same architectures trained from scratch on as many images as the whole schedule.
- Fast scaling: dWr vs dwr latency at equal flops (``match_flops``) and the Pearson r of latency with
  flops, params and activations over every scaled model (paper: activations predict runtime best).
- BYOT: the deepest exit vs the plain network trained for the same steps, and each shallow exit vs the
  same truncated network trained alone for the same steps.

Every training here is the methods' own (``recipe: demo`` by default, ``--recipe paper`` for a GPU);
``--scale`` multiplies every method's epoch count (the SN-Net anchors always train the demo's 4 epochs). Latency: batch 1, 1 thread, eager PyTorch, the project's profiler.

    python bench/fidelity.py [--data PATH] [--scale 1.0] [--recipe demo|paper] [--only stitching,byot]
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from podium.methods.base import Anchor
from podium.methods.data import DataBundle
from podium.methods.families import build
from podium.methods.profiling import DeviceProfile, measure
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit, fit_method

ANCHOR_EPOCHS = 4.0  # not scaled: SN-Net's comparisons need anchors that are good models
CPU_1T = DeviceProfile(name="cpu-1t", threads=1, latency_budget_ms=1e5, max_seconds=3.0)
ANCHORS = {  # the demo's anchors: small enough for a CPU, different enough to stitch
    "resnet-tiny": {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]},
    "resnet-small": {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]},
}


def load(path: Path | None, size: int, batch: int) -> DataBundle:
    from podium.config import DataConfig
    from podium.data import load_bundle
    from podium.hard_digits import export_digits_hard
    from podium.files import files_digest

    if path is None:
        path = REPO / "data" / "digits-hard"
        if not (path / "manifest.csv").exists():
            print(f"exporting the hard digits to {path} (the export_digits_hard stage's defaults)", flush=True)
            export_digits_hard(path)
    cfg = DataConfig(path=str(path), stage=None, image_size=(size, size), batch_size=batch, crop_pct=1.0,
                     augment={"enabled": False})
    digest = files_digest(sorted(path.rglob("manifest.csv")) or [path])
    return load_bundle(path, cfg, digest)


def row(method: str, comparison: str, paper: str, ours: float, other: float, unit: str = "acc",
        higher: bool = True, note: str = "") -> dict[str, Any]:
    """``ours`` is the paper's favoured side; the sign matches when it wins (``higher``) or is lower."""
    return {"method": method, "comparison": comparison, "paper": paper, "a": ours, "b": other, "unit": unit,
            "match": ours > other if higher else ours < other, "note": note}


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer freshly initialised (PyTorch's defaults): the same architecture, from scratch."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return fresh


def train_alone(model: nn.Module, data: DataBundle, steps: int, train: TrainConfig, size: tuple[int, int] | None = None
                ) -> float:
    """``model`` trained with plain cross-entropy for ``steps`` steps; its val accuracy."""
    fit(model, data.train_loader(size), cross_entropy_loss(model), train.model_copy(update={"epochs": 1e6,
                                                                                              "max_steps": steps}),
        name="alone")
    return evaluate(model.eval(), data.eval_loader("val", size))


# --------------------------------------------------------------------------------------------- SN-Net

def train_anchors(data: DataBundle, epochs: float) -> list[Anchor]:
    anchors = []
    for name, arch in ANCHORS.items():
        torch.manual_seed(0)
        model = build(arch, data.num_classes, data.input_spec.channels)
        fit(model, data.train, cross_entropy_loss(model), TrainConfig(epochs=epochs, lr=0.1), name=name)
        anchors.append(Anchor(name, model.eval(), "trained", arch))
        print(f"anchor {name}: val {evaluate(model, data.val):.4f}", flush=True)
    return anchors


def stitching(data: DataBundle, scale: float, recipe: str) -> list[dict[str, Any]]:
    from podium.methods.stitching import Stitching, StitchingConfig, pareto_rows

    anchors = train_anchors(data, ANCHOR_EPOCHS)  # anchors as the demo trains them (84-87 % on the hard digits)
    base = StitchingConfig.model_validate({"recipe": recipe})
    base = base.model_copy(update={"train": base.train.model_copy(update={"epochs": base.train.epochs * scale})})

    def mean_stitch_acc(**update: Any) -> float:
        space = Stitching(base.model_copy(update=update)).fit(data, anchors)
        accs = [r["val_acc"] for r in pareto_rows(space) if r["kind"] == "stitch"]
        return sum(accs) / len(accs)

    he0, ls0 = mean_stitch_acc(init="he", joint_training=False), mean_stitch_acc(init="ls", joint_training=False)
    he1, ls1 = mean_stitch_acc(init="he"), mean_stitch_acc(init="ls")
    s2f = mean_stitch_acc(init="ls", direction="slow_to_fast")
    return [row("SN-Net", "LS vs He init, before joint training", "LS > He", ls0, he0),
            row("SN-Net", "LS vs He init, after joint training", "LS > He", ls1, he1),
            row("SN-Net", "Fast-to-Slow vs Slow-to-Fast (LS, trained)", "F2S > S2F", ls1, s2f)]


# --------------------------------------------------------------------------------------------- OFA

def shrinking(data: DataBundle, scale: float, recipe: str) -> list[dict[str, Any]]:
    from bench.shrinking import scratch_accuracy
    from podium.methods.shrinking import OpenSpace, Shrinking, ShrinkingConfig

    cfg = ShrinkingConfig.model_validate({"recipe": recipe})
    cfg = cfg.model_copy(update={"phases": [p.model_copy(update={"epochs": p.epochs * scale}) for p in cfg.phases]})
    space = fit_method(Shrinking(cfg), data)
    steps = space.training_cost.steps
    images = space.training_cost.images
    full, units = OpenSpace.full(cfg), len(cfg.unit_widths)
    rows = []
    for which in ("max", "mid", "min"):
        arch = full.uniform(units, which)
        shrunk = space.evaluate_arch(arch)
        scratch_steps = max(1, images // data.cfg.batch_size)  # as many images as the whole schedule
        scratch = scratch_accuracy(cfg, arch, space.data, scratch_steps)
        rows.append(row("OFA", f"PS sub-net ({which}) vs same arch from scratch", "PS >= scratch", shrunk, scratch,
                        note=f"{images / 1e3:.0f}k images each ({steps} PS steps)"))
    return rows


# --------------------------------------------------------------------------------------------- scaling

def scaling(data: DataBundle, scale: float, recipe: str) -> list[dict[str, Any]]:
    from podium.methods.scaling import ScalingConfig, plan_scales, runtime_correlation

    size = data.input_spec.size[0]
    shape = (data.input_spec.channels, size, size)
    latency: dict[str, dict[float, float]] = {}
    records = []
    warm = plan_scales(ScalingConfig(scales=[1]), data.num_classes, shape[0])[0]  # the first measurement pays start-up
    measure(build(warm.arch, data.num_classes, shape[0]).eval(), (shape[0], warm.resolution, warm.resolution), CPU_1T)
    for strategy in ("dwr", "dWr"):
        cfg = ScalingConfig.model_validate({"recipe": recipe, "strategy": strategy, "scales": [1, 2, 4, 8],
                                            "match_flops": True, "base": {"resolution": size}})
        for plan in plan_scales(cfg, data.num_classes, shape[0]):
            model = build(plan.arch, data.num_classes, shape[0]).eval()
            p50 = measure(model, (shape[0], plan.resolution, plan.resolution), CPU_1T).p50_ms
            latency.setdefault(strategy, {})[plan.s] = p50
            records.append({"name": plan.name, **plan.complexity.as_dict(), "p50_ms": p50})
    rows = [row("scaling", f"dWr vs dwr latency at {s:g}x flops", "dWr faster", latency["dWr"][s], latency["dwr"][s],
                unit="ms", higher=False) for s in (4, 8)]
    r = runtime_correlation(records)
    rows.append(row("scaling", "Pearson r of latency: acts vs flops", "acts > flops", r["r_acts"], r["r_flops"],
                    unit="r", note=f"params {r['r_params']:.2f}; {r['n']} models"))
    return rows


# --------------------------------------------------------------------------------------------- BYOT

def self_distill(data: DataBundle, scale: float, recipe: str) -> list[dict[str, Any]]:
    from podium.methods.self_distill import SelfDistill, SelfDistillConfig

    cfg = SelfDistillConfig.model_validate({"recipe": recipe, "train_baseline": True, "early_exit_threshold": None})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": cfg.train.epochs * scale})})
    space = fit_method(SelfDistill(cfg), data)
    steps = space.training_cost.steps // 2  # the multi-exit network and the baseline trained the same steps
    exits = list(space.candidates())
    rows = [row("BYOT", "deepest exit vs plain network", "deepest > plain", exits[-1].metrics["val_acc"],
                evaluate(space.baseline, data.val), note=f"{steps} steps each")]
    for i, cand in enumerate(exits[:-1]):
        alone = train_alone(reinit(cand.model, cfg.train.seed), data, steps, cfg.train)
        rows.append(row("BYOT", f"exit {i + 1}/{len(exits)} vs the truncated net alone", "exit > alone",
                        cand.metrics["val_acc"], alone))
    return rows


SECTIONS: dict[str, Callable[[DataBundle, float, str], list[dict[str, Any]]]] = {
    "stitching": stitching, "shrinking": shrinking, "scaling": scaling, "self_distill": self_distill}


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = f"{'method':<8} {'comparison':<48} {'paper':<15} {'ours':>8} {'other':>8}  sign   note"
    lines = [header, "-" * len(header)]
    for r in rows:
        fmt = (lambda v: f"{100 * v:7.2f}%") if r["unit"] == "acc" else (lambda v: f"{v:8.3f}")
        lines.append(f"{r['method']:<8} {r['comparison'][:48]:<48} {r['paper']:<15} {fmt(r['a'])} {fmt(r['b'])}  "
                     f"{'yes' if r['match'] else 'NO':<5}  {r['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder with train/val/test (default: hard digits)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="the demo's (hard digits calibrated at 64)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count")
    parser.add_argument("--recipe", choices=["demo", "paper"], default="demo")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    data = load(args.data, args.size, args.batch)
    print(f"data: {', '.join(f'{s} {len(v)}' for s, v in data.splits.items())} images, {data.num_classes} classes, "
          f"{args.size} px; recipe {args.recipe}, epochs x{args.scale:g}", flush=True)
    rows = []
    for name in args.only.split(","):
        start = time.perf_counter()
        rows += SECTIONS[name](data, args.scale, args.recipe)
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
        print(format_rows(rows), flush=True)
    print()
    print(format_rows(rows))
    print(f"\n{sum(r['match'] for r in rows)}/{len(rows)} signs match the papers")


if __name__ == "__main__":
    main()
