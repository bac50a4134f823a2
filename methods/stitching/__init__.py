"""Stitchable Neural Networks (SN-Net, Pan et al., CVPR 2023): every stitch is a candidate.

Several pretrained *anchors* of one family (ResNets, ViTs or Swins of growing size) are joined into
one network that runs at many accuracy/FLOPs points: the first blocks of a smaller anchor, a small
stitching layer (1x1 conv on feature maps, linear on tokens), then the remaining blocks and head
of the next larger anchor ("Fast-to-Slow"). Stitching layers are initialised by least squares on
real activations, then all weights are trained jointly, one sampled configuration per step.

Pieces, timm style:

- each model family's ``split`` hook (:func:`podium.methods.families.split`) cuts an anchor into
  embed, a flat list of blocks (with stage indices) and head, sharing the anchor's modules.
- :mod:`.space`: :func:`paired_stitching` / :func:`unpaired_stitching` / :func:`enumerate_stitches`
  build the stitch space (reference rules of ziplab/SN-Net: DeiT-Ti/S/B 71 configurations,
  Swin-T/S/B 41, ResNet-18/50 10), Fast-to-Slow or, for the ablation, Slow-to-Fast;
  :func:`assemble` builds one stitch.
- :mod:`.init`: :func:`least_squares` solves ``min ||[X, 1] A - Y||`` in float64;
  :func:`init_stitch_layers` applies it to collected activations (or He initialisation for comparison).
- :mod:`.method`: :class:`Stitching` builds the supernet, trains it with :func:`methods.train.fit` and
  returns a :class:`StitchSpace` whose candidates are standalone, ONNX-exportable modules;
  :func:`describe_space` lists the space with FLOPs without training (for ``podium space show``).

Importing this package registers the ``stitching`` method (:mod:`.method`).
"""
from podium.methods.families import AnchorParts
from podium.methods.stitching.init import (
    as_rows,
    collect_features,
    init_stitch_layers,
    least_squares,
    set_stitch_weights,
    stitch_residual,
    take_batches,
)
from podium.methods.stitching.method import (
    ConfigSampler,
    Stitching,
    StitchingConfig,
    StitchResult,
    StitchSpace,
    StitchSupernet,
    arch_name,
    config_dict,
    describe_space,
    pareto_rows,
    recipe_kind,
    select_anchors,
    stitch_lr_optimizer,
)
from podium.methods.stitching.space import (
    StitchConfig,
    StitchedNet,
    assemble,
    build_stitch_layers,
    enumerate_stitches,
    is_hierarchical,
    make_stitch_layer,
    official_stages,
    paired_stitching,
    probe_shapes,
    unpaired_stitching,
)

__all__ = [
    "AnchorParts",
    "ConfigSampler",
    "StitchConfig",
    "StitchResult",
    "StitchSpace",
    "StitchSupernet",
    "StitchedNet",
    "Stitching",
    "StitchingConfig",
    "arch_name",
    "as_rows",
    "assemble",
    "build_stitch_layers",
    "collect_features",
    "config_dict",
    "describe_space",
    "enumerate_stitches",
    "init_stitch_layers",
    "is_hierarchical",
    "least_squares",
    "make_stitch_layer",
    "official_stages",
    "paired_stitching",
    "pareto_rows",
    "probe_shapes",
    "recipe_kind",
    "select_anchors",
    "set_stitch_weights",
    "stitch_lr_optimizer",
    "stitch_residual",
    "take_batches",
    "unpaired_stitching",
]
