"""ONNX Runtime on the exported ONNX graph (what a deployment team ships), one runtime per provider.

- ``onnxruntime``: the CPU execution provider; FP32, and INT8 by post-training static quantisation
  (``onnxruntime.quantization.quantize_static``: QDQ format, per-channel symmetric INT8 weights,
  UINT8 activations, MinMax calibration on the caller's training images). Weights use 7 bits
  (``reduce_range``): x86 CPUs without VNNI saturate U8S8 products otherwise; measured on the digits,
  a ResNet lost 0.7-4 points with 8-bit weights and none with 7.
- ``onnxruntime-cuda`` / ``onnxruntime-tensorrt``: the CUDA and TensorRT execution providers, available
  where ``onnxruntime-gpu`` and a GPU are; FP16 converts the graph (inputs and outputs stay FP32), INT8
  is the same QDQ graph (TensorRT runs it as explicit quantisation).
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class OrtSession(Session):
    def __init__(self, path: Path, threads: int, providers: list[Any], shared_pool: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if shared_pool:  # the process's one pool (OnnxRuntime.share_threads): spinning, as deployed
            options.use_per_session_threads = False
        else:
            # Each session owns a pool; spinning pools steal the cores from the next session run in the
            # same process (160 OFA lookup-table sessions on 2 threads took 199 s instead of 71 s), so a
            # process holding many sessions without a shared pool does not spin.
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def run(self, prepared: Any) -> Any:
        return self.session.run(None, prepared)[0]


class _Batches:
    """``quantize_static``'s calibration reader over float32 NCHW batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.items = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


PRECISION_KEY = "podium.precision"  # in the graph's metadata_props (absent: fp32)


def graph_precision(path: Path) -> str:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props.get(PRECISION_KEY, "fp32")


def quantize_onnx_int8(source: Path, target: Path, calibration: Sequence[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="podium-qdq-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), _Batches("input", calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
    return target


def convert_onnx_fp16(source: Path, target: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
    return target


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    artifact_name = "model.onnx"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    provider: ClassVar[str] = "CPUExecutionProvider"

    def available(self) -> bool:
        if importlib.util.find_spec("onnxruntime") is None:
            return False
        import onnxruntime as ort

        return self.provider in ort.get_available_providers()

    def import_library(self) -> None:
        import onnxruntime  # noqa: F401

    _shared_threads: ClassVar[int | None] = None

    def share_threads(self, threads: int) -> None:
        """ONNX Runtime's global thread pool, spinning like the default pool of a deployed session:
        measured on 2 threads, a session without spinning ran 1.8-2.3x slower than the same graph in a
        default session alone in its process (a pool thread's wake-up per operator), and a global pool
        ran like the lone session. Must run before the process's first session. One thread needs no
        pool (nothing to wake or to share): each session keeps its own, as before."""
        if threads < 2:
            return
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        OnnxRuntime._shared_threads = threads

    def providers(self) -> list[Any]:
        return [self.provider]

    def export(self, model: Any, input_shape: tuple[int, int, int], folder: Path, precision: str = "fp32",
               calibration: Sequence[np.ndarray] = ()) -> Path:
        from podium.methods.export import export_onnx, with_metadata

        target = self.export_target(folder, precision, calibration)
        if precision == "fp32":
            return export_onnx(model, input_shape, target)
        with tempfile.TemporaryDirectory(prefix="podium-onnx-") as tmp:
            fp32 = export_onnx(model, input_shape, Path(tmp) / "fp32.onnx")
            converted = (quantize_onnx_int8(fp32, Path(tmp) / "int8.onnx", calibration) if precision == "int8"
                         else convert_onnx_fp16(fp32, Path(tmp) / "fp16.onnx"))
            return with_metadata(converted, target, {PRECISION_KEY: precision})

    def open(self, source: Source, threads: int) -> Session:
        if not isinstance(source, (str, Path)):
            raise TypeError(f"{self.name} runs an exported .onnx file; export the module first")
        return OrtSession(Path(source), threads, self.providers(), shared_pool=threads == self._shared_threads)


@register_runtime
class OnnxRuntimeCuda(OnnxRuntime):
    name = "onnxruntime-cuda"
    precisions = ("fp32", "fp16", "int8")
    provider = "CUDAExecutionProvider"


@register_runtime
class OnnxRuntimeTensorRT(OnnxRuntime):
    """TensorRT through ONNX Runtime. FP16 kernels are enabled only for a graph exported as fp16 (so an
    fp32 artifact is measured in fp32); a QDQ (INT8) graph runs as explicit quantisation. Engines are
    cached next to the artifact."""

    name = "onnxruntime-tensorrt"
    precisions = ("fp32", "fp16", "int8")
    provider = "TensorrtExecutionProvider"

    def open(self, source: Source, threads: int) -> Session:
        if not isinstance(source, (str, Path)):
            raise TypeError(f"{self.name} runs an exported .onnx file; export the module first")
        cache = Path(source).parent / "trt-cache"
        cache.mkdir(exist_ok=True)
        options = {"trt_fp16_enable": graph_precision(Path(source)) == "fp16", "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(cache)}
        return OrtSession(Path(source), threads, [(self.provider, options), "CUDAExecutionProvider"],
                          shared_pool=threads == self._shared_threads)
