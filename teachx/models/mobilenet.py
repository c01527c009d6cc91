"""MobileNet v1 (Howard et al. 2017), following the Keras reference implementation.

Stem conv3x3(32, stride 2) then 13 depthwise-separable blocks (depthwise conv3x3 -> BN -> ReLU6
-> pointwise conv1x1 -> BN -> ReLU6) with pointwise widths/strides
64/1, 128/2, 128/1, 256/2, 256/1, 512/2, 5x 512/1, 1024/2, 1024/1. Convs have no bias and
BatchNorm uses eps=1e-3, as in Keras. The width multiplier ``alpha`` scales every width
(``int(width * alpha)``, as Keras does). neck = global average pool -> flatten -> dropout
(``dropout``, default 0; Keras uses 1e-3 before its 1x1-conv classifier, which here is an
equivalent nn.Linear).

Small inputs (``small_input``; default: longer side <= 64 px) use CIFAR-style strides: the stem
conv and the second block (128 wide) use stride 1 instead of 2, so the network downsamples 8x
instead of 32x (32x32 -> 4x4 final maps, the same as CIFAR ResNet-18). Widths and parameter
counts are unchanged.
"""

from __future__ import annotations

from torch import nn

from teachx.errors import ConfigError
from teachx.models._common import MODELS, image_hw, probability, resolve_small_input, set_dims
from teachx.models.base import Backbone, set_pyramid
from teachx.models.layers import conv_bn, init_weights

# (pointwise width, stride) of the 13 depthwise-separable blocks
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_SMALL_INPUT_STRIDE1 = {1}  # block indices whose stride becomes 1 for small inputs (with the stem)
_BN_EPS = 1e-3


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """depthwise conv3x3 -> BN -> ReLU6 -> pointwise conv1x1 -> BN -> ReLU6."""
    return nn.Sequential(
        conv_bn(in_channels, in_channels, 3, stride=stride, groups=in_channels, activation=nn.ReLU6(), bn_eps=_BN_EPS),
        conv_bn(in_channels, out_channels, 1, activation=nn.ReLU6(), bn_eps=_BN_EPS),
    )


class MobileNetV1(Backbone):
    """MobileNet v1 with width multiplier ``alpha``; ``features(x)`` is the pooled int(1024*alpha) vector."""

    def __init__(
        self, in_channels: int, num_classes: int, alpha: float = 1.0, dropout: float = 0.0, small_input: bool = False
    ):
        super().__init__()
        width = int(32 * alpha)
        stride_so_far = 1 if small_input else 2
        layers: list[nn.Module] = [
            conv_bn(in_channels, width, 3, stride=stride_so_far, activation=nn.ReLU6(), bn_eps=_BN_EPS)
        ]
        strides, widths = [stride_so_far], [width]
        for i, (out, stride) in enumerate(BLOCKS):
            if small_input and i in _SMALL_INPUT_STRIDE1:
                stride = 1
            layers.append(depthwise_separable(width, int(out * alpha), stride))
            width = int(out * alpha)
            stride_so_far *= stride
            strides.append(stride_so_far)
            widths.append(width)
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, num_classes)
        set_dims(self, in_channels, num_classes, width)
        set_pyramid(self, strides, widths)
        init_weights(self)


@MODELS.register("mobilenet", "mobilenet_v1", "mobilenetv1")
def mobilenet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    alpha: float = 1.0,
    dropout: float = 0.0,
    small_input: bool | None = None,
) -> MobileNetV1:
    """MobileNet v1 (Howard et al. 2017): 13 depthwise-separable blocks.

    Args:
        alpha: width multiplier of every layer, in (0, 4] (e.g. 0.25, 0.5, 0.75, 1.0)
        dropout: dropout before the classifier
        small_input: CIFAR-style strides (8x downsampling) instead of ImageNet's (32x); null: auto, true for inputs up to 64 px
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 4.0 or int(32 * alpha) < 1:
        raise ConfigError(f"alpha must be a width multiplier in (0, 4] (e.g. 0.25, 0.5, 0.75, 1.0), got {alpha!r}")
    hw = image_hw(image_size)
    return MobileNetV1(
        in_channels,
        num_classes,
        alpha=float(alpha),
        dropout=probability("dropout", dropout),
        small_input=resolve_small_input(small_input, hw),
    )
