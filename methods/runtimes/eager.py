"""Eager PyTorch on the CPU: the module itself here, its ``torch.export`` program elsewhere.

Locally a session runs the candidate's own ``nn.Module``. The portable artifact is ``model.pt2``
(``torch.export``, dynamic batch): what a remote device or a release carries, since an arbitrary
module's Python class cannot be rebuilt from its weights. A ``.pt2`` archive is loaded only after
every pickled entry in it has been checked to load with ``weights_only=True`` (torch's own loader
falls back to full unpickling, which would run code planted in the file).

Peak memory is the bytes of the parameters and buffers plus the highest live total of the tensors
the first batch allocates (counted op by op by a dispatch mode, freed when their storage is).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class EagerSession(Session):
    def __init__(self, model: Any, threads: int) -> None:
        import torch

        self.model = model  # in eval mode already (an exported program's module cannot switch modes)
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def close(self) -> None:
        import torch

        self.inference.__exit__(None, None, None)
        torch.set_num_threads(self.previous_threads)

    def prepare(self, batch: np.ndarray) -> Any:
        import torch

        device = next(self.model.parameters(), torch.empty(0)).device
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)

    def run(self, prepared: Any) -> Any:
        return self.model(prepared)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.prepare(batch)).float().cpu().numpy()


def check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading could unpickle arbitrary objects."""
    import torch

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and '"use_pickle": true' in archive.read(name).decode():
                raise ValueError(f"{path}: {name} asks for pickled tensors; refusing to load it")
            if name.endswith((".pt", ".pkl")):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as exc:
                    raise ValueError(f"{path}: {name} is not plain tensors ({str(exc).splitlines()[0][:120]})") from None


def load_pt2(path: Path) -> Any:
    import torch

    check_pt2(Path(path))
    return torch.export.load(str(path)).module()


def _live_bytes_mode():
    """A dispatch mode counting the bytes of every tensor storage ops allocate, until each is freed.

    Thread-local and silent, unlike the profiler (OFA measures from training threads); it agrees with
    torch's profiler memory events within 3 % on the digits ResNets. Frees are found by polling torch's
    own storage weak references before each op: a Python ``weakref.finalize`` on a storage runs Python
    code from inside C++ storage destruction, which crashed the test suite's process (SIGSEGV) much later."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref, bytes)
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[key]  # freed since the last op (its address may be reused below)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.live:  # a new allocation (views share their base's storage)
                        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    return LiveBytes()


def allocator_peak_mb(model: Any, batch: np.ndarray) -> float:
    """Parameters + buffers + the peak of live tensor bytes allocated during one batch."""
    import torch

    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    counter = _live_bytes_mode()
    with torch.inference_mode(), counter:
        model(x)
    return (resident + counter.peak) / 2**20


@register_runtime
class EagerRuntime(Runtime):
    name = "torch"
    artifact_name = "model.pt2"
    runs_module = True

    def available(self) -> bool:
        return True

    def import_library(self) -> None:
        import torch  # noqa: F401

    def export(self, model: Any, input_shape: tuple[int, int, int], folder: Path, precision: str = "fp32",
               calibration: Sequence[np.ndarray] = ()) -> Path:
        import copy

        import torch
        from torch.export import Dim

        target = self.export_target(folder, precision, calibration)
        module = copy.deepcopy(model).cpu().eval()
        example = torch.zeros(2, *input_shape)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=4096)},),
                                      strict=False)
        torch.export.save(program, str(target))
        return target

    def open(self, source: Source, threads: int) -> Session:
        import torch

        if isinstance(source, torch.nn.Module):
            return EagerSession(source.eval(), threads)
        return EagerSession(load_pt2(Path(source)), threads)

    def peak_memory_mb(self, source: Source, input_shape: tuple[int, int, int], threads: int,
                       batch_size: int) -> float:
        import torch

        model = source.eval() if isinstance(source, torch.nn.Module) else load_pt2(Path(source))
        batch = np.random.default_rng(0).standard_normal((batch_size, *input_shape), dtype=np.float32)
        with EagerSession(model, threads):
            return allocator_peak_mb(model, batch)


