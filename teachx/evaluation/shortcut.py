"""Wrong-reason scores: how much of an explanation sits on a known artefact (shortcut benchmarks).

On a shortcut benchmark (``teachx.data.shortcuts``) every image's artefact is known (``Split.masks``),
so "right for the right reasons" (Ross, Hughes & Doshi-Velez 2017) can be measured directly: the
share of the total abs(attribution) that falls on the artefact. 0 means the explanation ignores the
artefact, 1 that it is all artefact. A map that spreads its mass evenly scores the mask's share of
the image (``area``), the chance level every real explanation is read against.

``wrong_reason_score`` scores given maps; ``artefact_share`` explains a model with teachx's own
teachers first; ``WrongReason`` is the same score under the metric contract (``METRICS``).

For a model with a built-in map (IMPACTX, ABN), ``honesty`` compares the built-in map's share with the
share of the same model's own input gradient (``HONESTY_REFERENCE``): 1 means the built-in map shows the
artefact as much as the model's gradient does, well below 1 that it hides an artefact the model uses.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.evaluation.base import METRICS, ExplainFn, Metric, MetricResult, eval_mode
from teachx.registry import declare_measure
from teachx.teachers import build
from teachx.teachers.base import Teacher


def _masks(masks: torch.Tensor, n: int, hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) masks as a float64 (N, H, W) 0/1 tensor."""
    masks = masks if isinstance(masks, torch.Tensor) else torch.tensor(np.asarray(masks))  # copies read-only memmaps
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != n or tuple(masks.shape[-2:]) != tuple(hw):
        raise ConfigError(f"masks must be ({n}, {hw[0]}, {hw[1]}) (1 on the artefact), got {tuple(masks.shape)}")
    return (masks != 0).double()


def mask_area(masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of each image the mask covers: the score of a map with equal mass everywhere."""
    masks = masks if isinstance(masks, torch.Tensor) else torch.tensor(np.asarray(masks))
    masks = masks[:, 0] if masks.dim() == 4 else masks
    return (masks != 0).double().flatten(1).mean(1)


def wrong_reason_score(attributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) float64: sum of abs(attribution) inside the mask over the total sum of abs(attribution).

    ``attributions``: (N, C, H, W) or (N, 1, H, W), summed over channels after taking absolute values (every
    channel's evidence counts, whatever its sign); ``masks``: (N, H, W), nonzero on the artefact.
    An all-zero map scores 0 (it puts nothing on the artefact), so the result has no NaN.
    """
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4:
        shape = tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions).__name__
        raise ConfigError(f"attributions must be (N, C, H, W) maps, got {shape}")
    n, _, h, w = attributions.shape
    magnitude = attributions.detach().double().abs().sum(1)  # (N, H, W)
    inside = (magnitude * _masks(masks, n, (h, w)).to(magnitude.device)).flatten(1).sum(1)
    total = magnitude.flatten(1).sum(1)
    return torch.where(
        total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total)
    )


declare_measure(
    "gradient_share",
    "The share of the model's absolute input gradient for the true class that falls on the "
    "artefact of the test images.",
    False,
)
declare_measure(
    "lrp_share", "The share of the model's absolute LRP relevance for the true class that falls on the artefact.", False
)
declare_measure(
    "artefact_area",
    "The artefact's share of the image: what a map that ignores the artefact puts there on average.",
    None,
)


declare_measure(
    "built_in_share",
    "The share of the model's absolute built-in map (IMPACTX, ABN) of the true class that falls on the "
    "artefact of the test images.",
    None,
)
declare_measure(
    "honesty",
    "The built-in map's artefact share divided by the same model's input-gradient artefact share: 1, the "
    "built-in map shows the artefact as much as the model's own gradient does; well below 1, it hides it.",
    None,
)

#: the post-hoc map (an ``artefact_share`` method) whose artefact share ``honesty`` divides by
HONESTY_REFERENCE = "gradient"


def honesty(built_in_share: Optional[float], reference_share: Optional[float]) -> Optional[float]:
    """The built-in map's artefact share over the same model's post-hoc share (``HONESTY_REFERENCE``);
    None where either is missing or the post-hoc map puts nothing on the artefact (no ratio to take)."""
    if built_in_share is None or reference_share is None or not reference_share > 0:
        return None
    return float(built_in_share) / float(reference_share)


def artefact_share(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    methods: Union[Sequence[Union[str, Teacher]], Mapping[str, Union[str, Teacher]]] = ("gradient", "lrp"),
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean wrong-reason score of ``model``'s post-hoc explanations of the label class, per method.

    ``x``: (N, C, H, W) inputs as the model takes them (normalised); ``y``: (N,) labels; ``masks``:
    (N, H, W). ``methods``: teacher names (``teachx teachers``; ``gradient`` is plain saliency, ``lrp``
    uses its default composite), built teachers, or ``{label: name or teacher}``. Returns
    ``{method: mean score, ..., "area": mean mask area}`` -- ``area`` is the chance level (a map
    with equal mass everywhere scores it).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConfigError(
            f"x must be an image batch (N, C, H, W), got {tuple(getattr(x, 'shape', ())) or type(x).__name__}"
        )
    n, _, h, w = x.shape
    y = torch.as_tensor(y).long().reshape(-1)
    if y.shape[0] != n:
        raise ConfigError(f"y must hold one label per image ({n}), got {y.shape[0]}")
    masks = _masks(masks, n, (h, w))
    pairs = (
        list(methods.items())
        if isinstance(methods, Mapping)
        else [(m if isinstance(m, str) else m.name, m) for m in methods]
    )
    labels = [str(label) for label, _ in pairs]
    if len(set(labels)) != len(labels) or "area" in labels:
        raise ConfigError(
            f"methods need distinct names other than 'area', got {labels}; pass them as {{label: teacher}}"
        )
    teachers = {label: (build(m) if isinstance(m, str) else m) for label, (_, m) in zip(labels, pairs)}
    device = next((p.device for p in model.parameters()), x.device)
    out: dict[str, float] = {}
    with eval_mode(model):
        for name, teacher in teachers.items():
            scores = []
            for start in range(0, n, batch_size):
                xb = x[start : start + batch_size].to(device)
                maps = teacher.attribute(model, xb, y[start : start + batch_size].to(device))
                scores.append(wrong_reason_score(maps, masks[start : start + batch_size]).cpu())
            out[name] = float(torch.cat(scores).mean()) if scores else float("nan")
    out["area"] = float(mask_area(masks).mean()) if n else float("nan")
    return out


@METRICS.register("wrong_reason")
class WrongReason(Metric):
    """Share of abs(attribution) on a known artefact (Ross et al. 2017's "wrong reasons"); lower is
    better, a map with equal mass everywhere scores the mask's area (``extra["area"]``).

    Args:
        masks: (B, H, W) artefact masks of the inputs (``Split.masks`` of a shortcut benchmark)
    """

    name = "wrong_reason"
    description = "The share of a map's absolute relevance that falls on the annotated artefact region."
    higher_is_better = False
    category = "localisation"
    needs_model = False

    def __init__(self, masks: Optional[torch.Tensor] = None):
        self.masks = masks

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: Any,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert maps is not None
        if self.masks is None:
            raise ConfigError(
                "metric 'wrong_reason' needs the artefact masks: build_metric('wrong_reason', masks=<(B, H, W) tensor>)"
            )
        masks = _masks(self.masks, inputs.shape[0], tuple(inputs.shape[-2:])).to(inputs.device)
        return self._result(wrong_reason_score(maps, masks), extra={"area": float(mask_area(masks).mean())})
