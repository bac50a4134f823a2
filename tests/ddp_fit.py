"""Run by `torchrun` from tests/test_distributed.py: the same small training in each process, data-parallel.

Usage: torchrun --nproc_per_node N tests/ddp_fit.py OUT.safetensors
"""
from __future__ import annotations

import logging
import sys

import torch
from safetensors.torch import save_file
from torch import nn

from podium.methods import distributed
from podium.methods.train import TrainConfig, cross_entropy_loss, fit
from tests.conftest import digits_bundle

CFG = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", seed=3)


def small_net() -> nn.Module:
    """With BatchNorm: each process sees a slice, yet must normalise with the global batch's statistics."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train() -> nn.Module:
    torch.set_num_threads(1)
    data = digits_bundle(image_size=(16, 16), batch_size=96)
    model = small_net()
    fit(model, data.train, cross_entropy_loss(model), CFG, name="ddp-test")
    return model


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    distributed.init_from_env()
    trained = train()
    if distributed.is_primary():
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, sys.argv[1])
    distributed.close()
