"""SN-Net stitching: stitch space rules, least-squares layers, exact identity stitches, export, fit."""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from podium.methods.base import Anchor
from podium.methods.complexity import count
from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.families.timm_hub import split_timm
from podium.methods.stitching import (
    StitchConfig,
    Stitching,
    StitchingConfig,
    as_rows,
    assemble,
    build_stitch_layers,
    collect_features,
    describe_space,
    enumerate_stitches,
    init_stitch_layers,
    least_squares,
    make_stitch_layer,
    paired_stitching,
    pareto_rows,
    probe_shapes,
    set_stitch_weights,
    stitch_residual,
    take_batches,
    unpaired_stitching,
)
from podium.methods.train import TrainConfig, cross_entropy_loss, fit
from podium.tasks.plots import plot_pareto
from tests.conftest import onnx_logits

SMALL = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}
LARGE = {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]}
SIZE = (32, 32)


def _vit(dim: int, depth: int, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=dim, depth=depth,
                             num_heads=2).eval()


def _space(models: list[nn.Module], names: list[str], **kw):
    parts = [split_timm(m) for m in models]  # timm ResNets and ViTs, by class
    shapes = [probe_shapes(p, 1, SIZE) for p in parts]
    configs = enumerate_stitches(parts, names, shapes, **kw)
    return parts, shapes, configs, build_stitch_layers(parts, shapes, configs)


@pytest.fixture(scope="module")
def anchors(digits) -> list[Anchor]:
    """The two demo anchors, trained briefly on the digits (a few seconds each)."""
    out = []
    for name, arch, epochs in (("small", SMALL, 2), ("large", LARGE, 2)):
        torch.manual_seed(0)
        model = build(arch, digits.num_classes, 1)
        fit(model, digits.train, cross_entropy_loss(model), TrainConfig(epochs=epochs, lr=0.05), name=name)
        out.append(Anchor(name=name, model=model.eval(), source="trained", arch=arch))
    return out


def test_stitch_space_rules():
    # Reference counts: DeiT-style paired depth 12 -> 34 stitches on 11 layers; unpaired 2 -> 4 blocks.
    paired = paired_stitching(12, window=2, stride=1)
    assert len(paired) == 34 and len({layer for *_, layer in paired}) == 11
    assert unpaired_stitching(2, 4) == [(0, 1, 0), (1, 2, 1), (1, 3, 1)]
    assert unpaired_stitching(2, 6) == [(0, 1, 0), (0, 2, 0), (1, 3, 1), (1, 4, 1), (1, 5, 1)]

    # Three anchors: stitches only between neighbours, Fast-to-Slow (front = the smaller anchor).
    mid = {"family": "resnet", "layers": [1, 2, 1, 1], "channels": [24, 48, 96, 192]}
    rows = describe_space([LARGE, SMALL, mid], 10, 1, SIZE, names=["L", "S", "M"])
    anchors = [r for r in rows if r["kind"] == "anchor"]
    stitches = [r for r in rows if r["kind"] == "stitch"]
    assert [r["name"] for r in anchors] == ["S", "M", "L"]  # sorted by FLOPs
    assert {(r["front"], r["end"]) for r in stitches} == {("S", "M"), ("M", "L")}
    # S/M: stage 0 paired (0,0); stage 1 unpaired (0,1); stages 2-3 paired (0,0) change resolution: dropped.
    # M/L: stages 0, 2, 3 unpaired (0,1); stage 1 paired window (0,1), (1,1) (k=0 would change resolution).
    assert sum(r["front"] == "S" for r in stitches) == 2 and sum(r["front"] == "M" for r in stitches) == 5
    flops = {r["name"]: r["flops"] for r in anchors}
    for r in stitches:
        assert r["flops"] > 0 and r["name"].startswith(f"{r['front']}[:{r['front_blocks']}]->")
    # ResNet-18/50 in stages 1-2 as in the reference: 8 stitches (10 configurations).
    demo = describe_space([SMALL, LARGE], 10, 1, SIZE, StitchingConfig(stages=[1, 2]))
    assert len(demo) == 2 + 2
    assert min(flops.values()) < max(flops.values())


