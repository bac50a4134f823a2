"""Trained spaces and the candidates they offer, saved as data and verified before use.

A saved folder holds ``tensors.safetensors`` (every module's weights, by ``<module name>/<state key>``)
and ``record.json``, written last: the schema version, what the folder holds (``kind``), the key it
was saved under, the method, the sha256 of the tensor file and what rebuilds the modules through the
method's own builders (:meth:`~podium.methods.base.CandidateSpace.to_record`). Nothing is pickled:
loading parses JSON and safetensors, builds modules from their recorded configs and loads their
weights strictly. A folder whose record does not parse, whose schema, kind or key differs, or whose
tensors do not match their digest raises :class:`UnusableRecord`; callers recompute.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from podium.files import atomic_write_bytes, atomic_write_text, sha256_bytes
from podium.methods.base import Candidate, CandidateSpace
from podium.methods.catalog import get_method, space_method
from podium.methods.data import DataBundle
from podium.methods.train import TrainingCost

SCHEMA = 1
RECORD, TENSORS = "record.json", "tensors.safetensors"
MAX_RECORD_BYTES = 64 << 20  # a record names configs and metrics: far below this


class UnusableRecord(ValueError):
    """A saved space or offer that must not be used (one line: what is wrong)."""


def save_space(space: CandidateSpace, folder: Path | str, key: str = "") -> Path:
    """Write ``space`` to ``folder`` (see the module docstring); returns the folder."""
    record, modules = space.to_record()
    cost = dataclasses.asdict(space.training_cost) if space.training_cost is not None else None
    body = {"method": space_method(space).name, "space": record, "training_cost": cost}
    return _write(Path(folder), "space", key, body, modules)


def load_space(folder: Path | str, data: DataBundle, key: str = "") -> CandidateSpace:
    """The space saved in ``folder`` under ``key``, rebuilt by its method's space class on ``data``."""
    body, weights = _read(Path(folder), "space", key)
    try:
        space_type = get_method(body["method"]).method.space_type
        space = space_type.from_record(body["space"], weights, data)
        space.training_cost = TrainingCost(**body["training_cost"]) if body["training_cost"] else None
    except UnusableRecord:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise UnusableRecord(f"the record does not rebuild the space: {type(exc).__name__}: {exc}") from None
    return space


def save_offers(offers: dict[str, list[Candidate]], folder: Path | str, key: str = "") -> Path:
    """Write what a space offered each device; a candidate offered to several devices is stored once."""
    modules: dict[str, nn.Module] = {}
    module_of: dict[str, str] = {}  # candidate name -> stored module name
    devices: dict[str, list[dict[str, Any]]] = {}
    for device, candidates in offers.items():
        rows = devices.setdefault(device, [])
        for cand in candidates:
            stored = module_of.get(cand.name)
            if stored is None or not _same_weights(modules[stored], cand.model):
                stored = module_of[cand.name] = f"c{len(modules)}"
                modules[stored] = cand.model
            rows.append({"name": cand.name, "method": cand.method, "config": cand.config,
                         "input_size": list(cand.input_size), "in_chans": cand.in_chans,
                         "metrics": cand.metrics, "module": stored})
    return _write(Path(folder), "offers", key, {"devices": devices}, modules)


def load_offers(folder: Path | str, space: CandidateSpace, key: str = "") -> dict[str, list[Candidate]]:
    """The offers saved in ``folder`` under ``key``, every stored module rebuilt by ``space`` once (the
    candidates offered to several devices share it, as they did when offered)."""
    body, weights = _read(Path(folder), "offers", key)
    built: dict[str, nn.Module] = {}

    def model(row: dict[str, Any]) -> nn.Module:
        if row["module"] not in built:
            built[row["module"]] = weights(row["module"], space.candidate_module(row["name"], row["config"]))
        return built[row["module"]]

    try:
        return {device: [Candidate(name=row["name"], method=row["method"], config=row["config"], model=model(row),
                                   input_size=tuple(row["input_size"]), metrics=row["metrics"],
                                   in_chans=row["in_chans"]) for row in rows]
                for device, rows in body["devices"].items()}
    except UnusableRecord:
        raise
    except (KeyError, TypeError, ValueError, IndexError, StopIteration, RuntimeError) as exc:
        raise UnusableRecord(f"the record does not rebuild the offers: {type(exc).__name__}: {exc}") from None


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _write(folder: Path, kind: str, key: str, body: dict[str, Any], modules: dict[str, nn.Module]) -> Path:
    tensors = {}
    for name, module in modules.items():
        if "/" in name:
            raise ValueError(f"module name {name!r} contains '/'")
        # clones: safetensors refuses tensors that share memory (tied or viewed weights)
        tensors.update({f"{name}/{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()})
    payload = save_tensors(tensors)
    record = {"schema": SCHEMA, "kind": kind, "key": key, "tensors_sha256": sha256_bytes(payload), **body}
    text = json.dumps(record, sort_keys=True)  # before any file is touched: a non-JSON value fails here
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / TENSORS, payload)
    atomic_write_text(folder / RECORD, text)  # last: a reader sees the old pair, the new pair or a digest mismatch
    return folder


def _read(folder: Path, kind: str, key: str) -> tuple[dict[str, Any], Any]:
    record_path = folder / RECORD
    try:
        if record_path.stat().st_size > MAX_RECORD_BYTES:
            raise UnusableRecord(f"{RECORD} is larger than {MAX_RECORD_BYTES >> 20} MiB")
        record = json.loads(record_path.read_text())
        payload = (folder / TENSORS).read_bytes()  # hashed and parsed from the same bytes
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UnusableRecord(f"unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(record, dict):
        raise UnusableRecord(f"{RECORD} is not a JSON object")
    for field, expected in (("schema", SCHEMA), ("kind", kind), ("key", key)):
        if record.get(field) != expected:
            raise UnusableRecord(f"{field} is {record.get(field)!r}, expected {expected!r}")
    if record.get("tensors_sha256") != sha256_bytes(payload):
        raise UnusableRecord(f"{TENSORS} does not match the digest in {RECORD}")
    try:
        tensors = load_tensors(payload)
    except SafetensorError as exc:
        raise UnusableRecord(f"{TENSORS} does not parse: {exc}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, state_key = name.partition("/")
        groups.setdefault(module, {})[state_key] = tensor

    def weights(name: str, module: nn.Module) -> nn.Module:
        try:
            module.load_state_dict(groups[name], strict=True)
        except (KeyError, RuntimeError) as exc:
            raise UnusableRecord(f"weights {name!r} do not fit the rebuilt module: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return module

    return record, weights
