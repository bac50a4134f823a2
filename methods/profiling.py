"""The one profiler: measured latency and memory of a model on a device profile.

Latency is always measured, never estimated: warm-up, then repeats in rounds until the median
is stable (or a cap), reported as p50/p90/mean/IQR. Runtimes: PyTorch eager or ONNX Runtime on
the exported graph (what a deployment team ships).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import psutil
import torch
from pydantic import Field, model_validator
from torch import nn

from methods.base import StrictModel


class DeviceProfile(StrictModel):
    """A deployment target: how to run the model there and what it may cost."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    runtime: Literal["torch", "onnxruntime"] = "torch"
    threads: int = Field(1, ge=1, le=256)
    batch_size: int = Field(1, ge=1, le=4096)
    latency_budget_ms: float = Field(gt=0, le=600_000)
    memory_budget_mb: float = Field(1024.0, gt=0, le=1_048_576)
    work_pool: str | None = None  # Prefect work pool of a worker on that hardware; None = profile here
    warmup: int = Field(5, ge=0)
    min_repeats: int = Field(20, ge=3)
    max_repeats: int = Field(200, ge=3)
    max_seconds: float = Field(10.0, gt=0)
    stable_tolerance: float = Field(0.03, gt=0)  # stop when the median moves less than this (relative)

    @model_validator(mode="after")
    def _repeats_ordered(self) -> "DeviceProfile":
        if self.max_repeats < self.min_repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) < min_repeats ({self.min_repeats})")
        return self


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    iqr_ms: float
    runs: int
    peak_mem_mb: float  # resident-memory growth of this process while loading + first inference
    runtime: str
    threads: int
    batch_size: int

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


def _rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def measure_torch(model: nn.Module, input_shape: tuple[int, int, int], profile: DeviceProfile) -> LatencyStats:
    """Latency of eager PyTorch on CPU with ``profile.threads`` intra-op threads."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(profile.threads)
    try:
        model = model.eval()
        inputs = torch.randn(profile.batch_size, *input_shape)
        rss_before = _rss_mb()
        with torch.inference_mode():
            model(inputs)
            peak = max(0.0, _rss_mb() - rss_before)
            samples = _time_until_stable(lambda: model(inputs), profile)
    finally:
        torch.set_num_threads(previous_threads)
    return LatencyStats(*_summarise(samples), runs=len(samples), peak_mem_mb=peak, runtime="torch",
                        threads=profile.threads, batch_size=profile.batch_size)


def measure_onnx(onnx_path: Path, input_shape: tuple[int, int, int], profile: DeviceProfile) -> LatencyStats:
    """Latency of ONNX Runtime (CPU provider) on the exported graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = profile.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    rss_before = _rss_mb()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {"input": np.random.default_rng(0).standard_normal((profile.batch_size, *input_shape), dtype=np.float32)}
    session.run(None, feed)
    peak = max(0.0, _rss_mb() - rss_before)
    samples = _time_until_stable(lambda: session.run(None, feed), profile)
    return LatencyStats(*_summarise(samples), runs=len(samples), peak_mem_mb=peak, runtime="onnxruntime",
                        threads=profile.threads, batch_size=profile.batch_size)


def measure(model: nn.Module, input_shape: tuple[int, int, int], profile: DeviceProfile,
            onnx_path: Path | None = None) -> LatencyStats:
    """Measure on the profile's runtime (ONNX Runtime needs the exported graph)."""
    if profile.runtime == "onnxruntime":
        if onnx_path is None:
            raise ValueError(f"device {profile.name!r} uses onnxruntime but no ONNX file was given")
        return measure_onnx(onnx_path, input_shape, profile)
    return measure_torch(model, input_shape, profile)
