"""Deployment artifacts: ONNX graphs and safetensors weights (never pickles)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path, opset: int = 17) -> Path:
    """Export ``model`` (eval mode, CPU) to ONNX with a dynamic batch axis. ``input_shape`` is C, H, W."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *input_shape)
    torch.onnx.export(
        model, (example,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
    )
    return path


def with_metadata(src: Path, dest: Path, props: dict[str, str]) -> Path:
    """A copy of the ONNX file ``src`` at ``dest`` with ``props`` in its ``metadata_props`` (the graph is
    unchanged: what was measured is what ships)."""
    import onnx

    model = onnx.load(str(src))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dest))
    return Path(dest)


def save_weights(model: nn.Module, path: Path) -> Path:
    """State dict as safetensors: loads without executing code (shared tensors are cloned)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)))
    return model
