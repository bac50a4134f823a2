"""The complexity counter against figures computed by hand (pycls definitions)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from podium.methods.complexity import count


def test_conv3x3_counts_by_hand():
    # 3 -> 8 channels, 3x3, pad 1, on 10x10: out 8x10x10
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    cx = count(conv, (10, 10), in_chans=3)
    assert cx.flops == 3 * 3 * 3 * 8 * 10 * 10  # k*k*Cin*Cout*H'*W' = 21,600 multiply-adds
    assert cx.params == 3 * 3 * 3 * 8
    assert cx.acts == 8 * 10 * 10


def test_conv_bias_stride_and_groups():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=True)
    cx = count(conv, (8, 8), in_chans=8)
    out = 16 * 4 * 4
    assert cx.flops == 3 * 3 * (8 // 4) * out + out  # grouped MACs + one add per output for the bias
    assert cx.params == 16 * (8 // 4) * 3 * 3 + 16
    assert cx.acts == out


def test_linear_counts_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 4 * 5, 10))
    cx = count(model, (4, 5), in_chans=1)
    assert cx.flops == 20 * 10 + 10
    assert cx.params == 20 * 10 + 10
    assert cx.acts == 10


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + identity, then ReLU (ResNet basic block)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def test_residual_block_counts_by_hand():
    c, h, w = 4, 6, 6
    cx = count(_BasicBlock(c), (h, w), in_chans=c)
    conv_macs = 3 * 3 * c * c * h * w  # 5,184 per conv
    assert cx.flops == 2 * conv_macs  # BN, ReLU and the residual add are free
    assert cx.params == 2 * (3 * 3 * c * c) + 2 * (2 * c)  # BN: affine weight+bias, not running stats
    assert cx.acts == 2 * c * h * w  # conv outputs only


def test_maxpool_and_unused_modules_are_not_counted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            self.pool = nn.MaxPool2d(2)
            self.unused = nn.Linear(100, 100)

        def forward(self, x):
            return self.pool(self.conv(x))

    cx = count(Net(), (4, 4), in_chans=1)
    assert cx.flops == 1 * 2 * 16
    assert cx.params == 2  # the unused Linear never ran
    assert cx.acts == 2 * 16  # the max-pool output is not an activation here (fvcore/timm convention)


def test_shared_module_params_once_flops_per_call():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    model = nn.Sequential(conv, conv)
    cx = count(model, (3, 3), in_chans=2)
    assert cx.flops == 2 * (2 * 2 * 9)
    assert cx.params == 4
    assert cx.acts == 2 * (2 * 9)


def test_count_restores_training_mode():
    model = _BasicBlock(2).train()
    count(model, (4, 4), in_chans=2)
    assert model.training


def test_regnetx_200mf_matches_pycls_zoo():
    """pycls model zoo: RegNetX-200MF is 0.2 GF, 2.7 M params, 2.2 M acts at 224x224."""
    import timm

    model = timm.create_model("regnetx_002", pretrained=False)
    cx = count(model, (224, 224), in_chans=3)
    assert cx.flops == pytest.approx(199.0e6, rel=0.01)
    assert cx.params == pytest.approx(2.68e6, rel=0.01)
    assert cx.acts == pytest.approx(2.16e6, rel=0.01)
