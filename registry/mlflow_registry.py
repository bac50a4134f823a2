"""The one MLflow client: runs, logged models, registered versions, aliases and promotion.

Models are logged in the ONNX flavour (loadable with ``mlflow.onnx``/pyfunc, no pickles) with the
safetensors weights and the architecture as extra files, so a version can be rebuilt in PyTorch
(``weights_only`` loading) or shipped as is.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from podium.errors import RegistryError, first_line
from podium.files import load_json

log = logging.getLogger("podium.registry")

ONNX_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime==1.32.0"]


class ModelRegistry:
    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        try:
            mlflow.set_tracking_uri(tracking_uri)
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except Exception as exc:  # unknown scheme, malformed URI
            raise RegistryError(f"MLflow tracking URI {tracking_uri!r} is unusable: {first_line(exc)}") from None

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail in seconds, not after MLflow's minutes of retries, when a tracking server is down."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return  # a database or folder: opening it is the check
        import requests

        try:
            requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as exc:
            reason = type(exc).__name__ if not isinstance(exc, requests.HTTPError) else str(exc)
            raise RegistryError(f"MLflow tracking server {self.tracking_uri} is unreachable ({reason})") from None

    # --- runs -----------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            location = None
            if self.artifact_root and "://" not in str(self.artifact_root):
                location = Path(self.artifact_root).resolve().as_uri()
            elif self.artifact_root:
                location = str(self.artifact_root)
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            raise RegistryError(f"MLflow at {self.tracking_uri} failed: {first_line(exc)}") from None
        except Exception as exc:  # unreachable server, bad URI scheme
            raise RegistryError(f"MLflow tracking URI {self.tracking_uri!r} is unusable: {first_line(exc)}") from None

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags or {})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def set_run_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def latest_run(self, experiment: str, tags: dict[str, str], status: str = "FINISHED") -> str | None:
        """The newest run of ``experiment`` with every tag in ``tags`` and this status, or None."""
        query = " and ".join([*(f"tags.{k} = '{v}'" for k, v in tags.items()), f"attributes.status = '{status}'"])
        found = self.client.search_runs([self.experiment_id(experiment)], filter_string=query,
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    # One ``log_batch`` request (one database transaction) per chunk instead of one per value: MLflow
    # accepts at most 100 params and 1000 metrics per batch.
    def log_params(self, run_id: str, params: dict[str, Any], prefix: str = "") -> None:
        items = [Param(key, str(value)[:6000]) for key, value in _flatten(params, prefix).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], prefix: str = "") -> None:
        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{key}", float(value), now, 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    # --- models -----------------------------------------------------------------------------
    def log_model(self, run_id: str, name: str, onnx_path: Path, weights_path: Path,
                  metadata: dict[str, Any], input_example: np.ndarray, extra_files: Sequence[Path] = ()) -> str:
        """Log an ONNX model (+ weights, metadata.json and the device runtime's own artifact files as
        extra files); returns its model URI."""
        with tempfile.TemporaryDirectory() as tmp:
            meta_path = Path(tmp) / "metadata.json"
            meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name=name, run_id=run_id, input_example=input_example,
                pip_requirements=ONNX_REQUIREMENTS, extra_files=[str(weights_path), str(meta_path), *map(str, extra_files)],
                save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            )
        return info.model_uri

    def register(self, registered_name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> ModelVersion:
        try:
            self.client.get_registered_model(registered_name)
        except MlflowException:
            self.client.create_registered_model(registered_name)
        model_id = model_uri.split("models:/", 1)[1] if model_uri.startswith("models:/") else None
        version = self.client.create_model_version(registered_name, source=model_uri, run_id=run_id,
                                                   tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
        return version

    def version_by_alias(self, registered_name: str, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(registered_name, alias)
        except MlflowException:
            return None

    def get_version(self, registered_name: str, version: str | int) -> ModelVersion:
        return self.client.get_model_version(registered_name, str(version))

    def set_alias(self, registered_name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(registered_name, alias, str(version))

    def set_version_tags(self, registered_name: str, version: str | int, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(registered_name, str(version), key, str(value))

    def model_tags(self, registered_name: str) -> dict[str, str]:
        """The registered model's own tags (not its versions'); empty when it is not registered yet."""
        try:
            return dict(self.client.get_registered_model(registered_name).tags)
        except MlflowException:
            return {}

    def set_model_tag(self, registered_name: str, key: str, value: Any) -> None:
        self.client.set_registered_model_tag(registered_name, key, str(value))

    def delete_model_tag(self, registered_name: str, key: str) -> None:
        try:
            self.client.delete_registered_model_tag(registered_name, key)
        except MlflowException:  # already gone
            pass

    def search_versions(self, registered_name: str, filter_tags: dict[str, str] | None = None) -> list[ModelVersion]:
        query = f"name = '{registered_name}'"
        for key, value in (filter_tags or {}).items():
            query += f" and tags.{key} = '{value}'"
        try:
            return list(self.client.search_model_versions(query))
        except MlflowException:
            return []

    def download_version(self, registered_name: str, version: str | int, dest: Path) -> Path:
        """Download a version's files (model.onnx, weights, metadata.json) into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_name}/{version}",
                                                    dst_path=str(dest), tracking_uri=self.tracking_uri)
        return Path(local)


def model_files(download_dir: Path) -> dict[str, Path]:
    """Locate model.onnx, the weights, metadata.json and the runtime artifact's files its
    ``artifact.files`` lists inside a downloaded MLflow ONNX model."""
    found = {p.name: p for p in Path(download_dir).rglob("*") if p.is_file()}
    wanted = ["model.onnx", "weights.safetensors", "metadata.json"]
    if "metadata.json" in found:
        try:
            metadata = load_json(found["metadata.json"])
            artifact = (metadata.get("artifact") or {}) if isinstance(metadata, dict) else None
        except ValueError as exc:
            raise RegistryError(f"downloaded model in {download_dir}: metadata.json {exc}") from None
        if not isinstance(artifact, dict) or not isinstance(artifact.get("files", []), list):
            raise RegistryError(f"downloaded model in {download_dir}: metadata.json has no valid 'artifact'")
        wanted += [str(n) for n in artifact.get("files", []) if n not in wanted]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise RegistryError(f"downloaded model in {download_dir} lacks {', '.join(missing)}")
    return {n: found[n] for n in wanted}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
