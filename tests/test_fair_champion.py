"""Champion vs challenger after the data changed: both are scored only on the new validation images
whose content the champion's run never trained on, never on a new split that holds its old training
images (which would favour the champion). Real SQLite MLflow, real ONNX models, the bundled digits
split two ways."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from podium.config import parse_config
from podium.data import export_digits, load_bundle, read_manifest
from podium.methods.export import export_onnx, save_weights
from podium.methods.families import build
from podium.tasks.common import DatasetRef, RunContext
from podium.tasks.release import TRAINING_IMAGES, compare_on_unseen, log_training_images
from tests.flow_helpers import REPO

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
SIZE = (16, 16)


def _context(root: Path, run_id: str = "") -> RunContext:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "mlartifacts"),
                       "experiment": "fair"}
    raw["data"]["image_size"] = list(SIZE)
    return RunContext(cfg=parse_config(raw), project_dir=str(root), run_id=run_id, git_sha="test")


def _release(root: Path, name: str, seed: int, data) -> tuple[dict[str, Path], dict]:
    torch.manual_seed(seed)
    model = build(TINY, data.num_classes, data.input_spec.channels).eval()
    folder = root / name
    files = {"model.onnx": export_onnx(model, (1, *SIZE), folder / "model.onnx"),
             "weights.safetensors": save_weights(model, folder / "weights.safetensors")}
    spec = data.input_spec
    meta = {"input_size": list(SIZE), "input_spec": {"mean": list(spec.mean), "std": list(spec.std)},
            "artifact": {"runtime": "onnxruntime", "precision": "fp32", "main": "model.onnx", "files": ["model.onnx"]}}
    return files, meta


def _register(ctx: RunContext, files: dict[str, Path], meta: dict, data_hash: str):
    registry = ctx.registry
    example = np.zeros((1, 1, *SIZE), np.float32)
    uri = registry.log_model(ctx.run_id, "winner-cpu-1t", files["model.onnx"], files["weights.safetensors"], meta,
                             example)
    return registry.register(ctx.cfg.model_name, uri, ctx.run_id, {"run_id": ctx.run_id, "data_hash": data_hash})


def _onnx_accuracy(path: Path, data, indices: list[int]) -> float:
    """Accuracy straight from ONNX Runtime on the chosen validation images (an independent path)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = total = 0
    for images, labels in data.restrict("val", indices).eval_loader("val", SIZE):
        logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        total += labels.numel()
    return correct / total


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    old, new = export_digits(root / "old", seed=0), export_digits(root / "new", seed=1)  # same images, resplit
    ctx = _context(root)
    old_data = load_bundle(old, ctx.cfg.data, "old-hash")
    new_data = load_bundle(new, ctx.cfg.data, "new-hash")
    champion_ctx = _context(root, ctx.registry.start_run("fair", "champion"))
    log_training_images(champion_ctx, DatasetRef(str(old), "old-hash"), old_data)
    champion_files, meta = _release(root, "champion", 0, old_data)
    champion = _register(champion_ctx, champion_files, meta, "old-hash")
    challenger_files, challenger_meta = _release(root, "challenger", 1, new_data)
    run_ctx = _context(root, ctx.registry.start_run("fair", "challenger"))
    return {"root": root, "old": old, "new": new, "new_data": new_data, "ctx": run_ctx, "champion": champion,
            "champion_files": champion_files, "meta": meta, "challenger_files": challenger_files,
            "challenger_meta": challenger_meta}


def test_both_models_are_scored_only_on_images_the_champion_never_trained_on(world):
    trained = {row["sha256"] for row in read_manifest(world["old"]) if row["split"] == "train"}
    by_path = {row["path"]: row["sha256"] for row in read_manifest(world["new"])}
    data = world["new_data"]
    val_paths = list(data.splits["val"].paths)
    unseen = [i for i, p in enumerate(val_paths) if by_path[p] not in trained]
    assert 0 < len(unseen) < len(val_paths) / 2  # the new split holds many of the champion's training images

    fair = compare_on_unseen(world["ctx"], DatasetRef(str(world["new"]), "new-hash"), data, world["champion"],
                             world["challenger_files"], world["challenger_meta"])
    assert f"the {len(unseen)} of {len(val_paths)} validation images the champion never trained on" in fair.note
    assert fair.champion_acc == pytest.approx(_onnx_accuracy(world["champion_files"]["model.onnx"], data, unseen))
    assert fair.challenger_acc == pytest.approx(_onnx_accuracy(world["challenger_files"]["model.onnx"], data, unseen))


def test_no_comparison_when_every_validation_image_was_trained_on(world, tmp_path):
    """A champion whose run trained on every image (here: its record says so) leaves no fair images."""
    data = world["new_data"]
    ctx = _context(world["root"], world["ctx"].registry.start_run("fair", "saw-everything"))
    everything = np.unique(np.array([int(r["sha256"][:16], 16) for r in read_manifest(world["new"])], np.uint64))
    np.save(tmp_path / "training_images.npy", everything, allow_pickle=False)
    ctx.registry.log_artifact(ctx.run_id, tmp_path / "training_images.npy", str(Path(TRAINING_IMAGES).parent))
    champion = _register(ctx, world["champion_files"], world["meta"], "old-hash")
    fair = compare_on_unseen(world["ctx"], DatasetRef(str(world["new"]), "new-hash"), data, champion,
                             world["challenger_files"], world["challenger_meta"])
    assert fair.champion_acc is None and fair.challenger_acc is None
    assert fair.note == f"only 0 of {len(data.splits['val'])} validation images are new to champion v{champion.version}"


def test_a_champion_without_a_training_record_is_not_compared(world):
    ctx = _context(world["root"], world["ctx"].registry.start_run("fair", "no-record"))
    champion = _register(ctx, world["champion_files"], world["meta"], "old-hash")
    fair = compare_on_unseen(world["ctx"], DatasetRef(str(world["new"]), "new-hash"), world["new_data"], champion,
                             world["challenger_files"], world["challenger_meta"])
    assert fair.champion_acc is None and "training images are not on record" in fair.note
