"""The one profiler: measured latency and memory of models on a device profile.

Latency is always measured, never estimated. Candidates are timed in interleaved rounds (A B C, B C A,
...) after each has warmed up until its timings are stable, so drift on a shared machine hits all of
them alike. Every round records whether the process was kept waiting for a CPU by another task
(its threads' run-queue delay, ``/proc/self/task/*/schedstat``) or its CPUs were taken by the
hypervisor (their ``steal`` in ``/proc/stat`` grew). Disturbed rounds are answered with more rounds,
and the statistics come from undisturbed ones when there are enough; otherwise the result is marked
``noisy``.
The median carries a distribution-free 95 % interval (order statistics of the round medians).

:func:`measure_isolated` runs all of a device's candidates in one dedicated process (``python -m
podium.methods.profiling``) pinned to fixed cores (``os.sched_setaffinity``) with the runtime's threads
fixed; :func:`measure` times one model in this process (latency lookup tables, benches).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from podium.methods.base import StrictModel
from podium.methods.runtimes import Source, get_runtime, runtime_names

if TYPE_CHECKING:
    from torch import nn


class DeviceProfile(StrictModel):
    """A deployment target: how to run the model there, what it may cost, and how hard to measure."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    runtime: str = "torch"  # a name in podium.methods.runtimes.RUNTIMES
    threads: int = Field(1, ge=1, le=256)
    batch_size: int = Field(1, ge=1, le=4096)
    latency_budget_ms: float = Field(gt=0, le=600_000)
    memory_budget_mb: float = Field(1024.0, gt=0, le=1_048_576)
    work_pool: str | None = None  # Prefect work pool of a worker on that hardware; None = profile here
    # what the device accepts; each beyond fp32 adds derived candidates (quantised from the best FP32 ones)
    precisions: tuple[Literal["fp32", "fp16", "int8"], ...] = ("fp32",)
    cores: tuple[int, ...] | None = None  # CPUs the measurement is pinned to; None: the last `threads` allowed
    warmup: int = Field(5, ge=0)  # runs per warm-up block; blocks repeat until two medians agree
    round_repeats: int = Field(5, ge=1)  # timed runs of each candidate per round
    min_rounds: int = Field(10, ge=3)
    max_rounds: int = Field(60, ge=3)
    max_seconds: float = Field(10.0, gt=0)  # per candidate, warm-up excluded
    stable_tolerance: float = Field(0.03, gt=0)  # wanted half-width of the median's interval (relative)
    # share of disturbed rounds beyond which a measurement short of min_rounds clean ones is noisy
    max_disturbed: float = Field(0.5, ge=0, le=1)
    # p50 (ms) of REFERENCE on this device: latencies are reported at this speed (see normalise_to_reference).
    # None: this process's own reference measurement (tasks.profile keeps the first clean one per host)
    reference_ms: float | None = Field(None, gt=0)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in runtime_names():
            raise ValueError(f"unknown runtime {value!r}; known runtimes: {', '.join(runtime_names())}")
        return value

    @model_validator(mode="after")
    def _rounds_ordered(self) -> "DeviceProfile":
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) < min_rounds ({self.min_rounds})")
        if self.cores is not None and len(set(self.cores)) != self.threads:
            raise ValueError(f"cores {list(self.cores)}: give one distinct core per thread ({self.threads})")
        return self

    @model_validator(mode="after")
    def _runtime_can_build(self) -> "DeviceProfile":
        if not self.precisions or len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions {list(self.precisions)}: list each precision once, at least one")
        runtime = get_runtime(self.runtime)
        if self.batch_size > runtime.max_batch:
            raise ValueError(f"batch_size {self.batch_size}: runtime {self.runtime!r} takes batches of at most "
                             f"{runtime.max_batch}")
        supported = runtime.precisions
        unsupported = [p for p in self.precisions if p not in supported]
        if unsupported:
            raise ValueError(f"runtime {self.runtime!r} cannot build {', '.join(unsupported)} "
                             f"(it supports {', '.join(supported)})")
        return self


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    iqr_ms: float
    runs: int
    peak_mem_mb: float  # model load + first batch: fresh-process high-water mark, or torch's allocator
    runtime: str
    threads: int
    batch_size: int
    precision: str = "fp32"  # of the artifact measured
    p50_low_ms: float = math.nan  # 95 % interval of the median
    p50_high_ms: float = math.nan
    rounds: int = 0  # rounds the statistics come from
    noisy: bool = False  # interference was seen and more rounds did not get past it
    interference: str = ""  # what was seen: disturbed rounds, spread, load
    cores: str = ""  # CPUs it was pinned to ("" = not pinned)
    raw_p50_ms: float = math.nan  # the p50 this process timed, before normalising to the reference speed
    reference_p50_ms: float = math.nan  # the reference network's p50 in the same process and rounds
    reference_ms: float = math.nan  # the reference speed the p50s are reported at (nan: not normalised)
    reference_input: str = ""  # CxHxW the reference ran at

    def as_dict(self) -> dict:
        return asdict(self)

    def budget_verdict(self, budget_ms: float) -> Literal["within", "over", "ambiguous"]:
        """Within the budget only when the whole interval is; ``ambiguous`` when it straddles it."""
        high = self.p50_high_ms if not math.isnan(self.p50_high_ms) else self.p50_ms
        low = self.p50_low_ms if not math.isnan(self.p50_low_ms) else self.p50_ms
        return "within" if high <= budget_ms else ("over" if low > budget_ms else "ambiguous")

    def interval_text(self) -> str:
        return f"{self.p50_ms:.3f} [{self.p50_low_ms:.3f}, {self.p50_high_ms:.3f}] ms"


