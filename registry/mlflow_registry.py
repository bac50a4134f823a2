"""The one MLflow client: runs, logged models, registered versions, aliases and promotion.

Models are logged in the ONNX flavour (loadable with ``mlflow.onnx``/pyfunc, no pickles) with the
safetensors weights and the architecture as extra files, so a version can be rebuilt in PyTorch
(``weights_only`` loading) or shipped as is. Each is an MLflow 3 *logged model of its run*, in the run's
experiment, with the ONNX graph's own signature, and each version is registered from that logged model
(``source`` ``models:/<model_id>``, linked both ways).

With a tracking server, artifacts go through the server (``--serve-artifacts``: ``mlflow-artifacts:/``)
or to an object store the config names, never to a folder on the training machine.
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
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS

from podium.errors import RegistryError, first_line
from podium.files import load_json

log = logging.getLogger("podium.registry")

ONNX_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime==1.32.0"]
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_DESCRIPTION_CHARS = 5000  # the registry's column for a version's description
MODEL_CARD = "README.md"  # a release's model card (registry/model_card.py), shipped beside its model


class ModelRegistry:
    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self._warned_local: set[str] = set()  # experiments said to keep artifacts on another machine
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
    @property
    def is_server(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: an object store or ``mlflow-artifacts:/`` URI as
        configured; a folder only without a tracking server. With a server, a folder (it would be on
        this machine, unreadable to every other client) gives way to the server's own default."""
        root = str(self.artifact_root or "")
        if not root:
            return None
        is_uri = ":/" in root
        if is_uri and not root.startswith("file:"):
            return root
        if self.is_server:
            log.info("tracking server %s: artifacts go through the server, not to the local folder %s",
                     self.tracking_uri, root)
            return None
        return root if is_uri else Path(root).resolve().as_uri()

    def experiment_id(self, name: str) -> str:
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if self.is_server and experiment.artifact_location.startswith(("file:", "/")) \
                        and name not in self._warned_local:
                    self._warned_local.add(name)
                    log.warning("experiment %r on %s keeps artifacts in %s, a folder of the machine that "
                                "created it: other clients cannot read them (use a new experiment)",
                                name, self.tracking_uri, experiment.artifact_location)
                return experiment.experiment_id
            return self.client.create_experiment(name, artifact_location=self.artifact_location())
        except MlflowException as exc:
            raise RegistryError(f"MLflow at {self.tracking_uri} failed: {first_line(exc)}") from None
        except Exception as exc:  # unreachable server, bad URI scheme
            raise RegistryError(f"MLflow tracking URI {self.tracking_uri!r} is unusable: {first_line(exc)}") from None

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags or {})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def rename_run(self, run_id: str, run_name: str) -> None:
        self.client.update_run(run_id, name=run_name)

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
        """Nested dicts flattened to dotted keys; each value as JSON (``null``, ``true``, ``["a"]``), a
        string as itself."""
        items = [Param(key, param_value(value)) for key, value in _flatten(params, prefix).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], prefix: str = "", step: int = 0) -> None:
        """``step``: where on a curve the values sit (the UI plots a metric logged at several steps)."""
        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{key}", float(value), now, int(step)) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dataset(self, run_id: str, dataset: Dataset, context: str = "training") -> None:
        """``dataset`` as an input of the run (logging the same name and digest again adds nothing)."""
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                     [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    # --- models -----------------------------------------------------------------------------
    def log_model(self, run_id: str, name: str, onnx_path: Path, weights_path: Path,
                  metadata: dict[str, Any], input_example: np.ndarray, extra_files: Sequence[Path] = (),
                  card: str | None = None, params: dict[str, Any] | None = None) -> str:
        """Log an ONNX model as a logged model of ``run_id`` in the run's experiment (+ weights,
        metadata.json, the model card as README.md and the device runtime's own artifact files as extra
        files), with the graph's signature and ``input_example`` fed to its input; returns its model
        URI (``models:/<model_id>``)."""
        graph = onnx.load(str(onnx_path))
        signature = onnx_signature(graph)
        example = {signature.inputs.input_names()[0]: np.asarray(input_example, dtype=np.float32)}
        run = self.client.get_run(run_id)
        # Created here, not by log_model: MLflow would put it in the process's active experiment
        # (Default, experiment 0) rather than the run's.
        logged = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                                 params={k: param_value(v) for k, v in (params or {}).items()})
        with tempfile.TemporaryDirectory() as tmp:
            meta_path = Path(tmp) / "metadata.json"
            meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
            files = [str(weights_path), str(meta_path), *map(str, extra_files)]
            if card is not None:
                (Path(tmp) / MODEL_CARD).write_text(card)
                files.append(str(Path(tmp) / MODEL_CARD))
            mlflow.set_tracking_uri(self.tracking_uri)  # the flavour's fluent code uses the process's URI
            info = mlflow.onnx.log_model(
                graph, name=name, run_id=run_id, model_id=logged.model_id, signature=signature,
                input_example=example, pip_requirements=ONNX_REQUIREMENTS, extra_files=files,
                save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            )
        return info.model_uri

    def register(self, registered_name: str, model_uri: str, run_id: str, tags: dict[str, Any],
                 description: str | None = None) -> ModelVersion:
        """A new version of ``registered_name`` from a logged model (``models:/<model_id>``), linked
        both ways: the version's source names the logged model, the logged model lists the version."""
        try:
            self.client.get_registered_model(registered_name)
        except MlflowException:
            self.client.create_registered_model(registered_name)
        model_id = logged_model_id(model_uri)
        version = self.client.create_model_version(
            registered_name, source=model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
            description=description[:MAX_DESCRIPTION_CHARS] if description else None, model_id=model_id)
        if model_id:
            self._list_version_on_model(model_id, registered_name, version.version)
        return version

    def _list_version_on_model(self, model_id: str, registered_name: str, version: str | int) -> None:
        """The logged model's ``mlflow.modelVersions`` tag, which the UI shows as its registrations (a
        tracking server sets it itself; a database client does not)."""
        listed = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        entries = json.loads(listed) if listed else []
        if not any(e.get("name") == registered_name and str(e.get("version")) == str(version) for e in entries):
            entries.append({"name": registered_name, "version": version})
            self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})

    @staticmethod
    def model_id_of(version: ModelVersion) -> str | None:
        """The logged model a version was registered from. MLflow 3.17's registry does not return
        ``ModelVersion.model_id`` (its SQL store has no column, its REST protocol no field), so it is
        read off the version's ``models:/<model_id>`` source when absent."""
        return version.model_id or logged_model_id(version.source or "")

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
    """Locate model.onnx, the weights, metadata.json, the model card (README.md, where the version has
    one) and the runtime artifact's files its ``artifact.files`` lists inside a downloaded MLflow ONNX
    model."""
    found = {p.name: p for p in Path(download_dir).rglob("*") if p.is_file()}
    wanted = ["model.onnx", "weights.safetensors", "metadata.json", *([MODEL_CARD] if MODEL_CARD in found else [])]
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


