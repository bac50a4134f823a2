"""Once-for-All progressive shrinking: elastic supernet, extraction, predictors, search."""
from __future__ import annotations

import copy
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
from podium.methods.shrinking.method import HOLDOUT_SPLIT, phase_train_config
from podium.methods.train import TrainConfig
from tests.conftest import onnx_logits, pt2_logits

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


def test_paper_recipe_from_yaml_is_the_papers_space_and_schedule() -> None:
    cfg = ShrinkingConfig.model_validate({"recipe": "paper"})
    assert len(cfg.unit_widths) == 5 and cfg.expand_choices == (3, 4, 6) and len(cfg.resolutions) == 25
    params = sum(p.numel() for p in OFASupernet(cfg, 3, 1000).parameters())
    assert 7.0e6 < params < 8.5e6  # the paper: about 7.7 M
    assert (cfg.train.lr, cfg.train.lr_batch, cfg.train.optimizer, cfg.train.weight_decay) == (2.6, 2048, "sgd", 3e-5)
    lrs = {p.name: round(cfg.train.lr * p.lr_mult, 6) for p in cfg.phases}
    assert lrs == {"full": 2.6, "kernel": 0.96, "depth-1": 0.08, "depth-2": 0.24, "width-1": 0.08, "width-2": 0.24}
    assert [p.subnets_per_step for p in cfg.phases] == [1, 1, 2, 2, 4, 4]
    assert (cfg.bn_recalibration_images, cfg.predictor.holdout_images, cfg.evolution.generations) == (2000, 10000, 500)
    kernel = phase_train_config(cfg, cfg.phases[1], 1, batches_per_epoch=10)  # 5 of its 125 epochs warm up
    assert (kernel.epochs, kernel.warmup_steps, kernel.lr) == (125, 50, pytest.approx(0.96))
    assert ShrinkingConfig.paper() == cfg and ShrinkingConfig.model_validate({}) == ShrinkingConfig()
    # YAML fields override the preset field by field; a phases list replaces the preset's whole
    mine = ShrinkingConfig.model_validate({"recipe": "paper", "predictor": {"samples": 8}, "train": {"epochs": 2},
                                           "phases": [{"name": "full", "elastic": "none", "epochs": 1}]})
    assert (mine.predictor.samples, mine.predictor.holdout_images) == (8, 10000)
    assert (mine.train.lr, mine.train.epochs) == (2.6, 2)
    assert [p.name for p in mine.phases] == ["full"] and mine.unit_widths == cfg.unit_widths


def test_bn_recalibration_images() -> None:
    assert ShrinkingConfig().bn_recalibration_images == 256  # the demo: what 4 batches of 64 read before


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


def test_second_width_phase_keeps_the_first_phases_channels_in_front() -> None:
    """Width phase 2 (expand {3,4,6}) re-sorts with the channels expand 4 trained kept in front, as
    the official re_organize_middle_weights(expand_ratio_stage=1): a plain sort would move them."""
    torch.manual_seed(2)
    block = ElasticMBConv(8, 8, 1, "relu", False, (3, 5, 7), (3, 4, 6)).eval()
    _randomise(block, seed=2)
    kept = 32  # make_divisible(8 * 4): the expand-4 width of width phase 1
    with torch.no_grad():
        block.project.weight[:, kept:] *= 10  # channels outside the phase-1 set are the most important
        block.expand_conv.weight[:, 0, 0, 0] = torch.arange(block.max_mid, dtype=torch.float32)  # channel ids
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        before = {e: block(x, 5, e) for e in (4, 6)}
    plain = copy.deepcopy(block)
    plain.sort_channels()
    assert set(plain.expand_conv.weight[:kept, 0, 0, 0].tolist()) != set(range(kept))  # it would move them
    block.sort_channels(keep_in_front=(4, 6))
    ids = block.expand_conv.weight[:, 0, 0, 0].tolist()
    assert set(ids[:kept]) == set(range(kept))
    importance = block.project.weight.abs().sum(dim=(0, 2, 3))
    for part in (importance[:kept], importance[kept:]):  # sorted within the phase-1 set and beyond it
        assert torch.all(part[:-1] >= part[1:])
    with torch.no_grad():  # the phase-1 sub-network (expand 4) computes what it did, so does the full one
        for e in (4, 6):
            torch.testing.assert_close(block(x, 5, e), before[e], atol=1e-5, rtol=1e-5)


def test_extracted_subnet_exports_to_onnx(supernet: OFASupernet, tmp_path) -> None:
    arch = OpenSpace.full(supernet.cfg).sample(2, random.Random(3))
    sub = extract_subnet(supernet, arch).eval()
    shape = (1, arch.resolution, arch.resolution)
    path = export_onnx(sub, shape, tmp_path / "sub.onnx")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = sub(x).numpy()
    np.testing.assert_allclose(onnx_logits(path, x.numpy()), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pt2_logits(sub, shape, x.numpy(), tmp_path / "pt2"), expected, atol=1e-4, rtol=1e-4)


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


def test_hold_out_moves_training_images_to_their_own_split(digits) -> None:
    data = digits.subset(train=100, val=20)
    held = data.hold_out(30, HOLDOUT_SPLIT)
    train_ids = {id(a) for a in held.splits["train"].images}
    holdout_ids = {id(a) for a in held.splits[HOLDOUT_SPLIT].images}
    assert (len(train_ids), len(holdout_ids)) == (70, 30) and not train_ids & holdout_ids
    assert train_ids | holdout_ids == {id(a) for a in data.splits["train"].images}
    assert held.splits["val"] is data.splits["val"]
    assert [id(a) for a in data.hold_out(30, HOLDOUT_SPLIT).splits[HOLDOUT_SPLIT].images] == \
        [id(a) for a in held.splits[HOLDOUT_SPLIT].images]  # the same draw every time
    with pytest.raises(ValueError):
        data.hold_out(100, HOLDOUT_SPLIT)