# ------------------------------------------------------------------------------ timing in rounds

def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval of the median: order statistics ``k`` and ``n-k+1`` with ``k`` the
    largest rank whose binomial(n, 1/2) tail stays within ``(1-confidence)/2``."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    return ordered[max(k - 1, 0)], ordered[min(n - k, n - 1)]


def _waiting_ns() -> int:
    """Nanoseconds this process's threads have spent runnable but waiting for a CPU (0 if unknown)."""
    total = 0
    try:
        for task in os.scandir("/proc/self/task"):
            with open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return total


def _steal_ticks(cores: set[int]) -> int:
    """Ticks the hypervisor took from ``cores`` (the ``steal`` column of ``/proc/stat``; 0 if unknown)."""
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    total += int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0
    return total


class _Disturbance:
    """Whether one round was disturbed: "waiting" (another task here held the CPU) or "steal"."""

    def __init__(self) -> None:
        self.cores = os.sched_getaffinity(0)
        self.waiting, self.steal = _waiting_ns(), _steal_ticks(self.cores)

    def since(self, wall_ns: int) -> str:
        waiting, steal = _waiting_ns(), _steal_ticks(self.cores)
        if waiting - self.waiting > 0.01 * wall_ns:  # kept waiting over 1 % of the round
            return "waiting"
        return "steal" if steal > self.steal else ""


@dataclass
class _Track:
    run: Callable[[], object]
    samples: list[list[float]]  # per round
    disturbed: list[str]  # per round: "" (clean), "waiting" or "steal"
    seconds: float = 0.0
    nearby_reference: list[float] = field(default_factory=list)  # per round: the reference block timed just before

    def used_rounds(self, min_rounds: int) -> list[list[float]]:
        """Undisturbed rounds when there are enough of them, else every round."""
        clean = [r for r, d in zip(self.samples, self.disturbed) if not d]
        return clean if len(clean) >= min_rounds else self.samples

    def settled(self, profile: DeviceProfile) -> bool:
        clean = sum(not d for d in self.disturbed)
        if clean < profile.min_rounds:
            return False
        medians = [statistics.median(r) for r in self.used_rounds(profile.min_rounds)]
        low, high = median_interval(medians)
        return (high - low) / 2 <= profile.stable_tolerance * statistics.median(medians)


def _warm_up(run: Callable[[], object], profile: DeviceProfile, max_blocks: int = 10) -> None:
    """Blocks of ``profile.warmup`` runs until two consecutive blocks' medians agree (caches, JIT, turbo)."""
    if profile.warmup == 0:
        return
    previous = None
    for _ in range(max_blocks):
        block = []
        for _ in range(profile.warmup):
            start = time.perf_counter()
            run()
            block.append(time.perf_counter() - start)
        median = statistics.median(block)
        if previous is not None and abs(median - previous) <= profile.stable_tolerance * previous:
            return
        previous = median