def test_stitch_forward_shapes_cnn_and_vit():
    torch.manual_seed(0)
    small, large = build(SMALL, 10, 1).eval(), build(LARGE, 10, 1).eval()
    parts, shapes, configs, layers = _space([small, large], ["s", "l"])
    assert len(configs) == 6  # 2 anchors + 1 unpaired stitch per stage
    x = torch.randn(3, 1, *SIZE)
    for c in configs:
        assert assemble(parts, layers, c)(x).shape == (3, 10)
    vits = [_vit(32, 2), _vit(64, 2, seed=1), _vit(64, 4, seed=2)]
    vparts, vshapes, vconfigs, vlayers = _space(vits, ["t", "s", "b"])
    # t/s paired (depth 2, window 2): 4 stitches; s/b unpaired (2 -> 4): 3 stitches.
    assert len(vconfigs) == 3 + 4 + 3
    assert all(isinstance(m, nn.Linear) for m in vlayers.values())
    for c in vconfigs:
        assert assemble(vparts, vlayers, c)(x).shape == (3, 10)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_identity_stitch_between_identical_anchors_reproduces_anchor(kind):
    torch.manual_seed(0)
    model = build(LARGE, 10, 1).eval() if kind == "cnn" else _vit(32, 4)
    twin = copy.deepcopy(model)
    parts, shapes, configs, layers = _space([model, twin], ["a", "b"])
    stitches = [c for c in configs if not c.is_anchor and c.front_blocks == c.end_start]
    assert stitches
    for c in stitches:
        dim = layers[c.layer].weight.shape[0]
        set_stitch_weights(layers[c.layer], torch.eye(dim), torch.zeros(dim))
    x = torch.randn(4, 1, *SIZE)
    with torch.no_grad():
        expected = model(x)
        for c in stitches:  # front[:j] -> identity -> twin[j:] runs exactly the anchor's blocks
            torch.testing.assert_close(assemble(parts, layers, c)(x), expected, rtol=0, atol=0)
        # and a stitch that skips a block does not (the test can fail)
        other = next(c for c in configs if not c.is_anchor and c.front_blocks != c.end_start)
        assert not torch.allclose(assemble(parts, layers, other)(x), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_least_squares_layer_beats_he_on_real_activations(digits, request, kind):
    if kind == "cnn":  # trained anchors: real activations of real features
        models = [a.model for a in request.getfixturevalue("anchors")]
    else:
        models = [_vit(32, 2), _vit(64, 2, seed=1)]
    parts, shapes, configs, layers = _space(models, ["f", "e"])
    c = next(c for c in configs if not c.is_anchor)
    loader = list(itertools.islice(digits.train, 4))  # fixed batches (the train loader reshuffles)
    batches = take_batches(loader, 4)
    x_rows = collect_features(parts[0], batches)[c.front_blocks]
    y_rows = collect_features(parts[1], batches)[c.end_start]
    assert x_rows.shape[0] > 10 * x_rows.shape[1]  # N >> C

    weight, bias = least_squares(x_rows, y_rows)
    # It solves the regression it claims to: normal equations hold, residual orthogonal to [X, 1].
    x1 = torch.cat([x_rows.double(), torch.ones(len(x_rows), 1, dtype=torch.float64)], 1)
    residual = x1 @ torch.cat([weight.T, bias[None]]) - y_rows.double()
    assert (x1.T @ residual).abs().max() < 1e-6 * x1.abs().max() * residual.abs().max() * len(x1)

    ls_layer = layers[c.layer]
    init_stitch_layers(parts, layers, [c], loader, "ls", 4)  # the same regression, through the method
    torch.testing.assert_close(ls_layer.weight.detach().reshape(weight.shape).double(), weight,
                               rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    he_layer = make_stitch_layer(parts[0].kind, weight.shape[1], weight.shape[0])
    ls_res, he_res = stitch_residual(ls_layer, x_rows, y_rows), stitch_residual(he_layer, x_rows, y_rows)
    assert ls_res < he_res and ls_res < 1.0  # better than predicting zeros (relative residual 1)


def test_cnn_stitch_onnx_matches_torch(tmp_path):
    torch.manual_seed(0)
    parts, _shapes, configs, layers = _space([build(SMALL, 10, 1).eval(), build(LARGE, 10, 1).eval()], ["s", "l"])
    c = next(c for c in configs if not c.is_anchor and c.stage == 2)
    model = assemble(parts, layers, c, standalone=True)
    # standalone: only the blocks it runs (front 3 of small, end 3 of large)
    assert len(model.front) == c.front_blocks and len(model.end) == len(parts[1].blocks) - c.end_start
    images = np.random.default_rng(0).standard_normal((5, 1, *SIZE)).astype(np.float32)
    path = export_onnx(model, (1, *SIZE), tmp_path / "stitch.onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(onnx_logits(path, images), expected, rtol=1e-4, atol=1e-4)


def test_vit_stitch_ls_init_and_onnx(digits, tmp_path):
    vits = [_vit(32, 2), _vit(64, 2, seed=1)]
    parts, _shapes, configs, layers = _space(vits, ["t", "s"])
    init_stitch_layers(parts, layers, configs, digits.train, "ls", 4)
    c = next(c for c in configs if not c.is_anchor)
    model = assemble(parts, layers, c, standalone=True)
    # The standalone copy holds no unused blocks (and the shells no blocks at all).
    total_blocks = sum(1 for m in model.modules() if type(m).__name__ == "Block")
    assert total_blocks == c.front_blocks + len(parts[1].blocks) - c.end_start
    images = np.random.default_rng(0).standard_normal((3, 1, *SIZE)).astype(np.float32)
    path = export_onnx(model, (1, *SIZE), tmp_path / "vit.onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(onnx_logits(path, images), expected, rtol=1e-4, atol=1e-4)


def test_short_fit_yields_candidates_with_metrics(digits, anchors, tmp_path):
    before = {k: v.clone() for k, v in anchors[1].model.state_dict().items()}
    cfg = StitchingConfig(train=TrainConfig(max_steps=6, lr=1e-3, optimizer="adamw"), distill=True,
                          sampling="flops_bins", bn_recalibration_batches=2)
    # Given large first: the method sorts anchors by FLOPs (small is the front).
    space = Stitching(cfg).fit(digits, [anchors[1], anchors[0]], teacher=anchors[1])
    cands = list(space.candidates())
    assert len(cands) == 6
    assert {c.config["front"] for c in cands if c.config["end"]} == {"small"}
    for cand in cands:
        assert 0.0 <= cand.metrics["val_acc"] <= 1.0
        assert min(cand.metrics[k] for k in ("flops", "params", "acts")) > 0
        assert cand.metrics["flops"] == count(cand.model, SIZE, 1).flops
        assert not cand.model.training and cand.method == "stitching" and cand.input_size == SIZE
    anchor_acc = {c.name: c.metrics["val_acc"] for c in cands if c.config["end"] is None}
    assert anchor_acc["sn-large"] > 0.5  # anchors still work after joint training
    # callers' anchors are not mutated
    for k, v in anchors[1].model.state_dict().items():
        assert torch.equal(v, before[k]), k
    rows = pareto_rows(space)
    assert len(rows) == 6 and any(r["pareto"] for r in rows)
    assert [r["flops"] for r in rows] == sorted(r["flops"] for r in rows)
    png = plot_pareto(rows, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = space.tables()
    assert list(tables) == ["stitching_pareto"] and tables["stitching_pareto"] == rows
    assert len(json.loads(json.dumps(tables["stitching_pareto"]))) == 6  # the report logs it as JSON
    plot = plot_pareto(tables["stitching_pareto"], tmp_path / "stitching_pareto.png")
    assert plot.suffix == ".png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_as_rows_is_nhwc():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = as_rows(x)
    assert rows.shape == (8, 3)
    torch.testing.assert_close(rows[1], x[0, :, 0, 1])


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match=r"windw\s+Extra inputs are not permitted"):
        StitchingConfig(windw=3)
    assert isinstance(StitchConfig(name="a", front=0, front_blocks=2).is_anchor, bool)
