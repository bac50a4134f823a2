"""Imports only run downwards: CLI → flows → tasks → {config, devices, data plane} → {methods, registry}
→ {errors, files}. Read from the source (no import needed), so a wrong import fails here, by name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"methods": "podium.methods", "registry": "podium.registry", "tasks": "podium.tasks",
           "flows": "podium.flows", "infra": "podium.infra", "podium": "podium"}
GROUND = ("podium.config", "podium.devices", "podium.data", "podium.dvc_ops", "podium.validation", "podium.facts")
BOTTOM = ("podium.errors", "podium.files")
# layer -> what it may never import (module prefixes)
FORBIDDEN = {
    "podium.methods": ("podium.registry", "podium.tasks", "podium.flows", "podium.cli", *GROUND, "prefect", "mlflow",
                       "boto3", "botocore", "great_expectations", "dvc"),
    "podium.registry": ("podium.methods", "podium.tasks", "podium.flows", "podium.cli", *GROUND, "torch", "prefect"),
    "ground": ("podium.tasks", "podium.flows", "podium.cli", "podium.registry", "prefect", "mlflow"),
    "podium.tasks": ("podium.flows", "podium.cli"),
    "podium.flows": ("podium.cli",),
    "podium.infra": ("podium.methods", "podium.registry", "podium.tasks", "podium.flows", "podium.cli"),
    "bottom": ("podium.methods", "podium.registry", "podium.tasks", "podium.flows", "podium.cli", *GROUND),
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def _layer(module: str) -> str:
    if module in BOTTOM:
        return "bottom"
    if module in GROUND:
        return "ground"
    for layer in ("podium.methods", "podium.registry", "podium.tasks", "podium.flows", "podium.infra"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "roof"  # podium/__init__, podium.cli


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module, path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_only_run_downwards(module: str, path: Path) -> None:
    banned = FORBIDDEN.get(_layer(module), ())
    wrong = sorted(name for name in _imports(path) if any(name == b or name.startswith(b + ".") for b in banned))
    assert not wrong, f"{module} ({_layer(module)}) imports {wrong}"


def test_no_generic_top_level_package_is_installed(tmp_path: Path) -> None:
    """`tasks`, `methods`, ... exist only as podium.tasks, podium.methods, ... (one namespace). Asked
    from another folder, so the checkout itself is not on the path."""
    import os
    import subprocess
    import sys

    probe = ("import importlib.util as u, sys; import podium.tasks.train, podium.methods.catalog; "
             "print(','.join(n for n in ('methods', 'registry', 'tasks', 'flows', 'infra') if u.find_spec(n)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"generic packages importable: {out.stdout.strip()}"


def test_every_package_folder_is_listed_for_installation() -> None:
    """A wheel (not only the editable install) must carry every sub-package: pyproject lists them."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"podium"}
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([package, *rel]))
    assert found == listed, f"missing: {sorted(found - listed)}; stale: {sorted(listed - found)}"
