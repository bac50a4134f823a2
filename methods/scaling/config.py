"""The scaling method's config: the small digits bases of each family, the scaled family's settings
and the ``paper`` recipe (pycls's training schedule for these models)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from podium.methods.base import StrictModel
from podium.methods.recipes import RecipeConfig
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
    # pycls rounds the scaled resolution to multiples of 4 (set 4 for its exact rule; the ``paper``
    # recipe does): ~2% steps at 224 px but 12.5% (27% in flops) at 32 px, where dWr's r = s^0.05
    # would keep s = 2 at 32 px. The small digits bases round to multiples of 2.
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

# pycls's schedule for these models: configs/dds_baselines/regnet{x,y}/*.yaml (the pycls model zoo's
# recipe; pycls publishes no configs of the Fast-scaling paper itself, pycls issue #171) with the
# defaults of pycls/core/config.py: SGD, momentum 0.9, nesterov, cosine to 0, 100 epochs, weight
# decay 5e-5, 5 warm-up epochs, lr 0.1 per 128 images (BASE_LR 0.8 at BATCH_SIZE 1024; 0.4 at 512
# and 0.2 at 256 for the larger models). No label smoothing (TRAIN.LABEL_SMOOTHING 0 and no config
# sets it). EMA: pycls always keeps an EMA of the weights ("as used in Fast and Accurate Model
# Scaling", pycls PR #138, pycls/core/net.py update_model_ema): every 32 steps with
# alpha = EMA_ALPHA·BATCH_SIZE/MAX_EPOCH·32, a per-step decay of 1 - 1e-5·1024/100 ≈ 0.9999.
# What TrainConfig cannot say (all small): pycls's EMA decay follows the batch and the epochs
# (ours is fixed per step: set ema_decay ≈ 1 - 1e-5·batch/epochs for another batch), copies the
# weights during the warm-up and is evaluated beside the raw weights, the better kept (ours: the
# model ends with the EMA weights, so a short run should set ``train: {ema_decay: null}``);
# pycls warms up from 0.1·lr and sets the lr once per epoch (ours: per step, from ~0); pycls decays
# BN weights too (ours: no decay on norms and biases) and recomputes BN statistics on 8192 training
# images before each evaluation (ours: not done).
_PAPER_TRAIN: dict[str, Any] = {
    "epochs": 100.0, "max_steps": None, "optimizer": "sgd", "momentum": 0.9,  # timm's "sgd" is nesterov
    "lr": 0.8, "lr_batch": 1024, "weight_decay": 5e-5, "warmup_steps": 0, "ema_decay": 0.9999,
}


class ScalingConfig(RecipeConfig):
    """Scaled family settings. ``recipe: paper``: pycls's rule and schedule (see ``RECIPES``); the
    EfficientNet schedule (configs/dds_baselines/effnet: lr 0.4 per 256, weight decay 1e-5, no
    warm-up) is the ``paper:efficientnet`` variant, applied by the method (``cfg.variant(family)``)."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"strategy": "dWr", "match_flops": False, "base": {"resolution_divisor": 4},
                  "warmup_epochs": 5.0, "train": _PAPER_TRAIN},
        "paper:efficientnet": {"warmup_epochs": None,
                               "train": {"lr": 0.4, "lr_batch": 256, "weight_decay": 1e-5}},
    }

    family: Literal["regnet", "efficientnet"] = "regnet"
    # None: the family's small default base (a mapping is read as the family's base, its fields
    # over the defaults; the ``paper`` recipe sets only resolution_divisor 4, pycls's rounding)
    base: RegNetBase | EfficientNetBase | None = None
    scales: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    strategy: StrategyName = "dWr"
    # pycls's rule by default: each member is the base scaled by s itself, whatever flops its rounded
    # shape has. True: search the s fed to the rule so the *realised* flops factor hits each scale.
    match_flops: bool = False
    flops_tolerance: float = Field(0.05, gt=0, lt=1)  # match_flops: the first shape within this relative error
    distill: bool = False  # KD from the teacher anchor (or, without one, from the largest scaled model)
    kd_temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)
    # warm-up in epochs of each member's own loader; when set it replaces train.warmup_steps
    warmup_epochs: float | None = Field(None, ge=0)
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

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """``train`` for a member whose loader gives ``steps_per_epoch`` optimizer steps an epoch:
        with ``warmup_epochs`` set, its warm-up is that many epochs, in steps."""
        if self.warmup_epochs is None:
            return self.train
        return self.train.model_copy(update={"warmup_steps": math.ceil(self.warmup_epochs * steps_per_epoch)})
