"""EfficientNet-B0 / B2 (Tan & Le 2019), MBConv blocks with squeeze-and-excitation and SiLU.

B0 stages (expansion, kernel, stride, width, repeats): (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2)
(6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1), between a conv3x3(32, stride 2) stem and a
conv1x1 head of 4x the last width (1280 for B0). Compound scaling: widths are ``width_mult * w``
rounded to a multiple of 8 (never below 90% of the exact value), repeats are ``ceil(depth_mult
* r)``; B2 uses width 1.1, depth 1.2, dropout 0.3 (B0: 1.0, 1.0, 0.2). The SE block squeezes to
``max(1, block_input_width // 4)`` channels. These choices reproduce the reference parameter
counts (B0 5,288,548; B2 9,109,994 at 1000 classes). BatchNorm uses eps=1e-3 (TF reference) and
PyTorch's default momentum.

Every MBConv is ``[expand conv1x1-BN-SiLU] -> depthwise convKxK-BN-SiLU -> SE -> project
conv1x1-BN`` and, when stride is 1 and widths match, ``Add(drop_path(branch), x)``. SE is
``x * sigmoid(conv(SiLU(conv(avgpool(x)))))`` with the product through ``layers.Mul``.

Stochastic depth (``drop_path``, default 0 = off): the rate grows linearly from 0 to
``drop_path`` over the blocks, as in the reference; masks come from torch's global generator,
so they are reproducible under ``torch.manual_seed``, and eval mode is deterministic.

Small inputs (``small_input``; default: longer side <= 64 px) use CIFAR-style strides: the stem
and stage 2 (the first stride-2 stage) use stride 1, so the network downsamples 8x instead of
32x (32x32 -> 4x4 final maps). Widths and parameter counts are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from teachx.models._common import MODELS, image_hw, probability, resolve_small_input, set_dims
from teachx.models.base import Backbone, set_pyramid
from teachx.models.layers import Add, Mul, StochasticDepth, conv_bn, init_weights

# (expansion, kernel, stride, width, repeats)
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_SMALL_INPUT_STRIDE1_STAGE = 1  # index of the stage whose stride becomes 1 for small inputs
_BN_EPS = 1e-3

# variant -> (width multiplier, depth multiplier, default dropout, reference resolution)
VARIANTS = {"b0": (1.0, 1.0, 0.2, 224), "b2": (1.1, 1.2, 0.3, 260)}


def round_width(width: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` to ``width``, at least ``divisor`` and at least 90% of ``width``."""
    rounded = max(divisor, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return rounded


class SqueezeExcitation(nn.Module):
    """Channel gate ``x * sigmoid(expand(SiLU(reduce(avgpool(x)))))`` (Hu et al. 2018)."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Sigmoid()
        self.mul = Mul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return self.mul(x, gate)


class MBConv(nn.Module):
    """Inverted residual block with depthwise conv and SE (Sandler et al. 2018; Tan & Le 2019)."""

    def __init__(
        self, in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int, drop_path: float = 0.0
    ):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(in_channels, hidden, 1, activation=nn.SiLU(), bn_eps=_BN_EPS))
        layers.append(
            conv_bn(hidden, hidden, kernel, stride=stride, groups=hidden, activation=nn.SiLU(), bn_eps=_BN_EPS)
        )
        layers.append(SqueezeExcitation(hidden, max(1, in_channels // 4)))
        layers.append(conv_bn(hidden, out_channels, 1, bn_eps=_BN_EPS))
        self.branch = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        if self.residual:
            self.drop_path = StochasticDepth(drop_path) if drop_path > 0 else nn.Identity()
            self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.residual:
            out = self.add(self.drop_path(out), x)
        return out


class EfficientNet(Backbone):
    """EfficientNet with compound scaling; ``features(x)`` is the pooled head vector (1280 for B0)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        drop_path: float = 0.0,
        small_input: bool = False,
    ):
        super().__init__()
        stem = round_width(32 * width_mult)
        stride_so_far = 1 if small_input else 2
        layers: list[nn.Module] = [
            conv_bn(in_channels, stem, 3, stride=stride_so_far, activation=nn.SiLU(), bn_eps=_BN_EPS)
        ]
        strides, widths = [stride_so_far], [stem]
        repeats = [math.ceil(r * depth_mult) for *_, r in B0_STAGES]
        total, block_id, width = sum(repeats), 0, stem
        for s, ((expansion, kernel, stride, out, _), n) in enumerate(zip(B0_STAGES, repeats)):
            if small_input and s == _SMALL_INPUT_STRIDE1_STAGE:
                stride = 1
            out = round_width(out * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(
                    MBConv(
                        width, out, expansion, kernel, stride if i == 0 else 1, drop_path=drop_path * block_id / total
                    )
                )
                width, block_id = out, block_id + 1
            layers.append(nn.Sequential(*blocks))
            stride_so_far *= stride
            strides.append(stride_so_far)
            widths.append(out)
        head = 4 * width
        layers.append(conv_bn(width, head, 1, activation=nn.SiLU(), bn_eps=_BN_EPS))
        strides.append(stride_so_far)
        widths.append(head)
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(head, num_classes)
        set_dims(self, in_channels, num_classes, head)
        set_pyramid(self, strides, widths)
        init_weights(self)


def _build(
    variant: str,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    dropout: float | None,
    drop_path: float,
    small_input: bool | None,
) -> EfficientNet:
    width_mult, depth_mult, default_dropout, _ = VARIANTS[variant]
    hw = image_hw(image_size)
    return EfficientNet(
        in_channels,
        num_classes,
        width_mult,
        depth_mult,
        dropout=default_dropout if dropout is None else probability("dropout", dropout),
        drop_path=probability("drop_path", drop_path),
        small_input=resolve_small_input(small_input, hw),
    )


@MODELS.register("efficientnet_b0", "efficientnet-b0", "efficientnetb0")
def efficientnet_b0(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    dropout: float | None = None,
    drop_path: float = 0.0,
    small_input: bool | None = None,
) -> EfficientNet:
    """EfficientNet-B0 (Tan & Le 2019).

    Args:
        dropout: dropout before the classifier; null: 0.2
        drop_path: stochastic-depth rate of the last block (scaled linearly from 0 over the blocks)
        small_input: CIFAR-style strides (8x downsampling) instead of ImageNet's (32x); null: auto, true for inputs up to 64 px
    """
    return _build("b0", in_channels, num_classes, image_size, dropout, drop_path, small_input)


@MODELS.register("efficientnet_b2", "efficientnet-b2", "efficientnetb2")
def efficientnet_b2(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    dropout: float | None = None,
    drop_path: float = 0.0,
    small_input: bool | None = None,
) -> EfficientNet:
    """EfficientNet-B2 (Tan & Le 2019): B0 with 1.1x width, 1.2x depth.

    Args:
        dropout: dropout before the classifier; null: 0.3
        drop_path: stochastic-depth rate of the last block (scaled linearly from 0 over the blocks)
        small_input: CIFAR-style strides (8x downsampling) instead of ImageNet's (32x); null: auto, true for inputs up to 64 px
    """
    return _build("b2", in_channels, num_classes, image_size, dropout, drop_path, small_input)
