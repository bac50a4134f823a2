"""The device inventory (``infra/devices.yaml`` by default): every target a model can be chosen for.

Each entry is a :class:`~podium.methods.profiling.DeviceProfile`, the profiler's own description of
where and how to measure; its runtime must be one this installation has.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from podium import infra
from podium.errors import DeviceError
from podium.files import load_yaml
from podium.methods.base import StrictModel
from podium.methods.profiling import DeviceProfile
from podium.methods.runtimes import available_runtimes, get_runtime

DEFAULT_INVENTORY = Path(infra.__file__).with_name("devices.yaml")


class Inventory(StrictModel):
    devices: list[DeviceProfile]


def load_inventory(path: Path = DEFAULT_INVENTORY) -> dict[str, DeviceProfile]:
    """Every device of the inventory at ``path`` by name (one-line DeviceError for a bad file or entry)."""
    try:
        raw = load_yaml(path)
    except FileNotFoundError:
        raise DeviceError(f"device inventory {path} does not exist") from None
    except ValueError as exc:
        raise DeviceError(f"device inventory {path}: {exc}") from None
    try:
        inventory = Inventory.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise DeviceError(f"{path}: {where}: {err['msg']}") from None
    names = [d.name for d in inventory.devices]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DeviceError(f"{path}: duplicate device names {duplicates}")
    return {d.name: d for d in inventory.devices}


def select_devices(inventory: dict[str, DeviceProfile], names: list[str], source: str) -> list[DeviceProfile]:
    unknown = [n for n in names if n not in inventory]
    if unknown:
        raise DeviceError(f"{source}: unknown device {unknown[0]!r}; known devices: {', '.join(sorted(inventory))}")
    for name in names:  # a device measured here needs its runtime here (a work-pool device brings its own)
        device = inventory[name]
        if get_runtime(device.runtime).available():
            continue
        if not device.work_pool:
            raise DeviceError(f"{source}: device {name!r} uses runtime {device.runtime!r}, which is not installed "
                              f"here (available: {', '.join(available_runtimes())})")
        if set(device.precisions) - {"fp32"}:  # derived models are built (and their accuracy measured) here
            raise DeviceError(f"{source}: device {name!r} accepts {', '.join(device.precisions)}: its runtime "
                              f"{device.runtime!r} builds them on this machine, which does not have it")
    return [inventory[n] for n in names]
