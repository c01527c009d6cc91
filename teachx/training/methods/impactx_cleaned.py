"""``impactx_cleaned``: IMPACTX (:mod:`teachx.training.methods.impactx`) trained towards teacher maps with the
artefact that `teachx reveal` localised removed -- a correction along a revealed concept that needs no annotation.

For every training image the concept localised (its arrays ``masks``, (M, H, W), and ``localised``, the M
training-split indices, as :mod:`teachx.training.methods.rrr_revealed` reads them), the teacher map is set to
zero inside that image's mask, in every channel; outside the mask, and on every image the concept did not
localise, it is the teacher's map unchanged. Zero is "no relevance" whatever the teacher's post-processing
(signed maps: neither for nor against the class; non-negative maps: the least relevant value), so the built-in
map is trained to give the artefact none while keeping everything else the teacher saw. No annotation is
read: the masks are the concept's alone.

The cleaned maps are a store of their own (:func:`teachx.teachers.store.derived_store`), next to the teacher's,
keyed by the teacher store's key and the masks' content: the teacher's maps are never overwritten, and the
cleaned ones are digested, verified, resumed and shared like every store's.

With self-teaching (``impactx.self_teach_every``, on by default for the ``unet_input`` decoder) the maps are
re-made from the model being trained every few epochs; those are cleaned the same way as they are read, so no
epoch's target gives the artefact relevance.

Unlike the concept methods that fine-tune the baseline, IMPACTX trains its model (M, LEP, decoder, classifier)
from scratch, so `teachx revise` keeps the run's training settings (epochs, learning rate). The teacher maps are
the run's teacher method (``teacher.*``) on the model the concept was fitted on: the run's baseline, whose
digest the concept must carry. Its options are ``method.options.concept`` and IMPACTX's options
(:mod:`teachx.training.methods.impactx_options`; also written ``impactx.KEY``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.teachers.store import MapStore, derived_store
from teachx.training.concepts import Concept, describe as describe_concept
from teachx.training.methods.base import METHODS, MethodContext
from teachx.training.methods.concept_method import (
    CONCEPT_OPTIONS,
    concept_record,
    load_checked_concept,
    require_concept_option,
)
from teachx.training.methods.impactx import Impactx
from teachx.training.methods.impactx_options import OPTION_NAMES
from teachx.training.methods.rrr_revealed import RevealedMasks, check_masks_fit, revealed_masks

#: bumped only if the cleaning rule changes the cleaned maps: part of their store's key
CLEANING_VERSION = 1


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def cleaned_maps(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``maps`` (B, C, H, W) with every channel set to zero where ``masks`` (B, 1, H, W) is non-zero."""
    return maps.masked_fill(masks.bool().expand_as(maps), 0.0)


def clean_store(
    store: MapStore, masks: np.ndarray, indices: np.ndarray, log: Callable[[str], None] = print
) -> MapStore:
    """The teacher's ``store`` with each localised training image's map zeroed inside its mask, as a store of its
    own (see the module docstring); ``masks`` (M, H, W) belong to the training images ``indices`` (M,)."""
    mask_of = RevealedMasks(masks, indices, store.maps.shape[0])
    material = {
        "derived": f"zeroed inside the artefact masks of {len(indices)} localised training images",
        "cleaned": CLEANING_VERSION,
        # the masks' content decides the cleaned maps: two concepts with the same masks share a store
        "masks": _sha256(str(mask_of.masks.shape).encode(), np.packbits(mask_of.masks).tobytes()),
        "localised": _sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()),
    }
    return derived_store(
        store, material, lambda idx: cleaned_maps(store.read(idx), mask_of(torch.from_numpy(idx))), log=log
    )


class CleanedSource:
    """A map source (``MapSource``) whose maps are cleaned as they are read: self-teaching's refreshed maps."""

    def __init__(self, source, mask_of: RevealedMasks):
        self.source, self.mask_of = source, mask_of

    def classes_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        classes_for = getattr(self.source, "classes_for", None)
        return classes_for(indices) if classes_for is not None else None

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        return cleaned_maps(self.source(indices), self.mask_of(indices))


class CleanedRefreshes:
    """Self-teaching's epoch hook, with every map source it swaps in cleaned inside the masks: the model being
    trained re-explains the training images, and its maps would bring the artefact back otherwise."""

    def __init__(self, hook, task, mask_of: RevealedMasks):
        self.hook, self.task, self.mask_of = hook, task, mask_of
        self.initial = task.source  # the cleaned teacher maps' source (cleaned in their store already)

    @property
    def refreshes(self) -> list[dict[str, Any]]:
        return self.hook.refreshes

    def __call__(self, epoch: int) -> None:
        self.hook(epoch)
        if self.task.source is not self.initial and not isinstance(self.task.source, CleanedSource):
            self.task.source = CleanedSource(self.task.source, self.mask_of)


