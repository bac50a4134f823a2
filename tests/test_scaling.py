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
    round_depth,
    round_group_width,
    round_width,
    runtime_correlation,
    scale_factors,
    scale_resolution,
)
from podium.methods.train import TrainConfig
from podium.tasks.plots import plot_runtime_correlation
from tests.conftest import onnx_logits

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


# ---------------------------------------------------------------- realised flops / acts


@pytest.fixture(scope="module")
def plans() -> dict[tuple[str, str], list[dict]]:
    out = {}
    for family in ("regnet", "efficientnet"):
        for strategy in ("dwr", "dWr"):
            out[family, strategy] = describe_scales(ScalingConfig(family=family, strategy=strategy,
                                                                  scales=[1, 2, 4, 8]))
    return out


@pytest.mark.parametrize("family", ["regnet", "efficientnet"])
@pytest.mark.parametrize("strategy", ["dwr", "dWr"])
def test_scaled_models_hit_the_flops_factor(plans, family, strategy):
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


def test_raw_rule_without_flops_matching_uses_s_itself():
    rows = describe_scales(ScalingConfig(strategy="dwr", scales=[1, 4], match_flops=False))
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
    assert candidates[1].metrics["flops"] > candidates[0].metrics["flops"]


def test_distillation_from_teacher_anchor(digits):
    teacher = build({"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}, 10, 1).eval()
    cfg = ScalingConfig(family="efficientnet", scales=[1], distill=True, train=TrainConfig(max_steps=3))
    candidates = list(Scaling(cfg).fit(digits, teacher=Anchor("t", teacher, source="trained")).candidates())
    assert len(candidates) == 1 and candidates[0].metrics["flops"] > 0
