"""Deployment runtimes behind one interface, registered by the defining module.

A runtime exports a candidate to its artifact in a precision it supports (``fp32``, ``fp16``, ``int8``:
INT8 is post-training static quantisation calibrated on images the caller passes), opens a session on
an artifact with a thread count, runs a prepared batch, measures a session's peak memory, and says
whether it is available on this machine. Every measurement in Podium (the profiler, OFA's latency
table, remote devices, INT8 accuracy) goes through :func:`get_runtime`, so a device's runtime decides
how its model is built and measured, everywhere.

Adding a runtime is one file here: subclass :class:`Runtime`, decorate it with
:func:`register_runtime`. Runtime modules import their libraries (torch included) lazily: this package
is imported by the fresh-process memory probe, which must not pay for what it does not measure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

Source = Any  # what a session opens: a Path to the runtime's artifact, or (torch) the nn.Module itself
PRECISIONS = ("fp32", "fp16", "int8")


class Session(ABC):
    """An open model. ``prepare`` converts a float32 NCHW batch once; ``run`` is what gets timed."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the session holds (threads settings, buffers)."""

    @abstractmethod
    def prepare(self, batch: np.ndarray) -> Any: ...

    @abstractmethod
    def run(self, prepared: Any) -> Any: ...

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a batch as a float32 NumPy array."""
        return np.asarray(self.run(self.prepare(batch)), dtype=np.float32)


class Runtime(ABC):
    name: ClassVar[str]
    artifact_name: ClassVar[str]  # the file a session opens (a sibling file may belong to it: artifact_files)
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # what export() can build here
    runs_module: ClassVar[bool] = False  # a local session may open the nn.Module itself (no export needed)
    max_batch: ClassVar[int] = 4096  # the largest batch its artifacts accept

    @abstractmethod
    def available(self) -> bool: ...

    @abstractmethod
    def export(self, model: Any, input_shape: tuple[int, int, int], folder: Path, precision: str = "fp32",
               calibration: Sequence[np.ndarray] = ()) -> Path:
        """Write ``model``'s artifact in ``precision`` under ``folder`` and return its main file.

        ``input_shape`` is C, H, W. ``calibration`` (float32 NCHW batches of training images, already
        normalised) is required for ``int8``: static quantisation observes activations on it."""

    @abstractmethod
    def open(self, source: Source, threads: int) -> Session: ...

    def import_library(self) -> None:
        """Import the runtime's library (the memory probe's baseline is taken after this)."""

    def share_threads(self, threads: int) -> None:
        """Run every session this process opens later on one shared pool of ``threads`` threads, as one
        deployed model would run on its own (the isolated measuring process holds hundreds of sessions).
        Runtimes whose threads are already per process need nothing here."""

    def artifact_files(self, artifact: Path) -> list[Path]:
        """Every file the artifact consists of (what a release or a remote device must receive)."""
        return [Path(artifact)]

    def peak_memory_mb(self, source: Source, input_shape: tuple[int, int, int], threads: int,
                       batch_size: int) -> float:
        """Peak resident memory of opening ``source`` and running its first batch, in a fresh process
        (the runtime's own libraries already imported, so only the model's cost counts)."""
        return probe_peak_memory_mb(self.name, Path(source), input_shape, threads, batch_size)

    def export_target(self, folder: Path, precision: str, calibration: Sequence[np.ndarray]) -> Path:
        """The path ``export`` writes its main file to (folder created), after checking that this runtime
        builds ``precision`` here and that INT8 has calibration batches."""
        if precision not in self.precisions:
            raise ValueError(f"runtime {self.name!r} cannot build {precision} here (it supports "
                             f"{', '.join(self.precisions)})")
        if precision == "int8" and not len(calibration):
            raise ValueError("int8 export needs calibration batches (training images)")
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder) / self.artifact_name


RUNTIMES: dict[str, Runtime] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    RUNTIMES[cls.name] = cls()
    return cls


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise KeyError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_names() -> tuple[str, ...]:
    return tuple(RUNTIMES)


def available_runtimes() -> tuple[str, ...]:
    return tuple(n for n, r in RUNTIMES.items() if r.available())


def probe_peak_memory_mb(runtime: str, artifact: Path, input_shape: tuple[int, int, int], threads: int,
                         batch_size: int, timeout_s: float = 300.0) -> float:
    """Run :mod:`podium.methods.runtimes.probe` in a new interpreter and return its answer (MB)."""
    request = json.dumps({"runtime": runtime, "artifact": str(artifact), "input_shape": list(input_shape),
                          "threads": threads, "batch_size": batch_size})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "podium.methods.runtimes.probe", request], capture_output=True,
                          text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {artifact} on {runtime} failed: {tail}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"])


from podium.methods.discovery import import_submodules  # noqa: E402

import_submodules(__name__, __path__)  # each runtime module registers itself (eager PyTorch, ONNX Runtime, ...)
