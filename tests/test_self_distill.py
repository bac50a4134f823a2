"""Self-distillation (Be Your Own Teacher): loss terms, gradient isolation, truncated exports, fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from podium.methods import self_distill as sd
from podium.methods.base import Anchor
from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.self_distill import (
    DEFAULT_ARCH,
    EARLY_EXIT_PROFILE,
    EarlyExitNet,
    ExitBranch,
    ForcedExitPath,
    MultiExitNet,
    SelfDistill,
    SelfDistillConfig,
    SelfDistillSpace,
    SepConv,
    TruncatedExit,
    describe_space,
    early_exit_latency,
    export_exit,
    model_loss,
    plain_backbone,
    self_distillation_loss,
)
from podium.methods.train import TrainConfig
from tests.conftest import onnx_logits, pt2_logits

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
    """Logits per exit, adapted features per shallow exit (None at the one next to the deepest, as
    the authors), teacher features and labels."""
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(batch, NUM_CLASSES, generator=gen) for _ in range(n_exits)]
    adapted = [torch.randn(batch, dim, generator=gen) for _ in range(n_exits - 2)] + [None]
    teacher_features = torch.randn(batch, dim, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return logits, adapted, teacher_features, labels


def _soft_ce(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """The authors' CrossEntropy(outputs, targets) of train.py, written out."""
    return -(F.log_softmax(student / t, 1) * F.softmax(teacher / t, 1)).sum(1).mean()


def test_loss_terms_and_weights():
    logits, adapted, teacher, labels = _random_outputs()
    out = self_distillation_loss(logits, adapted, teacher, labels)
    assert len(out.ce) == 4 and len(out.kd) == 3 and len(out.hint) == 3  # the deepest has no KD/hint
    assert all(t.item() > 0 for t in [*out.ce, *out.kd, *out.hint[:2]])
    assert out.hint[2].item() == 0.0  # the 3/4-depth exit gets no hint (the authors' ``index != 1``)
    expected = out.ce[-1] + sum(0.7 * c + 0.3 * k + 0.03 * h for c, k, h in zip(out.ce[:-1], out.kd, out.hint))
    torch.testing.assert_close(out.total, expected)


def test_kd_is_the_authors_soft_target_ce_without_t2_and_switchable():
    logits, adapted, teacher, labels = _random_outputs()
    out = self_distillation_loss(logits, adapted, teacher, labels, temperature=3.0)
    for pos in range(3):
        torch.testing.assert_close(out.kd[pos], _soft_ce(logits[pos], logits[-1], 3.0))
    standard = self_distillation_loss(logits, adapted, teacher, labels, temperature=3.0, kd_t2_scaling=True)
    for plain, scaled in zip(out.kd, standard.kd):
        torch.testing.assert_close(scaled, plain * 9.0)
    # soft CE = KL + the teacher's entropy: minimal (and gradient-free) when the student matches the teacher
    student = logits[-1].clone().requires_grad_(True)
    matched = self_distillation_loss([student, logits[-1]], [None], teacher, labels, alpha=1.0)
    p_teacher = F.softmax(logits[-1] / 3.0, 1)
    entropy = -(p_teacher * p_teacher.log()).sum(1).mean()
    torch.testing.assert_close(matched.kd[0], entropy)
    matched.kd[0].backward()
    assert student.grad.abs().max().item() < 1e-6


def test_hint_is_the_l2_distance_over_the_batch_and_switchable():
    logits, adapted, teacher, labels = _random_outputs()
    out = self_distillation_loss(logits, adapted, teacher, labels)
    for pos in range(2):
        torch.testing.assert_close(out.hint[pos], ((adapted[pos] - teacher) ** 2).sum().sqrt())  # not squared, not a mean
    adapted[0] = teacher.clone()
    assert self_distillation_loss(logits, adapted, teacher, labels).hint[0].item() == 0.0
    off = self_distillation_loss(logits, adapted, teacher, labels, hint_weight=0.0)
    assert all(h.item() == 0.0 for h in off.hint)
    expected = off.ce[-1] + sum(0.7 * c + 0.3 * k for c, k in zip(off.ce[:-1], off.kd))
    torch.testing.assert_close(off.total, expected)


