"""SN-Net stitching: stitch space rules, least-squares layers, exact identity stitches, export, fit."""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from podium.methods import families, losses
from podium.methods.base import Anchor
from podium.methods.complexity import count
from podium.methods.export import export_onnx
from podium.methods.families import build
from podium.methods.families.timm_hub import split_timm
from podium.methods.stitching import (
    StitchConfig,
    Stitching,
    StitchingConfig,
    StitchSupernet,
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
    recipe_kind,
    set_stitch_weights,
    stitch_lr_optimizer,
    stitch_residual,
    take_batches,
    unpaired_stitching,
)
from podium.methods.stitching import method as stitching_method
from podium.methods.train import TrainConfig, cross_entropy_loss, fit, scaled_lr
from podium.tasks.plots import plot_pareto
from tests.conftest import onnx_logits, pt2_logits

SMALL = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}
LARGE = {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]}
SIZE = (32, 32)


def _vit(dim: int, depth: int, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=dim, depth=depth,
                             num_heads=2).eval()


def _swin(dim: int, depths: tuple[int, ...], seed: int = 0) -> SwinTransformer:
    """A small Swin on 32x32 digits: 16x16 patches, then 8x8, 4x4 and 2x2 token maps (NHWC)."""
    torch.manual_seed(seed)
    return SwinTransformer(img_size=32, patch_size=2, in_chans=1, num_classes=10, embed_dim=dim, depths=depths,
                           num_heads=(2, 2, 2, 2), window_size=4).eval()


def _model(kind: str, seed: int = 0) -> nn.Module:
    """A twin-able anchor per kind; stage 1 has 3 blocks so that window 3 holds a block-skipping stitch."""
    torch.manual_seed(seed)
    if kind == "cnn":
        model = build({"family": "resnet", "layers": [1, 3, 1, 1], "channels": [16, 32, 64, 128]}, 10, 1).eval()
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            nn.init.uniform_(norm.weight, 0.5, 1.5)  # timm zero-inits each block's last BN: blocks start as identities
        return model
    return _vit(32, 4, seed) if kind == "vit" else _swin(16, (1, 3, 1, 1), seed)


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
    # Reference counts: DeiT-style paired depth 12 -> 34 stitches on 11 layers; the CNN/Swin rule
    # (no rewinds: k > j) 11 on 11; unpaired 2 -> 4 blocks.
    paired = paired_stitching(12, window=2, stride=1)
    assert len(paired) == 34 and len({layer for *_, layer in paired}) == 11
    forward_only = paired_stitching(12, window=2, stride=1, rewind=False)
    assert forward_only == [(j, j + 1, j) for j in range(11)]
    assert len(paired_stitching(12, window=3, rewind=False)) == 21  # (j, j+1), (j, j+2)
    assert unpaired_stitching(2, 4) == [(0, 1, 0), (1, 2, 1), (1, 3, 1)]
    assert unpaired_stitching(2, 6) == [(0, 1, 0), (0, 2, 0), (1, 3, 1), (1, 4, 1), (1, 5, 1)]

    # Three anchors: stitches only between neighbours, Fast-to-Slow (front = the smaller anchor),
    # by default in a CNN's stages 1-2 only.
    mid = {"family": "resnet", "layers": [1, 2, 1, 1], "channels": [24, 48, 96, 192]}
    rows = describe_space([LARGE, SMALL, mid], 10, 1, SIZE, names=["L", "S", "M"])
    anchors = [r for r in rows if r["kind"] == "anchor"]
    stitches = [r for r in rows if r["kind"] == "stitch"]
    assert [r["name"] for r in anchors] == ["S", "M", "L"]  # sorted by FLOPs
    assert {(r["front"], r["end"]) for r in stitches} == {("S", "M"), ("M", "L")}
    assert {r["stage"] for r in stitches} == {1, 2}
    # S/M: stage 1 unpaired 1 -> 2 blocks (0,1); stage 2 paired depth 1: none without rewinds.
    # M/L: stage 1 paired depth 2 (0,1); stage 2 unpaired 1 -> 2 blocks (0,1).
    assert sum(r["front"] == "S" for r in stitches) == 1 and sum(r["front"] == "M" for r in stitches) == 2
    flops = {r["name"]: r["flops"] for r in anchors}
    for r in stitches:
        assert r["flops"] > 0 and r["name"].startswith(f"{r['front']}[:{r['front_blocks']}]->")
        assert r["end_start"] > r["front_blocks"] - 1  # no rewinds in CNNs
    assert min(flops.values()) < max(flops.values())
    everywhere = describe_space([SMALL, LARGE], 10, 1, SIZE, StitchingConfig(stages=[0, 1, 2, 3]))
    assert len(everywhere) == 2 + 4  # one unpaired stitch per stage when asked for all four


