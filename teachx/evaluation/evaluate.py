"""Run several metrics over several map sets and get one JSON-able report.

Typical IMPACTX use: ``{"impactx": built_in_maps, "shap_post_hoc": teacher_maps}``; a
``"random"`` map set (seeded uniform noise) is added as the floor every real map must beat.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.evaluation.agreement import map_agreement
from teachx.evaluation.base import ExplainFn, Metric, build_metric, check_maps

DEFAULT_METRICS = ("pixel_flipping_morf", "pixel_flipping_lerf", "faithfulness_correlation", "complexity", "sparseness")


def random_maps(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Seeded uniform [0, 1) maps with the shape/device of ``like``: the chance-level floor."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def _summary(values: torch.Tensor) -> dict[str, Any]:
    values = values.detach().double().cpu()
    finite = values[torch.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std(unbiased=False)) if finite.numel() else None,
        "n": int(values.numel()),
        "n_undefined": int(values.numel() - finite.numel()),
        "values": [float(v) if v == v and abs(v) != float("inf") else None for v in values.tolist()],
    }


def evaluate_maps(
    model: Optional[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    maps_by_name: dict[str, torch.Tensor],
    metrics: Sequence[str | Metric] = DEFAULT_METRICS,
    explain_fns: Optional[dict[str, ExplainFn]] = None,
    include_random: bool = True,
    agreement_reference: Optional[str] = None,
    seed: int = 0,
    with_values: bool = True,
) -> dict[str, Any]:
    """Score every map set with every metric; return a JSON-able dict.

    Args:
        maps_by_name: name -> (B, 1|C, H, W) maps for ``inputs``.
        metrics: registered names or ``Metric`` instances. Metrics that re-explain models
            (``needs_teacher``, e.g. MPRT) are run once per entry of ``explain_fns`` instead.
        include_random: add a ``"random"`` map set (seeded) as the floor.
        agreement_reference: name of a map set; every other set gets ``map_agreement`` with it.

    Returns ``{"metrics": {name: {higher_is_better, category, options}}, "maps": {set: {metric:
    {mean, std, n, n_undefined, values[, mean_curve, curve_x]}}}, "explainers": {...},
    "agreement": {set: {measure: summary}}}``.
    """
    if not maps_by_name:
        raise ConfigError("maps_by_name is empty; pass at least one map set, e.g. {'impactx': maps}")
    map_sets = {name: check_maps(maps, inputs) for name, maps in maps_by_name.items()}
    if include_random and "random" not in map_sets:
        first = next(iter(map_sets.values()))
        map_sets["random"] = random_maps(first, seed)
    instances = [build_metric(m) for m in metrics]
    names = [m.name for m in instances]
    if len(set(names)) != len(names):
        raise ConfigError(f"metric names must be unique in one evaluation, got {names}")

    report: dict[str, Any] = {
        "metrics": {
            m.name: {"higher_is_better": m.higher_is_better, "category": m.category, "options": _jsonable(m.options())}
            for m in instances
        },
        "maps": {},
        "explainers": {},
        "n_images": int(inputs.shape[0]),
    }
    for set_name, maps in map_sets.items():
        report["maps"][set_name] = {
            m.name: m(model, inputs, targets, maps).to_dict(with_values) for m in instances if not m.needs_teacher
        }
    for explainer, fn in (explain_fns or {}).items():
        report["explainers"][explainer] = {
            m.name: m(model, inputs, targets, None, fn).to_dict(with_values) for m in instances if m.needs_teacher
        }
    if agreement_reference is not None:
        if agreement_reference not in map_sets:
            raise ConfigError(
                f"agreement_reference '{agreement_reference}' is not a map set; choose one of {', '.join(map_sets)}"
            )
        reference = map_sets[agreement_reference]
        report["agreement"] = {
            "reference": agreement_reference,
            "sets": {
                name: {
                    k: _summary(v) if with_values else _drop_values(_summary(v))
                    for k, v in map_agreement(maps, reference).items()
                }
                for name, maps in map_sets.items()
                if name != agreement_reference
            },
        }
    return report


def _drop_values(summary: dict[str, Any]) -> dict[str, Any]:
    summary.pop("values", None)
    return summary


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if isinstance(value, torch.Tensor):
            value = "tensor"
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out
