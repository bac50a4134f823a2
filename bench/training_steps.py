"""Training-step speed per model family on this CPU, against its matmul peak: which of channels-last,
glibc allocator tuning and ``torch.compile`` pay?

Families, built as the demo builds them (``configs/demo.yaml`` and the methods' defaults): the two
ResNet anchors (``resnet-tiny``, ``resnet-small``), the scaling method's RegNet at s=1 and s=4
(``regnet-s1``, ``regnet-s4``: ``plan_scales`` of the default ``ScalingConfig``, each at its planned
resolution), the Once-for-All supernet with its largest sub-network active (``ofa-max``) and the
self-distillation multi-exit ResNet with its own loss (``self-distill``). Input: batch 64 of random
1x32x32 images, 10 classes (``--image-size 96 --in-chans 3`` for photo-sized rows; RegNet's base
resolution follows ``--image-size``).

A training step is forward, loss (cross-entropy; self-distill: its three-term loss), backward and
an optimizer step (``methods.train.make_optimizer``: timm's nesterov SGD, as every training uses),
on ``--threads`` threads (default 1). Steps are timed in blocks of ~``--block-s`` seconds after
warm-up. Each variant runs ``--blocks`` blocks interleaved with the baseline (A B A B ...), so drift
hits both alike; its figure is the median of the per-pair speed ratios (variant / baseline, > 1 =
faster) with the 95 % interval of that median (``profiling.median_interval``):

- ``ch-last``: model and inputs in ``torch.channels_last``.
- ``alloc``: ``methods.host.tune_allocator()`` (glibc's trim and mmap thresholds at 256 MiB). It is
  process-wide and cannot be undone, so the pair runs as two child processes of this bench, one
  tuned and one not, driven block by block in turn; ``minflt/step`` are the minor page faults per
  step (``getrusage``) of the untuned/tuned child.
- ``compiled``: ``torch.compile`` (inductor) of the model (self-distill: of its ``forward_exits``).
  ``compile s`` is the first compiled step's wall time less an eager step's; ``break-even`` is the
  number of steps after which compiling has paid, ``compile_s / (eager step s - compiled step s)``,
  "never" when the compiled step is not faster. A compile failure is printed in the row's note.
  ``TORCHINDUCTOR_COMPILE_THREADS`` defaults to 1 here (no pool of compile workers on a shared box).

``steps/s`` and ``img/s`` are the baseline's (NCHW, default allocator, eager; median of its blocks).
``GFLOP/s`` = 3 x forward FLOPs per image x img/s / 1e9, with forward FLOPs = 2 x the multiply-adds
``complexity.count`` reports (it counts multiply-adds, the peak counts a multiply-add as 2 FLOPs) and
backward taken as twice the forward. ``%peak`` is that against this machine's one-process fp32
matmul peak on the same threads (1024x1024 @ 1024x1024 ``torch.mm`` blocks, 2 n^3 FLOPs each; the
best block), printed at the top with the load average; the load average is printed again at the end.
Small convolutions reach a small fraction of the matmul peak: the low figures say how much of a
step is framework overhead and memory traffic rather than arithmetic.

    .venv/bin/python bench/training_steps.py [--quick] [--families resnet-tiny,regnet-s4] [--blocks 10]
        [--threads 1] [--image-size 96 --in-chans 3] [--no-compile]

``--quick``: resnet-tiny only (unless ``--families`` says otherwise), 4 blocks of ~0.25 s: a smoke run
(~1.5 min here, most of it compiling). The full bench takes roughly 10 minutes on this 2-core machine.
Run it on a quiet machine: another busy process skews every ratio's interval and the compile times.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # read when inductor is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from podium.errors import ConfigError, PodiumError  # noqa: E402
from podium.methods.complexity import count  # noqa: E402
from podium.methods.families import build  # noqa: E402
from podium.methods.host import tune_allocator  # noqa: E402
from podium.methods.profiling import median_interval  # noqa: E402
from podium.methods.train import TrainConfig, make_optimizer  # noqa: E402

BATCH, NUM_CLASSES = 64, 10
BATCH_POOL = 4  # distinct random batches cycled through, so the steps do not fit one batch
WARMUP_STEPS = 3
QUICK_FAMILY = "resnet-tiny"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def compile_model(model: nn.Module) -> nn.Module:
    return torch.compile(model)


@dataclass
class Workload:
    """One family's training step: a fresh (seeded) model, its loss, its input and how to compile it."""

    name: str
    size: tuple[int, int]
    in_chans: int
    make: Callable[[], nn.Module]
    loss: LossFn = cross_entropy
    compile: Callable[[nn.Module], nn.Module] = compile_model

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().train()


