"""Once-for-All configuration: the supernet's shape, its search space, the shrinking schedule,
the accuracy predictor and the evolutionary search; plus the space's size and a summary of it."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from podium.methods.base import StrictModel
from podium.methods.train import TrainConfig

Activation = Literal["relu", "hswish"]


class PhaseConfig(StrictModel):
    """One progressive-shrinking phase.

    ``elastic`` names the dimension this phase opens ("none" = the full network, the teacher);
    ``num_choices`` how many of that dimension's choices are open after it, largest first
    (None = all). Dimensions opened by earlier phases stay open.
    """

    name: str
    elastic: Literal["none", "kernel", "depth", "width"]
    num_choices: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr_mult: float = Field(1.0, gt=0)
    subnets_per_step: int = Field(1, ge=1)


class EvolutionConfig(StrictModel):
    """OFA's evolution finder: population, parents, children by mutation and by crossover."""

    population: int = Field(100, ge=2)
    generations: int = Field(60, ge=0)
    parents: int = Field(25, ge=1)
    mutation_children: int = Field(50, ge=0)
    crossover_children: int = Field(50, ge=0)
    mutation_prob: float = Field(0.1, ge=0, le=1)  # per block (kernel, expand) and per unit (depth)
    resolution_mutation_prob: float = Field(0.5, ge=0, le=1)
    max_tries: int = Field(500, ge=1)  # attempts to draw a sample under the budget


class PredictorConfig(StrictModel):
    """Accuracy predictor: an MLP over one-hot (K, E) per block slot + one-hot resolution."""

    samples: int = Field(60, ge=4)  # sub-networks evaluated (BN-recalibrated) to train it
    hidden: int = Field(400, ge=1)
    layers: int = Field(3, ge=1)
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    holdout: float = Field(0.2, ge=0, lt=1)  # fraction of samples kept to report its error


def _paper_phases() -> list[PhaseConfig]:
    """The paper's schedule (180/120/25/120/25/120 epochs) and learning rates relative to the full net."""
    return [
        PhaseConfig(name="full", elastic="none", epochs=180, lr_mult=1.0, subnets_per_step=1),
        PhaseConfig(name="kernel", elastic="kernel", epochs=120, lr_mult=0.96 / 2.6, subnets_per_step=1),
        PhaseConfig(name="depth-1", elastic="depth", num_choices=2, epochs=25, lr_mult=0.08 / 2.6, subnets_per_step=2),
        PhaseConfig(name="depth-2", elastic="depth", epochs=120, lr_mult=0.24 / 2.6, subnets_per_step=2),
        PhaseConfig(name="width-1", elastic="width", num_choices=2, epochs=25, lr_mult=0.08 / 2.6, subnets_per_step=4),
        PhaseConfig(name="width-2", elastic="width", epochs=120, lr_mult=0.24 / 2.6, subnets_per_step=4),
    ]


def _demo_phases() -> list[PhaseConfig]:
    """Paper order and relative lengths scaled down ~1/30; the later phases get relatively higher
    learning rates than the paper's because they are far shorter here."""
    return [
        PhaseConfig(name="full", elastic="none", epochs=4, lr_mult=1.0, subnets_per_step=1),
        PhaseConfig(name="kernel", elastic="kernel", epochs=2, lr_mult=0.4, subnets_per_step=1),
        PhaseConfig(name="depth-1", elastic="depth", num_choices=2, epochs=0.5, lr_mult=0.1, subnets_per_step=2),
        PhaseConfig(name="depth-2", elastic="depth", epochs=2, lr_mult=0.3, subnets_per_step=2),
        PhaseConfig(name="width-1", elastic="width", num_choices=2, epochs=0.5, lr_mult=0.1, subnets_per_step=4),
        PhaseConfig(name="width-2", elastic="width", epochs=2, lr_mult=0.3, subnets_per_step=4),
    ]


