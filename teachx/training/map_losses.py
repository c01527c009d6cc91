"""Losses between IMPACTX's built-in maps and the teacher's maps (``impactx.map_loss``).

Every loss is ``loss(pred, target) -> scalar`` on (B, C, H, W) maps, the mean over images of a
per-image quantity computed over all C*H*W values (so each image weighs the same):

- ``mse``: mean squared error over all values (the paper's; today's default).
- ``pearson``: 1 - the per-image Pearson correlation. Invariant to the prediction's per-image
  offset and scale, so the decoder is not rewarded for reproducing the dataset-mean map's level.
  A constant target (e.g. an all-zero map) has no correlation: its images contribute 1 and no
  gradient.
- ``pearson_anchored``: ``pearson`` plus ``(mean(p)/rms(p) - mean(t)/rms(t))^2`` per image
  (rms: root mean square; each ratio lies in [-1, 1], so the term is bounded). It reads only the
  map's offset relative to its spread: for a prediction ``a t + b`` (a > 0) it is zero exactly when
  ``b = 0``. So the shape is learned as with ``pearson`` (and every
  offset-free measure -- correlations, pixel-flipping order -- reads the same), while the map's zero
  is the teacher's: red and blue read as for and against, as in a signed teacher map.
- ``cosine``: 1 - the per-image cosine similarity (uncentred correlation). Invariant to the
  prediction's positive scale only: the zero of the map stays meaningful, so a signed teacher map
  (SHAP, LRP: red for, blue against) is matched in sign, not just in shape up to an offset.
- ``standardized_mse``: MSE between the prediction and the per-image *standardised target*
  ((t - mean) / std). Standardising the prediction as well would give exactly 2 * (1 - Pearson r)
  (mean((zp - zt)^2) = 2 - 2r with population standard deviations), i.e. the ``pearson`` loss
  at twice the weight, so only the target is standardised: every image's map counts with unit
  variance, and the prediction stays on a fixed scale (its offset and scale are learned).
- ``rank``: a pairwise ranking loss (RankNet, Burges et al. 2005) on the per-image standardised
  prediction: for ``pairs`` random pixel pairs (i, j) per image whose target values differ by more
  than ``tie`` x the image's max abs(target), ``softplus(-sign(t_i - t_j) * (p_i - p_j))``, averaged
  over the valid pairs. It asks only for the order of the pixels, which is what MoRF/LeRF read.
  Pairs are drawn from torch's global generator (the trainer seeds it per epoch, so runs stay
  reproducible and resumable); pass ``pairs`` explicitly for a fixed set.

``map_target_pool: K`` (``pooled``) average-pools prediction and target by K x K (partial edge
windows average their valid pixels) before any of these losses: the model is then asked for the
coarse layout of the map, not its pixel-level detail.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from teachx.config.schema import add_hook
from teachx.errors import ConfigError
from teachx.registry import Registry
from teachx.teachers.postprocess import normalize_maps

MapLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MAP_LOSSES: Registry[MapLossFn] = Registry("map loss")

_EPS = 1e-8


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1)


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row (B, N) z-scores with the population standard deviation; a constant row becomes 0."""
    centred = x - x.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + eps)


@MAP_LOSSES.register("mse")
def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of (B, N) rows; a zero row gives 0 (its image contributes no gradient)."""
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True)


@MAP_LOSSES.register("pearson", "correlation")
def pearson_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _flat(pred), _flat(target)
    return (1.0 - _cosine(_centred(p), _centred(t))).mean()  # Pearson r = cosine of the centred maps


@MAP_LOSSES.register("pearson_anchored")
def pearson_anchored_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _flat(pred), _flat(target)
    r = _cosine(_centred(p), _centred(t))
    root_n = p.shape[1] ** 0.5  # mean / rms = sum / (norm * sqrt(N))
    level = lambda x: x.sum(dim=1) / (x.norm(dim=1) * root_n).clamp_min(_EPS)  # noqa: E731
    return (1.0 - r + (level(p) - level(t)).pow(2)).mean()


@MAP_LOSSES.register("cosine")
def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1.0 - _cosine(_flat(pred), _flat(target))).mean()


@MAP_LOSSES.register("standardized_mse", "standardised_mse", "zmse")
def standardized_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _flat(pred), _flat(target)
    return (p - standardize(t)).pow(2).mean(dim=1).mean()


def sample_pairs(batch: int, n: int, pairs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, pairs) index tensors i, j with i != j, from torch's global generator."""
    i = torch.randint(0, n, (batch, pairs), device=device)
    j = (i + torch.randint(1, max(2, n), (batch, pairs), device=device)) % n  # never equal to i (n >= 2)
    return i, j


