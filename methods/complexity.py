"""Model complexity: flops, params and activations, counted as the pycls code counts them.

The single source of these numbers for every method (Dollár et al., CVPR 2021):

- ``flops``: multiply-adds. Conv: k_h*k_w*C_in*C_out*H'*W'/groups (+C_out*H'*W' with bias);
  Linear: C_in*C_out per output row (+C_out with bias); other matrix products (attention's QK^T and
  AV, as pycls's ``MultiheadAttention.complexity``): n*k*m per (n x k)(k x m) product, so
  2*T^2*D per attention layer, whether it runs as matmuls or fused in
  ``F.scaled_dot_product_attention``. Norms, activations, softmax, pooling, adds: 0.
- ``params``: every parameter the forward pass computes with, once (a module reached twice, or a
  bare ``nn.Parameter`` such as a ViT's ``cls_token``/``pos_embed`` or Swin's relative position
  bias tables, counts once; reading only its shape or device does not count). Norm layers count
  2*C (affine weight and bias; running stats are buffers).
- ``acts``: elements of the output tensors of conv and linear layers and of the attention products
  (H*T^2 scores and T*D values per layer, as pycls; max-pool outputs are *not* counted, as in
  fvcore/timm's tables rather than pycls).

Counted at batch 1 for the given input size (forward hooks on conv/linear layers, a torch-function
mode for the parameters and the attention products), so a stitched or truncated path counts only
what it runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Complexity:
    flops: int
    params: int
    acts: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _conv_flops(conv: nn.Conv2d, output: torch.Tensor) -> int:
    out_elements = output.numel()  # C_out * H' * W' (batch 1)
    k_h, k_w = conv.kernel_size
    macs = out_elements * k_h * k_w * (conv.in_channels // conv.groups)
    return macs + (out_elements if conv.bias is not None else 0)


def _linear_flops(linear: nn.Linear, output: torch.Tensor) -> int:
    # tokens (1 for a classifier); Swin's window attention runs its windows as the batch: count them all
    rows = output.numel() // linear.out_features
    macs = rows * linear.in_features * linear.out_features
    return macs + (rows * linear.out_features if linear.bias is not None else 0)


_MATRIX_PRODUCTS = {"matmul", "__matmul__", "bmm"}
# What a forward pass may ask of a parameter without computing with it.
_METADATA = {"__get__", "numel", "size", "dim", "element_size", "is_floating_point", "is_complex", "is_contiguous"}


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


class _Tally(TorchFunctionMode):
    """Sees every torch function the forward pass calls (not those nested inside one: nn.Linear's
    ``F.linear`` is one call): records the parameters it computes with and counts the matrix
    products. Runs at batch 1, so whole-tensor sizes are per-sample sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.params: dict[int, nn.Parameter] = {}
        self.flops = 0
        self.acts = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _METADATA:
            for leaf in _leaves((args, kwargs)):
                if isinstance(leaf, nn.Parameter):
                    self.params[id(leaf)] = leaf
        out = func(*args, **kwargs)
        if name == "scaled_dot_product_attention":
            query, key, value = args[:3] if len(args) >= 3 else (kwargs.get("query"), kwargs.get("key"),
                                                                 kwargs.get("value"))
            scores = query.numel() // query.shape[-1] * key.shape[-2]  # (..., heads, T_q, T_k)
            self.flops += scores * query.shape[-1] + scores * value.shape[-1]  # QK^T, then AV
            self.acts += scores + out.numel()
        elif name in _MATRIX_PRODUCTS and isinstance(out, torch.Tensor) and args[0].ndim >= 1:
            self.flops += out.numel() * args[0].shape[-1]
            self.acts += out.numel()
        return out


@torch.no_grad()
def count(model: nn.Module, input_size: tuple[int, int], in_chans: int = 3) -> Complexity:
    """Count flops/params/acts of ``model`` on one ``in_chans x H x W`` input."""
    flops = 0
    acts = 0

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal flops, acts
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Conv2d):
            flops += _conv_flops(module, output)
            acts += output.numel()
        elif isinstance(module, nn.Linear):
            flops += _linear_flops(module, output)
            acts += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tally = _Tally()
    try:
        with tally:
            model(torch.zeros(1, in_chans, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params = sum(p.numel() for p in tally.params.values())
    return Complexity(flops=int(flops + tally.flops), params=int(params), acts=int(acts + tally.acts))