class ShrinkingConfig(StrictModel):
    """Supernet shape, search space, shrinking schedule, predictors and search.

    The defaults are a tiny space for the bundled digits (32x32, 1 channel); ``paper()`` gives
    OFA-MobileNetV3's space (5 units, depth {2,3,4}, expand {3,4,6}, kernel {3,5,7}, 25 resolutions).
    """

    # supernet shape
    stem_width: int = Field(8, ge=1)
    stem_stride: int = Field(2, ge=1)
    first_block_width: int = Field(8, ge=1)  # the fixed expand-1 block after the stem
    unit_widths: tuple[int, ...] = (16, 24, 40)
    unit_strides: tuple[int, ...] = (2, 2, 1)
    unit_se: tuple[bool, ...] = (False, True, True)
    unit_acts: tuple[Activation, ...] = ("relu", "hswish", "hswish")
    head_width: int = Field(96, ge=1)  # final 1x1 expand before pooling (960 in the paper)
    feature_width: int = Field(128, ge=1)  # 1x1 feature mix after pooling (1280 in the paper)
    # search space
    depth_choices: tuple[int, ...] = (1, 2, 3)
    expand_choices: tuple[float, ...] = (3, 4, 6)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    resolutions: tuple[int, ...] = (24, 28, 32)
    # progressive shrinking
    phases: list[PhaseConfig] = Field(default_factory=_demo_phases)
    kd_weight: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    bn_recalibration_batches: int = Field(4, ge=1)  # batches of the fixed training subset
    # specialisation
    predictor: PredictorConfig = PredictorConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    top_k: int = Field(3, ge=1)  # candidates per device (measured for real)
    lut_warmup: int = Field(2, ge=0)  # latency lookup table: per-entry measurement effort
    lut_repeats: int = Field(10, ge=3)
    lut_max_seconds: float = Field(0.5, gt=0)
    # OFA uses SGD-Nesterov; on the tiny demo AdamW reaches far higher accuracy in so few steps
    train: TrainConfig = TrainConfig(epochs=1, lr=0.005, optimizer="adamw", weight_decay=3e-5)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "ShrinkingConfig":
        n = len(self.unit_widths)
        if n == 0:
            raise ValueError("unit_widths must name at least one unit")
        for field in ("unit_strides", "unit_se", "unit_acts"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries, unit_widths has {n}")
        for field in ("depth_choices", "expand_choices", "kernel_choices", "resolutions"):
            values = getattr(self, field)
            if not values or len(set(values)) != len(values) or min(values) <= 0:
                raise ValueError(f"{field} must be distinct positive values, got {values}")
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ValueError(f"kernel_choices must be odd (centre crops), got {self.kernel_choices}")
        if not self.phases or self.phases[0].elastic != "none":
            raise ValueError("the first phase must train the full network (elastic: none): it is the teacher")
        return self

    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    @classmethod
    def paper(cls, **overrides: Any) -> "ShrinkingConfig":
        """OFA-MobileNetV3's space and schedule (ImageNet scale; far too large to train here)."""
        values: dict[str, Any] = dict(
            stem_width=16, stem_stride=2, first_block_width=16,
            unit_widths=(24, 40, 80, 112, 160), unit_strides=(2, 2, 2, 1, 2),
            unit_se=(False, True, False, True, True), unit_acts=("relu", "relu", "hswish", "hswish", "hswish"),
            head_width=960, feature_width=1280,
            depth_choices=(2, 3, 4), expand_choices=(3, 4, 6), kernel_choices=(3, 5, 7),
            resolutions=tuple(range(128, 225, 4)), phases=_paper_phases(),
            bn_recalibration_batches=32,
            predictor=PredictorConfig(samples=1000, epochs=100),
            evolution=EvolutionConfig(generations=500),
            train=TrainConfig(epochs=1, lr=2.6, optimizer="sgd", weight_decay=3e-5, warmup_steps=0),
        )
        values.update(overrides)
        return cls(**values)


def space_size(cfg: ShrinkingConfig) -> int:
    """Number of distinct sub-networks: (sum_d (|K|*|E|)^d)^units * |R| (closed form)."""
    per_block = len(cfg.kernel_choices) * len(cfg.expand_choices)
    per_unit = sum(per_block ** d for d in cfg.depth_choices)
    return per_unit ** len(cfg.unit_widths) * len(cfg.resolutions)


def describe_space(cfg: ShrinkingConfig) -> dict[str, Any]:
    """A pure summary of a configured space for the CLI (no model is built)."""
    size = space_size(cfg)
    return {
        "units": len(cfg.unit_widths),
        "unit_widths": list(cfg.unit_widths),
        "depth_choices": sorted(cfg.depth_choices),
        "kernel_choices": sorted(cfg.kernel_choices),
        "expand_choices": sorted(cfg.expand_choices),
        "resolutions": sorted(cfg.resolutions),
        "subnets_per_resolution": size // len(cfg.resolutions),
        "size": size,
        "summary": (f"OFA space: {len(cfg.unit_widths)} units, depth {sorted(cfg.depth_choices)}, "
                    f"kernel {sorted(cfg.kernel_choices)}, expand [{', '.join(f'{e:g}' for e in sorted(cfg.expand_choices))}], "
                    f"{len(cfg.resolutions)} resolutions -> {size:.3e} sub-networks"),
    }
