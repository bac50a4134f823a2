"""The one profiler: measured latency and memory of a model on a device profile.

Latency is always measured, never estimated: warm-up, then repeats in rounds until the median
is stable (or a cap), reported as p50/p90/mean/IQR. The device's runtime (:mod:`podium.methods.runtimes`)
decides what runs: the module itself (eager PyTorch) or its exported artifact (ONNX Runtime, ...).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from torch import nn

from podium.methods.base import StrictModel
from podium.methods.runtimes import Source, get_runtime, runtime_names


class DeviceProfile(StrictModel):
    """A deployment target: how to run the model there and what it may cost."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    runtime: str = "torch"  # a name in podium.methods.runtimes.RUNTIMES
    threads: int = Field(1, ge=1, le=256)
    batch_size: int = Field(1, ge=1, le=4096)
    latency_budget_ms: float = Field(gt=0, le=600_000)
    memory_budget_mb: float = Field(1024.0, gt=0, le=1_048_576)
    work_pool: str | None = None  # Prefect work pool of a worker on that hardware; None = profile here
    # what the device accepts; each beyond fp32 adds derived candidates (quantised from the best FP32 ones)
    precisions: tuple[Literal["fp32", "fp16", "int8"], ...] = ("fp32",)
    warmup: int = Field(5, ge=0)
    min_repeats: int = Field(20, ge=3)
    max_repeats: int = Field(200, ge=3)
    max_seconds: float = Field(10.0, gt=0)
    stable_tolerance: float = Field(0.03, gt=0)  # stop when the median moves less than this (relative)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in runtime_names():
            raise ValueError(f"unknown runtime {value!r}; known runtimes: {', '.join(runtime_names())}")
        return value

    @model_validator(mode="after")
    def _repeats_ordered(self) -> "DeviceProfile":
        if self.max_repeats < self.min_repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) < min_repeats ({self.min_repeats})")
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

    def as_dict(self) -> dict:
        return asdict(self)


def _summarise(samples_ms: list[float]) -> tuple[float, float, float, float]:
    arr = np.asarray(samples_ms)
    q25, p50, q75, p90 = np.percentile(arr, [25, 50, 75, 90])
    return float(p50), float(p90), float(arr.mean()), float(q75 - q25)


def _time_until_stable(run_once: Callable[[], object], profile: DeviceProfile) -> list[float]:
    for _ in range(profile.warmup):
        run_once()
    samples: list[float] = []
    previous_median = None
    deadline = time.perf_counter() + profile.max_seconds
    while len(samples) < profile.max_repeats:
        for _ in range(profile.min_repeats):
            start = time.perf_counter()
            run_once()
            samples.append((time.perf_counter() - start) * 1e3)
        median = statistics.median(samples)
        stable = previous_median is not None and abs(median - previous_median) <= profile.stable_tolerance * previous_median
        if stable or time.perf_counter() > deadline:
            break
        previous_median = median
    return samples


def measure(model: nn.Module | None, input_shape: tuple[int, int, int], profile: DeviceProfile,
            artifact: Source | None = None, runtime: str | None = None, precision: str = "fp32",
            memory: bool = True) -> LatencyStats:
    """Latency and memory of ``model`` on the profile's runtime (or ``runtime``).

    ``artifact`` is the runtime's already exported artifact (an ONNX file, a ``.pt2``, ...); without
    one, a runtime that runs modules (torch) measures ``model`` itself and any other exports it to a
    temporary folder first. Peak memory is the runtime's :meth:`~podium.methods.runtimes.Runtime.peak_memory_mb`
    (model load + first batch, measured before the timing starts); ``memory=False`` skips it (latency
    tables that only need p50) and reports ``nan``.
    """
    rt = get_runtime(runtime or profile.runtime)
    batch = np.random.default_rng(0).standard_normal((profile.batch_size, *input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="podium-measure-") as tmp:
        if artifact is None:
            if model is None:
                raise ValueError(f"device {profile.name!r}: nothing to measure (no model, no artifact)")
            artifact = model if rt.runs_module else rt.export(model, input_shape, Path(tmp))
        peak = rt.peak_memory_mb(artifact, input_shape, profile.threads, profile.batch_size) if memory else float("nan")
        with rt.open(artifact, profile.threads) as session:
            prepared = session.prepare(batch)
            session.run(prepared)
            samples = _time_until_stable(lambda: session.run(prepared), profile)
    return LatencyStats(*_summarise(samples), runs=len(samples), peak_mem_mb=peak, runtime=rt.name,
                        threads=profile.threads, batch_size=profile.batch_size, precision=precision)
