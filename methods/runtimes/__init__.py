"""Deployment runtimes behind one interface, registered by the defining module.

A runtime exports a candidate to its artifact, opens a session on it with a thread count, runs a
prepared batch, and says whether it is available on this machine. Every measurement in Podium (the
profiler, OFA's latency table, remote devices) goes through :func:`get_runtime`, so a device's
runtime decides how its latency is measured, everywhere.

Adding a runtime is one file here: subclass :class:`Runtime`, decorate it with
:func:`register_runtime`, import it below.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

Source = Path | nn.Module  # what a session opens: the runtime's artifact, or the module itself (eager)


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
        """Logits of a batch as a NumPy array."""
        return np.asarray(self.run(self.prepare(batch)))


class Runtime(ABC):
    name: ClassVar[str]
    artifact_name: ClassVar[str | None]  # the file it runs from (None: the in-memory module)
    portable: ClassVar[bool]  # its artifact can be shipped to another machine and measured there

    @abstractmethod
    def available(self) -> bool: ...

    @abstractmethod
    def export(self, model: nn.Module, input_shape: tuple[int, int, int], folder: Path) -> Source:
        """The artifact of ``model`` for this runtime, written under ``folder`` (C, H, W input)."""

    @abstractmethod
    def open(self, source: Source, threads: int) -> Session: ...


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


def remote_runtime(name: str) -> Runtime:
    """The runtime a remote device measures with: its own when its artifact travels, else ONNX Runtime
    (an arbitrary ``nn.Module`` cannot be rebuilt safely on another machine from its weights alone)."""
    runtime = get_runtime(name)
    return runtime if runtime.portable else get_runtime("onnxruntime")


from podium.methods.discovery import import_submodules  # noqa: E402

import_submodules(__name__, __path__)  # each runtime module registers itself (eager PyTorch, ONNX Runtime, ...)
