"""Anchor acquisition from a checkpoint (local and s3://): safetensors only, clear errors."""
from __future__ import annotations

import boto3
import pytest
import torch

from podium.config import AnchorConfig, parse_config
from podium.methods.export import save_weights
from podium.methods.families import build
from podium.tasks.anchors import AnchorError, _from_checkpoint, initial_model
from podium.tasks.common import RunContext

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def context(tmp_path, store_uri: str = "store", endpoint: str | None = None) -> RunContext:
    cfg = parse_config({"anchors": [{"name": "tiny", "arch": TINY}], "store": {"uri": store_uri, "endpoint_url": endpoint}})
    return RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="none", git_sha="none")


def test_local_checkpoint_loads_the_same_weights(tmp_path, digits):
    source = build(TINY, 10, 1).eval()
    save_weights(source, tmp_path / "tiny.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="tiny.safetensors")  # relative to the project
    anchor = _from_checkpoint(context(tmp_path), acfg, digits)
    assert anchor.source == "checkpoint:tiny.safetensors"
    for key, value in source.state_dict().items():
        assert torch.equal(anchor.model.state_dict()[key], value), key


def test_s3_checkpoint_loads_the_same_weights(tmp_path, digits, s3):
    source = build(TINY, 10, 1).eval()
    save_weights(source, tmp_path / "w.safetensors")
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="ckpts")
    client.upload_file(str(tmp_path / "w.safetensors"), "ckpts", "anchors/tiny.safetensors")
    acfg = AnchorConfig(name="tiny", arch=TINY, checkpoint="s3://ckpts/anchors/tiny.safetensors")
    anchor = _from_checkpoint(context(tmp_path, endpoint=s3), acfg, digits)
    assert anchor.source == "checkpoint:s3://ckpts/anchors/tiny.safetensors"
    loaded = anchor.model.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


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
        _from_checkpoint(context(tmp_path), AnchorConfig(name="tiny", arch=TINY, checkpoint="nope.safetensors"), digits)
    save_weights(build({**TINY, "channels": [16, 32, 64, 128]}, 10, 1), tmp_path / "other.safetensors")
    with pytest.raises(AnchorError, match="does not fit arch") as err:
        _from_checkpoint(context(tmp_path), AnchorConfig(name="tiny", arch=TINY, checkpoint="other.safetensors"), digits)
    assert "\n" not in str(err.value)
