"""The catalogue of methods: name -> (config class, method class), imported on first use."""
from __future__ import annotations

import importlib
from typing import Any

from methods.base import StrictModel

_METHODS: dict[str, tuple[str, str, str]] = {
    "stitching": ("methods.stitching", "StitchingConfig", "Stitching"),
    "shrinking": ("methods.shrinking", "ShrinkingConfig", "Shrinking"),
    "scaling": ("methods.scaling", "ScalingConfig", "Scaling"),
    "self_distill": ("methods.self_distill", "SelfDistillConfig", "SelfDistill"),
}

METHOD_NAMES = tuple(_METHODS)


def _lookup(name: str, index: int) -> Any:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    module_name = _METHODS[name][0]
    return getattr(importlib.import_module(module_name), _METHODS[name][index])


def config_class(name: str) -> type[StrictModel]:
    return _lookup(name, 1)


def method_class(name: str) -> type:
    return _lookup(name, 2)