@pytest.fixture(scope="module")
def reference_anchors() -> dict[str, tuple]:
    """The papers' anchor trios as timm builds them (untrained), cut and probed at 224 on the meta
    device: shapes without weights, in well under a second per anchor."""
    trios = {"deit": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"],
             "swin": ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"],
             "resnet": ["resnet18", "resnet50"]}
    out = {}
    with torch.device("meta"):
        for family, names in trios.items():
            archs = [{"family": "timm", "name": n} for n in names]
            parts = [families.split(a, build(a, 1000, 3).eval()) for a in archs]
            out[family] = (names, parts, [probe_shapes(p, 3, (224, 224)) for p in parts])
    return out


@pytest.mark.parametrize("family, expected", [("deit", 71), ("swin", 41), ("resnet", 10)])
def test_reference_space_sizes(reference_anchors, family, expected):
    names, parts, shapes = reference_anchors[family]
    configs = enumerate_stitches(parts, names, shapes)
    assert len(configs) == expected  # the papers' and the reference code's counts
    stitches = [c for c in configs if not c.is_anchor]
    assert all(c.end == c.front + 1 for c in stitches)  # Fast-to-Slow, nearest anchors only
    if family == "resnet":  # stages 1-2 only: 3 + 5 unpaired stitches
        assert sorted({c.stage for c in stitches}) == [1, 2] and len(stitches) == 8
    if family == "swin":  # stages 0-2 (the last skipped); per anchor pair 1 + 1 + 17 (paired or 6 -> 18 unpaired)
        assert sorted({c.stage for c in stitches}) == [0, 1, 2]
        assert [sum(c.stage == s and c.front == 0 for c in stitches) for s in (0, 1, 2)] == [1, 1, 17]
        assert [sum(c.stage == s and c.front == 1 for c in stitches) for s in (0, 1, 2)] == [1, 1, 17]
        assert all(c.end_start >= c.front_blocks for c in stitches)  # no rewinds
    # Swin's NHWC token maps get linear stitching layers over their channels.
    layers = build_stitch_layers(parts, shapes, configs)
    expected_kind = nn.Conv2d if family == "resnet" else nn.Linear
    assert layers and all(isinstance(layer, expected_kind) for layer in layers.values())
    # Slow-to-Fast: the same cut points run the other way, the larger anchor in front.
    reverse = enumerate_stitches(parts, names, shapes, direction="slow_to_fast")
    reversed_stitches = [c for c in reverse if not c.is_anchor]
    assert len(reverse) == expected and all(c.front == c.end + 1 for c in reversed_stitches)
    assert ({(c.end, c.end_start, c.front, c.front_blocks) for c in reversed_stitches}
            == {(c.front, c.front_blocks, c.end, c.end_start) for c in stitches})


def test_slow_to_fast_stitches_run_from_the_larger_anchor():
    vits = [_vit(32, 2), _vit(64, 2, seed=1), _vit(64, 4, seed=2)]
    parts, shapes, configs, layers = _space(vits, ["t", "s", "b"], direction="slow_to_fast")
    stitches = [c for c in configs if not c.is_anchor]
    assert len(configs) == 3 + 4 + 3 and {(c.front, c.end) for c in stitches} == {(1, 0), (2, 1)}
    assert all(c.name.startswith(("s[", "b[")) for c in stitches)
    x = torch.randn(2, 1, *SIZE)
    for c in stitches:  # e.g. s[:2] -> linear 64 -> 32 -> t[1:]
        assert layers[c.layer].in_features == shapes[c.front][c.front_blocks][-1]
        assert assemble(parts, layers, c)(x).shape == (2, 10)


