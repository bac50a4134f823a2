"""Once-for-All progressive shrinking (Cai et al., ICLR 2020) with per-device search.

One elastic MobileNetV3-style supernet is trained once, in the paper's phase order (full network,
then elastic kernel, elastic depth, elastic width), each phase sampling sub-networks per step and
distilling from the full network. Afterwards every device costs only a search: a latency lookup
table *measured on that device*, an accuracy predictor trained on evaluated sub-networks, and an
evolutionary search under the device's latency budget. The best few sub-networks are extracted as
standalone static modules (plain Conv2d/BatchNorm2d, transformed kernels, sorted and truncated
channels), BN-recalibrated, measured for real and yielded as candidates.

Elastic dimensions (see /work/shared/methods/shrinking.md):

- kernel: one max-size depthwise kernel per layer plus per-layer transformation matrices
  (25x25 for 7->5, 9x9 for 5->3) initialised to identity; a smaller kernel is the centre crop of
  the *transformed* next-larger kernel (K3 comes from the transformed K5, never from K7);
- width: hidden channels sorted by the L1 norm of the projection conv's weights at the start of
  each width phase (producer outputs and consumer inputs permuted together), the channel sets of the
  widths earlier width phases trained kept in front; a sub-network keeps the first
  ``make_divisible(C_in * e, 8)``;
- depth: a unit at depth D runs its first D blocks;
- resolution: one input size sampled per step; the teacher sees the same size.

The accuracy predictor learns from sub-networks' accuracies on training images held out of
shrinking (``predictor.holdout_images``), never from ``val``, which only reports the candidates.
``recipe: paper`` is OFA-MobileNetV3's space and the official schedule (:class:`ShrinkingConfig`).

Files: ``config`` (the configuration, the space's size), ``space`` (architectures and the choices
open so far), ``blocks`` (static and elastic blocks), ``supernet`` (the supernet, sub-networks and
their extraction), ``latency`` (per-device lookup table), ``predictor`` (accuracy predictor),
``search`` (evolutionary search) and ``method`` (progressive shrinking and the candidate space;
importing it registers the method).
"""
from podium.methods.shrinking.blocks import ElasticMBConv
from podium.methods.shrinking.config import PhaseConfig, ShrinkingConfig, describe_space, space_size
from podium.methods.shrinking.method import Shrinking, ShrinkSpace
from podium.methods.shrinking.predictor import encode_arch
from podium.methods.shrinking.space import Arch, OpenSpace
from podium.methods.shrinking.supernet import OFASubnet, OFASupernet, extract_subnet

__all__ = ["Arch", "ElasticMBConv", "OFASubnet", "OFASupernet", "OpenSpace", "PhaseConfig", "ShrinkSpace", "Shrinking",
           "ShrinkingConfig", "describe_space", "encode_arch", "extract_subnet", "space_size"]
