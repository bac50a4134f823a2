"""Data-parallel training: one process vs ``torchrun`` with 1 and N processes, same global batch.

    python bench/distributed.py [--epochs 2] [--max-steps N] [--optimizer sgd] [--processes 2] [--device cpu]

Trains self-distillation (demo config) on the bundled digits four ways and prints one table:
  * in-process: the pipeline's path for ``runtime.processes: 1`` (all cores to one process), and
    again on one thread: the weights move by float summation order alone, the noise floor;
  * torchrun x1: the distributed path with one process (its start-up and hand-over cost);
  * torchrun xN: N data-parallel processes, cores split evenly between them (gloo on CPU).
Wall time includes loading the data and, for torchrun, starting the processes and passing the
trained space back. The last columns compare with the first row: same global batch, so the
data-parallel model should differ no more than the one-thread run does.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from podium.config import parse_config  # noqa: E402
from podium.methods.catalog import method_class  # noqa: E402
from podium.methods.train import evaluate  # noqa: E402
from podium.tasks.common import DatasetRef, RunContext, load_data  # noqa: E402
from podium.tasks.distributed import fit_distributed  # noqa: E402

METHOD = "self_distill"  # needs no anchors, so the bench trains nothing else


def context(store: Path, method: str, epochs: int, processes: int, device: str, max_steps: int | None,
            optimizer: str) -> RunContext:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["store"] = {"uri": str(store)}
    raw["runtime"] = {"processes": processes, "device": device, "checkpoint_every_s": 3600}
    raw["methods"] = {method: {"train": {"epochs": epochs, "max_steps": max_steps, "optimizer": optimizer}}}
    if method == "self_distill":
        raw["methods"][method]["train_baseline"] = False
    return RunContext(cfg=parse_config(raw), project_dir=str(REPO), run_id="", git_sha="bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ref = DatasetRef(root=str(REPO / "data" / "digits"), data_hash="bench-distributed")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = context(Path(tmp) / "store", METHOD, args.epochs, 1, args.device, args.max_steps, args.optimizer)
        data = load_data(ctx, ref)
        cores = torch.get_num_threads()
        for threads in (cores, 1):  # 1 thread: how far float summation order alone moves the weights
            torch.set_num_threads(threads)
            start = time.perf_counter()
            space = method_class(METHOD)(ctx.cfg.method_config(METHOD)).fit(load_data(ctx, ref), [], None)
            rows.append((f"in-process, {threads} thread(s)", 1, time.perf_counter() - start, space))
        torch.set_num_threads(cores)
        for processes in (1, args.processes):
            ctx = context(Path(tmp) / f"store{processes}", METHOD, args.epochs, processes, args.device,
                          args.max_steps, args.optimizer)
            start = time.perf_counter()
            space = fit_distributed(ctx, ref, METHOD, [], None, f"bench-{processes}")
            rows.append((f"torchrun x{processes}", processes, time.perf_counter() - start, space))

    reference = rows[0][3].model.state_dict()
    print(f"\n{METHOD}, {args.epochs} epochs, {args.optimizer}, device {args.device}, {cores} cores here")
    print("| run | processes | wall s | vs in-process | deepest exit val acc | largest relative weight difference |")
    print("|---|---|---|---|---|---|")
    for name, processes, wall, space in rows:
        state = space.model.state_dict()
        diff, worst = max(((state[k] - reference[k]).abs().max().item() / reference[k].abs().max().clamp(min=1e-12).item(), k)
                          for k in reference if reference[k].is_floating_point() and "running" not in k)
        accuracy = evaluate(space.model, data.val)
        print(f"| {name} | {processes} | {wall:.1f} | {wall / rows[0][2]:.2f}x | {accuracy:.4f} | {diff:.2e} ({worst}) |")


if __name__ == "__main__":
    main()
