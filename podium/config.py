"""The pipeline's configuration: one YAML file parsed into typed, strict models.

Any unknown key, repeated key, wrong type, NaN or value outside its range fails before work starts
with a one-line ``ConfigError`` naming the file and the dotted path of the bad field; so does an
anchor architecture that cannot be built (checked on the meta device: no memory, no weights).
Paths (``data.path``, ``store.uri``, ``runtime.cache_dir``, ``devices.inventory``,
``tracking.artifact_root``) given relative stay inside the project: one that climbs out with ``..``
is an error; an absolute path or a URI points elsewhere on purpose.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, create_model, field_validator, model_validator

from podium.devices import DEFAULT_INVENTORY
from podium.errors import ConfigError, DataError, first_line
from podium.files import load_yaml
from podium.methods.base import StrictModel
from podium.methods.catalog import config_class, method_names
from podium.methods.train import TrainConfig
from podium.methods.transforms import LoaderConfig


def _inside_project(value: str) -> str:
    """A relative path must not climb out of the project; absolute paths and URIs are deliberate."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "://" in value or Path(value).is_absolute():
        return value
    normal = posixpath.normpath(value.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{value!r} climbs out of the project directory; give an absolute path (or a URI) "
                         "to point outside it on purpose")
    return value


ProjectPath = Annotated[str, AfterValidator(_inside_project)]
ClassName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/\\\x00]+$")]


def _unique(values: list[str] | None, what: str) -> list[str] | None:
    if values is not None:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{what} must be unique, repeated: {', '.join(repeated)}")
    return values


class RemoteConfig(StrictModel):
    """A DVC remote the pipeline records (as ``podium``) in the committed ``.dvc/config`` and pushes to."""

    url: str  # s3://bucket/path, or an absolute (or ~) folder outside the working tree
    endpoint_url: str | None = None

    @field_validator("url")
    @classmethod
    def _pullable_from_a_clone(cls, url: str) -> str:
        from podium.dvc_ops import check_remote_url

        try:
            return check_remote_url(url)
        except DataError as exc:
            raise ValueError(str(exc)) from None


class DataConfig(LoaderConfig):
    """The dataset (where, how versioned, what validation demands) and how it is read (LoaderConfig)."""

    path: ProjectPath = "data/digits"  # dataset root, relative to the project directory
    stage: str | None = Field("export_digits", min_length=1)  # DVC stage that produces it; None: `dvc add`-tracked
    classes: list[ClassName] | None = Field(None, min_length=2)  # declared class set; None: the train folders
    min_per_class: int = Field(5, ge=1)  # per class, in every split
    min_side: int = Field(8, ge=1)  # smallest image side validation accepts
    dvc_remote: RemoteConfig | None = None  # None: the repository's default remote (`local`, in the user's
    # cache, added to .dvc/config when it has none: podium.dvc_ops.ensure_default_remote)
    push: bool = True  # after validation passed, never before

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None and any(c in (".", "..") or c.startswith(".") for c in classes):
            raise ValueError("class names are folder names: none may start with '.'")
        return _unique(classes, "class names")


class TrackingConfig(StrictModel):
    uri: str = Field("sqlite:///mlflow.db", min_length=1)
    artifact_root: ProjectPath = "mlartifacts"  # used when the experiment is created
    experiment: str = Field("podium", min_length=1)


class StoreConfig(StrictModel):
    uri: ProjectPath = "store"  # a folder with the S3 layout, or s3://bucket/prefix
    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL / boto3's own resolution