def logged_model_id(model_uri: str) -> str | None:
    """``m-…`` of a logged model's URI ``models:/m-…``; None for any other URI (``models:/name/1``, ``runs:/``)."""
    return model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None


def onnx_signature(graph: onnx.ModelProto) -> ModelSignature:
    """The graph's own inputs and outputs as MLflow's signature: names, dtypes, shapes (a symbolic
    axis such as the batch is -1)."""
    def specs(values) -> Schema:
        tensors = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            tensors.append(TensorSpec(dtype, shape, name=value.name))
        return Schema(tensors)

    weights = {init.name for init in graph.graph.initializer}  # old exporters list them as inputs too
    return ModelSignature(inputs=specs([v for v in graph.graph.input if v.name not in weights]),
                          outputs=specs(graph.graph.output))


class DvcSource(DatasetSource):
    """A DVC-versioned folder: its path in the repository, the commit whose ``dvc.lock`` pins it and
    the remote it is pushed to; ``dvc pull`` at that commit brings back exactly these files."""

    def __init__(self, path: str, md5: str, git_commit: str = "", remote: str | None = None,
                 stage: str | None = None) -> None:
        self.path, self.md5, self.git_commit, self.remote, self.stage = path, md5, git_commit, remote, stage

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, dst_path: str | None = None) -> str:
        raise MlflowException(f"check out commit {self.git_commit or '?'} and run `dvc pull {self.path}` "
                              f"(md5 {self.md5})")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "md5": self.md5, "git_commit": self.git_commit, "remote": self.remote,
                "stage": self.stage}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcSource:
        return cls(**{k: source_dict.get(k) for k in ("path", "md5", "git_commit", "remote", "stage")})


class DvcDataset(Dataset):
    """A dataset known by its DVC md5 (the digest), with image counts as its profile."""

    def __init__(self, source: DvcSource, name: str, profile: dict[str, Any] | None = None) -> None:
        self._profile = profile
        super().__init__(source=source, name=name, digest=source.md5)

    def _compute_digest(self) -> str:
        return self.source.md5

    @property
    def profile(self) -> dict[str, Any] | None:
        return self._profile

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self._profile is not None:
            config["profile"] = json.dumps(self._profile, sort_keys=True)
        return config


def param_value(value: Any) -> str:
    """A param as MLflow shows it: a string as itself, anything else as JSON, cut at MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_CHARS]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
