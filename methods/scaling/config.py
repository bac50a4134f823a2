"""The scaling method's config: the small digits bases of each family and the scaled family's settings."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from podium.methods.base import StrictModel
from podium.methods.scaling.rule import StrategyName
from podium.methods.train import TrainConfig


class RegNetBase(StrictModel):
    """A small RegNetX for 1-channel 32x32 digits: stem 16, stages at 16/8/4/2 px."""

    depths: list[int] = [1, 1, 2, 2]
    widths: list[int] = [24, 48, 96, 192]
    group_widths: list[int] = [8, 8, 8, 8]
    strides: list[int] = [1, 2, 2, 2]
    stem_width: int = 16
    bottle_ratio: float = 1.0
    se_ratio: float = 0.0
    resolution: int = 32
    # pycls rounds resolution to multiples of 4: ~2% steps at 224 px but 12.5% (27% in flops) at
    # 32 px, too coarse to hit a flops target, so the small digits bases round to multiples of 2.
    resolution_divisor: int = Field(2, ge=1)

    def arch(self) -> dict[str, Any]:
        return {"family": "regnet_scaled", **self.model_dump(exclude={"resolution", "resolution_divisor"})}


class EfficientNetBase(StrictModel):
    """A small EfficientNet for 1-channel 32x32 digits (B0-like stages, fewer and narrower)."""

    depths: list[int] = [1, 1, 1, 2]
    widths: list[int] = [16, 24, 40, 64]
    kernels: list[int] = [3, 3, 5, 3]
    strides: list[int] = [1, 2, 2, 2]
    expand_ratios: list[int] = [1, 4, 4, 4]
    stem_width: int = 16
    head_width: int = 128
    se_ratio: float = 0.25
    resolution: int = 32
    resolution_divisor: int = Field(2, ge=1)  # see RegNetBase

    def arch(self) -> dict[str, Any]:
        return {"family": "efficientnet_scaled", **self.model_dump(exclude={"resolution", "resolution_divisor"})}


_BASES: dict[str, type[StrictModel]] = {"regnet": RegNetBase, "efficientnet": EfficientNetBase}


class ScalingConfig(StrictModel):
    family: Literal["regnet", "efficientnet"] = "regnet"
    base: RegNetBase | EfficientNetBase | None = None  # None: the family's small default base
    scales: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    strategy: StrategyName = "dWr"
    match_flops: bool = True  # search the rule's s so the *realised* flops factor hits each scale
    flops_tolerance: float = Field(0.05, gt=0, lt=1)  # accept the first shape within this relative error
    distill: bool = False  # KD from the teacher anchor (or, without one, from the largest scaled model)
    kd_temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)
    train: TrainConfig = TrainConfig(epochs=6.0, max_steps=120, lr=0.2, warmup_steps=10)  # 0.05: 76% val, 0.2: 97% (digits, s=1)

    @model_validator(mode="before")
    @classmethod
    def _base_for_family(cls, data: Any) -> Any:
        """Parse ``base`` with the family's base model (a RegNet base has no kernels, etc.)."""
        if isinstance(data, dict):
            family = data.get("family", "regnet")
            base = data.get("base")
            if isinstance(base, dict) and family in _BASES:
                data = {**data, "base": _BASES[family](**base)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ScalingConfig":
        if self.base is not None and not isinstance(self.base, _BASES[self.family]):
            raise ValueError(f"base {type(self.base).__name__} does not match family {self.family!r}")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        return self

    def resolved_base(self) -> RegNetBase | EfficientNetBase:
        return self.base if self.base is not None else _BASES[self.family]()
