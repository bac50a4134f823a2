"""Self-distillation bench on the bundled digits: baseline vs each exit vs ensemble vs early exit.

    python bench/self_distill.py [--epochs 10] [--seed 0] [--threads 2] [--no-hint-ablation]

Trains the multi-exit ResNet with self-distillation (the authors' T=3, α=0.3, λ=0.03, KD without
T², hint = torch.dist through the adaptation layers) and the same backbone with plain
cross-entropy for the same steps, from the same initial weights; then prints, per model: val/test
top-1, flops (multiply-adds, methods.complexity), params, and CPU batch-1 latency p50 at 1 thread
in eager PyTorch and in ONNX Runtime (methods.profiling). The early-exit row runs in eager PyTorch
only (data-dependent control flow: no static ONNX graph); its latency is the mean over the real
val images (each exit's path timed by methods.profiling.measure, weighted by the exit histogram)
and its flops the expected flops under that histogram (branches tried before counted). It is
compared with the plain backbone (stages + head, no branches) timed by the same function and
profile. The loss terms at initialisation and after training show what the hint contributes.
With the ablation (default) the λ=0 model (no hint loss) is trained too.
Digits val/test are ~270 images each: one image is 0.37 points.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from podium.methods.complexity import count  # noqa: E402
from podium.methods.profiling import DeviceProfile, measure  # noqa: E402
from podium.methods.self_distill import (  # noqa: E402
    EARLY_EXIT_PROFILE,
    MultiExitNet,
    SelfDistill,
    SelfDistillConfig,
    early_exit_outcomes,
    measure_early_exit,
    model_loss,
    plain_backbone,
)
from podium.methods.train import TrainConfig, evaluate  # noqa: E402
from tests.conftest import digits_bundle  # noqa: E402

CPU_1T = DeviceProfile(name="cpu-1t", threads=1, latency_budget_ms=1000, max_seconds=3.0)


class Ensemble(nn.Module):
    """All exits in one pass, logits averaged (the paper's ensemble)."""

    def __init__(self, model: MultiExitNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.model.forward_exits(x).logits).mean(0)


def row(name: str, model: nn.Module, data, shape) -> dict:
    cx = count(model, shape[1:], shape[0])
    lat = measure(model, shape, CPU_1T)
    ort_lat = measure(model, shape, CPU_1T.model_copy(update={"runtime": "onnxruntime"}))
    return {"model": name, "val": evaluate(model, data.val), "test": evaluate(model, data.test),
            "mflops": cx.flops / 1e6, "kparams": cx.params / 1e3, "ms": lat.p50_ms, "ort_ms": ort_lat.p50_ms}


def early_exit_flops(model: MultiExitNet, cands, shape) -> list[float]:
    """Flops of an image that leaves at exit k: the truncated exit k plus the branches it tried before."""
    h, w = shape[1:]
    branch_flops = [count(branch, (h // s.reduction, w // s.reduction), s.channels).flops
                    for branch, s in zip(model.branches, model.stages)]
    return [c.metrics["flops"] + sum(branch_flops[:k]) for k, c in enumerate(cands)]


def loss_terms(model: MultiExitNet, cfg: SelfDistillConfig, data) -> str:
    """The loss and λ·Σ hint on the first training batch (train mode, no gradient)."""
    images, labels = next(iter(data.train))
    was_training = model.training
    model.train()
    with torch.no_grad():
        terms = model_loss(model, images, labels, cfg)
    model.train(was_training)
    hint = cfg.hint_weight * sum(terms.hint).item()
    kd = cfg.alpha * sum(terms.kd).item()
    return (f"total {terms.total.item():.3f}, α·ΣKD {kd:.3f}, λ·Σhint {hint:.3f} "
            f"({hint / terms.total.item():.1%} of the total, batch {labels.shape[0]})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--no-hint-ablation", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    data = digits_bundle(seed=args.seed)
    shape = (data.input_spec.channels, *data.input_spec.size)
    train = TrainConfig(epochs=args.epochs, lr=0.05, warmup_steps=10, seed=args.seed, log_every_s=30)

    runs = [("sd", 0.03)] + ([] if args.no_hint_ablation else [("sd λ=0", 0.0)])
    rows = []
    for label, hint in runs:
        cfg = SelfDistillConfig(hint_weight=hint, early_exit_threshold=args.threshold, train=train,
                                train_baseline=label == "sd")
        # the weights fit starts from: the same seeded backbone, then the branches and adapters
        untrained = MultiExitNet(SelfDistill(cfg)._backbone(data, []), data.num_classes)
        print(f"[{label}] loss at initialisation: {loss_terms(untrained, cfg, data)}", flush=True)
        start = time.perf_counter()
        space = SelfDistill(cfg).fit(data)
        print(f"[{label}] trained in {time.perf_counter() - start:.1f}s; loss after: "
              f"{loss_terms(space.model, cfg, data)}", flush=True)
        if space.baseline is not None:
            rows.append(row("baseline (CE only)", space.baseline, data, shape))
        cands = list(space.candidates())
        for cand in cands:
            rows.append(row(f"{label} {cand.name}", cand.model, data, shape))
        rows.append(row(f"{label} ensemble", Ensemble(space.model).eval(), data, shape))
        early = space.early_exit_model(args.threshold)
        val = measure_early_exit(early, data.val, shape)
        test = early_exit_outcomes(early, data.test)
        backbone_ms = measure(plain_backbone(space.model), shape, EARLY_EXIT_PROFILE).mean_ms
        print(f"[{label}] early exit mean {val['mean_ms']:.3f} ms (per exit path "
              + " / ".join(f"{ms:.3f}" for ms in val["exit_mean_ms"])
              + f") vs plain backbone mean {backbone_ms:.3f} ms: {backbone_ms / val['mean_ms']:.2f}x "
              f"(methods.profiling.measure, profile {EARLY_EXIT_PROFILE.name})", flush=True)
        fracs = [c / sum(val["exit_counts"]) for c in val["exit_counts"]]
        exp_flops = sum(f * c for f, c in zip(fracs, early_exit_flops(space.model, cands, shape)))
        rows.append({"model": f"{label} early-exit@{args.threshold}", "val": val["acc"], "test": test["acc"],
                     "mflops": exp_flops / 1e6, "kparams": sum(p.numel() for p in early.parameters()) / 1e3,
                     "ms": val["mean_ms"], "ort_ms": float("nan"),
                     "note": "mean, not p50; exits " + "/".join(f"{f:.0%}" for f in fracs)})

    print(f"\nself-distillation on digits 32x32, {args.epochs:g} epochs, seed {args.seed}, "
          f"latency = CPU batch-1, 1 thread, p50 (eager torch | onnxruntime)")
    header = f"{'model':<28} {'val':>6} {'test':>6} {'MFLOPs':>7} {'Kparams':>8} {'torch ms':>8} {'ort ms':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<28} {100 * r['val']:6.2f} {100 * r['test']:6.2f} {r['mflops']:7.2f} "
              f"{r['kparams']:8.1f} {r['ms']:8.2f} {r['ort_ms']:7.3f}  {r.get('note', '')}")


if __name__ == "__main__":
    main()
