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

**Masks** (:func:`concept_masks`): a concept heatmap also holds the relevance of what the image shares with
images without the concept (a garment's collar and sleeves), and a fixed share of each image's maximum cut it
poorly (the timestamp's masks took in the collar, the frame's none of the frame). So each heatmap is
contrasted: minus the mean heatmap of its ``NEIGHBOURS`` nearest *references* (in pixel distance), the class's
images the concept scores lowest, and kept only where the image differs from those neighbours (what the
artefact changed is where the image is unlike similar images without it); the mask is the high part of an Otsu
split of the positive values left. Nothing here reads annotations: the references are chosen by the concept's
own scores. On the Fashion-MNIST artefact benchmarks (docs/studies/r2r-fashion-mnist.md, from the first layer)
it raised the mean mask IoU at p = 0.5 of the timestamp from 0.40 to 0.53, of the frame from 0.00 to 0.58 and
of the band-aid from 0.14 to 0.42.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.reveal.cav import otsu_threshold

LOCALISE_METHODS = ("lrp", "gradient")

#: the images of the concept's class that it scores lowest, which stand for the class without it
REFERENCES = 400
#: each localised image is contrasted with this many nearest references
NEIGHBOURS = 5
#: a pixel is changed where it differs from its nearest references' mean by more than this (normalised units)
CHANGED = 0.1


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
    (an image without positive relevance gets an empty mask). The former rule of the reveal's masks."""
    h = np.clip(np.asarray(heatmaps, dtype=np.float64), 0, None)
    peak = h.reshape(len(h), -1).max(1).reshape(-1, *([1] * (h.ndim - 1)))
    return (h >= threshold * peak) & (peak > 0)


def otsu_masks(heatmaps: np.ndarray) -> np.ndarray:
    """Boolean masks: per image, its positive values at or above the Otsu cut of them (the cut that splits them
    in the two most distinct parts: all of them when they are equal or fewer than 3); none without any."""
    h = np.asarray(heatmaps, dtype=np.float64)
    out = h > 0
    for i, img in enumerate(h):
        pos = img[img > 0]
        if len(pos) >= 3:
            out[i] &= img >= otsu_threshold(pos)
    return out


def nearest(images: np.ndarray, references: np.ndarray, k: int, same: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, k) indices of each image's ``k`` nearest ``references`` by Euclidean distance over all pixels, never
    one that ``same`` (N, R) marks as the image itself unless nothing else is left."""
    a = np.asarray(images, dtype=np.float32).reshape(len(images), -1)  # float32: large images stay affordable
    b = np.asarray(references, dtype=np.float32).reshape(len(references), -1)
    d2 = (a * a).sum(1, dtype=np.float64)[:, None] + (b * b).sum(1, dtype=np.float64)[None, :] - 2.0 * (a @ b.T)
    if same is not None:
        d2 = np.where(same, np.inf, d2)
    return np.argsort(d2, axis=1, kind="stable")[:, : min(k, len(b))]


def contrast(
    heatmaps: np.ndarray,
    images: np.ndarray,
    ref_heatmaps: np.ndarray,
    ref_images: np.ndarray,
    neighbours: int = NEIGHBOURS,
    changed: float = CHANGED,
    same: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Each (H, W) heatmap of the (C, H, W) ``images`` minus the mean heatmap of its ``neighbours`` nearest
    references, zero where the image is within ``changed`` of their mean image in every channel: the relevance
    the image has and similar images without the concept lack, where it differs from them. ``same`` (N, R):
    which reference is the image itself (never its own neighbour)."""
    if len(ref_images) == 0:
        raise ValueError("contrasting heatmaps needs at least one reference image")
    images, ref_images = np.asarray(images, np.float32), np.asarray(ref_images, np.float32)
    near = nearest(images, ref_images, neighbours, same)
    base = np.asarray(ref_heatmaps, np.float64)[near].mean(1)
    moved = np.abs(images - ref_images[near].mean(1)).max(1) > changed
    return (np.asarray(heatmaps, np.float64) - base) * moved


def reference_indices(scores: np.ndarray, indices: np.ndarray, limit: int = REFERENCES) -> np.ndarray:
    """The ``limit`` ``indices`` with the lowest concept ``scores`` (the images of the class least like the
    concept), lowest first."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[:limit]
    return np.asarray(indices)[order]


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


def concept_masks(
    model: nn.Module,
    batches,
    indices: np.ndarray,
    references: np.ndarray,
    layer: nn.Module,
    cav: np.ndarray,
    method: str = "lrp",
    batch_size: int = 64,
    step: Optional["callable"] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, masks) of the images ``indices`` for ``cav`` at ``layer``: the concept heatmaps, and masks from
    them contrasted with the ``references`` (:func:`contrast`, :func:`otsu_masks`). ``batches(idx)`` gives the
    normalised images the model reads."""
    heat = heatmaps_in_batches(model, batches, indices, layer, cav, method, batch_size, step)
    if len(indices) == 0:
        return heat, np.zeros(heat.shape, dtype=bool)
    ref_heat = heatmaps_in_batches(model, batches, references, layer, cav, method, batch_size)
    images = _images(batches, indices, batch_size)
    ref_images = _images(batches, references, batch_size)
    same = np.asarray(indices)[:, None] == np.asarray(references)[None, :]
    return heat, otsu_masks(contrast(heat, images, ref_heat, ref_images, same=same))


def _images(batches, indices: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [batches(indices[s : s + batch_size]).float().cpu().numpy() for s in range(0, len(indices), batch_size)]
    )
