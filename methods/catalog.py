"""The catalogue of methods, filled by the defining modules (timm style).

A method module decorates its method class with :func:`register_method`; the first lookup imports
every module of ``podium.methods``, so a new method is one new file and nothing lists it.
The config loader, ``podium space show``, the training task's cache key and the report ask the
catalogue; nothing imports a method by name.

A registered method class is built from its config (``Method(cfg)``) and its ``fit(data, anchors,
teacher)`` returns a :class:`~podium.methods.base.CandidateSpace`. ``describe(cfg, shape, anchors)``
lists its space without training, as rows of plain values. ``Method.space_type`` is the space class
``fit`` returns: saved spaces are loaded back through it (:func:`space_method` finds a space's method).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from podium.files import files_digest
from podium.methods.base import AnchorSpec, CandidateSpace, DataShape, StrictModel

Describe = Callable[[Any, DataShape, Sequence[AnchorSpec]], list[dict[str, Any]]]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[StrictModel]
    method: type
    describe: Describe

    @property
    def source_files(self) -> list[Path]:
        """The method's own source: its module, or every file of its package (``methods/<name>/``)."""
        module = sys.modules[self.method.__module__]
        path = Path(module.__file__)
        return [path] if module.__package__ == "podium.methods" else sorted(path.parent.glob("*.py"))

    def source_digest(self) -> str:
        """Changes with any line of the method's code (part of its training cache key)."""
        return files_digest(self.source_files)


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config: type[StrictModel], describe: Describe) -> Callable[[type], type]:
    """Class decorator: register ``cls`` as method ``name`` with its config model and describer."""

    def wrap(cls: type) -> type:
        if name in METHODS and METHODS[name].method is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodEntry(name, config, cls, describe)
        cls.name = name
        return cls

    return wrap


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        import podium.methods
        from podium.methods.discovery import import_submodules

        import_submodules("podium.methods", podium.methods.__path__)
        _discovered = True


def method_names() -> tuple[str, ...]:
    _discover()
    return tuple(METHODS)


def get_method(name: str) -> MethodEntry:
    _discover()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def config_class(name: str) -> type[StrictModel]:
    return get_method(name).config


def method_class(name: str) -> type:
    return get_method(name).method


def space_method(space: CandidateSpace) -> MethodEntry:
    """The method whose ``fit`` returns spaces of ``space``'s class."""
    _discover()
    for entry in METHODS.values():
        if getattr(entry.method, "space_type", None) is type(space):
            return entry
    raise KeyError(f"no registered method returns a {type(space).__name__}")
