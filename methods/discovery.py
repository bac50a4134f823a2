"""Registries are filled by importing every module of their package (timm style, without a list to edit)."""
from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package: each registers what it defines, so adding a family, a
    runtime or a method is one new file. (Modules must import optional dependencies lazily.)"""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        importlib.import_module(f"{package}.{info.name}")
