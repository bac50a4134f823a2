"""Data-parallel training with ``torch.distributed`` (gloo on CPU, NCCL on GPU), as ``torchrun`` starts it.

Every process runs the same method code on the same data loader with the same seeds, so all draw
the same batches and the same sub-networks. :func:`methods.train.fit` then trains each process on
its slice of every global batch and averages the gradients (weighted by slice size) before the
optimiser step: the update is the one a single process makes on the whole batch, so the same
global batch size gives the same model. Only normalisation statistics differ: BatchNorm sees each
process's slice, as with PyTorch's DistributedDataParallel.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


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