def time_in_rounds(runs: dict[str, Callable[[], object]], profile: DeviceProfile, reference: str | None = None,
                   reference_every: int = 0) -> dict[str, dict[str, Any]]:
    """Time every ``runs[name]()`` in interleaved rounds; per name its samples (ms) and noise record.

    With ``reference`` (one of the names), the reference's block opens every round, and again before
    every ``reference_every`` other runs when that is > 0 (a lookup table's round of 150 models lasts
    seconds, and the host's speed moves faster than that); every other block is normalised to the
    reference block timed just before it (:func:`normalise_to_reference`) before any statistic or
    stopping decision. The reference's own entry stays raw, from the block that opens each round.
    Stops when every candidate has ``min_rounds`` undisturbed rounds whose median
    interval is within ``stable_tolerance``, or at ``max_rounds``, or when the timed runs have taken
    ``max_seconds`` per candidate in all (a lookup table of 140 layers at 0.5 s each: 70 s at most)."""
    tracks = {name: _Track(run, [], []) for name, run in runs.items()}
    for track in tracks.values():
        _warm_up(track.run, profile)
    names = [n for n in tracks if n != reference]
    loads = []

    def judged() -> dict[str, _Track]:
        if reference is None:
            return tracks
        ref = tracks[reference]
        return {name: (t if name == reference else normalise_to_reference(t, ref, profile.reference_ms))
                for name, t in tracks.items()}

    def timed_block(track: _Track) -> tuple[list[float], str]:
        watch, began = _Disturbance(), time.perf_counter_ns()
        block = []
        for _ in range(profile.round_repeats):
            start = time.perf_counter()
            track.run()
            block.append((time.perf_counter() - start) * 1e3)
        wall = time.perf_counter_ns() - began
        track.seconds += wall / 1e9
        return block, watch.since(wall)

    every = reference_every if reference_every > 0 else len(names)
    for round_index in range(profile.max_rounds):
        loads.append(os.getloadavg()[0])
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if reference is not None:
            order = [n for i in range(0, len(order), every) for n in [reference, *order[i:i + every]]]
        nearby = math.nan
        for name in order:
            track = tracks[name]
            block, disturbed = timed_block(track)
            if name == reference:
                nearby = statistics.median(block)
                if len(track.samples) > round_index:
                    continue  # a repeat within the round: only the scale of the blocks after it
            track.samples.append(block)
            track.disturbed.append(disturbed)
            track.nearby_reference.append(nearby)
        done = round_index + 1 >= profile.min_rounds and all(t.settled(profile) for t in judged().values())
        if done or sum(t.seconds for t in tracks.values()) > profile.max_seconds * len(tracks):
            break  # settled, or the time of max_seconds per candidate is spent
    summaries = {name: _summary(track, profile, loads) for name, track in judged().items()}
    for name, track in tracks.items():
        summaries[name]["raw_p50_ms"] = float(np.median([s for r in track.used_rounds(profile.min_rounds) for s in r]))
    if reference is not None:
        own = statistics.median(statistics.median(r) for r in tracks[reference].samples)
        speed = profile.reference_ms if profile.reference_ms is not None else own
        for name in names:
            if name != reference:
                summaries[name].update(reference_p50_ms=summaries[reference]["raw_p50_ms"], reference_ms=speed)
                if own > SLOW_HOST * speed:
                    note = f"host at {own / speed:.2f}x the reference time"
                    summaries[name]["interference"] = "; ".join(x for x in (summaries[name]["interference"], note) if x)
    return summaries


def normalise_to_reference(track: _Track, reference: _Track, speed_ms: float | None) -> _Track:
    """``track`` as if every block had run at the reference speed: each sample times ``speed_ms`` over the
    median of the reference block timed just before it (``speed_ms`` None: the reference's median over
    its rounds).

    The host's speed moves from second to second on a shared machine (other tenants, frequency, cache
    contention) and moves every model alike, so the ratio to a fixed network timed next to it repeats
    across processes far better than the time does (bench/profiler.py); in a lookup table's long rounds,
    a reference timed every 10 models narrowed the networks' intervals 2-3x against one factor for the
    whole process. A round counts as disturbed when either was."""
    scale = speed_ms if speed_ms is not None else statistics.median(statistics.median(r) for r in reference.samples)
    return _Track(track.run, [[s * scale / m for s in block] for block, m in zip(track.samples, track.nearby_reference)],
                  [d or r for d, r in zip(track.disturbed, reference.disturbed)], track.seconds, track.nearby_reference)


