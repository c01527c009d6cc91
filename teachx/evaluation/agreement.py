"""Agreement between two sets of maps, e.g. IMPACTX's built-in maps vs a teacher applied post hoc.

``map_agreement(a, b)`` gives per-image Spearman, Pearson, cosine similarity and top-k
intersection; ``reconstruction_r2(pred, target, mean_map)`` says how much better a predicted map
is than the best constant guess (the mean training map). All per image, batched, on the maps'
device.
"""

from __future__ import annotations

from typing import Optional

import torch

from teachx.errors import ConfigError
from teachx.evaluation.base import check_maps, cosine, pearson, spearman


def _pair(a: torch.Tensor, b: torch.Tensor, reduce_channels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = check_maps(a), check_maps(b).to(a.device)
    if a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ConfigError(f"map sets do not match: {tuple(a.shape)} vs {tuple(b.shape)}; both need (B, *, H, W)")
    if reduce_channels or a.shape[1] != b.shape[1]:
        a, b = a.sum(1, keepdim=True), b.sum(1, keepdim=True)
    return a.double().flatten(1), b.double().flatten(1)


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the k largest values per row; ties go to the lower index."""
    return values.argsort(dim=1, descending=True, stable=True)[:, :k]


def top_k_intersection(
    a: torch.Tensor, b: torch.Tensor, k: int | float = 0.1, use_abs: bool = False, reduce_channels: bool = True
) -> torch.Tensor:
    """Fraction of a's top-k features that are also among b's top-k (k an int or a fraction)."""
    fa, fb = _pair(a, b, reduce_channels)
    if use_abs:
        fa, fb = fa.abs(), fb.abs()
    k = _resolve_k(k, fa.shape[1])
    in_a = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, top_k_indices(fa, k), True)
    in_b = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, top_k_indices(fb, k), True)
    return (in_a & in_b).sum(1).double() / k


def _resolve_k(k: int | float, n: int) -> int:
    if isinstance(k, float) and 0 < k < 1:
        k = max(1, round(k * n))
    k = int(k)
    if not 1 <= k <= n:
        raise ConfigError(f"top-k size {k} must be between 1 and the {n} features per map")
    return k


def map_agreement(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int | float = 0.1,
    topk_abs: bool = False,
    reduce_channels: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-image agreement of two map sets (B, 1|C, H, W): each entry a (B,) tensor.

    ``spearman`` (rank correlation, average ranks for ties), ``pearson``, ``cosine`` (NaN where a
    map is constant / all zero), ``top_k_intersection`` (k features, an int or a fraction of the
    pixels; by signed value, or by abs(value) with ``topk_abs``). Channels are summed first.
    """
    fa, fb = _pair(a, b, reduce_channels)
    return {
        "spearman": spearman(fa, fb),
        "pearson": pearson(fa, fb),
        "cosine": cosine(fa, fb),
        "top_k_intersection": top_k_intersection(a, b, k, topk_abs, reduce_channels),
    }


def map_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error between two (B, ...) map sets of one shape."""
    if pred.shape != target.shape:
        raise ConfigError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} maps must have one shape")
    return (pred.double() - target.double()).pow(2).flatten(1).mean(1)


def reconstruction_r2(
    pred: torch.Tensor, target: torch.Tensor, mean_map: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-image R^2 of predicted maps against the best constant predictor.

    ``r2 = 1 - mse(pred, target) / mse(mean_map, target)``: 1 is a perfect reconstruction, 0 is
    no better than always predicting ``mean_map`` (the mean training map, broadcast to the
    batch; default: the mean of ``target`` over the batch), negative is worse. NaN where the
    target equals the mean map.
    """
    if mean_map is None:
        mean_map = target.double().mean(0, keepdim=True)
    mean_map = mean_map.to(target.device)
    try:
        reference = mean_map.double().expand_as(target)
    except RuntimeError as error:
        raise ConfigError(
            f"mean_map {tuple(mean_map.shape)} does not broadcast to the maps {tuple(target.shape)}"
        ) from error
    error = map_mse(pred, target)
    floor = map_mse(reference, target)
    r2 = 1 - error / floor
    return torch.where(floor > 0, r2, torch.full_like(r2, float("nan")))