@MAP_LOSSES.register("rank", "pairwise_rank")
def rank_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    n_pairs: int = 1024,
    tie: float = 1e-3,
) -> torch.Tensor:
    p, t = standardize(_flat(pred)), _flat(target)
    if pairs is None:
        pairs = sample_pairs(p.shape[0], p.shape[1], n_pairs, p.device)
    i, j = pairs
    dt = t.gather(1, i) - t.gather(1, j)
    dp = p.gather(1, i) - p.gather(1, j)
    valid = (dt.abs() > tie * t.abs().amax(dim=1, keepdim=True)).float()
    per_pair = F.softplus(-torch.sign(dt) * dp) * valid
    per_image = per_pair.sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)
    return per_image.mean()


#: what each loss leaves free in the built-in map, so viewers compare it with the teacher's map on the
#: terms it was trained on: "none" (values: mse), "scale" (a positive factor per image: cosine,
#: pearson_anchored), "affine" (factor and offset per image: pearson, rank; standardized_mse fixes
#: them, but to the z-scored target's, so its maps too are compared as z-scores)
INVARIANCE = {
    "mse": "none",
    "pearson": "affine",
    "pearson_anchored": "scale",
    "cosine": "scale",
    "standardized_mse": "affine",
    "rank": "affine",
}


#: each loss as a figure names it, in the training loss "CE + λ·<this>"
FORMULA = {
    "mse": "MSE",
    "pearson": "(1 − Pearson)",
    "pearson_anchored": "(1 − Pearson + offset term)",
    "cosine": "(1 − cosine)",
    "standardized_mse": "MSE to the z-scored map",
    "rank": "pairwise rank loss",
}


def formula(name: str, pool: int = 1) -> str:
    """``impactx.map_loss`` (after ``map_target_pool``) in a figure's words, e.g. "(1 − Pearson)"."""
    text = FORMULA.get(MAP_LOSSES.canonical(name), name)
    return text + (f" on {pool}×{pool}-pooled maps" if pool > 1 else "")


def comparable(maps: np.ndarray, invariance: str) -> np.ndarray:
    """``maps`` (one image's map, any shape) with what its loss leaves free removed: unchanged for
    "none", divided by max abs(value) for "scale" (sign and zero kept, like ``teacher.normalize=maxabs``),
    z-scored for "affine". A map that is zero where it would be divided stays zero."""
    m = np.asarray(maps, dtype=np.float32)
    if invariance == "none":
        return m
    row = torch.from_numpy(m.reshape(1, -1).copy())
    if invariance == "affine":
        row = _centred(row)
    how = "std" if invariance == "affine" else "maxabs"  # teacher.normalize's own scalings
    return normalize_maps(row.view(1, 1, 1, -1), how).reshape(m.shape).numpy()


def pooled(maps: torch.Tensor, k: int) -> torch.Tensor:
    """K x K average pooling (partial edge windows average their valid pixels); k = 1: unchanged."""
    if k <= 1:
        return maps
    return F.avg_pool2d(maps.float(), kernel_size=k, stride=k, ceil_mode=True)


class MapLoss:
    """``impactx.map_loss`` after ``impactx.map_target_pool``: ``MapLoss("pearson", pool=4)(pred, target)``."""

    def __init__(self, name: str = "mse", pool: int = 1):
        self.name = MAP_LOSSES.canonical(name)
        self.fn = MAP_LOSSES.get(self.name)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ConfigError(f"impactx.map_target_pool must be an integer >= 1 (1 = no pooling), got {pool!r}")
        self.pool = pool

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ConfigError(
                f"built-in maps {tuple(pred.shape)} and teacher maps {tuple(target.shape)} differ in shape; "
                "set impactx.map_size to the teacher maps' resolution"
            )
        return self.fn(pooled(pred, self.pool), pooled(target, self.pool))

    def __repr__(self) -> str:
        return f"MapLoss({self.name!r}, pool={self.pool})"


def _check_config_map_loss(ic: Any) -> None:
    """The ``impactx.validate`` hook of IMPACTX's options (:class:`teachx.training.methods.impactx_options.ImpactxOptions`):
    map_loss is a registered map loss."""
    try:
        MAP_LOSSES.canonical(ic.map_loss)
    except ConfigError as exc:
        raise ConfigError(f"impactx.map_loss: {exc}") from None


add_hook("impactx.validate", _check_config_map_loss)
