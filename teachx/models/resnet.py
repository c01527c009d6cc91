"""ResNet-18 (He et al. 2016), and the CIFAR ResNets of He et al. sec. 4.2 (ResNet-8/20/32/56...).

ResNet-18 has BasicBlocks x [2, 2, 2, 2] (widths 64, 128, 256, 512).

Small inputs (``small_input``; default: longer side <= 64 px) use the CIFAR stem of He et al.
sec. 4.2 as commonly adapted to ResNet-18: conv3x3(64, stride 1) -> BN -> ReLU and no max pool,
so the network downsamples 8x (32x32 -> 4x4) and has 11,173,962 parameters at 10 classes.
Otherwise the ImageNet stem: conv7x7(64, stride 2) -> BN -> ReLU -> maxpool3x3(stride 2), 32x
downsampling, 11,689,512 parameters at 1000 classes. Shortcuts are identity, or conv1x1-BN
(option B) where the shape changes. Residual sums go through ``layers.Add``, followed by the
block's own ReLU.

``resnet_cifar`` (alias ``resnet20``) is the 6n+2-layer CIFAR family: conv3x3(16) -> 3 stages of n
BasicBlocks with 16, 32, 64 channels (stride 1, 2, 2) -> global average pool -> linear. It is cheap
enough on a CPU to be the "stronger teacher" of a LeNet-5 student (configs/study-cifar10-lenet5.yaml
trains a ResNet-8 for 15 epochs on CIFAR-10). Shortcuts are option B (conv1x1-BN where the
shape changes) rather than the paper's zero padding (option A), so that LRP canonizers see only
convolutions, BatchNorms and ``layers.Add``: ResNet-20 has 272,474 parameters at 10 classes
(269,722 with option A).
"""

from __future__ import annotations

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.models._common import MODELS, image_hw, positive_int, probability, resolve_small_input, set_dims
from teachx.models.base import Backbone, set_pyramid
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
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers: list[nn.Module] = [stem]
        width = 64
        strides, widths = [1 if small_input else 4], [64]
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(width, out, stride), BasicBlock(out, out, 1)))
            width = out
            strides.append(strides[-1] * stride)
            widths.append(out)
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, num_classes)
        set_dims(self, in_channels, num_classes, width)
        set_pyramid(self, strides, widths)
        init_weights(self)


@MODELS.register("resnet18", "resnet-18", "resnet_18")
def resnet18(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    dropout: float = 0.0,
    small_input: bool | None = None,
) -> ResNet18:
    """ResNet-18 (He et al. 2016), with a CIFAR stem (3x3 conv, no max-pool) for small inputs.

    Args:
        dropout: dropout before the classifier
        small_input: CIFAR stem (3x3 stride-1 conv, no max-pool) instead of ImageNet's; null: auto, true up to 64 px
    """
    hw = image_hw(image_size)
    return ResNet18(
        in_channels,
        num_classes,
        dropout=probability("dropout", dropout),
        small_input=resolve_small_input(small_input, hw),
    )


class CifarResNet(Backbone):
    """The 6n+2-layer CIFAR ResNet; ``features(x)`` is the pooled ``4 * width``-d vector."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, width: int = 16, dropout: float = 0.0):
        super().__init__()
        blocks = (depth - 2) // 6
        layers: list[nn.Module] = [conv_bn(in_channels, width, 3, activation=nn.ReLU())]
        channels = width
        strides, widths = [1], [width]
        for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers.append(
                nn.Sequential(
                    *(BasicBlock(channels if i == 0 else out, out, stride if i == 0 else 1) for i in range(blocks))
                )
            )
            channels = out
            strides.append(strides[-1] * stride)
            widths.append(out)
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(channels, num_classes)
        set_dims(self, in_channels, num_classes, channels)
        set_pyramid(self, strides, widths)
        init_weights(self)


@MODELS.register("resnet_cifar", "resnet20", "resnet-cifar")
def resnet_cifar(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    depth: int = 20,
    width: int = 16,
    dropout: float = 0.0,
) -> CifarResNet:
    """CIFAR ResNet (He et al. 2016, sec. 4.2): three stages of basic blocks, depth 6n+2.

    Args:
        depth: layers, 6n+2: 8, 14, 20, 32, 44, 56 or 110
        width: channels of the first stage (doubled in each of the next two)
        dropout: dropout before the classifier
    """
    image_hw(image_size)
    depth = positive_int("depth", depth)
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"resnet_cifar depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    return CifarResNet(
        in_channels,
        num_classes,
        depth=depth,
        width=positive_int("width", width),
        dropout=probability("dropout", dropout),
    )
