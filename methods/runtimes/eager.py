"""Eager PyTorch on the CPU: the module itself, no artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from podium.methods.runtimes import Runtime, Session, Source, register_runtime


class EagerSession(Session):
    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model.eval()
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def close(self) -> None:
        self.inference.__exit__(None, None, None)
        torch.set_num_threads(self.previous_threads)

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        device = next(self.model.parameters(), torch.empty(0)).device
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)

    def run(self, prepared: Any) -> Any:
        return self.model(prepared)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.prepare(batch)).float().cpu().numpy()


@register_runtime
class EagerRuntime(Runtime):
    name = "torch"
    artifact_name = None
    portable = False

    def available(self) -> bool:
        return True

    def export(self, model: nn.Module, input_shape: tuple[int, int, int], folder: Path) -> Source:
        return model

    def open(self, source: Source, threads: int) -> Session:
        if not isinstance(source, nn.Module):
            raise TypeError("the torch runtime runs an nn.Module, not a file")
        return EagerSession(source, threads)
