"""Split hook for timm's ``SwinTransformer`` (a helper module: it registers no builder).

:func:`split_swin` cuts a Swin into embed (patch embedding), its blocks with their stage index and
head (final norm, pooling, classifier), sharing the model's modules. timm keeps Swin's token maps
NHWC (B x H x W x C) from the patch embedding to the head, so the parts are of kind ``vit``: a
stitching layer is a linear map over the last (channel) dimension.

timm runs a stage's patch merging at the start of the stage (the reference code ran it at the end
of the previous one), so the first block of stages 1..3 here is that merging followed by the
stage's first block: every block's output, and every block's input but that one's, then has its
stage's resolution, and stitches stay inside a stage as in the reference code.
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from podium.methods.families import AnchorParts


class SwinHead(nn.Module):
    """Final norm + pooling + classifier (timm's ``forward_features`` tail and ``forward_head``)."""

    def __init__(self, model: SwinTransformer):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def split_swin(model: SwinTransformer) -> AnchorParts:
    blocks: list[nn.Module] = []
    stages: list[int] = []
    for stage, layer in enumerate(model.layers):
        for i, block in enumerate(layer.blocks):
            if i == 0 and not isinstance(layer.downsample, nn.Identity):
                block = nn.Sequential(layer.downsample, block).train(model.training)
            blocks.append(block)
            stages.append(stage)
    return AnchorParts("vit", model.patch_embed, blocks, stages, SwinHead(model))
