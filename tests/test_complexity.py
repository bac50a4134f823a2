"""The complexity counter against figures computed by hand (pycls definitions)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from podium.methods.complexity import count
from podium.methods.shrinking import OFASupernet, OpenSpace, ShrinkingConfig, extract_subnet


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


def test_attention_products_count_by_hand():
    """One ViT block: pycls's MultiheadAttention.complexity adds QK^T and AV, T^2*D multiply-adds each,
    with H*T^2 score and T*D value activations; the bare cls_token/pos_embed parameters count."""
    from timm.models.vision_transformer import VisionTransformer

    t, d, h = 5, 8, 2  # 2x2 patches of 4x4 on 8x8, plus the class token
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=d, depth=1,
                              num_heads=h, mlp_ratio=4.0)
    cx = count(model, (8, 8), in_chans=1)
    patch = 4 * 4 * d * 4 + d * 4
    linears = t * (d * 3 * d + 3 * d) + t * (d * d + d) + t * (d * 4 * d + 4 * d) + t * (4 * d * d + d)
    attention = 2 * t * t * d
    head = d * 3 + 3
    assert cx.flops == patch + linears + attention + head
    assert cx.acts == d * 4 + t * (3 * d + d + 4 * d + d) + (h * t * t + t * d) + 3
    assert cx.params == sum(p.numel() for p in model.parameters())


def test_fused_and_explicit_attention_count_alike():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    fused = count(model, (224, 224))
    for block in model.blocks:
        block.attn.fused_attn = False  # q @ k^T, softmax, @ v
    assert count(model, (224, 224)) == fused
    assert fused.params == sum(p.numel() for p in model.parameters())  # cls_token and pos_embed included


@pytest.mark.parametrize("name, gflops", [("deit_tiny_patch16_224", 1.26), ("deit_small_patch16_224", 4.61),
                                          ("deit_base_patch16_224", 17.6), ("swin_tiny_patch4_window7_224", 4.50)])
def test_transformers_match_their_papers(name, gflops):
    """DeiT-Ti/S/B at 224: 1.26 / 4.61 / 17.6 GFLOPs (the DeiT paper, as pycls counts attention); Swin-T 4.5
    (its windows run as the batch of its window attention). Built on the meta device: shapes, no weights."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
        cx = count(model, (224, 224))
    assert f"{cx.flops / 1e9:.3g}" == f"{gflops:.3g}"
    assert cx.params == sum(p.numel() for p in model.parameters())


def test_bare_parameters_count_once_when_computed_with():
    class Shell(nn.Module):  # holds a parameter but never runs (like a split hook's shell)
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(1, 2, 1, 1))
            self.unused = nn.Parameter(torch.zeros(7))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.shell = nn.Conv2d(1, 2, 1, bias=False), Shell()

        def forward(self, x):
            y = self.conv(x) + self.shell.offset + self.shell.offset
            return y.new_zeros(self.shell.unused.shape) + y.sum()  # a shape read is not a use

    cx = count(Net(), (3, 3), in_chans=1)
    assert cx.params == 2 + 2


def test_functional_calls_on_sliced_weights_count_what_they_run():
    class Elastic(nn.Module):  # an OFA-style block: only the active slice of each weight computes
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.fc = nn.Linear(8 * 5 * 5, 10)
            self.transform = nn.Parameter(torch.eye(9))

        def forward(self, x):
            kernel = F.linear(self.conv.weight[:4].reshape(-1, 9), self.transform).reshape(4, 3, 3, 3)
            y = F.conv2d(x, kernel, None, 1, 1)  # 4 of the 8 filters
            return F.linear(y.flatten(1), self.fc.weight[:6, :4 * 25], self.fc.bias[:6])

    cx = count(Elastic(), (5, 5), in_chans=3)
    conv_out, fc_out = 4 * 5 * 5, 6
    # the kernel transform multiplies weights by weights: no activation, 0 flops
    assert cx.flops == conv_out * 3 * 3 * 3 + fc_out * 4 * 25 + fc_out
    assert cx.acts == conv_out + fc_out


def test_an_ofa_supernet_counts_as_its_extracted_subnetwork():
    cfg = ShrinkingConfig(stem_width=8, first_block_width=8, unit_widths=(8, 16), unit_strides=(1, 2),
                          unit_se=(False, True), unit_acts=("relu", "hswish"), head_width=24, feature_width=32,
                          depth_choices=(1, 2), resolutions=(16, 20))
    supernet, space, rng = OFASupernet(cfg, in_chans=1, num_classes=10), OpenSpace.full(cfg), random.Random(0)
    archs = [space.uniform(2, "max"), space.uniform(2, "min")] + [space.sample(2, rng) for _ in range(3)]
    seen = set()
    for arch in archs:
        supernet.set_active(arch)
        size = (arch.resolution, arch.resolution)
        elastic, extracted = count(supernet, size, in_chans=1), count(extract_subnet(supernet, arch), size, in_chans=1)
        assert (elastic.flops, elastic.acts) == (extracted.flops, extracted.acts), arch.name
        seen.add(elastic.flops)
    assert len(seen) == len(archs)  # each sub-network its own count, not the full supernet's or 0