def _summary(track: _Track, profile: DeviceProfile, loads: list[float]) -> dict[str, Any]:
    rounds = track.used_rounds(profile.min_rounds)
    samples = np.asarray([s for r in rounds for s in r])
    q25, p50, q75, p90 = (float(v) for v in np.percentile(samples, [25, 50, 75, 90]))
    low, high = median_interval([statistics.median(r) for r in rounds])
    low, high = min(low, p50), max(high, p50)
    disturbed = sum(bool(d) for d in track.disturbed)
    kinds = ", ".join(f"{kind} {track.disturbed.count(kind)}" for kind in ("waiting", "steal")
                      if kind in track.disturbed)
    half_width = (high - low) / 2 / p50 if p50 > 0 else 0.0
    clean = len(track.disturbed) - disturbed
    contaminated = clean < profile.min_rounds and disturbed > profile.max_disturbed * len(track.disturbed)
    noisy = contaminated or half_width > 2 * profile.stable_tolerance
    notes = [f"{disturbed}/{len(track.disturbed)} rounds disturbed ({kinds})" if disturbed else "",
             f"interval ±{100 * half_width:.1f}%" if noisy else "",
             f"load {max(loads):.1f}" if disturbed or noisy else ""]
    return {"p50_ms": p50, "p90_ms": p90, "mean_ms": float(samples.mean()), "iqr_ms": q75 - q25,
            "runs": int(samples.size), "p50_low_ms": low, "p50_high_ms": high, "rounds": len(rounds),
            "noisy": noisy, "interference": "; ".join(n for n in notes if n)}


# ------------------------------------------------------------------------------ measuring