def test_hint_grows_as_sqrt_batch_unless_normalised_to_a_reference_batch():
    logits, adapted, teacher, labels = _random_outputs(batch=8)
    doubled = ([torch.cat([z, z]) for z in logits], [torch.cat([a, a]) if a is not None else None for a in adapted],
               torch.cat([teacher, teacher]), torch.cat([labels, labels]))
    raw, raw2 = self_distillation_loss(logits, adapted, teacher, labels), self_distillation_loss(*doubled)
    torch.testing.assert_close(raw2.hint[0], raw.hint[0] * 2 ** 0.5)  # the authors' torch.dist: √batch
    ref, ref2 = (self_distillation_loss(*args, hint_batch=128) for args in ((logits, adapted, teacher, labels), doubled))
    torch.testing.assert_close(ref2.hint[0], ref.hint[0])  # normalised: the same at any batch ...
    torch.testing.assert_close(ref.hint[0], raw.hint[0] * (128 / 8) ** 0.5)  # ... the authors' value at 128
    at_reference = self_distillation_loss(logits, adapted, teacher, labels, hint_batch=8)
    torch.testing.assert_close(at_reference.hint[0], raw.hint[0])


def test_ce_zero_for_confident_correct_and_positive_otherwise():
    logits, adapted, teacher, labels = _random_outputs()
    logits[0] = F.one_hot(labels, NUM_CLASSES).float() * 1e4
    out = self_distillation_loss(logits, adapted, teacher, labels)
    assert out.ce[0].item() < 1e-6
    logits[0] = F.one_hot((labels + 1) % NUM_CLASSES, NUM_CLASSES).float() * 10
    assert self_distillation_loss(logits, adapted, teacher, labels).ce[0].item() > 1.0


def test_alpha_weights():
    logits, adapted, teacher, labels = _random_outputs()
    pure_ce = self_distillation_loss(logits, adapted, teacher, labels, alpha=0.0, hint_weight=0.0)
    torch.testing.assert_close(pure_ce.total, sum(pure_ce.ce))
    pure_kd = self_distillation_loss(logits, adapted, teacher, labels, alpha=1.0, hint_weight=0.0)
    torch.testing.assert_close(pure_kd.total, pure_kd.ce[-1] + sum(pure_kd.kd))


def test_hint_is_material_at_initialisation_and_trains_the_adaptation_layers():
    net = _net().train()
    assert sorted(net.hint_adapters) == ["0", "1"]  # exits 1/4 and 2/4; none for 3/4 (as the authors)
    assert all(isinstance(a, torch.nn.Linear) and (a.in_features, a.out_features) == (128, 128)
               for a in net.hint_adapters.values())
    images, labels = torch.randn(8, 1, 32, 32), torch.randint(0, NUM_CLASSES, (8,))
    cfg = SelfDistillConfig()
    terms = model_loss(net, images, labels, cfg)
    share = cfg.hint_weight * sum(terms.hint).item() / terms.total.item()
    assert share > 0.01, f"λ·hint is only {share:.2%} of the loss"
    terms.total.backward()
    for adapter in net.hint_adapters.values():
        assert adapter.weight.grad is not None and torch.count_nonzero(adapter.weight.grad) > 0
    # the classifiers read the unadapted features: the adapters shape the hint only
    net.eval()
    with torch.no_grad():
        before = net.forward_exits(images).logits
        for adapter in net.hint_adapters.values():
            adapter.weight.zero_()
        after = net.forward_exits(images).logits
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------- gradients


def _deepest_only_params(net: MultiExitNet):
    return [*net.backbone.layer4.parameters(), *net.backbone.get_classifier().parameters()]


def test_kd_and_hint_gradients_do_not_reach_deepest_classifier():
    net = _net().train()
    images, labels = torch.randn(8, 1, 32, 32), torch.randint(0, NUM_CLASSES, (8,))
    terms = model_loss(net, images, labels, SelfDistillConfig())
    (sum(terms.kd) + sum(terms.hint)).backward()
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
    terms = self_distillation_loss(out.logits, net.adapted_features(out.features), out.features[-1], labels)
    terms.total.backward(retain_graph=True)
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
    for pos in range(net.num_exits):  # the hint adaptation layers are training-only
        assert not any("hint_adapters" in n for n, _ in export_exit(net, pos).named_parameters())
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
    for pos in range(4):  # a forced path computes what its exit computes, whatever the threshold says
        forced = ForcedExitPath(first, pos)
        assert torch.equal(forced(x), expected[pos]) and first.last_exit == pos


