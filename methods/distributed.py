"""Data-parallel training with ``torch.distributed`` (gloo on CPU, NCCL on GPU), as ``torchrun`` starts it.

Every process runs the same method code on the same data loader with the same seeds, so all draw
the same batches and the same sub-networks. :func:`methods.train.fit` then trains each process on
its slice of every global batch and averages the gradients (weighted by slice size) before the
optimiser step: the update is the one a single process makes on the whole batch, so the same
global batch size gives the same model. BatchNorm layers normalise with the statistics of the whole
global batch during training (:func:`synchronized_batchnorm`, two all-reduces per layer, on gloo as
well as NCCL, which ``nn.SyncBatchNorm`` does not support on CPU): without it every process would
normalise its own slice and the model would drift away from the single-process one.
"""
from __future__ import annotations

import os
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

# Its replacement (_functional_collectives) has no autograd on every version we support; this one does.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_primary() -> bool:
    """The process that writes (checkpoints, results, logs of record)."""
    return rank() == 0


def init_from_env() -> str:
    """Join the process group torchrun describes in the environment; returns the device to train on."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("PODIUM_DEVICE", "auto") != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return f"cuda:{local_rank}" if use_cuda else "cpu"


def close() -> None:
    """Leave the process group once every process is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This process's slice of a global batch and its share of it (the loss weight)."""
    world = world_size()
    if world == 1:
        return images, labels, 1.0
    index = rank()
    mine_images, mine_labels = images.tensor_split(world)[index], labels.tensor_split(world)[index]
    return mine_images, mine_labels, mine_images.shape[0] / max(images.shape[0], 1)


def share_of_global_batch(local: int) -> float:
    """This process's share of a global batch that a sharded loader already split (one all-reduce)."""
    if world_size() == 1:
        return 1.0
    total = torch.tensor([float(local)])
    dist.all_reduce(total)
    return local / max(float(total.item()), 1.0)


def sum_gradients(model: nn.Module) -> None:
    """Sum the (share-weighted) gradients of every process, in one all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def synchronized_batchnorm(model: nn.Module) -> Iterator[None]:
    """While training data-parallel, every BatchNorm in ``model`` uses the global batch's statistics.

    The layers keep their class (and state dict); only their ``forward`` is replaced until the block
    ends, so what comes out is the same plain model a single process trains."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if world_size() == 1 or not norms:
        yield
        return
    for norm in norms:
        norm.forward = types.MethodType(_global_batch_norm, norm)
    try:
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


def _global_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm over the first ``C`` channels (all of them, or an elastic layer's active ones) with
    mean and variance of the global batch; differentiable through the all-reduces like ``SyncBatchNorm``."""
    if not self.training:
        return type(self).forward(self, x)
    channels, dims = x.shape[1], [0, *range(2, x.dim())]
    local = torch.cat([x.sum(dims), x.new_tensor([float(x.numel() // max(channels, 1))])])
    summed = dist_fn.all_reduce(local)  # sums and element count in one collective
    count = summed[-1].detach()
    mean = summed[:-1] / count
    shape = [1, channels] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    var = dist_fn.all_reduce((centred * centred).sum(dims)) / count  # two passes, as one process computes it
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * (count / (count - 1).clamp(min=1))
            self.running_mean[:channels].mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var[:channels].mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        out = out * self.weight[:channels].view(shape) + self.bias[:channels].view(shape)
    return out
