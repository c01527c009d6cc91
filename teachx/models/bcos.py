"""B-cos networks (Böhle, Fritz, Schiele, CVPR 2022; B-cos v2, TPAMI 2024): backbones whose every
layer is a dynamic linear map, so a prediction is exactly explained by its input contributions.

A B-cos unit with unit-norm weight ``w_hat`` computes ``|cos(x, w)|^(B-1) * (w_hat^T x)`` on its
input patch ``x``: with B = 2 (the default) only inputs aligned with the weight pass on much signal.
There are no biases, no ReLUs (the alignment scaling is the non-linearity) and, following v2, no
centering anywhere: the optional normalisation divides by a batch standard deviation and scales
(``norm="bnu"``: uncentered BatchNorm without bias), and pooling is linear (average) or a selection
(max). MaxOut (``max_out`` > 1 units per channel, the max kept, as in v1) is optional.

Input encoding. A B-cos layer only sees directions, so the image enters as ``[x, 1 - x]`` (6 channels
for RGB, 2 for grayscale) with ``x`` the image in [0, 1]: every pixel then has a norm of at least
1/sqrt(2) and black and white differ in angle, not only length. teachx feeds models images
normalised with the training split's mean and std, so the stem (``body[0]``) first undoes that
normalisation, ``x = x_n * std + mean``, from two buffers that the trainer fills before training
(``teachx.models.base.tell_input_normalization``) and that checkpoints carry. A model that was never
trained by teachx has mean 0 and std 1: it reads its inputs as images already in [0, 1].

Explanation mode (``explanation_mode(model)``) detaches every dynamic factor: the ``|cos|^(B-1)``
scales and the normalisation's standard deviations. The network is then linear in the encoded
input, ``logits = W(x) x_enc``, and the gradient of logit ``y`` with respect to ``x_enc`` is the row
``W(x)_y``. ``model.contributions(x, y)`` returns ``W(x)_y * x_enc`` with the two encoding channels of
each colour channel added, (B, C, H, W): its sum over channels and pixels is the logit ``y``, up to
float rounding (there are no biases to leave out). The ``bcos`` teacher returns these maps; ``model.explain(x, y)``
and ``model.forward_all(x, y)`` give their sum over channels as the model's own map, which evaluations score as
they score the built-in maps of IMPACTX and ABN (``teachx.models.explains_itself``).

The logits are divided by a fixed ``temperature``, as in the papers: B-cos outputs are bounded by
the input norm and shrink with each ``|cos|`` factor, so without it a softmax stays nearly uniform.
teachx trains with cross-entropy; v2 recommends binary cross-entropy on one-hot labels, which teachx's
classifier training does not offer, so these backbones are trained with cross-entropy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.models._common import MODELS, choice, image_hw, positive_int, set_dims
from teachx.models.base import Backbone, set_pyramid
from teachx.models.layers import Add

_EPS = 1e-6
"""Added to squared patch norms (as the reference implementation does) so an all-zero patch has no 0/0."""


def _alignment_scale(linear: torch.Tensor, norm: torch.Tensor, b: float, detach: bool) -> torch.Tensor:
    """``|cos|^(B-1) = |w_hat^T x / ||x|| |^(B-1)``; detached in explanation mode (then a constant)."""
    if detach:
        linear, norm = linear.detach(), norm.detach()
    cos = linear / norm
    if b == 2:
        return cos.abs()
    if b > 2:
        return cos.abs().pow(b - 1)
    return (cos.abs() + _EPS).pow(b - 1)  # 1 < B < 2: |cos|^(B-1) has an infinite slope at 0


def _check_b(b: Any) -> float:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 <= float(b) <= 10:
        raise ConfigError(f"b (the B-cos exponent) must be a number from 1 to 10, got {b!r}; the papers use 2")
    return float(b)


class BcosConv2d(nn.Module):
    """A B-cos convolution: unit-norm filters, output ``|cos(x, w)|^(B-1) * (w_hat^T x)`` per patch.

    ``max_out`` > 1 keeps the largest of that many units per output channel (MaxOut). No bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        b: float = 2.0,
        max_out: int = 1,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.b, self.max_out = float(b), max_out
        self.weight = nn.Parameter(torch.empty(out_channels * max_out, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="linear")
        self.detach = False  # explanation mode: set by ``explanation_mode``

    def unit_weight(self) -> torch.Tensor:
        """The filters scaled to unit L2 norm (the papers' w_hat)."""
        return self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]

    def patch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``||x||`` of every input patch the convolution reads, (B, 1, h, w)."""
        ones = torch.ones(1, self.in_channels, self.kernel_size, self.kernel_size, dtype=x.dtype, device=x.device)
        return (F.conv2d(x * x, ones, stride=self.stride, padding=self.padding) + _EPS).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.unit_weight(), stride=self.stride, padding=self.padding)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).amax(dim=2)
        if self.b == 1:
            return out
        return _alignment_scale(out, self.patch_norm(x), self.b, self.detach) * out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, b={self.b:g}, max_out={self.max_out}"
        )


class BcosLinear(nn.Module):
    """A B-cos fully connected layer, ``|cos(x, w)|^(B-1) * (w_hat^T x)`` per output, divided by
    ``temperature`` (1 except for the logit layer)."""

    def __init__(self, in_features: int, out_features: int, b: float = 2.0, max_out: int = 1, temperature: float = 1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.b, self.max_out, self.temperature = float(b), max_out, float(temperature)
        self.weight = nn.Parameter(torch.empty(out_features * max_out, in_features))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="linear")
        self.detach = False

    def unit_weight(self) -> torch.Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.unit_weight())
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_features, self.max_out)).amax(dim=2)
        if self.b != 1:
            norm = ((x * x).sum(dim=1, keepdim=True) + _EPS).sqrt()
            out = _alignment_scale(out, norm, self.b, self.detach) * out
        return out / self.temperature if self.temperature != 1 else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, b={self.b:g}, max_out={self.max_out}, "
            f"temperature={self.temperature:g}"
        )


class UncenteredBatchNorm2d(nn.Module):
    """B-cos v2's normalisation: ``x / sqrt(var + eps) * gamma`` per channel, no mean subtracted and no
    bias (both would break the dynamic linearity); the batch variance is detached in explanation mode."""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.detach = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = (x.detach() if self.detach else x).var(dim=(0, 2, 3), unbiased=False)
            if not self.detach:  # an explanation leaves the model as it was
                with torch.no_grad():
                    self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach())
        else:
            var = self.running_var
        return x * (self.weight / (var + self.eps).sqrt())[None, :, None, None]


class BcosStem(nn.Module):
    """``body[0]`` of every B-cos backbone: undo teachx's input normalisation, encode ``[x, 1 - x]``,
    then the first B-cos convolution (and normalisation, if any)."""

    def __init__(self, in_channels: int, conv: BcosConv2d, norm: nn.Module | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Record the per-channel mean/std (in [0, 1] pixel units) that the inputs were normalised with."""
        mean_t = torch.as_tensor(list(mean), dtype=self.input_mean.dtype).reshape(-1)
        std_t = torch.as_tensor(list(std), dtype=self.input_std.dtype).reshape(-1)
        if mean_t.numel() == 1:
            mean_t, std_t = mean_t.expand(self.in_channels), std_t.expand(self.in_channels)
        if mean_t.numel() != self.in_channels or std_t.numel() != self.in_channels:
            raise ConfigError(
                f"the B-cos input encoding needs one mean and std per channel ({self.in_channels}), "
                f"got {mean_t.numel()} and {std_t.numel()}"
            )
        self.input_mean.copy_(mean_t)
        self.input_std.copy_(std_t)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> the encoding ``[x, 1 - x]`` of the [0, 1] image, (B, 2C, H, W)."""
        pixels = x * self.input_std[None, :, None, None] + self.input_mean[None, :, None, None]
        return torch.cat([pixels, 1 - pixels], dim=1)

    def forward_encoded(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(encoded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encoded(self.encode(x))


_DETACHABLE = (BcosConv2d, BcosLinear, UncenteredBatchNorm2d)


@contextlib.contextmanager
def explanation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Detach every dynamic scale of ``model`` (B-cos alignment factors, normalisation statistics) while
    inside, so the network is the linear map ``W(x)`` and gradients give ``W(x)``; restored on exit."""
    modules = [m for m in model.modules() if isinstance(m, _DETACHABLE)]
    before = [m.detach for m in modules]
    for m in modules:
        m.detach = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.detach = flag


