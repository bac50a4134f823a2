"""Fast compound model scaling: the rule, the rounding, the families, the method and the runtime report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from podium.methods.base import Anchor
from podium.methods.complexity import count
from podium.methods.export import export_onnx
from podium.methods.families import build, scale
from podium.methods.scaling import (
    STRATEGIES,
    EfficientNetBase,
    RegNetBase,
    Scaling,
    ScalingConfig,
    adjust_block_compatibility,
    describe_scales,
    plan_scales,
    round_depth,
    round_group_width,
    round_width,
    runtime_correlation,
    scale_factors,
    scale_resolution,
)
from podium.methods.train import TrainConfig, scaled_lr
from podium.tasks.plots import plot_runtime_correlation
from tests.conftest import onnx_logits, pt2_logits

# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("s", [0.5, 2.0, 4.0, 8.0])
def test_every_strategy_scales_flops_by_s(name, s):
    d, w, r = scale_factors(name, s)
    assert d * w * w * r * r == pytest.approx(s)


def test_exponents_match_the_paper_table():
    expected = {  # (d, w, r) exponents and the ideal params / acts growth exponents
        "d": (1, 0, 0, 1, 1), "w": (0, 0.5, 0, 1, 0.5), "r": (0, 0, 0.5, 0, 1),
        "dw": (0.5, 0.25, 0, 1, 0.75), "dwr": (1 / 3, 1 / 6, 1 / 6, 2 / 3, 5 / 6),
        "dWr": (0.1, 0.4, 0.05, 0.9, 0.6),
    }
    for name, (e_d, e_w, e_r, e_p, e_a) in expected.items():
        e = STRATEGIES[name].exponents()
        assert (e["d"], e["w"], e["r"], e["params"], e["acts"]) == pytest.approx((e_d, e_w, e_r, e_p, e_a)), name
        assert e["flops"] == pytest.approx(1.0)
    assert STRATEGIES["dWr"].scale_groups and not STRATEGIES["dwr"].scale_groups
    with pytest.raises(ValueError):
        scale_factors("dWR", 2.0)


# ---------------------------------------------------------------- rounding


def test_depth_and_width_rounding_rules():
    assert round_depth(2, 8 ** (1 / 3)) == 4  # whole blocks
    assert round_depth(1, 0.1) == 1  # at least one block
    assert round_depth(5, 0.5) == 2  # 2.5 -> 2: Python's half-to-even, as pycls
    assert round_width(16, 1.26) == 24  # 20.2 -> nearest multiple of 8
    assert round_width(24, 1.1) == 24
    assert round_width(4, 0.1) == 8  # at least 8
    assert scale_resolution(224, 2 ** (1 / 6)) == 252  # round(r*res/4)*4
    assert scale_resolution(32, 1.072, divisor=2) == 34


def test_group_width_rounding_and_compatibility():
    assert round_group_width(2, 1.0) == 2  # <= 2 kept
    assert round_group_width(1, 3.0) == 4  # <= 5 -> 4
    assert round_group_width(8, 1.5) == 16  # else a multiple of 8
    ws, _bs, gs = adjust_block_compatibility([24, 8, 40], [1.0, 1.0, 1.0], [16, 16, 8])
    assert ws == [32, 8, 40] and gs == [16, 8, 8]  # 24 -> 32 (multiple of 16); g clipped to the width
    assert all(w % g == 0 for w, g in zip(ws, gs))


def test_regnet_group_width_follows_width_only_for_fast_scaling():
    arch = RegNetBase().arch()
    fast, uniform = scale(arch, "dWr", 8.0), scale(arch, "dwr", 8.0)
    assert fast["group_widths"] != arch["group_widths"]  # g scales with w (pycls d1_w8_g8_r1)
    assert uniform["group_widths"] == arch["group_widths"]
    for a in (fast, uniform):
        assert all(w % 8 == 0 and w % g == 0 for w, g in zip(a["widths"], a["group_widths"]))
    assert fast["depths"] == arch["depths"]  # d = 8^0.1 = 1.23 keeps 1- and 2-block stages
    assert uniform["depths"] == [round_depth(x, 2.0) for x in arch["depths"]]


def test_arch_dict_rebuilds_the_same_model_from_json():
    for base in (RegNetBase(), EfficientNetBase()):
        arch = scale(base.arch(), "dWr", 4.0)
        rebuilt = json.loads(json.dumps(arch))  # what an MLflow tag round-trip gives
        a, b = build(arch, 10, 1), build(rebuilt, 10, 1)
        assert count(a, (34, 34), 1) == count(b, (34, 34), 1)
        assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


# ---------------------------------------------------------------- the same shapes as pycls's scaler
# A reference reimplemented from facebookresearch/pycls (pycls/models/scaler.py scaling_factors and
# scale_model, pycls/models/blocks.py adjust_block_compatibility), line for line, not imported.

PYCLS_SCALE_TYPES = {"d": "d", "w": "w", "r": "r", "dw": "dw", "dr": "dr", "wr": "wr", "dwr": "dwr",
                     "dWr": "d1_w8_g8_r1"}  # pycls's name of fast compound scaling


def pycls_scaling_factors(scale_type: str, scale_factor: float) -> tuple[float, float, float, float]:
    if all(c in "dwgr" for c in scale_type):
        weights = {c: 1.0 if c in scale_type else 0.0 for c in "dwgr"}
    else:
        weights = {"d": 0.0, "w": 0.0, "g": 0.0, "r": 0.0,
                   **{part[0]: float(part[1:]) for part in scale_type.split("_")}}
    total = weights["d"] + weights["w"] + weights["r"] or weights["g"] / 2 or 1.0
    d = scale_factor ** (weights["d"] / total)
    w, g, r = (scale_factor ** (weights[c] / total / 2.0) for c in "wgr")
    return d, w, g, r


def pycls_adjust_block_compatibility(ws: list, bs: list, gs: list) -> tuple[list, list, list]:
    vs = [int(max(1, w * b)) for w, b in zip(ws, bs)]
    gs = [int(min(g, v)) for g, v in zip(gs, vs)]
    ms = [int(np.lcm(g, int(b))) if b > 1 else g for g, b in zip(gs, bs)]
    vs = [max(m, int(round(v / m) * m)) for v, m in zip(vs, ms)]
    ws = [int(v / b) for v, b in zip(vs, bs)]
    return ws, bs, gs


def pycls_scale_anynet(base: RegNetBase, scale_type: str, s: float) -> tuple[list, list, list, int]:
    d_scale, w_scale, g_scale, r_scale = pycls_scaling_factors(scale_type, s)
    ds = [max(1, round(d * d_scale)) for d in base.depths]
    ws = [max(1, round(w * w_scale / 8)) * 8 for w in base.widths]
    gs = [max(1, round(g * g_scale)) for g in base.group_widths]
    gs = [g if g <= 2 else 4 if g <= 5 else round(g / 8) * 8 for g in gs]
    ws, _bs, gs = pycls_adjust_block_compatibility(ws, [base.bottle_ratio] * len(ws), gs)
    return ds, ws, gs, round(base.resolution * r_scale / 4) * 4


def pycls_scale_effnet(base: EfficientNetBase, scale_type: str, s: float) -> tuple[list, list, int, int, int]:
    d_scale, w_scale, _g_scale, r_scale = pycls_scaling_factors(scale_type, s)
    ds = [max(1, round(d * d_scale)) for d in base.depths]
    ws = [max(1, round(w * w_scale / 8)) * 8 for w in base.widths]
    sw = max(1, round(base.stem_width * w_scale / 8)) * 8
    hw = max(1, round(base.head_width * w_scale / 8)) * 8
    ws, _bs, _gs = pycls_adjust_block_compatibility(ws, base.expand_ratios, [1] * len(ds))
    return ds, ws, sw, hw, round(base.resolution * r_scale / 4) * 4


# pycls's dds_baselines configs as stages (regnet.generate_regnet_full of DEPTH/W0/WA/WM/GROUP_W):
# RegNetY-4.0GF (22, 96, 31.41, 2.24, 64, SE) and RegNetX-400MF (22, 24, 24.48, 2.54, 16); EN-B0.
PYCLS_REGNETY_4GF = RegNetBase(depths=[2, 6, 12, 2], widths=[128, 192, 512, 1088], group_widths=[64] * 4,
                               strides=[2] * 4, stem_width=32, se_ratio=0.25, resolution=224, resolution_divisor=4)
PYCLS_REGNETX_400MF = RegNetBase(depths=[1, 2, 7, 12], widths=[32, 64, 160, 384], group_widths=[16] * 4,
                                 strides=[2] * 4, stem_width=32, resolution=224, resolution_divisor=4)
PYCLS_EN_B0 = EfficientNetBase(depths=[1, 2, 2, 3, 3, 4, 1], widths=[16, 24, 40, 80, 112, 192, 320],
                               kernels=[3, 3, 5, 3, 5, 5, 3], strides=[1, 2, 2, 2, 1, 2, 1],
                               expand_ratios=[1, 6, 6, 6, 6, 6, 6], stem_width=32, head_width=1280,
                               resolution=224, resolution_divisor=4)
PYCLS_SCALES = [0.25, 0.5, 2.0, 3.0, 4.0, 16.0]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("base", [PYCLS_REGNETY_4GF, PYCLS_REGNETX_400MF], ids=["RegNetY-4GF", "RegNetX-400MF"])
def test_regnet_shapes_equal_pycls_scaler(base, strategy):
    assert PYCLS_SCALE_TYPES[strategy]  # every strategy has its pycls scale type
    for s in PYCLS_SCALES:
        scaled = scale(base.arch(), strategy, s)
        resolution = scale_resolution(base.resolution, scale_factors(strategy, s)[2], base.resolution_divisor)
        ours = (scaled["depths"], scaled["widths"], scaled["group_widths"], resolution)
        assert ours == pycls_scale_anynet(base, PYCLS_SCALE_TYPES[strategy], s), (strategy, s)
        assert scaled["stem_width"] == base.stem_width  # pycls scales neither RegNet's stem nor its head


@pytest.mark.parametrize("strategy", ["dWr", "dwr", "w", "d", "r"])
def test_efficientnet_shapes_equal_pycls_scaler(strategy):
    for s in PYCLS_SCALES:
        scaled = scale(PYCLS_EN_B0.arch(), strategy, s)
        resolution = scale_resolution(224, scale_factors(strategy, s)[2], 4)
        ours = (scaled["depths"], scaled["widths"], scaled["stem_width"], scaled["head_width"], resolution)
        assert ours == pycls_scale_effnet(PYCLS_EN_B0, PYCLS_SCALE_TYPES[strategy], s), (strategy, s)


def test_default_plan_is_pycls_scaler_output():
    """The method's own path (plan_scales, default config): RegNetY-4GF by 4 and 16 with dWr as pycls
    makes it; the s = 4 row checked by hand too (d 1.149, w = g 1.741, r 1.072)."""
    plans = plan_scales(ScalingConfig(base=PYCLS_REGNETY_4GF, scales=[4, 16]))
    for plan in plans:
        assert plan.s_rule == plan.s
        ours = (plan.arch["depths"], plan.arch["widths"], plan.arch["group_widths"], plan.resolution)
        assert ours == pycls_scale_anynet(PYCLS_REGNETY_4GF, "d1_w8_g8_r1", plan.s)
    # g 111.4 -> 111 -> 112 (multiple of 8); widths 224 336 891->888->896 1894->1896->1904 (multiples of 112)
    assert (plans[0].arch["depths"], plans[0].arch["widths"], plans[0].arch["group_widths"],
            plans[0].resolution) == ([2, 7, 14, 2], [224, 336, 896, 1904], [112] * 4, 240)
    assert plans[1].flops_factor == pytest.approx(16, rel=0.1)  # a big base: rounding and stem cost little


# ---------------------------------------------------------------- realised flops / acts


@pytest.fixture(scope="module")
def plans() -> dict[tuple[str, str], list[dict]]:
    """The digits bases scaled with the opt-in flops matching."""
    out = {}
    for family in ("regnet", "efficientnet"):
        for strategy in ("dwr", "dWr"):
            out[family, strategy] = describe_scales(ScalingConfig(family=family, strategy=strategy,
                                                                  scales=[1, 2, 4, 8], match_flops=True))
    return out


@pytest.mark.parametrize("family", ["regnet", "efficientnet"])
@pytest.mark.parametrize("strategy", ["dwr", "dWr"])
def test_matched_models_hit_the_flops_factor(plans, family, strategy):
    rows = plans[family, strategy]
    base = rows[0]
    assert base["s"] == 1 and base["flops_factor"] == 1
    for row in rows[1:]:
        assert row["flops"] / base["flops"] == pytest.approx(row["s"], rel=0.10), row


def test_fast_scaling_grows_activations_slower(plans):
    for family in ("regnet", "efficientnet"):
        slopes = {}
        for strategy in ("dwr", "dWr"):
            rows = plans[family, strategy]
            x = np.log([r["flops"] for r in rows])
            y = np.log([r["acts"] for r in rows])
            slopes[strategy] = np.polyfit(x, y, 1)[0]  # acts ∝ flops^slope
            assert rows[-1]["acts"] > rows[0]["acts"]
        assert slopes["dWr"] < slopes["dwr"], (family, slopes)
        assert plans[family, "dWr"][-1]["acts"] < plans[family, "dwr"][-1]["acts"]  # at s=8 too


def test_the_raw_rule_is_the_default_and_uses_s_itself():
    assert ScalingConfig().match_flops is False
    rows = describe_scales(ScalingConfig(strategy="dwr", scales=[1, 4]))
    assert rows[1]["s_rule"] == 4.0
    d, w, r = scale_factors("dwr", 4.0)
    assert rows[1]["depths"] == [round_depth(x, d) for x in RegNetBase().depths]
    assert rows[1]["resolution"] == scale_resolution(32, r, 2)


# ---------------------------------------------------------------- config


def test_config_parses_base_per_family_and_rejects_mismatch():
    cfg = ScalingConfig.model_validate({"family": "efficientnet", "base": {"depths": [1, 1, 1, 1]}})
    assert isinstance(cfg.base, EfficientNetBase) and cfg.base.depths == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        ScalingConfig.model_validate({"family": "regnet", "base": {"kernels": [3, 3, 3, 3]}})
    with pytest.raises(ValueError):
        ScalingConfig(family="regnet", base=EfficientNetBase())
    with pytest.raises(ValueError):
        ScalingConfig(scales=[0.0])
    with pytest.raises(ValueError):
        ScalingConfig(strategy="dWR")
    assert ScalingConfig().strategy == "dWr" and ScalingConfig().scales == [1.0, 2.0, 4.0]


def test_demo_defaults_are_the_class_defaults_and_give_distinct_members():
    assert ScalingConfig.model_validate({}) == ScalingConfig()
    cfg = ScalingConfig()
    assert (cfg.recipe, cfg.strategy, cfg.match_flops, cfg.warmup_epochs) == ("demo", "dWr", False, None)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps) == (0.2, 120, 10)
    assert cfg.train_config(steps_per_epoch=20) == cfg.train
    for family in ("regnet", "efficientnet"):
        rows = describe_scales(ScalingConfig(family=family))  # s = 1, 2, 4 by pycls's rule on 32x32 digits
        shapes = {(json.dumps(r["widths"]), json.dumps(r["depths"]), r["resolution"]) for r in rows}
        assert len(shapes) == len(rows), rows
        assert [r["flops"] for r in rows] == sorted({r["flops"] for r in rows}), rows


def test_paper_recipe_is_pycls_schedule_and_yaml_overrides_field_by_field():
    cfg = ScalingConfig.model_validate({"recipe": "paper", "train": {"epochs": 3}})
    train = cfg.train
    assert (cfg.strategy, cfg.match_flops, cfg.warmup_epochs) == ("dWr", False, 5.0)
    assert STRATEGIES[cfg.strategy].alpha == 0.8
    assert (train.optimizer, train.momentum, train.lr, train.lr_batch, train.weight_decay) == (
        "sgd", 0.9, 0.8, 1024, 5e-5)
    assert (train.epochs, train.max_steps, train.ema_decay) == (3, None, 0.9999)  # epochs: the YAML's
    assert scaled_lr(train, 128) == pytest.approx(0.1)  # pycls: 0.1 per 128 images
    assert cfg.resolved_base().resolution_divisor == 4  # pycls's resolution rounding, on the digits base
    assert cfg.train_config(steps_per_epoch=1252).warmup_steps == 5 * 1252  # 5 warm-up epochs
    mine = ScalingConfig.model_validate({"recipe": "paper", "base": {"depths": [2, 2, 2, 2]}, "warmup_epochs": None})
    assert mine.resolved_base().depths == [2, 2, 2, 2] and mine.resolved_base().resolution_divisor == 4
    assert mine.train_config(steps_per_epoch=10).warmup_steps == 0


def test_paper_recipe_efficientnet_variant_is_applied_by_the_method():
    cfg = ScalingConfig.model_validate({"recipe": "paper", "family": "efficientnet", "train": {"epochs": 2}})
    assert isinstance(cfg.resolved_base(), EfficientNetBase) and cfg.resolved_base().resolution_divisor == 4
    method_cfg = Scaling(cfg).cfg
    assert (method_cfg.train.lr, method_cfg.train.lr_batch, method_cfg.train.weight_decay) == (0.4, 256, 1e-5)
    assert (method_cfg.train.epochs, method_cfg.warmup_epochs, method_cfg.family) == (2, None, "efficientnet")
    assert Scaling(ScalingConfig(recipe="paper")).cfg.train.lr == 0.8  # RegNet: no variant


# ---------------------------------------------------------------- runtime correlation


def test_runtime_correlation_pearson():
    records = [{"name": f"m{i}", "flops": f, "params": p, "acts": a, "p50_ms": 0.5 + 2e-5 * a}
               for i, (f, p, a) in enumerate([(1e6, 5e4, 1e4), (2e6, 4e4, 3e4), (4e6, 2e5, 2e4), (8e6, 1e5, 9e4)])]
    corr = runtime_correlation(records)
    assert corr["r_acts"] == pytest.approx(1.0)
    assert corr["r_flops"] == pytest.approx(np.corrcoef([1, 2, 4, 8], [1, 3, 2, 9])[0, 1])
    assert corr["best"] == "acts" and corr["n"] == 4
    flat = runtime_correlation([{**r, "p50_ms": 1.0} for r in records])
    assert math.isnan(flat["r_acts"]) and flat["best"] is None


def test_plot_runtime_correlation_writes_png(tmp_path):
    records = [{"name": "a", "flops": 1e6, "params": 1e4, "acts": 1e4, "p50_ms": 1.0},
               {"name": "b", "flops": 3e6, "params": 2e4, "acts": 4e4, "p50_ms": 2.5},
               {"name": "c", "flops": 5e6, "params": 5e4, "acts": 5e4, "p50_ms": 2.9}]
    path = plot_runtime_correlation(records, tmp_path / "corr.png", "cpu-test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the method


def test_short_fit_yields_exportable_candidates(digits, tmp_path):
    cfg = ScalingConfig(scales=[1, 2], train=TrainConfig(max_steps=4, lr=0.05))
    space = Scaling(cfg).fit(digits)
    candidates = list(space.candidates())
    assert [c.config["s"] for c in candidates] == [1.0, 2.0]
    for c in candidates:
        assert c.method == "scaling" and c.config["strategy"] == "dWr"
        assert set(c.config) == {"strategy", "s", "arch", "resolution"}
        assert c.input_size == (c.config["resolution"],) * 2
        assert 0.0 <= c.metrics["val_acc"] <= 1.0
        assert not c.model.training and next(c.model.parameters()).device.type == "cpu"
        expected = count(build(c.config["arch"], 10, 1), c.input_size, 1)
        assert (c.metrics["flops"], c.metrics["params"], c.metrics["acts"]) == (
            expected.flops, expected.params, expected.acts)
        path = export_onnx(c.model, (1, *c.input_size), tmp_path / f"{c.name}.onnx")
        images = torch.randn(2, 1, *c.input_size)
        with torch.no_grad():
            want = c.model(images).numpy()
        np.testing.assert_allclose(onnx_logits(path, images.numpy()), want, rtol=1e-3, atol=1e-4)
        got = pt2_logits(c.model, (1, *c.input_size), images.numpy(), tmp_path / c.name)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert candidates[1].metrics["flops"] > candidates[0].metrics["flops"]


def test_short_fit_with_the_paper_recipe(digits):
    cfg = ScalingConfig.model_validate({"recipe": "paper", "family": "efficientnet", "scales": [1],
                                        "train": {"max_steps": 2, "ema_decay": None}})
    candidates = list(Scaling(cfg).fit(digits).candidates())
    assert len(candidates) == 1 and 0.0 <= candidates[0].metrics["val_acc"] <= 1.0


def test_distillation_from_teacher_anchor(digits):
    teacher = build({"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}, 10, 1).eval()
    cfg = ScalingConfig(family="efficientnet", scales=[1], distill=True, train=TrainConfig(max_steps=3))
    candidates = list(Scaling(cfg).fit(digits, teacher=Anchor("t", teacher, source="trained")).candidates())
    assert len(candidates) == 1 and candidates[0].metrics["flops"] > 0
