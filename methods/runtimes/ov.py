"""OpenVINO on the CPU: the ONNX graph converted to OpenVINO IR (``model.xml`` + ``model.bin``).

INT8 is NNCF's post-training quantisation of the IR (``nncf.quantize``, performance preset:
symmetric INT8 weights and activations), calibrated on the caller's training images.
Sessions pin ``INFERENCE_PRECISION_HINT`` to f32: on CPUs with bf16 units OpenVINO would otherwise
run the un-quantised parts in bf16 and the measured model would not be the one whose accuracy was
reported.

OpenVINO's CPU plugin installs its own alternate signal stack in the thread that compiles a model and
unmaps it when the model is freed, from whatever thread frees it, without giving the compiling thread
its old stack back. That thread's next signal then kills the process (SIGSEGV from the kernel: the
test suite died so, in a poll, once a garbage collection in another thread freed a session). Every
OpenVINO call that compiles (:func:`own_signal_stack`) puts the caller's stack back, and sessions
release their model in :meth:`OpenVinoSession.close`.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class _SignalStack(ctypes.Structure):  # stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def own_signal_stack() -> Iterator[None]:
    """Run the block, then give this thread back the alternate signal stack it had before it."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:  # not Linux/glibc-like: nothing to guard
        yield
        return
    try:
        yield
    finally:
        after = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(after))
        if (after.ss_sp, after.ss_size, after.ss_flags) != (before.ss_sp, before.ss_size, before.ss_flags):
            before.ss_flags &= ~1  # SS_ONSTACK is reported, never set
            libc.sigaltstack(ctypes.byref(before), None)


class OpenVinoSession(Session):
    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        with own_signal_stack():
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.request = self.compiled.create_infer_request()

    def close(self) -> None:
        self.request = self.compiled = None  # freed here, in the thread that opened the session

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, prepared: Any) -> Any:
        return self.request.infer([prepared])[self.compiled.output(0)]


def quantize_ir_int8(graph: Any, calibration: Sequence[np.ndarray]) -> Any:
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    with own_signal_stack():  # NNCF compiles the graph to collect statistics
        return nncf.quantize(graph, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                             subset_size=len(batches))


@register_runtime
class OpenVinoRuntime(Runtime):
    name = "openvino"
    artifact_name = "model.xml"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")

    def available(self) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def import_library(self) -> None:
        import openvino  # noqa: F401

    def artifact_files(self, artifact: Path) -> list[Path]:
        return [Path(artifact), Path(artifact).with_suffix(".bin")]

    def export(self, model: Any, input_shape: tuple[int, int, int], folder: Path, precision: str = "fp32",
               calibration: Sequence[np.ndarray] = ()) -> Path:
        import openvino as ov

        from podium.methods.export import export_onnx

        target = self.export_target(folder, precision, calibration)
        with tempfile.TemporaryDirectory(prefix="podium-ov-") as tmp:
            graph = ov.convert_model(str(export_onnx(model, input_shape, Path(tmp) / "model.onnx")))
        if precision == "int8":
            graph = quantize_ir_int8(graph, calibration)
        graph.set_rt_info(precision, ["podium", "precision"])
        ov.save_model(graph, str(target), compress_to_fp16=False)  # writes model.xml + model.bin
        return target

    def open(self, source: Source, threads: int) -> Session:
        if not isinstance(source, (str, Path)):
            raise TypeError("openvino runs an exported model.xml; export the module first")
        return OpenVinoSession(Path(source), threads)
