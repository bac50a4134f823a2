"""Core types shared by every method: data, anchors, candidates and candidate spaces."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from podium.methods.data import DataBundle


class StrictModel(BaseModel):
    """Base for every config model: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: channels, resolution and the normalisation applied to pixels in [0, 1]."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # eval resize (see podium.methods.data.eval_preprocessing)
    crop_pct: float = 1.0

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def with_size(self, height: int, width: int) -> "InputSpec":
        return replace(self, height=height, width=width)

    def with_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> "InputSpec":
        return replace(self, mean=mean, std=std)


@dataclass
class Anchor:
    """A pretrained model that methods build on, and where it came from."""

    name: str
    model: nn.Module
    source: str  # e.g. "registry:models:/anchor-x@latest", "checkpoint:/path", "timm-hub:resnet18", "trained"
    arch: dict[str, Any] = field(default_factory=dict)  # enough to rebuild the module (family builder kwargs)


@dataclass
class Candidate:
    """One deployable model: standalone (no supernet machinery), exportable to ONNX.

    ``metrics`` holds at least ``val_acc`` (fraction in [0, 1]) and the complexity figures
    ``flops`` (multiply-adds), ``params`` and ``acts`` from :mod:`methods.complexity`.
    ``input_size`` is the (height, width) the candidate runs at: methods that scale
    resolution (scaling, OFA) give each candidate its own; ``in_chans`` its input channels.
    """

    name: str
    method: str
    config: dict[str, Any]
    model: nn.Module
    input_size: tuple[int, int]
    metrics: dict[str, float] = field(default_factory=dict)
    in_chans: int = field(kw_only=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W of one input (exports and measurements use it)."""
        return (self.in_chans, *self.input_size)


# Loads the weights stored under a name into a module built for them (strictly) and returns the module.
LoadWeights = Callable[[str, nn.Module], nn.Module]


class CandidateSpace(ABC):
    """What ``Method.fit`` returns. ``candidates(device)`` yields a finite set for that device.

    ``device`` is a :class:`podium.methods.profiling.DeviceProfile` or None (all candidates). Spaces
    too large to enumerate search per device, yield the top few and set ``searches_per_device`` (the
    others are asked once, their candidates offered to every device). ``report`` (numbers and small
    JSON) and ``tables`` (rows the run report logs and plots) are optional. ``training_cost`` is set by
    :func:`podium.methods.train.fit_method` (a :class:`~podium.methods.train.TrainingCost`).

    A space is saved as data (:meth:`save`, :func:`podium.methods.space_store.load_space`): each method
    says in :meth:`to_record` what rebuilds its modules through its own builders, and rebuilds them in
    :meth:`from_record`; no pickle is ever written or read.
    """

    training_cost: Any = None
    searches_per_device = False  # True: candidates(device) depends on the device (and may measure on it)

    @abstractmethod
    def candidates(self, device: Any = None) -> Iterable[Candidate]: ...

    def to_record(self) -> tuple[dict[str, Any], dict[str, nn.Module]]:
        """A JSON-able record that rebuilds the space (architectures, configs, metrics, names) and the
        modules whose weights it needs, by name (names without ``/``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def from_record(cls, record: dict[str, Any], weights: LoadWeights, data: DataBundle) -> CandidateSpace:
        """The space :meth:`to_record` described: every module built from the record, then ``weights``
        loaded into it. ``data`` is the dataset the space was trained on (spaces that measure or search
        after training read it)."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")

    def candidate_module(self, name: str, config: dict[str, Any]) -> nn.Module:
        """The module of this space's candidate ``name`` with ``config``, built but not holding its
        own weights yet (a saved offer loads them into it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild candidates")

    def save(self, folder: Path | str, key: str = "") -> Path:
        """Write the space to ``folder`` (safetensors + JSON, verified on load); ``key`` names what it is."""
        from podium.methods.space_store import save_space

        return save_space(self, folder, key)

    def report(self) -> dict[str, Any]:
        return {}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Named tables of rows; rows with ``flops`` and ``val_acc`` are drawn as an accuracy front."""
        return {}


class Method(ABC):
    """A method as the catalogue knows it: built from its config, ``fit`` returns its space.

    Usable without orchestration: ``space = Stitching(cfg).fit(data, anchors)``. ``name`` is set by
    :func:`podium.methods.catalog.register_method`.
    """

    name: str = ""
    space_type: ClassVar[type[CandidateSpace]]  # what ``fit`` returns; loads saved spaces of this method

    @abstractmethod
    def fit(self, data: "DataBundle", anchors: Sequence[Anchor] = (), teacher: Anchor | None = None
            ) -> CandidateSpace: ...


@dataclass(frozen=True)
class DataShape:
    """What a space needs to know of the data without loading it (``podium space show``)."""

    num_classes: int
    channels: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class AnchorSpec:
    """An anchor by name and architecture, before any weights exist."""

    name: str
    arch: dict[str, Any]
