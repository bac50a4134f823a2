"""ONNX Runtime on the CPU, on the exported ONNX graph (what a deployment team ships)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from podium.methods.export import export_onnx
from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class OrtSession(Session):
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def run(self, prepared: Any) -> Any:
        return self.session.run(None, prepared)[0]


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    artifact_name = "model.onnx"
    portable = True

    def available(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def export(self, model: nn.Module, input_shape: tuple[int, int, int], folder: Path) -> Source:
        return export_onnx(model, input_shape, Path(folder) / self.artifact_name)

    def open(self, source: Source, threads: int) -> Session:
        if isinstance(source, nn.Module):
            raise TypeError("onnxruntime runs an exported .onnx file; export the module first")
        return OrtSession(Path(source), threads)