# ------------------------------------------------------------------------------------------- families


def resnet(name: str, arch: dict[str, Any], image_size: int, in_chans: int) -> Workload:
    return Workload(name, (image_size, image_size), in_chans, lambda: build(arch, NUM_CLASSES, in_chans))


def regnet(name: str, s: float, image_size: int, in_chans: int) -> Workload:
    from podium.methods.scaling.config import ScalingConfig
    from podium.methods.scaling.plan import plan_scales

    cfg = ScalingConfig(base={"resolution": image_size}, scales=[s])  # the demo's family, strategy, base
    plan = plan_scales(cfg, NUM_CLASSES, in_chans)[0]
    return Workload(name, (plan.resolution, plan.resolution), in_chans, lambda: build(plan.arch, NUM_CLASSES, in_chans))


def ofa_max(name: str, image_size: int, in_chans: int) -> Workload:
    from podium.methods.shrinking import OFASupernet, ShrinkingConfig

    # a new supernet's active sub-network is the largest (every unit at max depth, kernel and expand)
    return Workload(name, (image_size, image_size), in_chans,
                    lambda: OFASupernet(ShrinkingConfig(), in_chans, NUM_CLASSES))


def self_distill(name: str, image_size: int, in_chans: int) -> Workload:
    from podium.methods.self_distill import MultiExitNet, SelfDistillConfig, model_loss

    cfg = SelfDistillConfig()

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model_loss(model, images, labels, cfg).total

    def compile_exits(model: nn.Module) -> nn.Module:
        # the loss calls forward_exits, which torch.compile(model) would leave eager
        model.forward_exits = torch.compile(model.forward_exits)
        return model

    return Workload(name, (image_size, image_size), in_chans,
                    lambda: MultiExitNet(build(cfg.backbone, NUM_CLASSES, in_chans), NUM_CLASSES),
                    loss=loss, compile=compile_exits)


def demo_anchor(name: str) -> dict[str, Any]:
    import yaml

    anchors = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["anchors"]
    return next(a["arch"] for a in anchors if a["name"] == name)


FAMILIES: dict[str, Callable[[int, int], Workload]] = {
    "resnet-tiny": lambda size, chans: resnet("resnet-tiny", demo_anchor("resnet-tiny"), size, chans),
    "resnet-small": lambda size, chans: resnet("resnet-small", demo_anchor("resnet-small"), size, chans),
    "regnet-s1": lambda size, chans: regnet("regnet-s1", 1.0, size, chans),
    "regnet-s4": lambda size, chans: regnet("regnet-s4", 4.0, size, chans),
    "ofa-max": lambda size, chans: ofa_max("ofa-max", size, chans),
    "self-distill": lambda size, chans: self_distill("self-distill", size, chans),
}


def workload(name: str, image_size: int, in_chans: int) -> Workload:
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name](image_size, in_chans)


# ------------------------------------------------------------------------------------------- stepping