def test_cut_swin_reproduces_the_model_and_keeps_its_stages():
    model = _swin(16, (2, 2, 2, 2))
    parts = families.split({"family": "timm", "name": "swin"}, model)  # split_timm, by the model's class
    assert parts.kind == "vit" and parts.stages == [0, 0, 1, 1, 2, 2, 3, 3]
    assert recipe_kind(parts) == "swin"
    shapes = probe_shapes(parts, 1, SIZE)
    assert shapes[0] == (16, 16, 16) and shapes[3] == (8, 8, 32)  # NHWC; stage 1 starts with its patch merging
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(assemble([parts], nn.ModuleDict(), StitchConfig("a", 0, 8)).eval()(x), model(x))


@pytest.mark.parametrize("kind", ["cnn", "vit", "swin"])
def test_identity_stitch_between_identical_anchors_reproduces_anchor(kind):
    model = _model(kind)
    twin = copy.deepcopy(model)
    parts, _shapes, configs, layers = _space([model, twin], ["a", "b"], window=3)
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


@pytest.mark.parametrize("kind", ["cnn", "vit", "swin"])
def test_least_squares_layer_beats_he_on_real_activations(digits, request, kind):
    if kind == "cnn":  # trained anchors: real activations of real features
        models = [a.model for a in request.getfixturevalue("anchors")]
    elif kind == "vit":
        models = [_vit(32, 2), _vit(64, 2, seed=1)]
    else:  # NHWC token maps: rows of channels without a permute
        models = [_swin(16, (2, 2, 2, 2)), _swin(24, (2, 2, 2, 2), seed=1)]
    parts, _shapes, configs, layers = _space(models, ["f", "e"])
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
    np.testing.assert_allclose(pt2_logits(model, (1, *SIZE), images, tmp_path / "pt2"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["cnn", "vit", "swin"])
def test_stitch_params_are_all_it_holds(kind):
    # Bare parameters a shell holds (a ViT's cls_token and pos_embed) or a block computes with (Swin's
    # relative position bias tables) count, once: a standalone stitch holds exactly what it runs.
    models = [_model(kind), _model(kind, seed=1)]
    parts, _shapes, configs, layers = _space(models, ["a", "b"], window=3)
    for c in configs[:1] + [c for c in configs if not c.is_anchor][:3]:
        model = assemble(parts, layers, c, standalone=True)
        assert count(model, SIZE, 1).params == sum(p.numel() for p in model.parameters()), c.name
    if kind == "vit":
        embed = parts[0].embed
        assert count(embed, SIZE, 1).params == sum(p.numel() for p in embed.parameters()) > (
            sum(p.numel() for p in models[0].patch_embed.parameters()))


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
    np.testing.assert_allclose(pt2_logits(model, (1, *SIZE), images, tmp_path / "pt2"), expected, rtol=1e-4, atol=1e-4)


def _spy_on_distillation(monkeypatch) -> list[int]:
    calls: list[int] = []

    def spy(student, teacher, labels):
        calls.append(len(labels))
        return losses.hard_distillation(student, teacher, labels)

    monkeypatch.setattr(stitching_method, "hard_distillation", spy)
    return calls


def test_short_fit_yields_candidates_with_metrics(digits, anchors, tmp_path, monkeypatch):
    before = {k: v.clone() for k, v in anchors[1].model.state_dict().items()}
    cfg = StitchingConfig(train=TrainConfig(max_steps=6, lr=1e-3, optimizer="adamw"),
                          sampling="flops_bins", bn_recalibration_batches=2)
    assert cfg.distill is None  # the default: distil when a teacher is given
    distilled = _spy_on_distillation(monkeypatch)
    # Given large first: the method sorts anchors by FLOPs (small is the front).
    space = Stitching(cfg).fit(digits, [anchors[1], anchors[0]], teacher=anchors[1])
    assert len(distilled) == 6  # every step: ½ CE(labels) + ½ CE(teacher's argmax)
    cands = list(space.candidates())
    assert len(cands) == 4
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
    assert len(rows) == 4 and any(r["pareto"] for r in rows)
    assert [r["flops"] for r in rows] == sorted(r["flops"] for r in rows)
    png = plot_pareto(rows, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = space.tables()
    assert list(tables) == ["stitching_pareto"] and tables["stitching_pareto"] == rows
    assert len(json.loads(json.dumps(tables["stitching_pareto"]))) == 4  # the report logs it as JSON
    plot = plot_pareto(tables["stitching_pareto"], tmp_path / "stitching_pareto.png")
    assert plot.suffix == ".png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_teacher_or_distill_off_trains_on_labels(digits, anchors, monkeypatch):
    distilled = _spy_on_distillation(monkeypatch)
    quick = {"train": TrainConfig(max_steps=1, lr=1e-3, optimizer="adamw"), "bn_recalibration_batches": 0}
    Stitching(StitchingConfig(**quick)).fit(digits, anchors)  # no teacher
    Stitching(StitchingConfig(distill=False, **quick)).fit(digits, anchors, teacher=anchors[1])
    assert distilled == []


def test_paper_recipe_and_its_variants(digits, anchors, monkeypatch):
    demo = StitchingConfig()
    assert StitchingConfig.model_validate({}) == demo and demo.recipe == "demo"
    assert (demo.train.optimizer, demo.train.lr, demo.train.epochs, demo.train.lr_batch) == ("adamw", 1e-3, 3, None)
    paper = StitchingConfig.model_validate({"recipe": "paper", "window": 3})
    vit = paper.train  # DeiT: 5e-5 per 512 images (lr * batch * world / 512) is 1e-4 per 1024
    assert (vit.optimizer, vit.lr, vit.lr_batch, vit.epochs, vit.weight_decay) == ("adamw", 1e-4, 1024, 50, 0.05)
    assert paper.distill is True and paper.window == 3 and paper.variant("vit") is paper
    cnn = paper.variant("cnn")  # ResNet: SGD 0.05 at 8 x 128 images, 30 epochs
    assert (cnn.train.optimizer, cnn.train.lr, cnn.train.lr_batch, cnn.train.epochs) == ("sgd", 0.05, 1024, 30)
    assert cnn.window == 3 and cnn.stitch_lr_scale == 1.0
    swin = paper.variant("swin")  # the ViT recipe, stitching layers at 10x the anchors' lr
    assert swin.train == vit and swin.stitch_lr_scale == 10.0
    mine = StitchingConfig.model_validate({"recipe": "paper", "train": {"epochs": 2}}).variant("cnn")
    assert (mine.train.epochs, mine.train.lr) == (2, 0.05)  # the YAML's own fields beat every preset

    trained_with: list[TrainConfig] = []
    monkeypatch.setattr(stitching_method, "fit", lambda *args, **kw: trained_with.append(args[3]))
    Stitching(StitchingConfig.model_validate({"recipe": "paper", "bn_recalibration_batches": 0})).fit(digits, anchors)
    assert trained_with == [cnn.train]  # ResNet anchors: the paper's CNN recipe


def test_stitching_layers_get_their_own_learning_rate():
    vits = [_vit(32, 2), _vit(64, 2, seed=1)]
    parts, _shapes, configs, layers = _space(vits, ["t", "s"])
    supernet = StitchSupernet(parts, layers, configs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=256)
    cfg = StitchingConfig.model_validate({"recipe": "paper"}).variant("swin")
    optimizer = stitch_lr_optimizer(supernet, loader, cfg)
    lr = scaled_lr(cfg.train, 256)
    assert lr == pytest.approx(2.5e-5)
    layer_params = {id(p) for p in layers.parameters()}
    for group in optimizer.param_groups:
        stitch = {id(p) in layer_params for p in group["params"]}
        assert len(stitch) == 1 and group["lr"] == pytest.approx(lr * (10 if stitch == {True} else 1))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(supernet.parameters()))
    assert stitch_lr_optimizer(supernet, loader, StitchingConfig()) is None  # fit builds its own


def test_as_rows_is_nhwc():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = as_rows(x, "cnn")
    assert rows.shape == (8, 3)
    torch.testing.assert_close(rows[1], x[0, :, 0, 1])
    nhwc = x.permute(0, 2, 3, 1)  # Swin's token maps: channels already last
    torch.testing.assert_close(as_rows(nhwc, "vit"), rows)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match=r"windw\s+Extra inputs are not permitted"):
        StitchingConfig(windw=3)
    assert isinstance(StitchConfig(name="a", front=0, front_blocks=2).is_anchor, bool)
