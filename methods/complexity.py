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

Counted at batch 1 for the given input size by a torch-function mode that sees every ``conv*d``,
``linear``, matrix product and attention call, whether a layer makes it or a forward calls
``F.conv2d`` on a sliced weight (an OFA supernet's active sub-network), so a stitched, truncated or
elastic path counts only what it runs. Calls on weights alone (OFA's kernel transform
``F.linear(crop, M)``) make weights, not activations, and count 0.
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


_MATRIX_PRODUCTS = {"matmul", "__matmul__", "bmm"}
_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d"}
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
    ``F.linear`` is one call): records the parameters it computes with, follows the tensors made
    from parameters alone, and counts the products of activations. Runs at batch 1, so whole-tensor
    sizes are per-sample sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.params: dict[int, nn.Parameter] = {}
        # tensors computed from parameters alone (slices, transformed kernels), kept alive so ids stay theirs
        self.weight_only: dict[int, torch.Tensor] = {}
        self.flops = 0
        self.acts = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [leaf for leaf in _leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if name not in _METADATA:
            for leaf in tensors:
                if isinstance(leaf, nn.Parameter):
                    self.params[id(leaf)] = leaf
        out = func(*args, **kwargs)
        if tensors and all(isinstance(t, nn.Parameter) or id(t) in self.weight_only for t in tensors):
            for leaf in _leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.weight_only[id(leaf)] = leaf
            return out
        if not isinstance(out, torch.Tensor):
            return out
        if name in _CONVOLUTIONS:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            macs = out.numel() * weight[0].numel()  # C_out*H'*W' outputs, each k*k*C_in/groups
            self.flops += macs + (out.numel() if bias is not None else 0)
            self.acts += out.numel()
        elif name == "linear":
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # rows: tokens (1 for a classifier); Swin's windows run as the batch, so all are counted
            self.flops += out.numel() * args[0].shape[-1] + (out.numel() if bias is not None else 0)
            self.acts += out.numel()
        elif name == "scaled_dot_product_attention":
            query, key, value = args[:3] if len(args) >= 3 else (kwargs.get("query"), kwargs.get("key"),
                                                                 kwargs.get("value"))
            scores = query.numel() // query.shape[-1] * key.shape[-2]  # (..., heads, T_q, T_k)
            self.flops += scores * query.shape[-1] + scores * value.shape[-1]  # QK^T, then AV
            self.acts += scores + out.numel()
        elif name in _MATRIX_PRODUCTS and args[0].ndim >= 1:
            self.flops += out.numel() * args[0].shape[-1]
            self.acts += out.numel()
        return out


@torch.no_grad()
def count(model: nn.Module, input_size: tuple[int, int], in_chans: int = 3) -> Complexity:
    """Count flops/params/acts of ``model`` on one ``in_chans x H x W`` input."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tally = _Tally()
    try:
        with tally:
            model(torch.zeros(1, in_chans, *input_size, device=device))
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in tally.params.values())
    return Complexity(flops=int(tally.flops), params=int(params), acts=int(tally.acts))
