"""Fast compound model scaling (Dollár, Singh, Girshick, "Fast and Accurate Model Scaling", CVPR 2021).

A base network is scaled by a flops factor ``s``. With flops ∝ d·w²·r², a strategy gives each of
depth, width and resolution a *share* of the flops growth; the width share is ``alpha``:

    d = s^((1-α)/2),  w = s^(α/2),  r = s^((1-α)/4)          (for d, w and r all scaled)

so params ∝ s^((1+α)/2) and activations ∝ s^(1-α/2). Uniform compound scaling ``dwr`` is
α = 1/3 (acts ∝ s^(5/6)); *fast* scaling ``dWr`` is α = 0.8 (acts ∝ s^0.6). The paper's point:
runtime follows activations more closely than flops, so ``dWr`` runs faster at equal flops.

By default a member is exactly what pycls ``pycls/models/scaler.py`` makes of the base at the same
``s`` (its ``d1_w8_g8_r1`` is ``dWr``; ``dwr``, ``w``... are its letter types): per-stage depth
``max(1, round(d·depth))`` (half to even), width ``max(1, round(w·width/8))·8``, the group width
scaled with the width for fast scaling (otherwise the number of groups balloons) and snapped (≤2
kept, ≤5 → 4, else a multiple of 8), then widths made compatible with the group width (pycls
``blocks.adjust_block_compatibility``); resolution ``round(r·res/4)·4`` (the small digits bases
round to 2, ``resolution_divisor``). RegNet's stem and head are not scaled (EfficientNet's stem and
head widths are, as in pycls), so the realised flops factor differs from ``s``, by tens of percent
for tiny bases; opt-in ``ScalingConfig.match_flops`` makes :func:`match_flops_scale` search the
``s`` fed to the rule so that the realised factor hits the target instead. ``recipe: paper``
trains with pycls's schedule for these models (:class:`ScalingConfig`).

The package, by layer:

- :mod:`.rule`: the pure scaling rule (strategies, multipliers, rounding; no torch);
- :mod:`.config`: the small digits bases and :class:`ScalingConfig`;
- :mod:`.plan`: the scaled family's shapes, resolutions and complexities, without training;
- :mod:`.method`: the registered ``scaling`` method and its candidate space;
- :mod:`.analysis`: the runtime correlation (latency vs flops, params, acts) per device.

The two scalable families live with the other families, each registered beside its builder with
its ``scale`` hook (``families.scale(arch, strategy, s)``), so a scaled model can be rebuilt from
its arch dict alone: ``regnet_scaled`` (:mod:`podium.methods.families.regnet`, timm's RegNet with
explicit per-stage depths/widths/group widths) and ``efficientnet_scaled``
(:mod:`podium.methods.families.efficientnet`, timm's EfficientNet from explicit per-stage block
strings). The runtime-correlation plot is drawn by :mod:`podium.tasks.plots`.
"""
# The rule first: the family modules import it, whichever of the two packages is imported first.
from podium.methods.scaling.analysis import METRICS, pearson_r, runtime_correlation  # noqa: F401
from podium.methods.scaling.config import EfficientNetBase, RegNetBase, ScalingConfig  # noqa: F401
from podium.methods.scaling.method import Scaling, ScalingSpace, describe  # noqa: F401  (registers "scaling")
from podium.methods.scaling.plan import (  # noqa: F401
    ScaledModel,
    describe_scales,
    match_flops_scale,
    plan_scales,
    realise_scale,
    shape_complexity,
)
from podium.methods.scaling.rule import (  # noqa: F401
    STRATEGIES,
    Strategy,
    StrategyName,
    adjust_block_compatibility,
    get_strategy,
    round_depth,
    round_group_width,
    round_width,
    scale_factors,
    scale_resolution,
)
