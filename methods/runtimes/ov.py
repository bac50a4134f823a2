"""OpenVINO on the CPU: the ONNX graph converted to OpenVINO IR (``model.xml`` + ``model.bin``).

INT8 is NNCF's post-training quantisation of the IR (``nncf.quantize``, performance preset:
symmetric INT8 weights and activations), calibrated on the caller's training images.
Sessions pin ``INFERENCE_PRECISION_HINT`` to f32: on CPUs with bf16 units OpenVINO would otherwise
run the un-quantised parts in bf16 and the measured model would not be the one whose accuracy was
reported.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class OpenVinoSession(Session):
    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, prepared: Any) -> Any:
        return self.request.infer([prepared])[self.compiled.output(0)]


def quantize_ir_int8(graph: Any, calibration: Sequence[np.ndarray]) -> Any:
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
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
