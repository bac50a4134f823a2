"""What a crash costs: checkpoint overhead and the time lost to a kill in the middle of a training.

    python bench/resume.py [--epochs 4] [--every 10] [--kill-after 1.5] [--threads 1]

Trains the demo's larger anchor (timm-style ResNet [2,2,2,2], 32-64-128-256) on the bundled
digits with the one training loop, three ways, and prints one table:
  * plain: no checkpoints;
  * checkpointed: a checkpoint every ``--every`` seconds into a local artifact store (the same
    code path as the pipeline: tasks.common.StoreCheckpoints);
  * killed + resumed: the training dies ``--kill-after`` checkpoint intervals in (1.5: half way
    between the first and the second checkpoint, so there is always one to resume from and half an
    interval of work to lose; the step is placed from the checkpointed run's own step rate), by an
    exception at that step, the in-process stand-in for SIGKILL that tests/test_crash_resume.py does
    for real; then a fresh model resumes from the last checkpoint. Lost time = (killed part +
    resumed part) - checkpointed. A training too short for the kill to follow a checkpoint is refused.
The resumed model's weights are compared with the uninterrupted checkpointed run's (bit-exact
expected: the checkpoint holds every random state and the position in the epoch).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from podium.methods.checkpoint import TrainingEnv, training_env  # noqa: E402
from podium.methods.families import build  # noqa: E402
from podium.methods.train import TrainConfig, cross_entropy_loss, fit, total_steps  # noqa: E402
from podium.registry.stores import LocalStore  # noqa: E402
from podium.tasks.common import StoreCheckpoints  # noqa: E402
from tests.conftest import digits_bundle  # noqa: E402

ARCH = {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]}


class Killed(RuntimeError):
    pass


def run(cfg: TrainConfig, store: Path | None, every_s: float, kill_at: int | None = None) -> tuple[float, object, object]:
    data = digits_bundle()
    torch.manual_seed(0)
    model = build(ARCH, num_classes=10, in_chans=1)
    loss = cross_entropy_loss(model)

    def maybe_killed(images, labels, step):
        if step == kill_at:
            raise Killed
        return loss(images, labels, step)

    checkpoints = StoreCheckpoints(LocalStore(store), "bench") if store else None
    start = time.perf_counter()
    result = None
    with training_env(TrainingEnv("cpu", checkpoints, every_s)):
        try:
            result = fit(model, data.train, maybe_killed, cfg, name="anchor resnet-small")
        except Killed:
            pass
    return time.perf_counter() - start, model, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--every", type=float, default=10.0, help="checkpoint interval, seconds")
    parser.add_argument("--kill-after", type=float, default=1.5, help="kill this many checkpoint intervals in")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, lr=0.1, log_every_s=1e9)
    steps = total_steps(cfg, len(digits_bundle().train))
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, _, _ = run(cfg, None, args.every)
        saved_s, reference, _ = run(cfg, Path(tmp) / "full", args.every)
        kill_at = round(args.kill_after * args.every * steps / saved_s)
        if not args.every * steps / saved_s <= kill_at < steps:
            raise SystemExit(f"error: a kill {args.kill_after:g} intervals of {args.every:g} s in is step {kill_at}, "
                             f"but the first checkpoint comes at step {round(args.every * steps / saved_s)} and the "
                             f"training has {steps}: lower --every or raise --epochs")
        killed_s, _, _ = run(cfg, Path(tmp) / "killed", args.every, kill_at=kill_at)
        resumed_s, resumed, result = run(cfg, Path(tmp) / "killed", args.every)
        size = sum(p.stat().st_size for p in (Path(tmp) / "full").rglob("*.pt"))
    same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))
    lost = killed_s + resumed_s - saved_s
    rows = [
        ("plain (no checkpoints)", f"{plain_s:.1f} s", ""),
        (f"checkpointed every {args.every:g} s", f"{saved_s:.1f} s",
         f"overhead {100 * (saved_s - plain_s) / plain_s:+.1f}% (checkpoint {size / 1e6:.1f} MB)"),
        (f"killed at step {kill_at}/{steps}", f"{killed_s:.1f} s",
         f"{args.kill_after:g} checkpoint intervals in"),
        (f"resumed from step {result.resumed_at}", f"{resumed_s:.1f} s",
         f"lost {lost:.1f} s = {100 * lost / saved_s:.1f}% of the training; weights bit-identical: {same}"),
    ]
    print(f"\nresnet-small on digits, {steps} steps, {args.threads} threads")
    print(f"| {'run':<32} | {'wall':>8} | notes")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 60}")
    for name, wall, note in rows:
        print(f"| {name:<32} | {wall:>8} | {note}")


if __name__ == "__main__":
    main()