class Stepper:
    """Training steps of one model copy: ``run`` is what is called (maybe compiled), ``model`` what SGD updates."""

    def __init__(self, work: Workload, model: nn.Module, run: nn.Module | None = None, channels_last: bool = False):
        memory = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.work, self.model, self.run = work, model, run if run is not None else model
        self.optimizer = make_optimizer(model, TrainConfig(lr=0.01))
        gen = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(BATCH, work.in_chans, *work.size, generator=gen).to(memory_format=memory),
                         torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)) for _ in range(BATCH_POOL)]
        self.done = 0

    def step(self) -> None:
        images, labels = self.batches[self.done % BATCH_POOL]
        self.optimizer.zero_grad(set_to_none=True)
        self.work.loss(self.run, images, labels).backward()
        self.optimizer.step()
        self.done += 1

    def block(self, steps: int) -> tuple[float, int]:
        """Wall seconds of ``steps`` steps and the minor page faults they took."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    def warm_up(self, steps: int = WARMUP_STEPS) -> float:
        """Runs ``steps`` steps; the median seconds of one."""
        return statistics.median(self.block(1)[0] for _ in range(steps))


@dataclass
class Pairs:
    """Interleaved blocks of a baseline and a variant: seconds per block, same steps in each."""

    base_s: list[float] = field(default_factory=list)
    variant_s: list[float] = field(default_factory=list)
    base_faults: list[int] = field(default_factory=list)
    variant_faults: list[int] = field(default_factory=list)

    def add(self, base: tuple[float, int], variant: tuple[float, int]) -> None:
        self.base_s.append(base[0])
        self.variant_s.append(variant[0])
        self.base_faults.append(base[1])
        self.variant_faults.append(variant[1])

    def speedup(self) -> tuple[float, float, float]:
        """Median variant/baseline speed ratio of the pairs and its 95 % interval."""
        ratios = [b / v for b, v in zip(self.base_s, self.variant_s)]
        low, high = median_interval(ratios)
        return statistics.median(ratios), low, high


def interleave(base: Callable[[int], tuple[float, int]], variant: Callable[[int], tuple[float, int]],
               steps: int, blocks: int) -> Pairs:
    pairs = Pairs()
    for _ in range(blocks):
        pairs.add(base(steps), variant(steps))
    return pairs


# ------------------------------------------------------------------------ allocator child processes


def child_main(args: argparse.Namespace) -> None:
    """A child of the allocator pair: tune (or not), build, warm up, say ready, then time a block per
    ``block N`` line on stdin, answering each with one JSON line."""
    torch.set_num_threads(args.threads)
    tuned = tune_allocator() if args.allocator == "on" else False
    work = workload(args.child, args.image_size, args.in_chans)
    stepper = Stepper(work, work.model())
    stepper.warm_up()
    print(json.dumps({"tuned": tuned}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] != ["block"]:
            break
        seconds, faults = stepper.block(int(command[1]))
        print(json.dumps({"s": seconds, "faults": faults}), flush=True)


class Child:
    """One allocator child of this bench, driven over its stdin/stdout."""

    def __init__(self, family: str, allocator: str, args: argparse.Namespace):
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", family, "--allocator", allocator,
                   "--threads", str(args.threads), "--image-size", str(args.image_size), "--in-chans", str(args.in_chans)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.allocator = allocator

    def answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = [row for row in self.log.read().splitlines() if row.strip()][-1:] or ["no output"]
            raise RuntimeError(f"allocator child ({self.allocator}) exited {self.proc.returncode}: {tail[0]}")
        return json.loads(line)

    def block(self, steps: int) -> tuple[float, int]:
        self.proc.stdin.write(f"block {steps}\n")
        reply = self.answer()
        return reply["s"], reply["faults"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def allocator_pairs(family: str, args: argparse.Namespace, steps: int) -> tuple[Pairs, bool]:
    """The untuned (baseline) and tuned child, a block each in turn; whether the tuning took."""
    children = [Child(family, "off", args), Child(family, "on", args)]
    try:
        _off, on = (child.answer() for child in children)  # both built and warmed up
        return interleave(children[0].block, children[1].block, steps, args.blocks), bool(on["tuned"])
    finally:
        for child in children:
            child.close()


# ------------------------------------------------------------------------------------------- the rows


@dataclass
class Row:
    name: str
    input: str
    fwd_flops: float  # per image, FLOPs (2 x multiply-adds)
    steps_per_s: float
    channels_last: tuple[float, float, float] | None = None
    allocator: tuple[float, float, float] | None = None
    faults_per_step: tuple[float, float] | None = None
    compile_s: float | None = None
    compiled: tuple[float, float, float] | None = None
    break_even: str = ""
    notes: list[str] = field(default_factory=list)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def measure_family(name: str, args: argparse.Namespace) -> Row:
    work = workload(name, args.image_size, args.in_chans)
    base = Stepper(work, work.model())
    step_s = base.warm_up()
    steps = max(1, round(args.block_s / step_s))
    macs = count(work.model().eval(), work.size, work.in_chans).flops
    row = Row(name, f"{work.in_chans}x{work.size[0]}x{work.size[1]}", 2.0 * macs, 0.0)
    base_blocks: list[float] = []

    channels_last = Stepper(work, work.model(), channels_last=True)
    channels_last.warm_up()
    pairs = interleave(base.block, channels_last.block, steps, args.blocks)
    row.channels_last = pairs.speedup()
    base_blocks += pairs.base_s

    try:
        pairs, tuned = allocator_pairs(name, args, steps)
        row.allocator = pairs.speedup()
        row.faults_per_step = (statistics.median(pairs.base_faults) / steps, statistics.median(pairs.variant_faults) / steps)
        if not tuned:
            row.notes.append("tune_allocator() returned False: the 'on' child ran untuned")
    except Exception as error:  # a crashed child: report it in the row, keep the other variants
        row.notes.append(f"allocator: {one_line(error)}")

    if not args.no_compile:
        try:
            torch._dynamo.reset()  # each family's compile time on its own, no graphs cached by an earlier one
            model = work.model()
            compiled = Stepper(work, model, run=work.compile(model))
            start = time.perf_counter()
            compiled.step()
            first_s = time.perf_counter() - start
            compiled.warm_up()
            pairs = interleave(base.block, compiled.block, steps, args.blocks)
            row.compiled = pairs.speedup()
            base_blocks += pairs.base_s
            eager_step = statistics.median(pairs.base_s) / steps
            compiled_step = statistics.median(pairs.variant_s) / steps
            row.compile_s = max(0.0, first_s - eager_step)
            saved = eager_step - compiled_step
            row.break_even = f"{math.ceil(row.compile_s / saved)}" if saved > 0 else "never"
        except Exception as error:  # inductor needs a C++ compiler and supports most, not all, graphs
            row.notes.append(f"compile failed: {one_line(error)}")

    row.steps_per_s = steps / statistics.median(base_blocks)
    return row


# ------------------------------------------------------------------------------------------- output


def matmul_peak(threads: int, n: int = 1024, blocks: int = 5, block_s: float = 0.3) -> tuple[float, float]:
    """fp32 ``torch.mm`` GFLOP/s of n x n @ n x n on ``threads`` threads: (best block, median block)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    start = time.perf_counter()
    torch.mm(a, b)
    reps = max(1, round(block_s / (time.perf_counter() - start)))
    rates = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return max(rates), statistics.median(rates)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def ratio_text(ratio: tuple[float, float, float] | None) -> str:
    return "-" if ratio is None else f"{ratio[0]:.2f} [{ratio[1]:.2f},{ratio[2]:.2f}]"