@METHODS.register("impactx_cleaned", "impactx-cleaned")
class ImpactxCleaned(Impactx):
    name = "impactx_cleaned"
    summary = (
        "IMPACTX trained towards the teacher's maps with the artefact teachx reveal localised zeroed (a concept "
        "file from teachx revise; options: concept and IMPACTX's)"
    )
    reference = "Apicella et al. 2025, IMPACTX; masks from Reveal to Revise (Pahde et al. 2023)"
    label = "IMPACTX (cleaned maps)"
    # its study units are of the methods' kind, keyed by its name and options (IMPACTX's kind is IMPACTX's alone)
    unit_kind = "method"
    unit_key_prefix = "m-"
    corrects_concept = True
    concept_needs_masks = True
    options = {"concept": CONCEPT_OPTIONS["concept"], **Impactx.options}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._concept: Optional[Concept] = None
        self._mask_of: Optional[RevealedMasks] = None

    @classmethod
    def check_combination(cls, opts: dict[str, Any]) -> None:
        require_concept_option(cls.name, opts["concept"], "whose localised artefact is removed from the teacher's maps")

    def own_options(self) -> dict[str, Any]:
        """Its options besides IMPACTX's (the concept), as its records name them (IMPACTX's are recorded as
        IMPACTX's: lam and maps)."""
        return {k: v for k, v in self.opts.items() if k not in OPTION_NAMES}

    def concept(self) -> Concept:
        if self._concept is None:
            self._concept = load_checked_concept(self.opts["concept"])
        return self._concept

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        return revealed_masks(self.concept(), self.opts["concept"], self.name, "zeroes the teacher's maps inside")

    def check_data(self, plan) -> None:
        super().check_data(plan)
        ic = self.ic
        if ic.lam <= 0:
            raise ConfigError(
                f"method {self.name} trains towards the teacher's cleaned maps, and impactx.lam={ic.lam} reads no "
                "map; set method.options.lam above 0 (or use method impactx for the model without maps)"
            )
        masks, indices = self.masks()
        check_masks_fit(masks, indices, plan.dataset, self.opts["concept"])

    def build_model(self, ctx: MethodContext) -> nn.Module:
        """IMPACTX's model, after checking that the concept belongs to the run's baseline (its digest)."""
        if ctx.baseline_model is None:
            raise ConfigError(
                f"method {self.name} needs the run's trained baseline, on which its concept was fitted; run it with "
                "teachx run or teachx revise"
            )
        self.concept().check_model(ctx.baseline_model(), where=self.opts["concept"])
        ctx.log(f"[{self.name}] {describe_concept(self.concept())}")
        return super().build_model(ctx)

    def task(self, model: nn.Module, ctx: MethodContext):
        """IMPACTX's task on the cleaned teacher maps."""
        if ctx.train_maps is None:
            raise ConfigError(f"method {self.name} needs the teacher's maps of the training split")
        masks, indices = self.masks()
        cleaned = clean_store(ctx.train_maps, masks, indices, ctx.log)
        self._mask_of = RevealedMasks(masks, indices, cleaned.maps.shape[0])
        ctx.log(f"[{self.name}] teacher maps of {len(indices)} localised training images zeroed inside their masks")
        return super().task(model, dataclasses.replace(ctx, train_maps=cleaned))

    def epoch_hook(self, task, ctx: MethodContext, out_dir: Path) -> Optional[Callable[[int], None]]:
        """IMPACTX's self-teaching (``impactx.self_teach_every``), its refreshed maps cleaned the same way."""
        hook = super().epoch_hook(task, ctx, out_dir)
        return None if hook is None else CleanedRefreshes(hook, task, self._mask_of)

    def describe(self) -> str:
        return super().describe() + f" towards teacher maps cleaned along concept {self.opts['concept']}"

    def arm_text(self) -> str:
        return f"method={self.name} concept={self.opts['concept']} " + super().arm_text()

    def record(self) -> dict[str, Any]:
        rec = concept_record(self.concept(), self.opts["concept"])
        rec["n_masks"] = int(len(self.masks()[1]))
        return {"method": self.name, "method_options": self.own_options(), "concept": rec}

    def results(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**super().results(record), "concept": record.get("concept")}

    def unit_record(self, stage: dict[str, Any]) -> dict[str, Any]:
        return {"method": self.name, "method_options": self.own_options(), **super().unit_record(stage)}

    def study_row(self, unit: dict[str, Any]) -> dict[str, Any]:
        return {"method_options": unit.get("method_options", {}), **super().study_row(unit)}
