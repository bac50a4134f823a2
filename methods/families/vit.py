"""Split hook for timm's ``VisionTransformer`` (a helper module: it registers no builder).

:func:`split_vit` cuts a ViT into embed (patch embedding, position embedding, pre-norm), its
blocks (all stage 0) and head (final norm, pooling, classifier), sharing the model's modules.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from podium.methods.families import AnchorParts, shell


class ViTEmbed(nn.Module):
    """patch_embed -> _pos_embed -> patch_drop -> norm_pre of a timm VisionTransformer.

    The shell never runs as a module: its bare parameters (``cls_token``, ``pos_embed``, ``reg_token``)
    are read by ``_pos_embed``, and :func:`podium.methods.complexity.count` counts them as the
    parameters the forward pass computes with.
    """

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.shell = shell(model, blocks=nn.Sequential(), norm=nn.Identity(), fc_norm=nn.Identity(),
                           head_drop=nn.Identity(), head=nn.Identity(), attn_pool=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shell
        return s.norm_pre(s.patch_drop(s._pos_embed(s.patch_embed(x))))


class ViTHead(nn.Module):
    """Final norm + pooling + head. Applied on stitched paths too (SN-Netv2 fix)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.shell = shell(model, blocks=nn.Sequential(), patch_embed=nn.Identity(), norm_pre=nn.Identity(),
                           patch_drop=nn.Identity(), pos_drop=nn.Identity(), pos_embed=None, cls_token=None,
                           reg_token=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(self.shell.norm(x))


def split_vit(model: VisionTransformer) -> AnchorParts:
    blocks = list(model.blocks)
    return AnchorParts("vit", ViTEmbed(model), blocks, [0] * len(blocks), ViTHead(model))
