"""ExecuTorch on the CPU through its XNNPACK backend: ``model.pte``, what a mobile or embedded app ships.

The artifact is the candidate's ``torch.export`` program (dynamic batch, 1 to :data:`MAX_BATCH`)
lowered with ``to_edge_transform_and_lower`` and the ``XnnpackPartitioner``; a session runs it in
ExecuTorch's C++ runtime (``executorch.runtime``). Graph inputs are not memory-planned (the caller's
tensor is used in place), so the arena a session allocates and zeroes at load holds only outputs and
the tensors between delegated partitions, sized for ``MAX_BATCH``: part of what peak memory measures.

INT8 is PT2E post-training static quantisation: ``prepare_pt2e`` with the ``XNNPACKQuantizer``
(symmetric, per-channel INT8 weights, INT8 activations), every calibration batch run through the
observed module, ``convert_pt2e``, then re-exported and lowered like FP32 (XNNPACK runs the
quantised convolutions and linears).

Threads: XNNPACK runs on ExecuTorch's one process-wide threadpool, which a session resizes to its
``threads`` (``_unsafe_reset_threadpool``) before loading its method. Each loaded XNNPACK runtime
keeps a pointer to the pool it was built with and resizing replaces (frees) that pool, so a session
on a different thread count is refused while other sessions are open; the pool keeps its size after
they close. The cpuinfo lines the runtime prints while creating the pool (once per process) and its
"Resetting threadpool" line are silenced by pointing stderr at /dev/null for those calls only.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from podium.methods.runtimes import Runtime, Session, Source, register_runtime

MAX_BATCH = 1024  # the exported batch range's upper end (the planned arena is sized for it)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ runtime's log lines (file descriptor 2) for the duration of the block."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@functools.lru_cache(maxsize=1)
def _bindings() -> Any:
    """ExecuTorch's C++ bindings, their threadpool created (and its cpuinfo chatter silenced) once."""
    from executorch.extension.pybindings import portable_lib

    with _quiet_stderr():
        portable_lib._threadpool_get_thread_count()
    return portable_lib


class ExecuTorchSession(Session):
    live: ClassVar[weakref.WeakSet[ExecuTorchSession]] = weakref.WeakSet()  # sessions holding a method

    def __init__(self, path: Path, threads: int) -> None:
        from executorch.runtime import Runtime as ETRuntime

        lib = _bindings()
        current = lib._threadpool_get_thread_count()
        if threads != current:
            if self.live:  # their XNNPACK runtimes hold the current pool: replacing it would free it under them
                raise RuntimeError(f"executorch sessions open on {current} threads; close them before opening "
                                   f"one on {threads} (the threadpool is process-wide)")
            with _quiet_stderr():  # "Resetting threadpool to N threads."
                lib._unsafe_reset_threadpool(threads)
        self.program = ETRuntime.get().load_program(path)  # kept: the method runs out of the program's buffers
        self.max_batch = self.program.metadata("forward").input_tensor_meta(0).sizes()[0]
        self.method = self.program.load_method("forward")
        self.live.add(self)

    def close(self) -> None:
        self.method = None  # before the program it was loaded from
        self.program = None
        self.live.discard(self)

    def prepare(self, batch: np.ndarray) -> Any:
        import torch

        if len(batch) > self.max_batch:
            raise ValueError(f"this executorch artifact takes batches of at most {self.max_batch}, got {len(batch)}")
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))

    def run(self, prepared: Any) -> Any:
        return self.method.execute([prepared])[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.prepare(batch)).numpy().astype(np.float32, copy=False)


def _export(module: Any, input_shape: tuple[int, int, int]) -> Any:
    import torch
    from torch.export import Dim

    return torch.export.export(module, (torch.zeros(2, *input_shape),), strict=False,
                               dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))


def _quantize_int8(module: Any, input_shape: tuple[int, int, int], calibration: Sequence[np.ndarray]) -> Any:
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(_export(module, input_shape).module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            observed(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return convert_pt2e(observed)


def _lower(program: Any) -> bytes:
    """XNNPACK-lowered ExecuTorch program bytes of an exported program."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    # XNNPACK's passes re-trace convolutions on fake tensors, and torch's fake convolution asks whether
    # the batch is >= 16 (NNPACK's heuristic): answered at the trace's batch of 2, that narrows the
    # batch to [2, 15] in the shape environment, and memory planning would size every buffer for 15
    # images. The program's own range constraints still say [.., MAX_BATCH]: put them back.
    lowered = edge.exported_program()
    sizes = [s for n in lowered.graph.nodes if n.op == "placeholder"
             for s in getattr(n.meta.get("val"), "shape", ()) if isinstance(s, torch.SymInt)]
    if sizes:
        sizes[0].node.shape_env.var_to_range.update(lowered.range_constraints)
    config = ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))
    return edge.to_executorch(config).buffer


@register_runtime
class ExecuTorchRuntime(Runtime):
    name = "executorch"
    artifact_name = "model.pte"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    max_batch = MAX_BATCH

    def available(self) -> bool:
        find = importlib.util.find_spec  # the C++ runtime's bindings, and the XNNPACK lowering
        return find("executorch") is not None and all(
            find(m) is not None for m in ("executorch.extension.pybindings._C", "executorch.backends.xnnpack"))

    def import_library(self) -> None:
        _bindings()
        import executorch.runtime  # noqa: F401

    def export(self, model: Any, input_shape: tuple[int, int, int], folder: Path, precision: str = "fp32",
               calibration: Sequence[np.ndarray] = ()) -> Path:
        target = self.export_target(folder, precision, calibration)
        module = copy.deepcopy(model).cpu().eval()
        if precision == "int8":
            module = _quantize_int8(module, input_shape, calibration)
        target.write_bytes(_lower(_export(module, input_shape)))
        return target

    def open(self, source: Source, threads: int) -> Session:
        if not isinstance(source, (str, Path)):
            raise TypeError("executorch runs an exported model.pte; export the module first")
        return ExecuTorchSession(Path(source), threads)
