"""Shared pieces of the backbone builders: the registry and option checking."""

from __future__ import annotations

import torch

from typing import Any, Callable

from teachx.errors import ConfigError
from teachx.models.base import Backbone
from teachx.registry import Registry

# name -> builder(in_channels, num_classes, image_size: (H, W), **options) -> Backbone
MODELS: Registry[Callable[..., Backbone]] = Registry("backbone")

SMALL_INPUT_MAX = 64
"""Inputs whose longer side is at most this many pixels get CIFAR-style strides by default."""


def image_hw(image_size: Any) -> tuple[int, int]:
    """Normalise ``32`` or ``(28, 32)`` to ``(H, W)``; anything else is a ConfigError."""
    if isinstance(image_size, bool):
        raise ConfigError(f"image_size must be an int or (height, width), got {image_size!r}")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ConfigError(f"image_size must be an int or (height, width), got {image_size!r}; e.g. image_size=32")
    if min(hw) < 8:
        raise ConfigError(f"image_size {hw} is too small; backbones need at least 8x8 pixels")
    return hw


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return value.lower()


def resolve_small_input(small_input: bool | None, hw: tuple[int, int]) -> bool:
    """``None`` (auto) means CIFAR-style strides when the longer side is <= 64 px."""
    if small_input is None:
        return max(hw) <= SMALL_INPUT_MAX
    if not isinstance(small_input, bool):
        raise ConfigError(f"small_input must be true, false or null (auto), got {small_input!r}")
    return small_input


def set_dims(model: Backbone, in_channels: int, num_classes: int, feature_dim: int) -> None:
    model.in_channels = in_channels
    model.num_classes = num_classes
    model.feature_dim = feature_dim


@torch.no_grad()
def output_in_eval_mode(model: "torch.nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """``model(x)`` in eval mode without gradients, the training mode restored afterwards: a value
    function for training objectives that query the model on perturbed inputs."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)
