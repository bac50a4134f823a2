"""Config errors fail before any work, naming the file and the dotted path of the bad field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.devices import DeviceError, load_inventory, select_devices
from podium.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    mutate(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_config_parses_with_every_method():
    cfg = load_config(DEMO)
    assert set(cfg.methods) == {"stitching", "scaling", "self_distill", "shrinking"}
    for name in cfg.methods:
        assert cfg.method_config(name) is not None


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["data"].update(batch_sise=3), "data.batch_sise: Extra inputs are not permitted"),
    (lambda r: r["data"].update(batch_size="many"), "data.batch_size"),
    (lambda r: r["anchors"][0]["train"].update(lr=float("nan")), "anchors.0.train.lr"),
    (lambda r: r["methods"].update(pruning={}), "methods.pruning: unknown method"),
    (lambda r: r["methods"]["stitching"].update(no_such_key=1), "methods.stitching.no_such_key"),
    (lambda r: r.update(teacher="resnet-huge"), "teacher 'resnet-huge' is not an anchor"),
])
def test_bad_config_names_the_field(tmp_path, mutate, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, mutate))
    message = str(err.value)
    assert expected in message
    assert "cfg.yaml" in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_device_and_impossible_budget(tmp_path):
    inventory = load_inventory()
    with pytest.raises(DeviceError, match="unknown device 'tpu-9'"):
        select_devices(inventory, ["cpu-1t", "tpu-9"], "cfg.yaml")
    bad = tmp_path / "devices.yaml"
    bad.write_text(yaml.safe_dump({"devices": [{"name": "x", "latency_budget_ms": -1}]}))
    with pytest.raises(DeviceError, match="devices.0.latency_budget_ms"):
        load_inventory(bad)