class BcosNetwork(Backbone):
    """A Backbone made of B-cos layers, with ``body[0]`` a ``BcosStem``; explained exactly by
    ``contributions``.

    It explains itself through the contract of the models with a built-in map (IMPACTX, ABN):
    ``forward_all(x, target)`` gives (logits, map) and ``explain(x, target)`` the map, here the contributions
    of ``target`` (default: the predicted class) summed over the colour channels, (B, 1, H, W), as the
    default channel reduction of teacher maps (``teacher.reduce=sum``) sums them; the map still adds up to the
    logit. So evaluations that score a model's own map (map quality, its faithfulness on the model, the share
    on a shortcut's artefact) score a B-cos model's contributions."""

    #: its map depends on the class explained (the contributions of that class's logit)
    per_class = True
    #: how reports and figures name its own map
    built_in_map_name = "B-cos contributions"

    def _encoded_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded input as a leaf that requires grad, logits computed from it)."""
        stem = self.body[0]
        encoded = stem.encode(x.detach()).detach().requires_grad_(True)
        h = stem.forward_encoded(encoded)
        for layer in list(self.body)[1:]:
            h = layer(h)
        return encoded, self.classifier(self.neck(h))

    def _explained(
        self, x: torch.Tensor, target: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, W(x)_target, x_enc) from one pass in explanation mode; ``target`` None: the predicted class,
        one class: the same for every image. Nothing keeps a gradient."""
        with explanation_mode(self), torch.enable_grad():
            encoded, logits = self._encoded_logits(x)
            if target is None:
                target = logits.detach().argmax(1)
            target = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(logits.shape[0])
            score = logits.gather(1, target.reshape(-1, 1)).sum()
            (weights,) = torch.autograd.grad(score, encoded)
        return logits.detach(), weights.detach(), encoded.detach()

    def dynamic_weights(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W(x)_target, x_enc): the rows of the dynamic linear map for class ``target`` (LongTensor (B,))
        and the encoded inputs they multiply, both (B, 2C, H, W). Parameters get no gradients."""
        return self._explained(x, target)[1:]

    def contributions(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``W(x)_target * x_enc`` with the ``x`` and ``1 - x`` channels of each colour added, (B, C, H, W):
        sums over channels and pixels to the logit of ``target``."""
        return _per_colour(*self.dynamic_weights(x, target))

    def forward_all(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the contributions of ``target`` summed over channels, (B, 1, H, W)) from one pass; ``target``:
        a class per image, or one for all; default the predicted class. Nothing keeps a gradient."""
        logits, weights, encoded = self._explained(x, target)
        return logits, _per_colour(weights, encoded).sum(1, keepdim=True)

    def explain(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's own map: the contributions of ``target`` (default: the predicted class) summed over
        channels, (B, 1, H, W); no parameter gets a gradient."""
        return self.forward_all(x, target)[1]


