"""Perturbation machinery shared by the faithfulness metrics: features, baselines, masks.

A *feature* is a pixel (all channels together) or a ``patch_size`` x ``patch_size`` patch; with
``reduce_channels=False`` and per-channel maps it is one channel of a pixel/patch. A feature's
relevance is the sum of the map over it. Masks are built on the (small) feature grid and expanded
to the image, so perturbing thousands of images x steps is a few tensor ops per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from teachx.errors import ConfigError

BASELINES = ("zero", "mean", "blur", "uniform")
Baseline = Union[str, float, torch.Tensor]


@dataclass(frozen=True)
class FeatureGrid:
    """How (B, F) feature vectors map back onto (B, C, H, W) images."""

    channels: int  # 1 (a feature covers all image channels) or C
    height: int  # feature grid height (H // patch_size)
    width: int
    patch_size: int

    @property
    def size(self) -> int:
        return self.channels * self.height * self.width

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, F) feature mask -> (N, channels, H, W) pixel mask (broadcastable over C)."""
        grid = mask.view(mask.shape[0], self.channels, self.height, self.width)
        p = self.patch_size
        if p > 1:
            grid = grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return grid


def feature_relevance(
    maps: torch.Tensor, inputs: torch.Tensor, patch_size: int = 1, reduce_channels: bool = True
) -> tuple[torch.Tensor, FeatureGrid]:
    """(B, F) relevance per feature (sum of the map over the feature) and the feature grid."""
    patch_size = int(patch_size)
    h, w = inputs.shape[-2:]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ConfigError(
            f"patch_size={patch_size} must be >= 1 and divide the image size {h}x{w}; pick a divisor such as 1, 2 or 4"
        )
    if reduce_channels or maps.shape[1] == 1:
        maps = maps.sum(dim=1, keepdim=True)
    rel = maps.double()
    if patch_size > 1:
        rel = F.avg_pool2d(rel, patch_size) * (patch_size * patch_size)
    grid = FeatureGrid(rel.shape[1], rel.shape[2], rel.shape[3], patch_size)
    return rel.flatten(1), grid


def make_baseline(
    inputs: torch.Tensor,
    baseline: Baseline = "zero",
    blur_sigma: float = 5.0,
    noise_range: Optional[tuple[float, float]] = None,
    seed: int = 0,
) -> torch.Tensor:
    """The replacement image per input, (B, C, H, W).

    - ``"zero"``: 0, i.e. the dataset mean when inputs are normalised;
    - ``"mean"``: the image's own per-channel mean;
    - ``"blur"``: a Gaussian blur of the image (sigma ``blur_sigma`` pixels; Petsiuk et al.'s
      insertion canvas);
    - ``"uniform"``: seeded uniform noise in ``noise_range`` (default: the image's min..max);
    - a float or a tensor broadcastable to the inputs (e.g. a dataset mean image).
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(inputs.device, inputs.dtype).expand_as(inputs)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline == "blur":
        return gaussian_blur(inputs, blur_sigma)
    if baseline == "uniform":
        generator = torch.Generator(device=inputs.device).manual_seed(int(seed))
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        if noise_range is None:
            low = inputs.flatten(1).min(1).values.view(-1, 1, 1, 1)
            high = inputs.flatten(1).max(1).values.view(-1, 1, 1, 1)
        else:
            low, high = (torch.tensor(float(v), device=inputs.device, dtype=inputs.dtype) for v in noise_range)
        return low + (high - low) * noise
    raise ConfigError(f"unknown baseline {baseline!r}; valid baselines: {', '.join(BASELINES)}, a number or a tensor")


def gaussian_blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel, edges replicated; kernel radius ceil(3 sigma)."""
    if sigma <= 0:
        return inputs.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=inputs.device, dtype=inputs.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = inputs.shape[1]
    x = F.pad(inputs, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


def check_baseline(baseline: Baseline) -> Baseline:
    if isinstance(baseline, str) and baseline not in BASELINES:
        raise ConfigError(
            f"unknown baseline {baseline!r}; valid baselines: {', '.join(BASELINES)}, a number or a tensor"
        )
    return baseline


def perturbation_ranks(relevance: torch.Tensor, most_relevant_first: bool, use_abs: bool = False) -> torch.Tensor:
    """(B, F) position of each feature in the perturbation order (0 = perturbed first).

    Ties keep feature (raster) order, so the order is deterministic on every device.
    """
    key = relevance.abs() if use_abs else relevance
    order = key.argsort(dim=1, descending=most_relevant_first, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks
