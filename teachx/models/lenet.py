"""LeNet-5 (LeCun et al. 1998) in the layout commonly used today.

conv5x5(6) - act - pool2 - conv5x5(16) - act - pool2 - fc120 - act - fc84 - act - fc(num_classes).

Differences from the 1998 paper, chosen because they are what "LeNet-5" means in practice and
what explanation methods handle cleanly: ReLU instead of scaled tanh and max pooling instead of
trainable sub-sampling (both switchable: ``activation="tanh"``, ``pool="avg"``); C3 is fully
connected to S2 (no sparse connection table); the output is a linear layer, not RBF units.

Inputs smaller than 32 px (e.g. 28x28 MNIST) get ``padding=2`` on conv1, as usual, so the
feature maps have the sizes of the 32x32 original; the flatten size is derived from the input
size, so larger inputs work too (with a larger fc120).
"""

from __future__ import annotations

from torch import nn

from teachx.errors import ConfigError
from teachx.models._common import MODELS, choice, image_hw, set_dims
from teachx.models.base import Backbone

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _after_convs(size: int, padding: int) -> int:
    """Spatial size after conv5 (padding p) -> pool2 -> conv5 -> pool2."""
    size = size + 2 * padding - 4
    size //= 2
    size -= 4
    return size // 2


class LeNet5(Backbone):
    """LeNet-5; ``features(x)`` is the 84-d vector after fc84 and its activation."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        activation: str = "relu",
        pool: str = "max",
        padding: int | None = None,
    ):
        super().__init__()
        act = _ACTIVATIONS[activation]
        pool_cls = _POOLS[pool]
        if padding is None:
            padding = 2 if min(image_size) < 32 else 0
        h, w = (_after_convs(s, padding) for s in image_size)
        if min(h, w) < 1:
            raise ConfigError(
                f"image_size {image_size} is too small for LeNet-5 with padding={padding}; "
                "use at least 16x16 pixels (or more padding)"
            )
        self.padding = padding
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=padding),
            act(),
            pool_cls(2),
            nn.Conv2d(6, 16, 5),
            act(),
            pool_cls(2),
        )
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            act(),
            nn.Linear(120, 84),
            act(),
        )
        self.classifier = nn.Linear(84, num_classes)
        set_dims(self, in_channels, num_classes, 84)
        # pyramid: the two pooled feature maps (6 @ 14x14 and 16 @ 5x5 for 32x32 inputs)
        self.pyramid_taps, self.pyramid_channels, self.pyramid_strides = (2, 5), (6, 16), (2, 4)

    def pyramid_shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """LeNet's unpadded 5x5 convs shrink the maps: (S + 2p - 4) // 2, then (. - 4) // 2."""
        first = [(s + 2 * self.padding - 4) // 2 for s in image_size]
        second = [(s - 4) // 2 for s in first]
        return [(6, *first), (16, *second)]


@MODELS.register("lenet5", "lenet", "lenet-5")
def lenet5(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    activation: str = "relu",
    pool: str = "max",
    padding: int | None = None,
) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998): two 5x5 conv + pool stages, three fully connected layers.

    Args:
        activation: relu or tanh
        pool: max or avg
        padding: zero padding of the first convolution; null: 2 for inputs below 32 px (28x28 digits), else 0
    """
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
        raise ConfigError(f"padding must be a non-negative integer or null (auto), got {padding!r}")
    return LeNet5(
        in_channels,
        num_classes,
        image_hw(image_size),
        activation=choice("activation", activation, tuple(_ACTIVATIONS)),
        pool=choice("pool", pool, tuple(_POOLS)),
        padding=padding,
    )
