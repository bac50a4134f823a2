"""Once-for-All progressive shrinking: elastic supernet, extraction, predictors, search."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from podium.methods.data import DataBundle
from podium.methods.export import export_onnx
from podium.methods.profiling import DeviceProfile
from podium.methods.shrinking import (
    Arch,
    ElasticMBConv,
    OFASubnet,
    OFASupernet,
    OpenSpace,
    PhaseConfig,
    Shrinking,
    ShrinkingConfig,
    describe_space,
    encode_arch,
    extract_subnet,
    space_size,
)
from podium.methods.train import TrainConfig
from tests.conftest import onnx_logits

TINY = ShrinkingConfig(stem_width=8, first_block_width=8, unit_widths=(8, 16), unit_strides=(1, 2),
                       unit_se=(False, True), unit_acts=("relu", "hswish"), head_width=24, feature_width=32,
                       depth_choices=(1, 2), resolutions=(16, 20))


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affines and kernel transforms, so equality tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            if isinstance(m, ElasticMBConv):
                for p in m.kernel_transforms.values():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def supernet() -> OFASupernet:
    torch.manual_seed(0)
    net = OFASupernet(TINY, in_chans=1, num_classes=10)
    _randomise(net)
    return net.eval()


def test_paper_space_size_matches_closed_form() -> None:
    cfg = ShrinkingConfig.paper()
    assert space_size(cfg) == (9 ** 2 + 9 ** 3 + 9 ** 4) ** 5 * 25 == 7371 ** 5 * 25
    info = describe_space(cfg)
    assert info["units"] == 5 and info["resolutions"][0] == 128 and info["resolutions"][-1] == 224
    assert info["subnets_per_resolution"] == 7371 ** 5
    # a brute-force count on a small space agrees with the closed form
    small = ShrinkingConfig(unit_widths=(8, 8), unit_strides=(1, 1), unit_se=(False, False),
                            unit_acts=("relu", "relu"), depth_choices=(1, 2), kernel_choices=(3, 5),
                            expand_choices=(3,), resolutions=(16, 20))
    per_unit = sum(len(list(np.ndindex(*(2,) * d))) for d in (1, 2))  # |K|^d * |E|^d with |E| = 1
    assert space_size(small) == per_unit ** 2 * 2


def test_paper_supernet_has_the_papers_size() -> None:
    params = sum(p.numel() for p in OFASupernet(ShrinkingConfig.paper(), 3, 1000).parameters())
    assert 7.0e6 < params < 8.5e6  # the paper: about 7.7 M


def test_kernel_transform_at_identity_is_centre_crop() -> None:
    block = ElasticMBConv(8, 8, 1, "relu", False, (3, 5, 7), (3, 4, 6))
    w = block.depthwise.weight
    assert torch.equal(block.active_kernel(7), w)
    assert torch.allclose(block.active_kernel(5), w[:, :, 1:6, 1:6])
    assert torch.allclose(block.active_kernel(3), w[:, :, 2:5, 2:5])
    # K3 comes from the *transformed* K5, never straight from K7
    with torch.no_grad():
        block.kernel_transforms["7to5"].copy_(torch.randn(25, 25))
    k5 = block.active_kernel(5)
    expected = (k5[:, :, 1:4, 1:4].reshape(-1, 9) @ block.kernel_transforms["5to3"].T).reshape(-1, 1, 3, 3)
    assert torch.allclose(block.active_kernel(3), expected, atol=1e-6)
    assert not torch.allclose(block.active_kernel(3), w[:, :, 2:5, 2:5])


def test_extracted_subnet_equals_supernet(supernet: OFASupernet) -> None:
    rng = random.Random(0)
    space = OpenSpace.full(supernet.cfg)
    archs = [space.uniform(2, "max"), space.uniform(2, "min")] + [space.sample(2, rng) for _ in range(3)]
    for arch in archs:
        x = torch.randn(3, 1, arch.resolution, arch.resolution)
        supernet.set_active(arch)
        with torch.no_grad():
            expected = supernet(x)
            sub = extract_subnet(supernet, arch).eval()
            got = sub(x)
        assert isinstance(sub, OFASubnet)
        assert not any(isinstance(m, ElasticMBConv) for m in sub.modules())
        assert len(sub.blocks) == sum(arch.depths)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert Arch.from_dict(arch.to_dict()) == arch


def test_channel_sorting_keeps_full_network_function() -> None:
    torch.manual_seed(1)
    net = OFASupernet(TINY, in_chans=1, num_classes=10)
    _randomise(net, seed=1)
    net.eval()
    x = torch.randn(4, 1, 20, 20)
    before = net(x).detach()
    block = net.units[1][0]
    importance_before = block.project.weight.abs().sum(dim=(0, 2, 3))
    net.sort_channels()
    after = net(x).detach()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    importance = block.project.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])  # sorted, most important first
    assert not torch.equal(importance, importance_before)  # and the test actually permuted something
    se_importance = block.se_expand.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(se_importance[:-1] >= se_importance[1:])


def test_extracted_subnet_exports_to_onnx(supernet: OFASupernet, tmp_path) -> None:
    arch = OpenSpace.full(supernet.cfg).sample(2, random.Random(3))
    sub = extract_subnet(supernet, arch).eval()
    shape = (1, arch.resolution, arch.resolution)
    path = export_onnx(sub, shape, tmp_path / "sub.onnx")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = sub(x).numpy()
    np.testing.assert_allclose(onnx_logits(path, x.numpy()), expected, atol=1e-4, rtol=1e-4)


def test_encoding_zeroes_skipped_blocks() -> None:
    cfg = ShrinkingConfig()
    shallow = Arch(24, (1, 1, 1), ((3,), (5,), (7,)), ((3,), (4,), (6,)))
    vec = encode_arch(shallow, cfg)
    assert vec.sum() == 3 * 2 + 1  # one kernel and one expand per active block, one resolution


def test_config_rejects_inconsistent_space() -> None:
    with pytest.raises(ValueError):
        ShrinkingConfig(unit_widths=(8, 16), unit_strides=(1,), unit_se=(False, True), unit_acts=("relu", "relu"))
    with pytest.raises(ValueError):
        ShrinkingConfig(kernel_choices=(3, 4))
    with pytest.raises(ValueError):
        ShrinkingConfig(phases=[PhaseConfig(name="kernel", elastic="kernel")])


def _small(data: DataBundle, n_train: int = 128, n_val: int = 32) -> DataBundle:
    """A slice of the digits (fast): ``n_train`` training and ``n_val`` validation images, batches of 32."""
    small = data.subset(train=n_train, val=n_val)
    small.cfg = small.cfg.model_copy(update={"batch_size": 32})
    return small


def test_fit_and_search_end_to_end(digits) -> None:
    phases = [PhaseConfig(name="full", elastic="none", max_steps=3),
              PhaseConfig(name="kernel", elastic="kernel", max_steps=2, lr_mult=0.4),
              PhaseConfig(name="depth", elastic="depth", max_steps=2, lr_mult=0.3, subnets_per_step=2),
              PhaseConfig(name="width", elastic="width", max_steps=2, lr_mult=0.3, subnets_per_step=2)]
    cfg = TINY.model_copy(update={"phases": phases, "train": TrainConfig(lr=0.05, log_every_s=60),
                                  "predictor": TINY.predictor.model_copy(update={"samples": 4, "hidden": 32, "epochs": 20}),
                                  "evolution": TINY.evolution.model_copy(update={"population": 12, "generations": 3,
                                                                                 "parents": 4, "mutation_children": 4,
                                                                                 "crossover_children": 4}),
                                  "top_k": 2, "bn_recalibration_batches": 1, "lut_repeats": 3, "lut_warmup": 1})
    space = Shrinking(cfg).fit(_small(digits))
    assert [h["phase"] for h in space.history] == ["full", "kernel", "depth", "width"]
    assert space.history[-1]["expands"] == [3, 4, 6] and space.history[-1]["kernels"] == [3, 5, 7]
    device = DeviceProfile(name="cpu-test", threads=1, latency_budget_ms=1000.0, warmup=1, min_repeats=3,
                           max_repeats=3, max_seconds=1.0)
    cands = list(space.candidates(device))
    assert 1 <= len(cands) <= 2
    for cand in cands:
        assert cand.method == "shrinking" and cand.name.startswith("ofa-r")
        assert cand.metrics["predicted_latency_ms"] <= device.latency_budget_ms
        assert cand.metrics["p50_ms"] > 0 and 0.0 <= cand.metrics["val_acc"] <= 1.0
        assert cand.metrics["flops"] > 0 and cand.metrics["params"] > 0 and cand.metrics["acts"] > 0
        assert cand.input_size == (cand.config["resolution"],) * 2
        assert not any(isinstance(m, ElasticMBConv) for m in cand.model.modules())
        assert cand.model(torch.randn(1, 1, *cand.input_size)).shape == (1, 10)
    assert list(space.candidates(device))[0] is cands[0]  # cached per device
    assert space.latency_tables["cpu-test"].table  # measured entries
    # a budget below the smallest sub-network yields nothing
    tight = device.model_copy(update={"name": "cpu-tight", "latency_budget_ms": 1e-6})
    assert list(space.candidates(tight)) == []
    reps = list(space.candidates())
    assert len(reps) == 3 and reps[0].metrics["flops"] > reps[-1].metrics["flops"]
