"""Explanation-quality metrics: faithfulness, randomisation, complexity, map agreement and wrong reasons.

Every metric is ``metric(model, inputs, targets, maps, explain_fn=None) -> MetricResult`` with
per-sample ``scores`` (B,), batched in torch on the inputs' device; ``METRICS`` maps names to
classes. See ``teachx/evaluation/README.md`` for definitions and where we differ from Quantus.
"""

from __future__ import annotations

from teachx.evaluation.agreement import map_agreement, map_mse, reconstruction_r2, top_k_intersection
from teachx.evaluation.base import (
    CATEGORIES,
    METRICS,
    Metric,
    MetricResult,
    build_metric,
    cosine,
    pearson,
    rankdata,
    spearman,
    ssim,
)
from teachx.evaluation.complexity import Complexity, Sparseness, fractional_entropy, gini_index
from teachx.evaluation.evaluate import DEFAULT_METRICS, evaluate_maps, random_maps
from teachx.evaluation.faithfulness import (
    Deletion,
    FaithfulnessCorrelation,
    Insertion,
    PerturbationCurve,
    PixelFlippingLeRF,
    PixelFlippingMoRF,
)
from teachx.evaluation.perturbation import gaussian_blur, make_baseline
from teachx.evaluation.randomisation import (
    MPRT,
    EfficientMPRT,
    fully_randomised,
    histogram_entropy,
    randomisable_layers,
    randomised_models,
)
from teachx.evaluation.shortcut import WrongReason, artefact_share, mask_area, wrong_reason_score

__all__ = [
    "CATEGORIES",
    "DEFAULT_METRICS",
    "METRICS",
    "MPRT",
    "Complexity",
    "Deletion",
    "EfficientMPRT",
    "FaithfulnessCorrelation",
    "Insertion",
    "Metric",
    "MetricResult",
    "PerturbationCurve",
    "PixelFlippingLeRF",
    "PixelFlippingMoRF",
    "Sparseness",
    "WrongReason",
    "artefact_share",
    "build_metric",
    "cosine",
    "evaluate_maps",
    "fractional_entropy",
    "fully_randomised",
    "gaussian_blur",
    "gini_index",
    "histogram_entropy",
    "make_baseline",
    "mask_area",
    "map_agreement",
    "map_mse",
    "pearson",
    "random_maps",
    "randomisable_layers",
    "randomised_models",
    "rankdata",
    "reconstruction_r2",
    "spearman",
    "ssim",
    "top_k_intersection",
    "wrong_reason_score",
]
