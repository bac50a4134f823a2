"""Resumable training: what a checkpoint holds, where it goes, and the environment every ``fit`` runs in.

A caller (a Prefect task) opens a :func:`training_env` around a method's training; every
:func:`methods.train.fit` inside it then saves a checkpoint every ``every_s`` seconds and at its
end, under its ``name``, and resumes from one when it finds it. Methods do not change: the same
names in the same order make a re-run after a crash pick up where the killed one stopped.

A checkpoint holds the model, the optimiser, the weight EMA and the fp16 grad scaler (when a fit
uses them), the step, the position in the epoch and every random state the loop depends on (torch,
CUDA, Python, NumPy, the loader's shuffle generator, and the method's own ``random.Random``
objects), so a resumed run replays the uninterrupted one exactly.
The learning-rate schedule is a pure function of the step, so the step is its whole state.
Serialised with ``torch.save`` and read back with ``weights_only=True``: no code runs on load.
"""
from __future__ import annotations

import contextlib
import io
import logging
import random
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from podium.files import atomic_write_bytes

log = logging.getLogger("podium.train")


class CheckpointStore(Protocol):
    """Where checkpoints live: ``load`` returns the serialised bytes or None when there is none."""

    def load(self, name: str) -> bytes | None: ...
    def save(self, name: str, data: bytes) -> None: ...


class DirectoryCheckpoints:
    """Checkpoints as files in a local folder, each replaced atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        return self.root / f"{checkpoint_file_name(name)}.pt"

    def load(self, name: str) -> bytes | None:
        path = self._path(name)
        return path.read_bytes() if path.exists() else None

    def save(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self._path(name), data)


def checkpoint_file_name(name: str) -> str:
    """A fit name ("shrinking/kernel", "anchor resnet-tiny") as a safe file or key name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


@dataclass(frozen=True)
class TrainingEnv:
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    checkpoints: CheckpointStore | None = None
    every_s: float = 60.0
    # (fit's name, step, steps, {"loss", "images_per_s", "epoch"}) with each progress line of the primary
    # process: the caller's hook (a plain callable: a progress bar, training curves); it must not raise
    on_progress: Callable[[str, int, int, dict[str, float]], None] | None = None
    # (fit's name, epochs done, model) after each whole epoch of the primary process, the model in train
    # mode: e.g. a validation pass for the curves; it must not raise and must leave the model as it found it
    on_epoch: Callable[[str, int, Any], None] | None = None
    # intra-op threads of every fit in this env (None: leave the thread's setting). torch's OpenMP pool and
    # MKL take their thread count per calling thread: a thread-pool worker does not inherit the main
    # thread's torch.set_num_threads and runs MKL on every core, oversubscribing its neighbours
    threads: int | None = None


_ENV: ContextVar[TrainingEnv] = ContextVar("podium_training_env", default=TrainingEnv())


def current_env() -> TrainingEnv:
    return _ENV.get()


@contextlib.contextmanager
def training_env(env: TrainingEnv) -> Iterator[TrainingEnv]:
    """Every ``fit`` (and ``pick_device()``) in this block, in this thread, uses ``env``; with
    ``env.threads`` this thread's intra-op thread budget is that, and is restored on leaving."""
    token = _ENV.set(env)
    previous = torch.get_num_threads()
    if env.threads is not None:
        torch.set_num_threads(env.threads)
    try:
        yield env
    finally:
        if env.threads is not None:
            torch.set_num_threads(previous)
        _ENV.reset(token)


# ---------------------------------------------------------------------------------------------
# Random states: captured as tensors and plain tuples so weights_only loading accepts them
# ---------------------------------------------------------------------------------------------

def capture_rng(shuffle: torch.Generator | None, rngs: Sequence[random.Random]) -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "methods": [r.getstate() for r in rngs],
        "shuffle": shuffle.get_state() if shuffle is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], shuffle: torch.Generator | None, rngs: Sequence[random.Random]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    for rng, saved in zip(rngs, state["methods"]):
        rng.setstate(_as_tuple(saved))
    if shuffle is not None and state["shuffle"] is not None:
        shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples all the way down; serialisation may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def dumps(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
