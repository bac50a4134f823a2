"""OpenVINO on the CPU: the ONNX graph converted to OpenVINO IR (``model.xml`` + ``model.bin``).

FP32 sessions pin ``INFERENCE_PRECISION_HINT`` to f32: on CPUs with bf16 units OpenVINO would
otherwise run in bf16 and the measured model would not be the one whose accuracy was reported.
The IR is two files, so it does not travel to remote devices (``portable = False``).
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from podium.methods.export import export_onnx
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


@register_runtime
class OpenVinoRuntime(Runtime):
    name = "openvino"
    artifact_name = "model.xml"
    portable = False

    def available(self) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def export(self, model: nn.Module, input_shape: tuple[int, int, int], folder: Path) -> Source:
        import openvino as ov

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="podium-ov-") as tmp:
            graph = ov.convert_model(str(export_onnx(model, input_shape, Path(tmp) / "model.onnx")))
        target = folder / self.artifact_name
        ov.save_model(graph, str(target), compress_to_fp16=False)  # writes model.xml + model.bin
        return target

    def open(self, source: Source, threads: int) -> Session:
        if isinstance(source, nn.Module):
            raise TypeError("openvino runs an exported model.xml; export the module first")
        return OpenVinoSession(Path(source), threads)
