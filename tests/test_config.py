"""Config errors fail before any work, naming the file and the dotted path of the bad field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from podium.config import ConfigError, load_config
from podium.devices import DeviceError, load_inventory, select_devices
from podium.methods.base import AnchorSpec, DataShape
from podium.methods.catalog import get_method, method_names

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
    for name in cfg.methods:  # each section parses into its method's own config model, with its defaults
        entry = get_method(name)
        method_cfg = cfg.method_config(name)
        assert type(method_cfg) is entry.config
        assert method_cfg == entry.config.model_validate(cfg.methods[name])
    assert cfg.method_config("scaling").strategy == "dWr"  # the paper's fast scaling by default


def test_every_registered_method_is_known_to_the_config_and_describes_its_space():
    """The catalogue is filled by importing the package; the config accepts exactly its names."""
    assert set(method_names()) == {"stitching", "scaling", "self_distill", "shrinking"}
    shape = DataShape(num_classes=10, channels=1, image_size=(32, 32))
    anchors = [AnchorSpec("tiny", {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}),
               AnchorSpec("small", {"family": "resnet", "layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256]})]
    for name in method_names():
        entry = get_method(name)
        rows = entry.describe(entry.config(), shape, anchors)
        assert rows and all(isinstance(r, dict) for r in rows), name
        assert len(entry.source_digest()) == 16 and entry.source_files, name
    with pytest.raises(KeyError, match="unknown method 'pruning'"):
        get_method("pruning")


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


def test_a_device_whose_runtime_is_not_installed_fails_at_config_time(monkeypatch):
    """One line before any work; a work-pool device is measured on its own machine, so it is exempt."""
    from podium.methods.runtimes import get_runtime

    inventory = load_inventory()
    assert [d.name for d in select_devices(inventory, ["cpu-1t-openvino"], "cfg.yaml")] == ["cpu-1t-openvino"]
    monkeypatch.setattr(type(get_runtime("openvino")), "available", lambda self: False)
    with pytest.raises(DeviceError, match=r"^cfg.yaml: device 'cpu-1t-openvino' uses runtime 'openvino', which is "
                                          r"not installed here \(available: torch, (?!.*openvino).*onnxruntime\)$"):
        select_devices(inventory, ["cpu-1t", "cpu-1t-openvino"], "cfg.yaml")
    remote = {"edge": inventory["cpu-1t-openvino"].model_copy(update={"name": "edge", "work_pool": "edge-pool",
                                                                      "precisions": ("fp32",)})}
    assert select_devices(remote, ["edge"], "cfg.yaml")[0].work_pool == "edge-pool"
    int8 = {"edge": remote["edge"].model_copy(update={"precisions": ("fp32", "int8")})}
    with pytest.raises(DeviceError, match=r"^cfg.yaml: device 'edge' accepts fp32, int8: its runtime 'openvino' "
                                          r"builds them on this machine, which does not have it$"):
        select_devices(int8, ["edge"], "cfg.yaml")
