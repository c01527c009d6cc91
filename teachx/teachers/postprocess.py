"""Post-processing of attribution maps, shared by every teacher: channel reduction,
per-image normalisation and optional Gaussian smoothing.

Teachers return raw maps shaped like the inputs (B, C, H, W); what a consumer (IMPACTX's map
target, a metric, a plot) needs is usually one map per image on a comparable scale. Keeping it
here means every teacher gets the same, documented treatment.

Defaults, and why:
  - ``reduce='sum'``: SHAP, LRP, IG and Gradient x Input are additive (the attributions of all
    input elements sum to the explained output difference); summing the channels keeps that
    completeness per pixel. Grad-CAM and Occlusion store ``map / C`` in every channel, so the
    sum gives their map back exactly.
  - ``normalize='maxabs'``: divides each image's map by its largest abs(value), giving [-1, 1]
    while keeping the sign and the zero (a pixel with no attribution stays 0); images become
    comparable without the shift that min-max scaling would introduce.
  - ``smooth=0.0``: no blur unless asked; blurring changes the attribution.

Order in ``postprocess``: reduce, then smooth, then normalise (so the final scale is the
documented one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from teachx.errors import ConfigError

REDUCTIONS = ("sum", "mean", "abs_sum", "l2", "none")
NORMALIZATIONS = ("none", "maxabs", "l1", "std", "minmax", "percentile")


def _check_maps(maps: torch.Tensor) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        raise ValueError(f"maps must be a tensor (B, C, H, W), got {getattr(maps, 'shape', type(maps).__name__)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be floating point, got {maps.dtype}")


def _choice(kind: str, how: str, valid: tuple[str, ...]) -> str:
    key = str(how).lower()
    if key not in valid:
        raise ConfigError(f"unknown {kind} '{how}'; valid choices: {', '.join(valid)}")
    return key


def reduce_channels(maps: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) ('none' returns the maps unchanged, (B, C, H, W)).

    'sum' keeps completeness; 'mean' is 'sum' / C; 'abs_sum' and 'l2' (Euclidean norm over
    channels) give unsigned magnitude maps, for methods whose sign is not meaningful per channel.
    """
    how = _choice("channel reduction", how, REDUCTIONS)
    _check_maps(maps)
    if how == "none":
        return maps
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    if how == "abs_sum":
        return maps.abs().sum(dim=1, keepdim=True)
    return maps.square().sum(dim=1, keepdim=True).sqrt()


def normalize_maps(
    maps: torch.Tensor, how: str = "maxabs", eps: float = 1e-12, percentile: float = 99.0
) -> torch.Tensor:
    """Scale each image's map (all its channels together) independently of the batch.

    - 'none': unchanged;
    - 'maxabs': m / max abs(m) -> [-1, 1], sign and zero kept;
    - 'l1': m / sum abs(m) (total absolute attribution 1), sign and zero kept;
    - 'std': m / std(m), scale only -- no centring, so zero stays zero;
    - 'minmax': (m - min) / (max - min) -> [0, 1]; shifts zero, use for display only;
    - 'percentile': m / q, q the ``percentile``-th percentile of abs(m), clipped to [-1, 1]
      (robust to a few extreme pixels, as captum's visualisation does).

    Divisors are clamped to at least ``eps``, so an all-zero (or constant, for minmax) map
    becomes zeros instead of NaN.
    """
    how = _choice("normalization", how, NORMALIZATIONS)
    _check_maps(maps)
    if how == "none":
        return maps
    if not 0.0 < float(percentile) <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}")
    flat = maps.reshape(maps.shape[0], -1)
    if how == "minmax":
        low = flat.amin(dim=1, keepdim=True)
        span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(eps)
        return ((flat - low) / span).view_as(maps)
    if how == "maxabs":
        scale = flat.abs().amax(dim=1, keepdim=True)
    elif how == "l1":
        scale = flat.abs().sum(dim=1, keepdim=True)
    elif how == "std":
        scale = flat.std(dim=1, correction=0, keepdim=True)
    else:  # percentile
        scale = torch.quantile(flat.abs(), float(percentile) / 100.0, dim=1, keepdim=True)
    out = flat / scale.clamp_min(eps)
    if how == "percentile":
        out = out.clamp(-1.0, 1.0)
    return out.view_as(maps)


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's choice)."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def smooth_maps(maps: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Gaussian blur of every (H, W) map separately (separable: rows then columns).

    Borders replicate the edge value (scipy.ndimage mode 'nearest'), so a blurred map keeps its
    mean level near the border instead of fading to zero. ``sigma=0`` returns the maps unchanged.
    """
    _check_maps(maps)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
        raise ConfigError(f"smoothing sigma must be a number >= 0 (pixels), got {sigma!r}")
    if sigma == 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype).to(maps.device)
    radius = (kernel.numel() - 1) // 2
    batch, channels, height, width = maps.shape
    x = maps.reshape(batch * channels, 1, height, width)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.view(batch, channels, height, width)


def postprocess(
    maps: torch.Tensor,
    reduce: str = "sum",
    normalize: str = "maxabs",
    smooth: float = 0.0,
    eps: float = 1e-12,
    percentile: float = 99.0,
) -> torch.Tensor:
    """Reduce channels, then smooth, then normalise per image (see the module docstring)."""
    reduce = _choice("channel reduction", reduce, REDUCTIONS)
    normalize = _choice("normalization", normalize, NORMALIZATIONS)
    maps = reduce_channels(maps, reduce)
    maps = smooth_maps(maps, smooth)
    return normalize_maps(maps, normalize, eps=eps, percentile=percentile)


__all__ = [
    "NORMALIZATIONS",
    "REDUCTIONS",
    "gaussian_kernel1d",
    "normalize_maps",
    "postprocess",
    "reduce_channels",
    "smooth_maps",
]