def partial_model(model: type[StrictModel]) -> type[StrictModel]:
    """``model`` with every field optional (default None), for overrides of a preset: errors still
    name the field (``anchors.0.train.lr``) and ``model_dump(exclude_unset=True)`` gives what was set."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        optional = copy.copy(info)
        optional.default, optional.default_factory = None, None
        fields[name] = (info.annotation | None, optional)
    return create_model(f"Partial{model.__name__}", __base__=StrictModel, **fields)


TrainOverrides = partial_model(TrainConfig)

# Each adaptation's own recipe (``train`` overrides it field by field).
ADAPT_RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {"epochs": 4, "lr": 0.1},  # no pretrained weights: the whole model trained here
    "finetune": {"epochs": 4, "lr": 0.01, "lr_batch": 256, "weight_decay": 1e-4, "warmup_steps": 10},
    "head": {"epochs": 4, "lr": 0.1, "lr_batch": 256, "weight_decay": 0.0},  # a linear probe
}


class AnchorConfig(StrictModel):
    """A model methods build on: its architecture, where its weights come from, how it is adapted.

    ``adapt`` (None: ``finetune`` without pretrained weights; with them ``none`` when their classifier
    already has the dataset's classes, else ``head``): ``none`` uses the weights untouched, ``head``
    trains a new classifier on frozen features, ``finetune`` trains every weight with ``train``.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    arch: dict[str, Any]  # {family: ..., its builder's arguments}: built on the meta device at load time
    checkpoint: str | None = None  # local path or s3:// URI: safetensors, or any timm checkpoint for a timm arch
    timm_hub: bool = False  # allow downloading timm hub weights (opt-in: needs network)
    adapt: Literal["none", "head", "finetune"] | None = None
    train: TrainOverrides = TrainOverrides()  # overrides of the adaptation's recipe (TrainConfig fields)

    @model_validator(mode="after")
    def _adapt_needs_weights(self) -> "AnchorConfig":
        if self.adapt in ("none", "head") and not self.pretrained:
            raise ValueError(f"anchor {self.name!r}: adapt: {self.adapt} needs pretrained weights "
                             f"(a checkpoint, or timm_hub: true)")
        try:
            self.recipe("finetune")  # a wrong TrainConfig field fails at load time, not mid-run
        except ValidationError as exc:
            raise ValueError(f"train.{_first_error(exc)}") from None
        return self

    @property
    def pretrained(self) -> bool:
        return self.checkpoint is not None or self.timm_hub

    def recipe(self, adapt: str) -> TrainConfig:
        """The training recipe of ``adapt`` (``scratch`` for a model without pretrained weights)."""
        return TrainConfig.model_validate({**ADAPT_RECIPES[adapt], **self.train.model_dump(exclude_unset=True)})


class TeacherConfig(AnchorConfig):
    """A distillation teacher that need not be an anchor (SN-Net distils from RegNetY-160)."""

    name: str = Field("teacher", pattern=r"^[a-z0-9][a-z0-9_-]*$")


class QuantizeConfig(StrictModel):
    """Derived FP16/INT8 candidates for devices that accept them (see :mod:`podium.tasks.quantize`)."""

    per_method: int = Field(2, ge=1, le=50)  # each method's most accurate FP32 candidates, per device
    max_speedup: float = Field(4.0, ge=1.0, le=100.0)  # parents' FP32 p50 at most this x the latency budget
    calibration_images: int = Field(256, ge=8, le=100_000)  # training images INT8 calibration observes


class DevicesConfig(StrictModel):
    inventory: ProjectPath = str(DEFAULT_INVENTORY)
    use: list[str] = Field(default_factory=lambda: ["cpu-1t", "cpu-2t-onnx"], min_length=1)
    remote_timeout_s: float = Field(900.0, gt=0)  # wait for a work-pool device's profile run (queue + measure)
    quantize: QuantizeConfig = QuantizeConfig()

    @field_validator("use")
    @classmethod
    def _unique_devices(cls, use: list[str]) -> list[str]:
        return _unique(use, "device names")


class RuntimeConfig(StrictModel):
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: CUDA when present
    checkpoint_every_s: float = Field(60.0, gt=0)  # trainings save a resumable checkpoint this often
    processes: int = Field(1, ge=1, le=1024)  # >1: each method trains data-parallel on this many torchrun processes
    cache_dir: ProjectPath = ".podium"

    @property
    def training_threads(self) -> int:
        """Intra-op threads of each of ``max_workers`` concurrent trainings: the cores shared out evenly
        (so trainings side by side never oversubscribe the CPU)."""
        return max(1, (os.cpu_count() or 1) // self.max_workers)


class PodiumConfig(StrictModel):
    model_name: str = Field("digits-classifier", pattern=r"^[a-z0-9][a-z0-9-]*$")
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    store: StoreConfig = StoreConfig()
    anchors: list[AnchorConfig] = Field(min_length=1)
    teacher: str | TeacherConfig | None = None  # an anchor's name, any model, or None: the largest anchor
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    devices: DevicesConfig = DevicesConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _teacher_is_an_anchor(self) -> "PodiumConfig":
        names = [a.name for a in self.anchors]
        if len(set(names)) != len(names):
            raise ValueError(f"anchor names must be unique, got {names}")
        if isinstance(self.teacher, str) and self.teacher not in names:
            raise ValueError(f"teacher {self.teacher!r} is not an anchor ({', '.join(names)})")
        return self

    def method_config(self, name: str) -> StrictModel:
        return config_class(name).model_validate(self.methods[name])

    def section_hash(self, *sections: str) -> str:
        """A stable digest of some top-level sections (part of task cache keys)."""
        dumped = self.model_dump(mode="json", include=set(sections))
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    where = prefix + ".".join(str(p) for p in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where or '<root>'}: {err['msg'].removeprefix('Value error, ')}{more}"


def parse_config(raw: Any, source: str = "<config>") -> PodiumConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        cfg = PodiumConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
    for name in cfg.methods:
        if name not in method_names():
            raise ConfigError(f"{source}: methods.{name}: unknown method; known methods: {', '.join(method_names())}")
        try:
            cfg.method_config(name)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_first_error(exc, f'methods.{name}.')}") from None
    _check_architectures(cfg, source)
    return cfg


def _architectures(cfg: PodiumConfig) -> list[tuple[str, dict[str, Any]]]:
    """(dotted path, arch dict) of every architecture the config names: anchors, the teacher, and
    any method setting that is an architecture (a dict with a ``family``, e.g. BYOT's backbone)."""
    archs = [(f"anchors.{i}.arch", anchor.arch) for i, anchor in enumerate(cfg.anchors)]
    if isinstance(cfg.teacher, TeacherConfig):
        archs.append(("teacher.arch", cfg.teacher.arch))
    for name in cfg.methods:
        for field, value in cfg.method_config(name).model_dump().items():
            if isinstance(value, dict) and "family" in value:
                archs.append((f"methods.{name}.{field}", value))
    return archs


def _check_architectures(cfg: PodiumConfig, source: str) -> None:
    """Build every architecture on the meta device (shapes only: no memory, no weights, milliseconds),
    so an unknown family or block type, a missing or extra argument or a zero width fails now, with
    one line, not an hour into a run."""
    import warnings

    import torch

    from podium.methods import families

    num_classes = len(cfg.data.classes) if cfg.data.classes else 10  # the count does not change what builds
    for where, arch in _architectures(cfg):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "initializing zero-element tensors": reported below
                model = families.build(arch, num_classes=num_classes, in_chans=3)
            empty = next((n for n, p in model.named_parameters() if p.numel() == 0), None)
        except Exception as exc:  # noqa: BLE001 - builders raise anything (KeyError, TypeError, timm's own)
            reason = f"{type(exc).__name__}: {first_line(exc)}" if isinstance(exc, (KeyError, TypeError)) \
                else first_line(exc)
            raise ConfigError(f"{source}: {where}: cannot be built ({reason})") from None
        if empty is not None:
            raise ConfigError(f"{source}: {where}: builds a layer without weights ({empty}): a width or depth of 0?")


def load_config(path: str | Path) -> PodiumConfig:
    """Parse the YAML config at ``path`` (at most 1 MB; repeated keys, deep nesting and alias bombs refused)."""
    path = Path(path)
    try:
        raw = load_yaml(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw, str(path))
