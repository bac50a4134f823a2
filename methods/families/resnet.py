"""ResNet of any depth and width (timm's ``ResNet``): small ones train in seconds on CPU.

Split hook (:func:`split_resnet`): stem, the blocks of ``layer1..layer4`` with their stage index,
and head, all sharing the model's modules. Also used for timm hub ResNets (:mod:`.timm_hub`).
"""
from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from podium.methods.families import AnchorParts, register_family, shell


class ResNetStem(nn.Module):
    """conv1 -> bn1 -> act1 -> maxpool of a timm ResNet."""

    def __init__(self, model: ResNet):
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = model.conv1, model.bn1, model.act1, model.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


class ResNetHead(nn.Module):
    """Global pool (+ dropout) + fc, through timm's ``forward_head`` on a stripped shell."""

    def __init__(self, model: ResNet):
        super().__init__()
        stripped = {name: nn.Identity() for name in ("conv1", "bn1", "act1", "maxpool",
                                                     "layer1", "layer2", "layer3", "layer4")}
        self.shell = shell(model, **stripped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shell.forward_head(x)


def split_resnet(model: ResNet) -> AnchorParts:
    blocks, stages = [], []
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for block in layer:
            blocks.append(block)
            stages.append(stage)
    return AnchorParts("cnn", ResNetStem(model), blocks, stages, ResNetHead(model))


@register_family("resnet", split=split_resnet)
def resnet(layers: list[int], channels: list[int], num_classes: int, in_chans: int,
           block: str = "basic", pretrained: bool = False) -> nn.Module:
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    return ResNet(block=block_cls, layers=tuple(layers), channels=tuple(channels), stem_width=channels[0],
                  num_classes=num_classes, in_chans=in_chans)
