"""Once-for-All configuration: the supernet's shape, its search space, the shrinking schedule,
the accuracy predictor and the evolutionary search; plus the space's size and a summary of it."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from podium.methods.base import StrictModel
from podium.methods.recipes import RecipeConfig
from podium.methods.train import TrainConfig

Activation = Literal["relu", "hswish"]


class PhaseConfig(StrictModel):
    """One progressive-shrinking phase.

    ``elastic`` names the dimension this phase opens ("none" = the full network, the teacher);
    ``num_choices`` how many of that dimension's choices are open after it, largest first
    (None = all). Dimensions opened by earlier phases stay open. ``warmup_epochs`` are part of
    ``epochs``: the cosine decay runs over the rest (the official scripts' ``n_epochs`` plus
    ``warmup_epochs``).
    """

    name: str
    elastic: Literal["none", "kernel", "depth", "width"]
    num_choices: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)  # > 0: replaces train.warmup_steps for this phase
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
    """Accuracy predictor: an MLP over one-hot (K, E) per block slot + one-hot resolution.

    Its targets are accuracies on ``holdout_images`` training images kept out of progressive
    shrinking (the official ``valid_size``), never on ``val``: ``val`` reports the candidates, and a
    predictor fitted on it would pick the sub-networks that happen to do well there.
    """

    samples: int = Field(60, ge=4)  # sub-networks evaluated (BN-recalibrated) to train it
    holdout_images: int = Field(250, ge=1)  # ~20% of the bundled digits' 1,257 training images
    hidden: int = Field(400, ge=1)
    layers: int = Field(3, ge=1)
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    subnet_holdout_fraction: float = Field(0.2, ge=0, lt=1)  # evaluated sub-nets not fitted on: its reported error


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


# The official learning rates at its 2048 images per step (64 per GPU x 32 GPUs, ``train_ofa_net.py``:
# ``init_lr = base_lr * num_gpus``): 2.6 for the full network (the paper; the official repository only
# downloads that network), 0.96 for the kernel phase (base_lr 3e-2), 0.08 / 0.24 for the first / second
# depth and width phases (2.5e-3 / 7.5e-3). Phases give theirs relative to the full network's.
PAPER_LR, PAPER_LR_BATCH = 2.6, 2048


def _paper_phase(name: str, elastic: str, epochs: float, lr: float, subnets: int, num_choices: int | None = None,
                 warmup_epochs: float = 0.0) -> dict[str, Any]:
    return {"name": name, "elastic": elastic, "num_choices": num_choices, "epochs": epochs,
            "warmup_epochs": warmup_epochs, "lr_mult": lr / PAPER_LR, "subnets_per_step": subnets}


class ShrinkingConfig(RecipeConfig):
    """Supernet shape, search space, shrinking schedule, predictors and search.

    The defaults (``recipe: demo``) are a tiny space for the bundled digits (32x32, 1 channel);
    ``recipe: paper`` is OFA-MobileNetV3's space (5 units, depth {2,3,4}, expand {3,4,6}, kernel
    {3,5,7}, 25 resolutions) and the official schedule. A ``phases`` list in the YAML replaces the
    preset's list whole (lists are not merged item by item).
    """

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "stem_width": 16, "stem_stride": 2, "first_block_width": 16,
            "unit_widths": (24, 40, 80, 112, 160), "unit_strides": (2, 2, 2, 1, 2),
            "unit_se": (False, True, False, True, True), "unit_acts": ("relu", "relu", "hswish", "hswish", "hswish"),
            "head_width": 960, "feature_width": 1280,
            "depth_choices": (2, 3, 4), "expand_choices": (3, 4, 6), "kernel_choices": (3, 5, 7),
            "resolutions": tuple(range(128, 225, 4)),
            # train_ofa_net.py: n_epochs + warmup_epochs per task and phase; the full network's 180 from the paper
            "phases": [
                _paper_phase("full", "none", 180, PAPER_LR, 1),
                _paper_phase("kernel", "kernel", 125, 0.96, 1, warmup_epochs=5),
                _paper_phase("depth-1", "depth", 25, 0.08, 2, num_choices=2),
                _paper_phase("depth-2", "depth", 125, 0.24, 2, warmup_epochs=5),
                _paper_phase("width-1", "width", 25, 0.08, 4, num_choices=2),
                _paper_phase("width-2", "width", 125, 0.24, 4, warmup_epochs=5),
            ],
            "kd_weight": 1.0, "label_smoothing": 0.1,  # kd_ratio, label_smoothing
            "bn_recalibration_images": 2000,  # reset_running_statistics(subset_size=2000)
            "predictor": {"samples": 1000, "epochs": 100, "holdout_images": 10000},  # n_arch, valid_size
            "evolution": {"generations": 500},
            "train": {"epochs": 1, "lr": PAPER_LR, "lr_batch": PAPER_LR_BATCH, "optimizer": "sgd", "momentum": 0.9,
                      "weight_decay": 3e-5, "warmup_steps": 0},  # sgd: nesterov; no decay on BN and biases
        },
    }

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
    # BN statistics of every evaluated sub-network: this many training images (a fixed subset of the
    # images the supernet trained on, read at the sub-network's resolution); 256 = 4 digit batches
    bn_recalibration_images: int = Field(256, ge=1)
    # specialisation
    predictor: PredictorConfig = PredictorConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    top_k: int = Field(3, ge=1)  # candidates per device (measured for real)
    # latency lookup table: per-entry measurement effort (10-40 interleaved rounds of lut_repeats runs;
    # fewer rounds left entries and networks repeatable only to +-30 % on a busy host)
    lut_warmup: int = Field(3, ge=0)
    lut_repeats: int = Field(5, ge=1)
    lut_max_rounds: int = Field(40, ge=10)
    lut_max_seconds: float = Field(0.25, gt=0)
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
        """``recipe: paper`` (ImageNet scale; far too large to train here), ``overrides`` over it."""
        return cls.model_validate({"recipe": "paper", **overrides})


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