def print_table(rows: list[Row], peak: float) -> None:
    header = ["family", "input", "MFLOP/img", "steps/s", "img/s", "GFLOP/s", "%peak", "ch-last x [95%]",
              "alloc x [95%]", "minflt/step off/on", "compile s", "compiled x [95%]", "break-even", "note"]
    table = [header]
    for r in rows:
        gflops = 3 * r.fwd_flops * r.steps_per_s * BATCH / 1e9
        faults = "-" if r.faults_per_step is None else f"{r.faults_per_step[0]:.0f}/{r.faults_per_step[1]:.0f}"
        table.append([r.name, r.input, f"{r.fwd_flops / 1e6:.1f}", f"{r.steps_per_s:.2f}", f"{r.steps_per_s * BATCH:.0f}",
                      f"{gflops:.2f}", f"{100 * gflops / peak:.1f}", ratio_text(r.channels_last), ratio_text(r.allocator),
                      faults, "-" if r.compile_s is None else f"{r.compile_s:.1f}", ratio_text(r.compiled),
                      r.break_even or "-", "; ".join(r.notes)])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FAMILY} only, 4 blocks of ~0.25 s")
    parser.add_argument("--families", default=None, help=f"comma-separated, of: {','.join(FAMILIES)}")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per variant (default 10, quick 4)")
    parser.add_argument("--block-s", type=float, default=None, help="seconds per block (default 0.5, quick 0.25)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # an allocator child: the family
    parser.add_argument("--allocator", choices=("on", "off"), default="off", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.blocks = args.blocks or (4 if args.quick else 10)
    args.block_s = args.block_s or (0.25 if args.quick else 0.5)
    if args.blocks < 1 or args.block_s <= 0 or args.threads < 1 or args.image_size < 8 or args.in_chans < 1:
        raise ConfigError("--blocks, --threads and --in-chans must be >= 1, --block-s > 0, --image-size >= 8")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        if args.child:
            child_main(args)
            return
        names = args.families.split(",") if args.families else [QUICK_FAMILY] if args.quick else list(FAMILIES)
        for name in names:
            workload(name, args.image_size, args.in_chans)  # fail on a bad name before measuring anything
    except PodiumError as error:
        sys.exit(f"error: {error}")
    print(f"load average at start: {load_average()}", flush=True)
    peak, peak_median = matmul_peak(args.threads)
    torch.set_num_threads(args.threads)
    print(f"fp32 matmul peak, {args.threads} thread(s): {peak:.1f} GFLOP/s (best block; median {peak_median:.1f}); "
          f"batch {BATCH}, {args.blocks} blocks of ~{args.block_s:g} s per variant; torch {torch.__version__}", flush=True)
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure_family(name, args))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print()
    print_table(rows, peak)
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
