"""ResNet-18 (He et al. 2016) with BasicBlocks x [2, 2, 2, 2] (widths 64, 128, 256, 512).

Small inputs (``small_input``; default: longer side <= 64 px) use the CIFAR stem of He et al.
sec. 4.2 as commonly adapted to ResNet-18: conv3x3(64, stride 1) -> BN -> ReLU and no max pool,
so the network downsamples 8x (32x32 -> 4x4) and has 11,173,962 parameters at 10 classes.
Otherwise the ImageNet stem: conv7x7(64, stride 2) -> BN -> ReLU -> maxpool3x3(stride 2), 32x
downsampling, 11,689,512 parameters at 1000 classes. Shortcuts are identity, or conv1x1-BN
(option B) where the shape changes. Residual sums go through ``layers.Add``, followed by the
block's own ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from teachx.models._common import MODELS, image_hw, probability, resolve_small_input, set_dims
from teachx.models.base import Backbone
from teachx.models.layers import Add, conv_bn, init_weights


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride=stride, activation=nn.ReLU()),
            conv_bn(out_channels, out_channels, 3),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = conv_bn(in_channels, out_channels, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.add = Add()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.add(self.branch(x), self.shortcut(x)))


class ResNet18(Backbone):
    """ResNet-18; ``features(x)`` is the pooled 512-d vector."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0, small_input: bool = True):
        super().__init__()
        if small_input:
            stem = conv_bn(in_channels, 64, 3, activation=nn.ReLU())
        else:
            stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers: list[nn.Module] = [stem]
        width = 64
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(width, out, stride), BasicBlock(out, out, 1)))
            width = out
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, num_classes)
        set_dims(self, in_channels, num_classes, width)
        init_weights(self)


@MODELS.register("resnet18", "resnet-18", "resnet_18")
def resnet18(in_channels: int, num_classes: int, image_size: tuple[int, int], *,
             dropout: float = 0.0, small_input: bool | None = None) -> ResNet18:
    """ResNet-18; options: dropout (default 0), small_input (null = auto: CIFAR stem up to 64 px)."""
    hw = image_hw(image_size)
    return ResNet18(in_channels, num_classes, dropout=probability("dropout", dropout),
                    small_input=resolve_small_input(small_input, hw))