def _per_colour(weights: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """``weights * encoded`` (B, 2C, H, W) with the ``x`` and ``1 - x`` channels of each colour added, (B, C, H, W)."""
    parts = weights * encoded
    channels = parts.shape[1] // 2
    return parts[:, :channels] + parts[:, channels:]


def _norm_layer(norm: str, channels: int) -> nn.Module:
    return UncenteredBatchNorm2d(channels) if norm == "bnu" else nn.Identity()


def _pool(pool: str) -> nn.Module:
    return nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)


def _after_convs(size: int, padding: int) -> int:
    """Spatial size after conv5 (padding p) -> pool2 -> conv5 -> pool2 (as LeNet-5)."""
    return ((size + 2 * padding - 4) // 2 - 4) // 2


class BcosLeNet5(BcosNetwork):
    """LeNet-5's layout in B-cos layers: conv5x5(6) - pool - conv5x5(16) - pool - fc120 - fc84 - fc(classes),
    no activations and no biases; ``features(x)`` is the 84-d output of fc84."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        b: float = 2.0,
        max_out: int = 1,
        pool: str = "avg",
        padding: int | None = None,
        temperature: float = 1e-4,
    ):
        super().__init__()
        if padding is None:
            padding = 2 if min(image_size) < 32 else 0
        h, w = (_after_convs(s, padding) for s in image_size)
        if min(h, w) < 1:
            raise ConfigError(
                f"image_size {image_size} is too small for B-cos LeNet-5 with padding={padding}; "
                "use at least 16x16 pixels (or more padding)"
            )
        self.padding = padding
        stem = BcosStem(in_channels, BcosConv2d(2 * in_channels, 6, 5, padding=padding, b=b, max_out=max_out))
        self.body = nn.Sequential(stem, _pool(pool), BcosConv2d(6, 16, 5, b=b, max_out=max_out), _pool(pool))
        self.neck = nn.Sequential(
            nn.Flatten(),
            BcosLinear(16 * h * w, 120, b=b, max_out=max_out),
            BcosLinear(120, 84, b=b, max_out=max_out),
        )
        self.classifier = BcosLinear(84, num_classes, b=b, max_out=max_out, temperature=temperature)
        set_dims(self, in_channels, num_classes, 84)
        self.pyramid_taps, self.pyramid_channels, self.pyramid_strides = (1, 3), (6, 16), (2, 4)

    def pyramid_shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        first = [(s + 2 * self.padding - 4) // 2 for s in image_size]
        second = [(s - 4) // 2 for s in first]
        return [(6, *first), (16, *second)]


class BcosBasicBlock(nn.Module):
    """B-cos v2's residual block: conv3x3-norm-conv3x3-norm plus the shortcut (identity, or a B-cos
    conv1x1-norm where the shape changes), added; no activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, b: float, max_out: int, norm: str):
        super().__init__()
        self.branch = nn.Sequential(
            BcosConv2d(in_channels, out_channels, 3, stride=stride, padding=1, b=b, max_out=max_out),
            _norm_layer(norm, out_channels),
            BcosConv2d(out_channels, out_channels, 3, padding=1, b=b, max_out=max_out),
            _norm_layer(norm, out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                BcosConv2d(in_channels, out_channels, 1, stride=stride, b=b, max_out=max_out),
                _norm_layer(norm, out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.branch(x), self.shortcut(x))


class BcosCifarResNet(BcosNetwork):
    """The 6n+2-layer CIFAR ResNet in B-cos layers (B-cos v2's cifar10_resnet): conv3x3(width) -> three
    stages of n blocks (width, 2 width, 4 width; stride 1, 2, 2) -> global average pool -> B-cos linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 20,
        width: int = 16,
        b: float = 2.0,
        max_out: int = 1,
        norm: str = "bnu",
        temperature: float = 0.1,
    ):
        super().__init__()
        blocks = (depth - 2) // 6
        stem_conv = BcosConv2d(2 * in_channels, width, 3, padding=1, b=b, max_out=max_out)
        layers: list[nn.Module] = [BcosStem(in_channels, stem_conv, _norm_layer(norm, width))]
        channels = width
        strides, widths = [1], [width]
        for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers.append(
                nn.Sequential(
                    *(
                        BcosBasicBlock(channels if i == 0 else out, out, stride if i == 0 else 1, b, max_out, norm)
                        for i in range(blocks)
                    )
                )
            )
            channels = out
            strides.append(strides[-1] * stride)
            widths.append(out)
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = BcosLinear(channels, num_classes, b=b, max_out=max_out, temperature=temperature)
        set_dims(self, in_channels, num_classes, channels)
        set_pyramid(self, strides, widths)


def _bcos_options(b: Any, max_out: Any, temperature: Any) -> tuple[float, int, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not float(temperature) > 0:
        raise ConfigError(f"temperature (the logit divisor) must be a positive number, got {temperature!r}")
    return _check_b(b), positive_int("max_out", max_out), float(temperature)


@MODELS.register("bcos_lenet5", "bcos-lenet5", "bcos_lenet")
def bcos_lenet5(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    b: float = 2.0,
    max_out: int = 1,
    pool: str = "avg",
    padding: int | None = None,
    temperature: float = 1e-4,
) -> BcosLeNet5:
    """B-cos LeNet-5 (Böhle et al. 2022): LeNet-5's layers as B-cos layers on the [x, 1-x] encoded image; exactly explained by its contributions (teacher bcos).

    Args:
        b: the B-cos exponent B (1: a linear network; the papers use 2)
        max_out: MaxOut units per channel (1: none, as in B-cos v2; the first paper used 2)
        pool: avg (linear, as B-cos v2) or max
        padding: zero padding of the first convolution; null: 2 for inputs below 32 px, else 0
        temperature: the fixed divisor of the logits
    """
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
        raise ConfigError(f"padding must be a non-negative integer or null (auto), got {padding!r}")
    b, max_out, temperature = _bcos_options(b, max_out, temperature)
    return BcosLeNet5(
        in_channels,
        num_classes,
        image_hw(image_size),
        b=b,
        max_out=max_out,
        pool=choice("pool", pool, ("avg", "max")),
        padding=padding,
        temperature=temperature,
    )


@MODELS.register("bcos_resnet", "bcos-resnet", "bcos_resnet20")
def bcos_resnet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    depth: int = 20,
    width: int = 16,
    b: float = 2.0,
    max_out: int = 1,
    norm: str = "bnu",
    temperature: float = 0.1,
) -> BcosCifarResNet:
    """B-cos CIFAR ResNet (B-cos v2): resnet_cifar's layout in B-cos layers, no ReLUs or biases; exactly explained by its contributions (teacher bcos).

    Args:
        depth: layers, 6n+2: 8, 14, 20, 32, 44, 56 or 110
        width: channels of the first stage (doubled in each of the next two)
        b: the B-cos exponent B (1: a linear network; the papers use 2)
        max_out: MaxOut units per channel (1: none, as in B-cos v2)
        norm: bnu (B-cos v2's uncentered BatchNorm without bias) or none
        temperature: the fixed divisor of the logits
    """
    image_hw(image_size)
    depth = positive_int("depth", depth)
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"bcos_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    b, max_out, temperature = _bcos_options(b, max_out, temperature)
    return BcosCifarResNet(
        in_channels,
        num_classes,
        depth=depth,
        width=positive_int("width", width),
        b=b,
        max_out=max_out,
        norm=choice("norm", norm, ("bnu", "none")),
        temperature=temperature,
    )