def test_early_exit_latency_is_reported_next_to_the_plain_backbone_by_the_one_profiler(digits, monkeypatch):
    net = _net()
    plain = plain_backbone(net)
    assert not any(isinstance(m, (ExitBranch, SepConv, EarlyExitNet)) for m in plain.modules())
    assert not any(n.startswith(("branches", "hint_adapters")) for n, _ in plain.named_parameters())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in net.backbone.parameters())
    measured: list[tuple[torch.nn.Module, object]] = []
    real_measure = sd.measure

    def recording_measure(model, input_shape, profile, **kwargs):
        measured.append((model, profile))
        fast = profile.model_copy(update={"warmup": 1, "round_repeats": 2, "min_rounds": 3, "max_rounds": 3})
        return real_measure(model, input_shape, fast, **kwargs)

    monkeypatch.setattr(sd, "measure", recording_measure)
    early = EarlyExitNet(net, threshold=0.0)
    latency = early_exit_latency(early, [3, 0, 1, 0], (1, 32, 32))
    assert [m.exit_pos for m, _ in measured] == [0, 2]  # only the paths images took
    exit_ms = latency["exit_mean_ms"]
    assert latency["mean_ms"] == pytest.approx((3 * exit_ms[0] + exit_ms[2]) / 4)
    measured.clear()
    cfg = SelfDistillConfig(early_exit_threshold=0.5)
    report = SelfDistillSpace(net.eval(), cfg, digits, baseline=None).report()
    assert report["early_exit_mean_ms"] > 0 and report["backbone_mean_ms"] > 0
    assert report["early_exit_speedup"] == pytest.approx(report["backbone_mean_ms"] / report["early_exit_mean_ms"])
    assert {type(m) for m, _ in measured} == {ForcedExitPath, type(plain)}  # both through the same function ...
    assert all(profile == EARLY_EXIT_PROFILE for _, profile in measured)  # ... with the same profile
    timed_plain = [m for m, _ in measured if not isinstance(m, ForcedExitPath)]
    assert len(timed_plain) == 1 and not any(isinstance(m, ExitBranch) for m in timed_plain[0].modules())


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
    got = pt2_logits(exported, (1, 32, 32), images.numpy(), tmp_path / "pt2")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


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
                "backbone_mean_ms", "early_exit_speedup", "early_exit_threshold"):
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
    assert (cfg.kd_t2_scaling, cfg.hint_batch, cfg.recipe) == (False, None, "demo")


def test_paper_recipe_is_the_authors_and_yaml_overrides_it_field_by_field():
    demo = SelfDistillConfig.model_validate({})
    assert demo == SelfDistillConfig()  # the class defaults are the demo
    assert (demo.train.epochs, demo.train.lr, demo.train.warmup_steps, demo.backbone) == (6, 0.05, 10, DEFAULT_ARCH)
    paper = SelfDistillConfig.model_validate({"recipe": "paper"})
    assert (paper.temperature, paper.alpha, paper.hint_weight, paper.kd_t2_scaling) == (3.0, 0.3, 0.03, False)
    assert paper.hint_batch == 128
    train = paper.train
    assert (train.lr, train.lr_batch, train.optimizer, train.momentum, train.weight_decay) == (
        0.1, 128, "momentum", 0.9, 5e-4)
    assert (train.epochs, train.warmup_steps) == (250, 0)
    assert paper.backbone == {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [64, 128, 256, 512]}
    mine = SelfDistillConfig.model_validate({"recipe": "paper", "train": {"epochs": 3}, "alpha": 0.5})
    assert (mine.train.epochs, mine.train.lr, mine.train.lr_batch, mine.alpha, mine.temperature) == (
        3, 0.1, 128, 0.5, 3.0)
