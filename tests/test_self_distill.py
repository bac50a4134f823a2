"""Self-distillation (Be Your Own Teacher): loss terms, gradient isolation, truncated exports, fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from podium.methods.base import Anchor
from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.self_distill import (
    DEFAULT_ARCH,
    EarlyExitNet,
    MultiExitNet,
    SelfDistill,
    SelfDistillConfig,
    TruncatedExit,
    describe_space,
    export_exit,
    self_distillation_loss,
)
from podium.methods.train import TrainConfig
from tests.conftest import onnx_logits

NUM_CLASSES = 10


def _net(seed: int = 0) -> MultiExitNet:
    torch.manual_seed(seed)
    return MultiExitNet(build(DEFAULT_ARCH, NUM_CLASSES, 1), NUM_CLASSES)


def _randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial running stats, so eval-mode equality tests can fail if a BN is skipped or swapped."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def space(digits):
    cfg = SelfDistillConfig(train=TrainConfig(max_steps=50, lr=0.05, warmup_steps=5))
    return SelfDistill(cfg).fit(digits)


# ---------------------------------------------------------------- loss terms


def _random_outputs(n_exits: int = 4, batch: int = 8, dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(batch, NUM_CLASSES, generator=gen) for _ in range(n_exits)]
    features = [torch.randn(batch, dim, generator=gen) for _ in range(n_exits)]
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return logits, features, labels


def test_loss_terms_positive_in_general():
    logits, features, labels = _random_outputs()
    out = self_distillation_loss(logits, features, labels)
    assert len(out.ce) == 4 and len(out.kl) == 3 and len(out.hint) == 3  # the deepest has no KL/hint
    assert all(t.item() > 0 for t in [*out.ce, *out.kl, *out.hint])
    expected = out.ce[-1] + sum(0.7 * c + 0.3 * k + 0.03 * h for c, k, h in zip(out.ce[:-1], out.kl, out.hint))
    torch.testing.assert_close(out.total, expected)


def test_kl_zero_iff_shallow_matches_teacher():
    logits, features, labels = _random_outputs()
    logits[1] = logits[-1].clone()
    out = self_distillation_loss(logits, features, labels)
    assert abs(out.kl[1].item()) < 1e-6
    assert out.kl[0].item() > 1e-3 and out.kl[2].item() > 1e-3
    # KL is computed at temperature T and scaled by T^2
    t = 3.0
    manual = F.kl_div(F.log_softmax(logits[0] / t, 1), F.softmax(logits[-1] / t, 1), reduction="batchmean") * t * t
    torch.testing.assert_close(out.kl[0], manual)


def test_hint_zero_iff_features_match_and_switchable():
    logits, features, labels = _random_outputs()
    features[0] = features[-1].clone()
    out = self_distillation_loss(logits, features, labels)
    assert out.hint[0].item() == 0.0
    assert out.hint[1].item() > 0 and out.hint[2].item() > 0
    off = self_distillation_loss(logits, features, labels, hint_weight=0.0)
    assert all(h.item() == 0.0 for h in off.hint)
    expected = off.ce[-1] + sum(0.7 * c + 0.3 * k for c, k in zip(off.ce[:-1], off.kl))
    torch.testing.assert_close(off.total, expected)
    assert out.total.item() > off.total.item()


def test_ce_zero_for_confident_correct_and_positive_otherwise():
    logits, features, labels = _random_outputs()
    confident = F.one_hot(labels, NUM_CLASSES).float() * 1e4
    logits[0] = confident
    out = self_distillation_loss(logits, features, labels)
    assert out.ce[0].item() < 1e-6
    wrong = F.one_hot((labels + 1) % NUM_CLASSES, NUM_CLASSES).float() * 10
    logits[0] = wrong
    assert self_distillation_loss(logits, features, labels).ce[0].item() > 1.0


def test_alpha_weights():
    logits, features, labels = _random_outputs()
    pure_ce = self_distillation_loss(logits, features, labels, alpha=0.0, hint_weight=0.0)
    torch.testing.assert_close(pure_ce.total, sum(pure_ce.ce))
    pure_kd = self_distillation_loss(logits, features, labels, alpha=1.0, hint_weight=0.0)
    torch.testing.assert_close(pure_kd.total, pure_kd.ce[-1] + sum(pure_kd.kl))


# ---------------------------------------------------------------- gradients


def _deepest_only_params(net: MultiExitNet):
    return [*net.backbone.layer4.parameters(), *net.backbone.get_classifier().parameters()]


def test_kl_and_hint_gradients_do_not_reach_deepest_classifier():
    net = _net().train()
    images, labels = torch.randn(8, 1, 32, 32), torch.randint(0, NUM_CLASSES, (8,))
    out = net.forward_exits(images)
    terms = self_distillation_loss(out.logits, out.features, labels)
    (sum(terms.kl) + sum(terms.hint)).backward()
    for p in _deepest_only_params(net):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for branch in net.branches:  # the students do learn from it ...
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in branch.parameters())
    # ... and so do the shared shallow stages (as in the paper)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in net.backbone.layer1.parameters())


def test_deepest_gradient_is_its_label_loss_alone():
    net = _net().train()
    images, labels = torch.randn(8, 1, 32, 32), torch.randint(0, NUM_CLASSES, (8,))
    out = net.forward_exits(images)
    self_distillation_loss(out.logits, out.features, labels).total.backward(retain_graph=True)
    full = [p.grad.clone() for p in _deepest_only_params(net)]
    net.zero_grad(set_to_none=True)
    F.cross_entropy(out.logits[-1], labels).backward()
    for g_full, p in zip(full, _deepest_only_params(net)):
        torch.testing.assert_close(g_full, p.grad)


# ---------------------------------------------------------------- exits and exports


def test_exit_shapes_and_branch_features():
    net = _net().eval()
    out = net.forward_exits(torch.randn(3, 1, 32, 32))
    assert net.num_exits == 4 and len(net.branches) == 3
    assert [tuple(z.shape) for z in out.logits] == [(3, NUM_CLASSES)] * 4
    assert [tuple(f.shape) for f in out.features] == [(3, 128)] * 4  # F_i has the deepest's dimension
    for pos in range(4):
        assert tuple(export_exit(net, pos)(torch.randn(2, 1, 32, 32)).shape) == (2, NUM_CLASSES)
    # other resolutions work too (adaptive pooling)
    assert [tuple(z.shape) for z in net.forward_exits(torch.randn(2, 1, 48, 40)).logits] == [(2, NUM_CLASSES)] * 4
    info = describe_space(SelfDistillConfig())
    assert info["size"] == 4 and [e["stage"] for e in info["exits"]] == ["layer1", "layer2", "layer3", "layer4"]


def test_truncated_exports_match_wrapped_exits_exactly():
    net = _net()
    _randomise_bn(net)
    net.eval()
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        expected = net.forward_exits(x).logits
        for pos in range(net.num_exits):
            exported = export_exit(net, pos)
            assert not exported.training
            assert torch.equal(exported(x), expected[pos]), f"exit {pos + 1} differs"
    shallow = export_exit(net, 0)
    assert isinstance(shallow, TruncatedExit)
    # truncated: later stages and the deepest head are gone, and it owns its weights (deep copy)
    names = {n for n, _ in shallow.named_parameters()}
    assert not any(n.startswith(("backbone.layer2", "backbone.layer4", "backbone.fc")) for n in names)
    assert sum(p.numel() for p in shallow.parameters()) < sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        next(shallow.parameters()).add_(1.0)
        assert torch.equal(net.forward_exits(x).logits[0], expected[0])


def test_early_exit_thresholds_pick_first_or_deepest():
    net = _net()
    _randomise_bn(net)
    net.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = net.forward_exits(x).logits
    first = EarlyExitNet(net, threshold=0.0)
    assert torch.equal(first(x), expected[0]) and first.last_exit == 0
    never = EarlyExitNet(net, threshold=float("inf"))
    assert torch.equal(never(x), expected[-1]) and never.last_exit == 3


def test_truncated_exit_onnx_matches_onnxruntime(tmp_path):
    net = _net()
    _randomise_bn(net)
    net.eval()
    exported = export_exit(net, 1)
    path = export_onnx(exported, (1, 32, 32), tmp_path / "exit2.onnx")
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = exported(images).numpy()
    np.testing.assert_allclose(onnx_logits(path, images.numpy()), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- method


def test_fit_yields_one_candidate_per_exit_and_a_report(space, digits):
    cands = list(space.candidates())
    assert [c.name for c in cands] == ["sd-exit1", "sd-exit2", "sd-exit3", "sd-exit4"]
    report = space.report()
    for pos, cand in enumerate(cands):
        assert {"val_acc", "flops", "params", "acts"} <= set(cand.metrics)
        assert 0.0 <= cand.metrics["val_acc"] <= 1.0
        assert cand.metrics["val_acc"] == pytest.approx(report[f"exit{pos + 1}_val_acc"])
        assert cand.method == "self_distill" and cand.config["exit"] == pos + 1
        assert cand.input_size == (32, 32) and not cand.model.training
        assert cand.model(digits.example_batch(2)).shape == (2, NUM_CLASSES)
    flops = [c.metrics["flops"] for c in cands]
    assert flops == sorted(flops) and len(set(flops)) == 4  # deeper exits cost more
    assert cands[-1].metrics["val_acc"] > 0.5  # 50 steps already learn digits (30 sat at the edge: 0.49-0.93 by seed)
    for key in ("ensemble_val_acc", "baseline_val_acc", "early_exit_val_acc", "early_exit_mean_ms",
                "deepest_mean_ms", "early_exit_threshold"):
        assert key in report
    assert sum(report[f"early_exit_frac_exit{i}"] for i in range(1, 5)) == pytest.approx(1.0)
    assert report["early_exit_mean_ms"] > 0 and all(isinstance(v, float) for v in report.values())


def test_baseline_can_be_skipped_and_anchor_init(digits):
    cfg = SelfDistillConfig(train_baseline=False, early_exit_threshold=None,
                            train=TrainConfig(max_steps=2), init_from_anchor="a")
    torch.manual_seed(123)
    anchor_model = build(DEFAULT_ARCH, NUM_CLASSES, 1)
    anchor = Anchor(name="a", model=anchor_model, source="trained", arch=dict(DEFAULT_ARCH))
    backbone = SelfDistill(cfg)._backbone(digits, [anchor])
    for (name, p), q in zip(backbone.state_dict().items(), anchor_model.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="no such anchor"):
        SelfDistill(cfg)._backbone(digits, [])
    other = Anchor(name="a", model=anchor_model, source="trained", arch={"family": "resnet", "layers": [2, 2, 2, 2],
                                                                          "channels": [16, 32, 64, 128]})
    with pytest.raises(ValueError, match="arch"):
        SelfDistill(cfg)._backbone(digits, [other])
    report = SelfDistill(cfg).fit(digits, [anchor]).report()
    assert "baseline_val_acc" not in report and "early_exit_val_acc" not in report


def test_config_is_strict():
    with pytest.raises(ValidationError):
        SelfDistillConfig(temprature=3.0)
    with pytest.raises(ValidationError):
        SelfDistillConfig(alpha=1.5)
    cfg = SelfDistillConfig()
    assert (cfg.temperature, cfg.alpha, cfg.hint_weight, cfg.early_exit_threshold) == (3.0, 0.3, 0.03, 0.95)
