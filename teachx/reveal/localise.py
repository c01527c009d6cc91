"""Where in each image a concept sits: relevance started at a layer from activation x CAV and propagated to
the input (concept-conditional relevance, as Reveal-to-Revise localises an artefact with CRP), summed over
channels to one heatmap per image, and a mask by threshold.

``method="lrp"`` uses teachx's LRP (:meth:`teachx.teachers.lrp.Lrp.attribute_from_layer`, composite
epsilon_plus by default: R2R uses epsilon_plus_flat, whose flat rule spreads each first-layer relevance evenly
over the filter's window and so blurs a thin artefact -- on a 1-pixel timestamp it halves the mask IoU, see
docs/guide/reveal.md); ``method="gradient"`` is gradient x input of the concept score
sum(a.clamp(0) x cav) (x * d score / dx): no rules, the same answer on a bias-free linear path, and usable
for models LRP has no rules for.
The start keeps only positive activations (``a.clamp(min=0) * cav``): where the concept is present, not where
a unit is off.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError

LOCALISE_METHODS = ("lrp", "gradient")


def concept_start(cav: torch.Tensor) -> "callable":
    """start(a) = a.clamp(min=0) * cav, the CAV broadcast over the spatial positions of feature maps."""

    def start(a: torch.Tensor) -> torch.Tensor:
        w = cav.to(a.device, a.dtype)
        w = w.view(1, -1, *([1] * (a.dim() - 2)))
        if w.shape[1] != a.shape[1]:
            raise ConfigError(
                f"the CAV has {cav.numel()} entries, the layer {a.shape[1]} channels; fit it at this layer"
            )
        return a.clamp(min=0) * w

    return start


def localise(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: nn.Module,
    cav: np.ndarray | torch.Tensor,
    method: str = "lrp",
    composite: str = "epsilon_plus",
) -> torch.Tensor:
    """(B, H, W) concept heatmaps of ``inputs`` (normalised images) for ``cav`` at ``layer``."""
    start = concept_start(torch.as_tensor(np.asarray(cav), dtype=torch.float32))
    if method == "lrp":
        from teachx.teachers.lrp import Lrp

        rel = Lrp(composite=composite).attribute_from_layer(model, inputs, layer, start)
    elif method == "gradient":
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
        was_training = model.training
        try:
            model.eval()
            with torch.enable_grad():
                x = inputs.detach().requires_grad_(True)
                model(x)
                a = captured[0]
                # d/dx of the concept score sum(a.clamp(0) * cav): the seed is the CAV where the unit is on
                seed = start(a.detach().gt(0).to(a.dtype))
                (grad,) = torch.autograd.grad(a, x, seed, allow_unused=True)
        finally:
            handle.remove()
            model.train(was_training)
        rel = torch.zeros_like(inputs) if grad is None else grad.detach() * inputs
    else:
        raise ConfigError(f"unknown localisation method '{method}'; valid: {', '.join(LOCALISE_METHODS)}")
    return rel.sum(1)


def artefact_mask(heatmaps: torch.Tensor | np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Boolean masks: where a heatmap's positive relevance is at least ``threshold`` x that image's maximum
    (an image without positive relevance gets an empty mask)."""
    h = np.clip(np.asarray(heatmaps, dtype=np.float64), 0, None)
    peak = h.reshape(len(h), -1).max(1).reshape(-1, *([1] * (h.ndim - 1)))
    return (h >= threshold * peak) & (peak > 0)


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Intersection over union per image of boolean masks (N, H, W); 1 where both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    axes = tuple(range(1, p.ndim))
    inter, union = (p & t).sum(axes), (p | t).sum(axes)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def heatmaps_in_batches(
    model: nn.Module,
    batches,
    indices: np.ndarray,
    layer: nn.Module,
    cav: np.ndarray,
    method: str = "lrp",
    batch_size: int = 64,
    step: Optional["callable"] = None,
) -> np.ndarray:
    """:func:`localise` over ``batches(indices[chunk])``; (N, H, W) float32."""
    out = []
    for s in range(0, len(indices), batch_size):
        chunk = indices[s : s + batch_size]
        out.append(localise(model, batches(chunk), layer, cav, method).float().cpu().numpy())
        if step is not None:
            step(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)
