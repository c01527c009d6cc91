"""``rrr_revealed``: Right for the Right Reasons (Ross, Hughes, Doshi-Velez 2017) on the artefact masks that
`teachx reveal` localised, so that the input-gradient penalty needs no annotation.

Fine-tunes the model a concept was computed on (see :mod:`teachx.training.methods.concept_method`) with

    L = CE(f(x), y) + lam * mean_n sum_d (A_nd * d/dx_nd sum_k log p_k(x_n))^2

RRR's loss and penalty (:func:`teachx.training.methods.rrr.rrr_penalty`), with A the artefact mask Reveal
localised for training image n (its heatmap along the CAV, contrasted and thresholded: :func:`teachx.reveal.localise.concept_masks`). The masks come with the concept file:
``teachx revise RUN_DIR --concept NAME --method rrr_revealed`` writes them into the correction concept
(arrays ``masks``, (M, H, W), and ``localised``, the M training-split indices they belong to). A training
image Reveal did not localise has no mask: it adds nothing to the penalty (its CE still counts). The mask is
looked up per image before augmentation and cropped and flipped with it, as RRR's annotation masks are.

``freeze`` defaults to ``none`` here (the concept methods' recipe freezes the features): the penalty is on
the input gradient, which the convolutions that see the masked pixels shape most directly. With the
features frozen the gradient still flows to the input (the penalty is defined, and trains the dense layers
to weigh the artefact's features less), but the artefact stays in the features; RRR trains every layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.training.concepts import Concept
from teachx.training.methods.base import METHODS, MethodContext, Option
from teachx.training.methods.concept_method import CONCEPT_OPTIONS, ConceptMethod, ConceptTask
from teachx.training.methods.rrr import RRRTask

#: the concept arrays the method reads: the masks, and the training-split index of each
MASKS, MASK_INDICES = "masks", "localised"


class RevealedMasks:
    """The mask A of each training image by dataset index, (B, 1, H, W) float: the concept's mask where Reveal
    localised the image, zeros elsewhere."""

    def __init__(self, masks: np.ndarray, indices: np.ndarray, n_train: int):
        self.masks = np.asarray(masks, dtype=bool)
        self.row = np.full(n_train, -1, dtype=np.int64)  # dataset index -> row of ``masks`` (-1: none)
        self.row[np.asarray(indices, dtype=np.int64)] = np.arange(len(self.masks))

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.row[indices.cpu().numpy()]
        out = np.zeros((len(rows), 1, *self.masks.shape[1:]), dtype=np.float32)
        have = rows >= 0
        out[have, 0] = self.masks[rows[have]]
        return torch.from_numpy(out)


def revealed_masks(
    concept: Concept, where: str, method: str = "rrr_revealed", use: str = "penalises the input gradient on"
) -> tuple[np.ndarray, np.ndarray]:
    """(masks (M, H, W), training indices (M,)) the concept carries; one line naming the fix if it has none
    (``method`` and what it does with the masks, ``use``, in the user's words)."""
    if MASKS not in concept.arrays or MASK_INDICES not in concept.arrays:
        raise ConfigError(
            f"concept '{where}' carries no artefact masks; method {method} {use} the "
            "masks `teachx reveal RUN_DIR --class C --concept top --name NAME` localises: correct with "
            f"`teachx revise RUN_DIR --concept NAME --method {method}`, which puts them into its concept file"
        )
    masks, indices = np.asarray(concept.arrays[MASKS]), np.asarray(concept.arrays[MASK_INDICES])
    if masks.ndim != 3 or indices.shape != (len(masks),) or not np.issubdtype(indices.dtype, np.integer):
        raise ConfigError(
            f"concept '{where}': its masks must be (images, height, width) with one training index each, got "
            f"{masks.shape} and {indices.shape}; make the concept again with `teachx revise`"
        )
    return masks, indices


def check_masks_fit(masks: np.ndarray, indices: np.ndarray, dataset, where: str) -> None:
    """Refuse, in one line, masks made on other data: of another image size, or of training images the split lacks."""
    if masks.shape[1:] != tuple(dataset.image_size):
        raise ConfigError(
            f"concept '{where}' has masks of {masks.shape[1]}x{masks.shape[2]} pixels but the "
            f"images are {dataset.image_size[0]}x{dataset.image_size[1]}; make the concept on this run's data"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= len(dataset.train)):
        raise ConfigError(
            f"concept '{where}' has masks of training images up to index {int(indices.max())}, "
            f"but the training split has {len(dataset.train)}; make the concept on this run's data"
        )


class RevealedRRRTask(RRRTask, ConceptTask):
    """RRR's task on the revealed masks, with the concept methods' frozen normalisation layers held in eval mode."""

    def __init__(self, model: nn.Module, mask_of, lam: float, target: str, frozen_norms, label_smoothing: float):
        super().__init__(model, mask_of, lam, target, label_smoothing)
        self.frozen_norms = list(frozen_norms or [])

    def loss(self, x, y, mask):
        self.hold_frozen()
        return super().loss(x, y, mask)


@METHODS.register("rrr_revealed", "rrr-revealed")
class RRRRevealed(ConceptMethod):
    concept_needs_masks = True
    name = "rrr_revealed"
    loss_text = "CE + λ·input-gradient penalty on the revealed masks"
    summary = (
        "fine-tune the baseline with RRR's input-gradient penalty inside the artefact masks teachx reveal "
        "localised (a concept file from teachx revise)"
    )
    reference = (
        "Ross, Hughes, Doshi-Velez 2017, Right for the Right Reasons; masks from Reveal to Revise (Pahde et al. 2023)"
    )
    options = {
        **CONCEPT_OPTIONS,
        "freeze": Option(
            "none",
            "none (every layer trains: the input gradient is shaped by the convolutions that see the masked pixels) "
            "| features (only dense layers train; the gradient still reaches the input)",
            choices=("features", "none"),
        ),
        "lam": Option(
            1000.0, "weight of the input-gradient penalty (RRR's paper uses 1000 on Decoy-MNIST)", minimum=0.0
        ),
        "target": Option(
            "all",
            "whose log-probability is differentiated: all (the paper: sum over classes) | label",
            choices=("all", "label"),
        ),
    }

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        return revealed_masks(self.concept(), self.opts["concept"])

    def check_data(self, plan) -> None:
        super().check_data(plan)
        masks, indices = self.masks()
        check_masks_fit(masks, indices, plan.dataset, self.opts["concept"])

    def record(self) -> dict[str, Any]:
        rec = super().record()
        rec["concept"]["n_masks"] = int(len(self.masks()[1]))
        return rec

    def task(self, model: nn.Module, ctx: MethodContext) -> RevealedRRRTask:
        _, norms = self.prepare(model)
        masks, indices = self.masks()
        mask_of = RevealedMasks(masks, indices, len(ctx.plan.dataset.train))
        return RevealedRRRTask(
            model, mask_of, self.opts["lam"], self.opts["target"], norms, self.cfg.train.label_smoothing
        )
