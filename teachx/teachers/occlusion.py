"""Occlusion (Zeiler & Fergus 2014) as a teacher, batched.

A window (all channels at once) slides over the image; each pixel gets the average, over the
windows that cover it, of ``f_t(x) - f_t(x with the window set to baseline)``. Windows start at
0, stride, 2*stride, ... and the last one may stick out of the image (it is clipped), exactly as
captum's ``Occlusion`` places them, so every pixel is covered.

Map convention (as for Grad-CAM): one value per pixel location, spread evenly over the C
channels (each holds ``value / C``), so the default channel-sum reduction returns the occlusion
map itself. captum repeats the value in every channel instead: ours times C equals captum's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.teachers.base import TEACHERS, Teacher
from teachx.teachers.gradients import TargetLike, as_float32, as_target, check_inputs, target_logits


def _pair(name: str, value: Any) -> tuple[int, int]:
    values = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"occlusion {name} must be a positive integer or a pair (h, w), got {value!r}")
    return int(values[0]), int(values[1])


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top/left offsets of the windows along one axis (the last one may be clipped)."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def window_masks(
    tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int, window: tuple[int, int]
) -> torch.Tensor:
    """Boolean masks (N, 1, H, W) of the windows with the given corners, built on the fly."""
    rows = torch.arange(height, device=tops.device)
    cols = torch.arange(width, device=tops.device)
    in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + window[0])  # (N, H)
    in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + window[1])  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def spread_over_windows(
    values: torch.Tensor, height: int, width: int, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Sum, per pixel, of the values (B, n_tops, n_lefts) of the windows covering it -> (B, H, W).

    A ``fold`` (the adjoint of unfold) on a canvas big enough for the clipped last windows,
    so no (windows x pixels) mask matrix is ever built.
    """
    batch, n_tops, n_lefts = values.shape
    canvas = ((n_tops - 1) * stride[0] + window[0], (n_lefts - 1) * stride[1] + window[1])
    patches = values.reshape(batch, 1, n_tops * n_lefts).expand(batch, window[0] * window[1], n_tops * n_lefts)
    summed = torch.nn.functional.fold(patches, canvas, kernel_size=window, stride=stride)
    return summed[:, 0, :height, :width]


@TEACHERS.register("occlusion")
class Occlusion(Teacher):
    """Occlusion (Zeiler & Fergus 2014): the drop of the target logit when a patch is replaced by a baseline.

    Args:
        window: side of the square patch, or [h, w]
        stride: step between patches; null: the window (non-overlapping patches)
        baseline: fill value of occluded pixels, in the model's (normalised) input space
        internal_batch_size: occluded images per forward pass (memory only; does not change the maps)
    """

    name = "occlusion"

    def __init__(
        self,
        window: int | tuple[int, int] = 4,
        stride: int | tuple[int, int] | None = None,
        baseline: float = 0.0,
        internal_batch_size: int = 256,
    ):
        self.window = _pair("window", window)
        self.stride = self.window if stride is None else _pair("stride", stride)
        if self.stride[0] > self.window[0] or self.stride[1] > self.window[1]:
            raise ConfigError(
                f"occlusion stride {self.stride} is larger than the window {self.window}, which would leave "
                "pixels unexplained; use stride <= window"
            )
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
            raise ConfigError(f"occlusion baseline must be a number (the fill value), got {baseline!r}")
        self.baseline = float(baseline)
        if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1:
            raise ConfigError(f"occlusion internal_batch_size must be an integer >= 1, got {internal_batch_size!r}")
        self.internal_batch_size = internal_batch_size

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        if inputs.dim() != 4:
            raise ConfigError(f"occlusion explains images (B, C, H, W), got inputs of shape {tuple(inputs.shape)}")
        batch, channels, height, width = inputs.shape
        if self.window[0] > height or self.window[1] > width:
            raise ConfigError(
                f"occlusion window {self.window} is larger than the {height}x{width} images; use a smaller window"
            )
        x = inputs.detach()
        target = as_target(target, batch, x.device)
        tops = torch.tensor(window_starts(height, self.window[0], self.stride[0]), device=x.device)
        lefts = torch.tensor(window_starts(width, self.window[1], self.stride[1]), device=x.device)
        n_windows = len(tops) * len(lefts)

        with torch.no_grad():
            clean = target_logits(model(x), target)  # (B,)
            # Rows are (image, window) pairs, image-major, windows row-major; chunked to bound memory.
            rows = batch * n_windows
            drops = torch.empty(rows, dtype=clean.dtype, device=x.device)
            for start in range(0, rows, self.internal_batch_size):
                idx = torch.arange(start, min(start + self.internal_batch_size, rows), device=x.device)
                image, window = idx // n_windows, idx % n_windows
                masks = window_masks(tops[window // len(lefts)], lefts[window % len(lefts)], height, width, self.window)
                occluded = torch.where(masks, self.baseline, x[image])
                drops[idx] = clean[image] - target_logits(model(occluded), target[image])
            grid = (batch, len(tops), len(lefts))
            summed = spread_over_windows(drops.view(grid), height, width, self.window, self.stride)
            ones = torch.ones((1,) + grid[1:], dtype=drops.dtype, device=x.device)
            counts = spread_over_windows(ones, height, width, self.window, self.stride)
            mean_drop = summed / counts  # every pixel is covered by at least one window
            maps = (mean_drop.unsqueeze(1) / channels).expand(batch, channels, height, width)
        return as_float32(maps)

    def options(self) -> dict[str, Any]:
        return {"window": list(self.window), "stride": list(self.stride), "baseline": self.baseline}