def measure(model: "nn.Module | None", input_shape: tuple[int, int, int], profile: DeviceProfile,
            artifact: Source | None = None, runtime: str | None = None, precision: str = "fp32",
            memory: bool = True) -> LatencyStats:
    """Latency and memory of one model on the profile's runtime (or ``runtime``), timed in this process.

    ``artifact`` is the runtime's already exported artifact (an ONNX file, a ``.pt2``, ...); without
    one, a runtime that runs modules (torch) measures ``model`` itself and any other exports it to a
    temporary folder first. Peak memory is the runtime's :meth:`~podium.methods.runtimes.Runtime.peak_memory_mb`
    (model load + first batch); ``memory=False`` skips it (latency tables that only need p50) and
    reports ``nan``. Candidates that compete for a device go through :func:`measure_isolated`.
    """
    rt = get_runtime(runtime or profile.runtime)
    batch = np.random.default_rng(0).standard_normal((profile.batch_size, *input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="podium-measure-") as tmp:
        if artifact is None:
            if model is None:
                raise ValueError(f"device {profile.name!r}: nothing to measure (no model, no artifact)")
            artifact = model if rt.runs_module else rt.export(model, input_shape, Path(tmp))
        peak = rt.peak_memory_mb(artifact, input_shape, profile.threads, profile.batch_size) if memory else math.nan
        with rt.open(artifact, profile.threads) as session:
            prepared = session.prepare(batch)
            session.run(prepared)
            timing = time_in_rounds({"model": lambda: session.run(prepared)}, profile)["model"]
    return LatencyStats(**timing, peak_mem_mb=peak, runtime=rt.name, threads=profile.threads,
                        batch_size=profile.batch_size, precision=precision)


# ------------------------------------------------------------------------------ the reference network

REFERENCE = "podium-reference"  # its name among a measurement's runs
SLOW_HOST = 1.25  # a process whose reference ran this much slower than the device's speed says so


def reference_network(in_chans: int = 3) -> "nn.Module":
    """The fixed network every measurement times beside its candidates (:func:`normalise_to_reference`):
    a small CNN of the candidates' operators (strided and depthwise convolutions, batch norm, pooling, a
    linear head) with weights from a fixed seed, run at the candidates' input size (see
    :func:`reference_shape`): about 2 M multiply-adds at 1x32x32, 100 M at 3x224x224, so its balance of per-call
    overhead and arithmetic follows the candidates'. Changing it changes every device's speed: bump
    ``tasks.profile.MEASUREMENT_VERSION``."""
    import torch
    from torch import nn

    def conv(cin: int, cout: int, stride: int, groups: int = 1, k: int = 3) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        net = nn.Sequential(*conv(in_chans, 16, 2), *conv(16, 32, 2), *conv(32, 32, 1, groups=32), *conv(32, 64, 1, k=1),
                            *conv(64, 64, 2, groups=64), *conv(64, 96, 1, k=1), *conv(96, 96, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))
    finally:
        torch.random.set_rng_state(generator_state)
    return net.eval()


def reference_shape(shapes: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The input the reference runs at beside models of ``shapes``: the largest of them (pixels, then
    channels), so one call's candidates share one reference and one device speed."""
    return tuple(max(shapes, key=lambda s: (s[1] * s[2], s[0])))  # type: ignore[return-value]


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


_reference_folder: Path | None = None


@functools.lru_cache(maxsize=None)
def _reference_artifact(runtime: str, shape: tuple[int, int, int]) -> "Artifact":
    """The reference as ``runtime`` runs it at ``shape``: a recipe for runtimes that run modules (built in
    the measuring process), else its artifact exported once per process (the measuring process then
    needs no torch)."""
    global _reference_folder
    rt = get_runtime(runtime)
    if rt.runs_module:
        return Artifact(REFERENCE, None, shape, build="podium.methods.profiling:reference_network",
                        build_args={"in_chans": shape[0]})
    if _reference_folder is None:
        _reference_folder = Path(tempfile.mkdtemp(prefix="podium-reference-"))
        atexit.register(shutil.rmtree, _reference_folder, True)
    path = rt.export(reference_network(shape[0]), shape, _reference_folder / f"{runtime}-{shape_text(shape)}")
    return Artifact(REFERENCE, Path(path), shape)


@dataclass(frozen=True)
class Artifact:
    """One model to measure in isolation: the runtime's main file and its input, or a recipe the
    measuring process builds the module from (``build`` = ``"module:function"`` called with
    ``build_args``; exported there for runtimes that do not run modules). A recipe suits what only
    latency is wanted of (lookup-table layers, random-weight networks): nothing is exported here."""

    name: str
    path: Path | None
    input_shape: tuple[int, int, int]
    precision: str = "fp32"
    build: str = ""
    build_args: dict[str, Any] = field(default_factory=dict)


def pinned_cores(profile: DeviceProfile) -> list[int]:
    """The CPUs a measurement for ``profile`` is pinned to: its ``cores``, else the last ``threads``
    CPUs this process may use (the first ones take most interrupts)."""
    allowed = sorted(os.sched_getaffinity(0))
    if profile.cores is not None:
        missing = sorted(set(profile.cores) - set(allowed))
        if missing:
            raise ValueError(f"device {profile.name!r}: cores {missing} are not available here (allowed: {allowed})")
        return list(profile.cores)
    return allowed[-profile.threads:]


def measure_isolated(artifacts: list[Artifact], profile: DeviceProfile, memory: bool = True,
                     timeout_s: float = 1800.0, reference_every: int = 0,
                     reference_input: tuple[int, int, int] | None = None) -> dict[str, LatencyStats]:
    """Every artifact timed in one fresh process pinned to :func:`pinned_cores`, interleaved in rounds
    with the :func:`reference_network`, and normalised to it (the stats' p50s are at the reference
    speed ``profile.reference_ms``, or at this process's own when that is None; ``raw_p50_ms`` is
    what this process timed; ``reference_every``: see :func:`time_in_rounds`; the reference
    runs at ``reference_input``, by default :func:`reference_shape` of the artifacts').

    The process imports only the runtime, fixes its thread counts (``OMP_NUM_THREADS``, the runtime's
    intra-op threads, one inter-op thread) and answers through a JSON file. Peak memory comes from the
    runtime's own probe (its fresh process per model)."""
    if not artifacts:
        return {}
    if memory and any(a.path is None for a in artifacts):
        raise ValueError("peak memory is probed on an artifact file; a recipe is measured with memory=False")
    if any(a.name == REFERENCE for a in artifacts):
        raise ValueError(f"{REFERENCE!r} is the reference network's name; give the model another")
    rt = get_runtime(profile.runtime)
    ref_shape = tuple(reference_input or reference_shape([a.input_shape for a in artifacts]))
    cores = pinned_cores(profile)
    threads = str(profile.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory(prefix="podium-isolated-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({
            "device": profile.model_dump(mode="json"), "cores": cores, "answer": str(answer),
            "reference_every": reference_every,
            "artifacts": [{"name": a.name, "path": str(a.path) if a.path else None, "input_shape": list(a.input_shape),
                           "build": a.build, "build_args": a.build_args}
                          for a in [*artifacts, _reference_artifact(profile.runtime, ref_shape)]]}))
        done = subprocess.run([sys.executable, "-m", "podium.methods.profiling", str(request)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not answer.exists():
            tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise RuntimeError(f"measuring {len(artifacts)} model(s) on {profile.name} failed: {tail}")
        timings = json.loads(answer.read_text())
    out = {}
    for a in artifacts:
        peak = rt.peak_memory_mb(a.path, a.input_shape, profile.threads, profile.batch_size) if memory else math.nan
        out[a.name] = LatencyStats(**timings[a.name], peak_mem_mb=peak, runtime=rt.name, threads=profile.threads,
                                   batch_size=profile.batch_size, precision=a.precision,
                                   cores=",".join(map(str, cores)), reference_input=shape_text(ref_shape))
    return out


def measure_against_budget(artifacts: list[Artifact], profile: DeviceProfile, memory: bool = True,
                           reference_input: tuple[int, int, int] | None = None) -> dict[str, LatencyStats]:
    """:func:`measure_isolated`, then once more, in a new process with twice the rounds, for those whose
    interval straddles the latency budget (a verdict still ``ambiguous`` after that is reported as such).
    The second process reports at the first one's reference speed, so both are on one scale. Peak memory
    is probed once."""
    reference_input = reference_input or reference_shape([a.input_shape for a in artifacts])
    stats = measure_isolated(artifacts, profile, memory=memory, reference_input=reference_input)
    straddling = [a for a in artifacts if stats[a.name].budget_verdict(profile.latency_budget_ms) == "ambiguous"]
    if straddling:
        first_speed = stats[straddling[0].name].reference_ms
        speed = profile.reference_ms or (first_speed if first_speed > 0 else None)  # nan: not normalised
        closer = profile.model_copy(update={"min_rounds": 2 * profile.min_rounds, "max_rounds": 2 * profile.max_rounds,
                                            "max_seconds": 2 * profile.max_seconds, "reference_ms": speed})
        for name, again in measure_isolated(straddling, closer, memory=False, reference_input=reference_input).items():
            note = "; ".join(x for x in (again.interference, "re-measured: straddled the budget") if x)
            stats[name] = dataclasses.replace(again, interference=note, peak_mem_mb=stats[name].peak_mem_mb)
    return stats


def _source(item: dict[str, Any], rt: Any, shape: tuple[int, int, int], folder: Path) -> Any:
    """What the runtime opens for one requested item: its file, or the module its recipe builds (exported
    into ``folder`` for a runtime that runs only files)."""
    if not item["build"]:
        return Path(item["path"])
    import importlib

    module_name, function = item["build"].split(":")
    model = getattr(importlib.import_module(module_name), function)(**item["build_args"]).eval()
    return model if rt.runs_module else rt.export(model, shape, folder)


def _isolated_main(request_path: str) -> None:
    """The dedicated process of :func:`measure_isolated`: pin first (threads started later inherit it)."""
    request = json.loads(Path(request_path).read_text())
    os.sched_setaffinity(0, request["cores"])
    profile = DeviceProfile.model_validate(request["device"])
    rt = get_runtime(profile.runtime)
    rt.import_library()
    rt.share_threads(profile.threads)
    if rt.runs_module:
        import torch

        torch.set_num_interop_threads(1)
    sessions, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="podium-isolated-") as tmp:
        try:
            for i, item in enumerate(request["artifacts"]):
                shape = tuple(item["input_shape"])
                session = rt.open(_source(item, rt, shape, Path(tmp) / str(i)), profile.threads)
                sessions.append(session)
                batch = np.random.default_rng(0).standard_normal((profile.batch_size, *shape), dtype=np.float32)
                prepared = session.prepare(batch)
                session.run(prepared)
                runs[item["name"]] = (lambda s=session, p=prepared: s.run(p))
            timings = time_in_rounds(runs, profile, reference=REFERENCE,
                                     reference_every=int(request["reference_every"]))
        finally:
            for session in reversed(sessions):
                session.close()
    Path(request["answer"]).write_text(json.dumps(timings))


if __name__ == "__main__":
    _isolated_main(sys.argv[1])
