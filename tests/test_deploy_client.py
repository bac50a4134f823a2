"""The deployment client: `podium fetch`, `podium predict` and the Python API a deployment script uses.

- The fetch and predict CLI paths import neither torch, Prefect nor MLflow (checked in a fresh
  interpreter that runs the typer app in-process, then lists what it imported); `import podium` and
  `from podium import fetch_release` import none of them either.
- `podium predict` on a real small release (a torch model exported to ONNX, published with metadata
  shaped like the pipeline's, its preprocessing recorded by the pipeline's own `eval_preprocessing`)
  prints the class and confidence that the pipeline's eval transform + onnxruntime give; a corrupt or
  missing image is one error line and exit 1; a verified fetch is reused, a tampered one replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.registry.release import FETCH_MARKER, publish_release
from podium.registry.stores import LocalStore
from tests.photos import write_photo

REPO = Path(__file__).resolve().parents[1]
MODEL, DEVICE = "tiny-classifier", "cpu-1t"
CLASSES = ["cat", "dog", "fox", "owl"]
HEAVY = ("torch", "prefect", "mlflow")

# Runs `podium <args>` for each argument list in-process, then prints what it imported (last line).
RUN_CLI = """
import json, os, sys
os.umask(0o022)
from podium.cli import app
codes = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="podium")
    except SystemExit as exc:
        codes.append(exc.code or 0)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def run_cli_fresh(*invocations: list[str]) -> tuple[list[int], list[str], subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-c", RUN_CLI, json.dumps(invocations)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["codes"], report["heavy"], done


def tiny_release(folder: Path) -> tuple[dict[str, Path], dict]:
    """A torch model exported to ONNX and a release metadata shaped like `tasks/release.py: _metadata`'s."""
    import torch
    from torch import nn

    from podium.methods.base import InputSpec
    from podium.methods.export import export_onnx
    from podium.methods.transforms import AugmentConfig, LoaderConfig, eval_preprocessing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(CLASSES)))
    size = (24, 24)
    onnx_path = export_onnx(model, (3, *size), folder / "model.onnx")
    cfg = LoaderConfig(image_size=size, crop_pct=0.875, interpolation="bilinear", augment=AugmentConfig(enabled=False))
    spec = InputSpec(channels=3, height=size[0], width=size[1], mean=(0.52, 0.41, 0.33), std=(0.21, 0.26, 0.3),
                     interpolation="bilinear", crop_pct=0.875)
    metadata = {
        "model": MODEL, "device": DEVICE, "candidate": "tiny", "method": "anchor", "config": {},
        "input_size": list(size),
        "artifact": {"runtime": "onnxruntime", "precision": "fp32", "main": "model.onnx", "files": [], "parent": None},
        "input_spec": {"channels": 3, "height": size[0], "width": size[1], "mean": list(spec.mean),
                       "std": list(spec.std), "pixel_scale": "[0, 1] then (x - mean) / std", "class_names": CLASSES},
        "preprocessing": eval_preprocessing(spec, cfg, size),
        "metrics": {"val_acc": 0.5, "p50_ms": 0.1}, "device_profile": {"name": DEVICE, "threads": 1, "batch_size": 1},
        "lineage": {"data_hash": "test", "git_sha": "test", "run_id": "test", "digest": "test"},
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return {"model.onnx": onnx_path, "metadata.json": folder / "metadata.json"}, {"spec": spec, "cfg": cfg, **metadata}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A local-folder store holding v1 of the tiny model, and photos of several formats and sizes."""
    root = tmp_path_factory.mktemp("deploy")
    files, metadata = tiny_release(root / "src")
    store = LocalStore(root / "store")
    publish_release(store, MODEL, DEVICE, 1, files, {k: v for k, v in metadata.items() if k not in ("spec", "cfg")})
    photos = [write_photo(root / "photos" / "a.png", (40, 30), 0, 1),
              write_photo(root / "photos" / "b.jpg", (31, 57), 1, 2),
              write_photo(root / "photos" / "c.png", (64, 64), 2, 3, mode="RGBA"),
              write_photo(root / "photos" / "d.png", (26, 90), 3, 4, mode="L")]
    return {"root": root, "store": root / "store", "files": files, "metadata": metadata, "photos": photos}


def reference_predictions(release: dict) -> list[tuple[str, str, float]]:
    """(path, class, confidence) per photo from the pipeline's own eval transform and normalisation
    (`methods/transforms.py: build_transform`, `methods/data.py: Loader`) and onnxruntime called directly."""
    import onnxruntime
    import torch

    from podium.images import decode
    from podium.methods.transforms import build_transform

    spec, cfg = release["metadata"]["spec"], release["metadata"]["cfg"]
    transform = build_transform(spec, cfg, spec.size, train=False)
    uint8 = torch.stack([torch.as_tensor(np.asarray(transform(decode(p, 3)))) for p in release["photos"]])
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(spec.std).view(1, -1, 1, 1) * 255.0)
    batch = uint8.float().sub_(mean).mul_(inv_std).numpy()
    session = onnxruntime.InferenceSession(str(release["files"]["model.onnx"]), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    return [(str(p), CLASSES[int(row.argmax())], float(row.max())) for p, row in zip(release["photos"], probabilities)]


def parse_predictions(stdout: str) -> list[tuple[str, str, float]]:
    rows = [line.split("\t") for line in stdout.strip().splitlines()]
    return [(path, label, float(confidence)) for path, label, confidence in rows]


def assert_same_predictions(got: list[tuple[str, str, float]], want: list[tuple[str, str, float]]) -> None:
    assert [(p, c) for p, c, _ in got] == [(p, c) for p, c, _ in want]
    assert np.allclose([c for *_, c in got], [c for *_, c in want], atol=1e-4)  # printed to 4 decimals


# --------------------------------------------------------------------------- imports (a, b)

def test_fetch_cli_imports_no_torch_prefect_or_mlflow_and_fetches_ordinary_files(release: dict, tmp_path: Path) -> None:
    dest = tmp_path / "deploy"
    codes, heavy, done = run_cli_fresh(
        ["fetch", "--model", MODEL, "--device", DEVICE, "--dest", str(dest), "--store", str(release["store"])],
        ["fetch", "--model", "missing-model", "--device", DEVICE, "--dest", str(tmp_path / "other"),
         "--store", str(release["store"])])
    assert codes == [0, 1], done.stderr
    assert heavy == [], f"the fetch path imported {heavy}"
    assert f"fetched {MODEL}/{DEVICE} v1 -> {dest}: run model.onnx with onnxruntime (fp32)" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no current release of missing-model/{DEVICE} in {release['store'].as_uri()}"]
    assert not (tmp_path / "other").exists()
    # what a deployment user gets: 0755 folder, 0644 files (umask 022), never the 0700/0600 of temp files
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {
        "model.onnx": 0o644, "metadata.json": 0o644, "manifest.json": 0o644, FETCH_MARKER: 0o644}


def test_import_podium_is_cheap_and_the_api_loads_lazily() -> None:
    script = """
import json, sys
import podium
bare = sorted(m for m in %r if m in sys.modules) + (["numpy"] if "numpy" in sys.modules else [])
from podium import fetch_release, open_store, read_fetch_marker
from podium.registry import release, stores
assert fetch_release is release.fetch_release and open_store is stores.open_store
assert "fetch_release" in dir(podium) and "ReleasedModel" in dir(podium)
try:
    podium.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise SystemExit("podium.no_such_name did not raise")
print(json.dumps({"bare": bare, "api": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY, HEAVY)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"bare": [], "api": []}


# ------------------------------------------------------------------------------ predict (c)

def test_predict_prints_what_the_pipeline_transform_and_onnxruntime_give(release: dict, tmp_path: Path) -> None:
    photos = [str(p) for p in release["photos"]]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    common = ["--model", MODEL, "--device", DEVICE, "--store", str(release["store"]), "--dest", str(tmp_path / "rel")]
    codes, heavy, done = run_cli_fresh(["predict", *common, *photos], ["predict", *common, str(corrupt)],
                                       ["predict", *common, str(tmp_path / "missing.png")])
    assert codes == [0, 1, 1], done.stderr
    assert heavy == [], f"the predict path imported {heavy}"
    printed = "\n".join(done.stdout.strip().splitlines()[:-1])  # the last line is RUN_CLI's report
    assert_same_predictions(parse_predictions(printed), reference_predictions(release))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0].startswith(f"error: cannot decode {corrupt}: "), done.stderr
    assert errors[1] == f"error: image {tmp_path / 'missing.png'} does not exist or is not a file"
    assert "Traceback" not in done.stderr


def test_predict_reuses_a_verified_fetch_and_replaces_a_tampered_one(release: dict, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(release["store"], store_dir)
    dest = tmp_path / "rel"
    want = reference_predictions(release)
    photos = [str(p) for p in release["photos"]]

    def predict(*extra: str) -> tuple[list, str]:
        result = CliRunner().invoke(app, ["predict", "--model", MODEL, "--device", DEVICE, "--store", str(store_dir),
                                          "--dest", str(dest), *extra, *photos])
        assert result.exit_code == 0, result.output
        return parse_predictions(result.stdout), result.stderr

    got, note = predict()
    assert_same_predictions(got, want)
    assert f"v1 (fetched in {dest})" in note
    # the store loses the model file: a pinned version is served from the verified folder without it
    (store_dir / MODEL / DEVICE / "v1" / "model.onnx").unlink()
    got, note = predict("--version", "1")
    assert_same_predictions(got, want)
    assert "(reused in" in note
    # a changed file in the folder no longer verifies: it is fetched again
    shutil.copy(release["files"]["model.onnx"], store_dir / MODEL / DEVICE / "v1" / "model.onnx")
    onnx_file = dest / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")
    got, note = predict()
    assert_same_predictions(got, want)
    assert "(fetched in" in note and onnx_file.read_bytes() == release["files"]["model.onnx"].read_bytes()
    # a new current version is fetched instead of reusing v1
    publish_release(LocalStore(store_dir), MODEL, DEVICE, 2, release["files"],
                    {k: v for k, v in release["metadata"].items() if k not in ("spec", "cfg")})
    _, note = predict()
    assert f"v2 (fetched in {dest})" in note
    assert json.loads((dest / FETCH_MARKER).read_text())["version"] == "2"


def test_predict_api_runs_a_fetched_release(release: dict, tmp_path: Path) -> None:
    from podium import ReleasedModel, fetch_or_reuse, open_store
    from podium.errors import DataError

    manifest, reused = fetch_or_reuse(open_store(str(release["store"])), MODEL, DEVICE, tmp_path / "rel")
    assert not reused and manifest["version"] == "1"
    with ReleasedModel.open(tmp_path / "rel") as model:
        got = [(p.path, p.label, p.confidence) for p in model.predict_files(release["photos"])]
        assert_same_predictions(got, reference_predictions(release))
        with pytest.raises(DataError, match="cannot decode"):
            list(model.predict_files([release["files"]["metadata.json"]]))
    assert fetch_or_reuse(open_store(str(release["store"])), MODEL, DEVICE, tmp_path / "rel")[1] is True
    os.remove(tmp_path / "rel" / "metadata.json")  # incomplete: not reused, fetched again
    assert fetch_or_reuse(open_store(str(release["store"])), MODEL, DEVICE, tmp_path / "rel")[1] is False
