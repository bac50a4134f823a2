"""Anchors and teachers: pretrained weights (local, s3://, timm checkpoints) used as pretrained, adapted
as configured (none | head | finetune), one-line errors, and training from the anchor's own seed."""
from __future__ import annotations

import boto3
import pytest
import torch
from safetensors.torch import save_file

from podium.config import AnchorConfig, ConfigError, TeacherConfig, parse_config
from podium.methods.export import save_weights
from podium.methods.families import build
from podium.methods.train import TrainConfig, cross_entropy_loss, evaluate, fit
from podium.tasks.anchors import AnchorError, _acquire_new, initial_model
from podium.tasks.common import RunContext

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
SHORT = {"max_steps": 15, "log_every_s": 1e9}


def context(tmp_path, store_uri: str = "store", endpoint: str | None = None) -> RunContext:
    cfg = parse_config({"anchors": [{"name": "tiny", "arch": TINY}], "store": {"uri": store_uri, "endpoint_url": endpoint},
                        "runtime": {"cache_dir": str(tmp_path / "cache")}})
    return RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="none", git_sha="none")


def _same(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def test_adapt_none_leaves_a_local_checkpoint_untouched(tmp_path, digits):
    source = build(TINY, 10, 1).eval()
    save_weights(source, tmp_path / "tiny.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="tiny.safetensors")  # relative to the project
    anchor = _acquire_new(context(tmp_path), acfg, digits, "anchor")[0]  # adapt unset: the head fits, so none
    assert anchor.source == "checkpoint:tiny.safetensors"
    assert _same(anchor.model, source)


def test_s3_checkpoint_loads_the_same_weights(tmp_path, digits, s3):
    source = build(TINY, 10, 1).eval()
    save_weights(source, tmp_path / "w.safetensors")
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="ckpts")
    client.upload_file(str(tmp_path / "w.safetensors"), "ckpts", "anchors/tiny.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="s3://ckpts/anchors/tiny.safetensors", adapt="none")
    anchor = _acquire_new(context(tmp_path, endpoint=s3), acfg, digits, "anchor")[0]
    assert anchor.source == "checkpoint:s3://ckpts/anchors/tiny.safetensors"
    assert _same(anchor.model, source)


def test_head_adaptation_trains_only_a_new_classifier_on_frozen_features(tmp_path, digits):
    source = build(TINY, 10, 1)  # pretrained features, then a head for another label set (5 classes; the data has 10)
    fit(source, digits.train, cross_entropy_loss(source), TrainConfig(max_steps=40, lr=0.1, log_every_s=1e9))
    source.reset_classifier(5)
    save_weights(source.eval(), tmp_path / "five.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="five.safetensors", train=SHORT)
    with pytest.raises(AnchorError, match=r"adapt: none, but its weights have a classifier for 5 classes .* 10"):
        _acquire_new(context(tmp_path), acfg.model_copy(update={"adapt": "none"}), digits, "anchor")[0]
    anchor = _acquire_new(context(tmp_path), acfg, digits, "anchor")[0]  # adapt unset: the head does not fit, so head
    assert anchor.source == "checkpoint:five.safetensors+head"
    assert anchor.model.fc.out_features == 10
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    adapted = anchor.model.state_dict()
    assert all(torch.equal(adapted[k], v) for k, v in backbone.items())  # weights and BN statistics untouched
    assert evaluate(anchor.model, digits.val) > 0.5  # 15 steps of a linear probe


def test_finetune_trains_every_weight_from_the_pretrained_ones(tmp_path, digits):
    source = build(TINY, 10, 1).eval()
    save_weights(source, tmp_path / "tiny.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="tiny.safetensors", adapt="finetune", train=SHORT)
    anchor = _acquire_new(context(tmp_path), acfg, digits, "anchor")[0]
    assert anchor.source == "checkpoint:tiny.safetensors+finetune"
    assert not torch.equal(anchor.model.conv1.weight, source.conv1.weight)


def test_a_timm_checkpoint_goes_through_timms_loader_and_adapts_its_stem_and_head(tmp_path, digits):
    arch = {"family": "timm", "name": "resnet10t"}
    imagenet = build(arch, 1000, 3).eval()  # an RGB, 1000-class checkpoint in timm's layout
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, tmp_path / "r10t.safetensors")
    acfg = AnchorConfig(name="r10t", arch=arch, checkpoint="r10t.safetensors", train=SHORT)
    anchor = _acquire_new(context(tmp_path), acfg, digits, "anchor")[0]
    assert anchor.source == "checkpoint:r10t.safetensors+head"
    stem = anchor.model.conv1[0].weight  # timm summed the RGB filters into one grey channel
    assert stem.shape[1] == 1 and torch.allclose(stem[:, 0], imagenet.conv1[0].weight.sum(dim=1), atol=1e-5)
    assert torch.equal(anchor.model.layer4[0].conv1.weight, imagenet.layer4[0].conv1.weight)


def test_an_anchor_starts_from_its_own_seed_whatever_was_drawn_before(digits):
    acfg = AnchorConfig(name="tiny", arch=TINY)
    first = initial_model(acfg, digits).state_dict()
    torch.rand(1000)  # another task (or library) drew from the global generator in between
    again = initial_model(acfg, digits).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = initial_model(AnchorConfig(name="tiny", arch=TINY, train={"seed": 1}), digits).state_dict()
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_missing_or_mismatched_checkpoint_is_one_line(tmp_path, digits):
    with pytest.raises(AnchorError, match="does not exist"):
        _acquire_new(context(tmp_path), AnchorConfig(name="tiny", arch=TINY, checkpoint="nope.safetensors"), digits,
                     "anchor")[0][0]
    save_weights(build({**TINY, "channels": [16, 32, 64, 128]}, 10, 1), tmp_path / "other.safetensors")
    with pytest.raises(AnchorError, match="does not fit arch.*size mismatch") as err:
        _acquire_new(context(tmp_path), AnchorConfig(name="tiny", arch=TINY, checkpoint="other.safetensors"), digits,
                     "anchor")[0][0]
    assert "\n" not in str(err.value)


def test_config_of_adaptation_and_of_a_teacher_that_is_no_anchor():
    with pytest.raises(ConfigError, match="adapt: head needs pretrained weights"):
        parse_config({"anchors": [{"name": "a", "arch": TINY, "adapt": "head"}]})
    with pytest.raises(ConfigError, match=r"anchors\.0\.train\.lrr"):
        parse_config({"anchors": [{"name": "a", "arch": TINY, "train": {"lrr": 1}}]})
    cfg = parse_config({"anchors": [{"name": "a", "arch": TINY}],
                        "teacher": {"arch": {"family": "timm", "name": "regnety_160"}, "timm_hub": True,
                                    "adapt": "finetune", "train": {"epochs": 1}}})
    assert isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.name == "teacher"
    assert cfg.teacher.recipe("finetune").epochs == 1 and cfg.teacher.recipe("finetune").lr_batch == 256
    with pytest.raises(ConfigError, match="teacher 'b' is not an anchor"):
        parse_config({"anchors": [{"name": "a", "arch": TINY}], "teacher": "b"})


def test_a_registered_anchor_whose_files_are_gone_is_acquired_again(tmp_path, digits, caplog):
    """An artifact root that moved or was deleted leaves the registry pointing at nothing: the anchor is
    trained again and registered as a new version (one warning), instead of failing the run."""
    import logging
    import shutil

    from podium.tasks.anchors import ALIAS, acquire_one, anchor_registered_name

    cfg = parse_config({"anchors": [{"name": "tiny", "arch": TINY, "train": SHORT}],
                        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                     "artifact_root": str(tmp_path / "mlartifacts")},
                        "runtime": {"cache_dir": str(tmp_path / "cache")}})
    probe = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="none", git_sha="none")
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), git_sha="none",
                     run_id=probe.registry.start_run(cfg.tracking.experiment, "anchors"))
    first = acquire_one(ctx, cfg.anchors[0], digits)
    name = anchor_registered_name(cfg.model_name, "tiny", "anchor")
    assert str(ctx.registry.version_by_alias(name, ALIAS).version) == "1" and first.source == "trained"
    shutil.rmtree(tmp_path / "mlartifacts")  # the version's files are gone
    with caplog.at_level(logging.WARNING, logger="podium.tasks.anchors"):
        again = acquire_one(ctx, cfg.anchors[0], digits)
    assert again.source == "trained" and str(ctx.registry.version_by_alias(name, ALIAS).version) == "2"
    assert any("registered v1 cannot be loaded" in r.getMessage() for r in caplog.records)
