"""Model complexity: flops, params and activations, counted as the pycls code counts them.

The single source of these numbers for every method (Dollár et al., CVPR 2021):

- ``flops``: multiply-adds. Conv: k_h*k_w*C_in*C_out*H'*W'/groups (+C_out*H'*W' with bias);
  Linear: C_in*C_out per output row (+C_out with bias). Norms, activations, pooling, adds: 0.
- ``params``: parameters of every module that runs in the forward pass (a module reached twice
  counts once). Norm layers count 2*C (affine weight and bias; running stats are buffers).
- ``acts``: elements of the output tensors of conv and linear layers (max-pool outputs are *not*
  counted, as in fvcore/timm's tables rather than pycls).

Counted with forward hooks at batch 1 for the given input size, so a stitched or truncated
path counts only the layers it runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Complexity:
    flops: int
    params: int
    acts: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _per_sample(output: torch.Tensor) -> int:
    return output.numel() // output.shape[0]


def _conv_flops(conv: nn.Conv2d, output: torch.Tensor) -> int:
    out_elements = _per_sample(output)  # C_out * H' * W'
    k_h, k_w = conv.kernel_size
    macs = out_elements * k_h * k_w * (conv.in_channels // conv.groups)
    return macs + (out_elements if conv.bias is not None else 0)


def _linear_flops(linear: nn.Linear, output: torch.Tensor) -> int:
    rows = _per_sample(output) // linear.out_features  # tokens per sample (1 for a classifier)
    macs = rows * linear.in_features * linear.out_features
    return macs + (rows * linear.out_features if linear.bias is not None else 0)


@torch.no_grad()
def count(model: nn.Module, input_size: tuple[int, int], in_chans: int = 3) -> Complexity:
    """Count flops/params/acts of ``model`` on one ``in_chans x H x W`` input."""
    flops = 0
    acts = 0
    ran: dict[int, nn.Module] = {}

    def hook(module: nn.Module, _inputs, output) -> None:
        nonlocal flops, acts
        ran[id(module)] = module
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Conv2d):
            flops += _conv_flops(module, output)
            acts += _per_sample(output)
        elif isinstance(module, nn.Linear):
            flops += _linear_flops(module, output)
            acts += _per_sample(output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, in_chans, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    seen: set[int] = set()
    params = 0
    for module in ran.values():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
    return Complexity(flops=int(flops), params=int(params), acts=int(acts))
