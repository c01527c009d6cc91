"""Complexity: how concentrated is a map? (Concise maps are easier to read.)

Both metrics look only at the maps (channels summed, then absolute values), not at the model.

- ``Complexity`` (Bhatt et al. 2020): Shannon entropy (nats) of the fractional contributions
  p_i = abs(a_i) / sum_j abs(a_j). log(n) for a uniform map, 0 for a single pixel. Lower is better.
- ``Sparseness`` (Chalasani et al. 2020): Gini index of abs(a). 0 for a uniform map,
  (n - 1) / n for a single pixel. Higher is better.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from teachx.evaluation.base import METRICS, ExplainFn, Metric, MetricResult


def _abs_pixels(maps: torch.Tensor, reduce_channels: bool) -> torch.Tensor:
    if maps.dim() == 4 and reduce_channels:
        maps = maps.sum(dim=1)
    return maps.double().flatten(1).abs()


def fractional_entropy(maps: torch.Tensor, reduce_channels: bool = True) -> torch.Tensor:
    """Entropy of abs(a) / sum abs(a) per map (0 * log 0 = 0); NaN for an all-zero map."""
    a = _abs_pixels(maps, reduce_channels)
    total = a.sum(1, keepdim=True)
    p = a / total
    terms = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    entropy = -terms.sum(1)
    return torch.where(total.squeeze(1) > 0, entropy, torch.full_like(entropy, float("nan")))


def gini_index(maps: torch.Tensor, reduce_channels: bool = True) -> torch.Tensor:
    """Gini index of abs(a) per map: sum_i (2i - n - 1) a_(i) / (n sum a), a sorted ascending.

    An all-zero map is as even as a map can be: 0 (Quantus adds 1e-7 to every value, which
    gives the same 0 there but biases near-zero maps; we do not).
    """
    a = _abs_pixels(maps, reduce_channels).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=torch.float64)
    total = a.sum(1)
    gini = ((2 * i - n - 1) * a).sum(1) / (n * total)
    return torch.where(total > 0, gini, torch.zeros_like(gini))


class _MapOnlyMetric(Metric):
    category = "complexity"
    needs_model = False

    def __init__(self, reduce_channels: bool = True):
        self.reduce_channels = bool(reduce_channels)

    def options(self) -> dict[str, Any]:
        return {"reduce_channels": self.reduce_channels}


@METRICS.register("complexity", "entropy")
class Complexity(_MapOnlyMetric):
    """Entropy of the fractional contribution of each pixel (Bhatt et al. 2020); lower is better."""

    name = "complexity"
    description = "The entropy of the map's absolute relevance: how evenly it spreads over the pixels."
    higher_is_better = False

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: Any,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert maps is not None
        return self._result(fractional_entropy(maps, self.reduce_channels))


@METRICS.register("sparseness", "gini")
class Sparseness(_MapOnlyMetric):
    """Gini index of abs(attributions) (Chalasani et al. 2020); higher is better."""

    name = "sparseness"
    description = "The Gini index of the map's absolute relevance: how much of it sits on few pixels."
    higher_is_better = True

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: Any,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert maps is not None
        return self._result(gini_index(maps, self.reduce_channels))