def _small(data: DataBundle, n_train: int = 128, n_val: int = 32) -> DataBundle:
    """A slice of the digits (fast): ``n_train`` training and ``n_val`` validation images, batches of 32."""
    small = data.subset(train=n_train, val=n_val)
    small.cfg = small.cfg.model_copy(update={"batch_size": 32})
    return small


def test_fit_and_search_end_to_end(digits, monkeypatch) -> None:
    phases = [PhaseConfig(name="full", elastic="none", max_steps=3),
              PhaseConfig(name="kernel", elastic="kernel", max_steps=2, lr_mult=0.4),
              PhaseConfig(name="depth", elastic="depth", max_steps=2, lr_mult=0.3, subnets_per_step=2),
              PhaseConfig(name="width-1", elastic="width", num_choices=2, max_steps=1, lr_mult=0.3,
                          subnets_per_step=2),
              PhaseConfig(name="width-2", elastic="width", max_steps=1, lr_mult=0.3, subnets_per_step=2)]
    cfg = TINY.model_copy(update={"phases": phases, "train": TrainConfig(lr=0.05, log_every_s=60),
                                  "predictor": TINY.predictor.model_copy(update={"samples": 4, "hidden": 32,
                                                                                 "epochs": 20, "holdout_images": 32}),
                                  "evolution": TINY.evolution.model_copy(update={"population": 12, "generations": 3,
                                                                                 "parents": 4, "mutation_children": 4,
                                                                                 "crossover_children": 4}),
                                  "top_k": 2, "bn_recalibration_images": 40, "lut_repeats": 3, "lut_warmup": 1, "lut_max_rounds": 10})
    data = _small(digits)
    reads: list[tuple[str, int | None]] = []
    trained_on: list[set[int]] = []
    kept_in_front: list[tuple] = []
    eval_loader, train_loader = DataBundle.eval_loader, DataBundle.train_loader
    sort_channels = OFASupernet.sort_channels

    def no_val(bundle, split="val", size=None, limit=None, batch_size=None):
        if split == "val":
            raise AssertionError("progressive shrinking or the accuracy predictor read val")
        reads.append((split, limit))
        return eval_loader(bundle, split, size, limit, batch_size)

    def recording_train(bundle, sizes=None):
        trained_on.append({id(a) for a in bundle.splits["train"].images})
        return train_loader(bundle, sizes)

    def recording_sort(net, keep_in_front=()):
        kept_in_front.append(tuple(keep_in_front))
        sort_channels(net, keep_in_front)

    with monkeypatch.context() as patch:
        patch.setattr(DataBundle, "eval_loader", no_val)
        patch.setattr(DataBundle, "train_loader", recording_train)
        patch.setattr(OFASupernet, "sort_channels", recording_sort)
        space = Shrinking(cfg).fit(data)
    assert [h["phase"] for h in space.history] == ["full", "kernel", "depth", "width-1", "width-2"]
    assert space.history[-1]["expands"] == [3, 4, 6] and space.history[-1]["kernels"] == [3, 5, 7]
    assert kept_in_front == [(6,), (4, 6)]  # width phase 2 keeps what phase 1 trained in front
    # the supernet trained on the training split less the hold-out, the predictor's targets came from it
    holdout = {id(a) for a in space.data.splits[HOLDOUT_SPLIT].images}
    assert len(holdout) == 32 and len(trained_on) == len(phases)
    assert all(ids == trained_on[0] and not ids & holdout for ids in trained_on)
    assert trained_on[0] | holdout == {id(a) for a in data.splits["train"].images}
    assert reads.count((HOLDOUT_SPLIT, None)) == cfg.predictor.samples
    assert set(reads) == {(HOLDOUT_SPLIT, None), ("train", 40)}  # BN statistics: 40 training images, not the hold-out
    assert space.predictor_report["holdout_images"] == 32
    device = DeviceProfile(name="cpu-test", threads=1, latency_budget_ms=1000.0, warmup=1, round_repeats=1,
                           min_rounds=3, max_rounds=3, max_seconds=1.0)
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


def test_the_lookup_table_holds_every_layer_a_sub_network_runs_measured_in_one_pinned_process():
    """The table enumerates the space's layer configurations up front (no search can ask for one it
    lacks) and measures them together, isolated; calibration networks are measured the same way."""
    import random

    from podium.methods.shrinking.latency import LatencyTable

    supernet = OFASupernet(TINY, 1, 10)
    space = OpenSpace.full(TINY)
    every = supernet.all_layer_specs(space)
    rng = random.Random(0)
    for _ in range(200):
        assert set(supernet.layer_specs(space.sample(len(TINY.unit_widths), rng))) <= every
    device = DeviceProfile(name="t", runtime="onnxruntime", latency_budget_ms=100, warmup=1, round_repeats=2,
                           min_rounds=3, max_rounds=3)
    table = LatencyTable(supernet, device, TINY, space)
    small, large = space.uniform(len(TINY.unit_widths), "min"), space.uniform(len(TINY.unit_widths), "max")
    assert table.table_sum(small) < table.table_sum(large)  # one read measured the whole space
    assert set(table.table) == every and all(v > 0 for v in table.table.values())
    measured = table.measure_archs([small, large])
    assert 0 < measured[0] < measured[1]
    table.calibrate([small, large])
    assert table.predict(large) > table.predict(small) > 0
