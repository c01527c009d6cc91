"""How well a reveal found a benchmark's artefact: the scores an R2R study reports, from the ground truth.

On an artefact benchmark (``teachx.data.artefacts``) teachx knows which training images carry the artefact
and where. The reveal methods never read that (they must find the artefact without annotations); this
module reads it afterwards, to measure them as the Reveal-to-Revise papers do:

- **detection** within the poisoned class: does the top-ranked candidate group hold the artefact's images
  (its precision and recall), which group matches them best and at which rank, and how well the method's
  per-sample suspicion scores rank them (AUROC and average precision);
- **retrieval**: how well the CAV scores of every training image, of every class, find the artefact's images
  (AUROC and average precision over the whole training split);
- **localisation**: the intersection over union of the concept's masks with the true artefact masks, over
  the localised images that carry the artefact (for artefacts with a place).

AUROC and average precision are scikit-learn's (``roc_auc_score``, ``average_precision_score``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from teachx.data.artefacts import GroundTruth
from teachx.reveal.base import RevealResult
from teachx.reveal.localise import mask_iou

#: a group "is the artefact" when it holds at least this share of the artefact's images and they are at least
#: this share of the group (both halves of an F1 of 0.5 or more)
MATCH = 0.5


def _auroc_ap(scores: np.ndarray, truth: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        return None, None
    return float(roc_auc_score(truth, scores)), float(average_precision_score(truth, scores))


@dataclass(frozen=True)
class GroupMatch:
    """One candidate group against the artefact's images of its class."""

    group: int
    rank: int  # 1 = most suspicious
    size: int
    precision: float  # share of the group's images that carry the artefact
    recall: float  # share of the class's artefact images in the group

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def is_artefact(self) -> bool:
        return self.precision >= MATCH and self.recall >= MATCH


@dataclass(frozen=True)
class Detection:
    """A class's reveal against the ground truth: is the artefact the top-ranked group, and the score ranking."""

    label: int
    method: str
    n_images: int
    n_artefact: int
    top: GroupMatch
    best: GroupMatch  # the group with the highest F1
    auroc: Optional[float]  # of the method's per-sample suspicion scores for "carries the artefact"
    average_precision: Optional[float]

    @property
    def top_is_artefact(self) -> bool:
        return self.top.is_artefact

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top"]["f1"], d["best"]["f1"] = self.top.f1, self.best.f1
        d["top_is_artefact"] = self.top_is_artefact
        return d

    def line(self) -> str:
        t, b = self.top, self.best
        verdict = "is the artefact" if self.top_is_artefact else "is not the artefact"
        best = "" if b.group == t.group else f"; best match group {b.group} (rank {b.rank}, F1 {b.f1:.2f})"
        scores = f"; suspicion scores rank them with AUROC {self.auroc:.3f}" if self.auroc is not None else ""
        return (
            f"  benchmark ground truth (for evaluation only, never read by the method): {self.n_artefact} of the "
            f"class's {self.n_images} images carry the artefact; the top group {verdict} (precision {t.precision:.2f}, "
            f"recall {t.recall:.2f}){best}{scores}"
        )


def detection(result: RevealResult, poisoned: np.ndarray, label: int) -> Optional[Detection]:
    """Score ``result`` (one class's reveal) against ``poisoned`` (bool per image of ``result.indices``);
    None when the class has no artefact image."""
    truth = np.asarray(poisoned, bool)
    if len(truth) != len(result.indices):
        raise ValueError(f"ground truth for {len(truth)} images, the reveal has {len(result.indices)}")
    if not truth.any():
        return None
    matches = []
    for rank, g in enumerate(result.groups, start=1):
        inside = np.isin(result.indices, np.asarray(g.members))
        hits = int((inside & truth).sum())
        matches.append(
            GroupMatch(g.group, rank, int(inside.sum()), hits / max(1, int(inside.sum())), hits / int(truth.sum()))
        )
    best = max(matches, key=lambda m: (m.f1, -m.rank))
    auroc, ap = _auroc_ap(np.asarray(result.scores, np.float64), truth)
    return Detection(label, result.method, len(truth), int(truth.sum()), matches[0], best, auroc, ap)


@dataclass(frozen=True)
class ConceptEvaluation:
    """A saved concept against the ground truth: retrieval over the training split, and localisation."""

    n_images: int
    n_artefact: int
    retrieval_auroc: Optional[float]
    retrieval_average_precision: Optional[float]
    localisation_iou: Optional[float]  # mean over the localised artefact images (None: the artefact has no place)
    n_localised_artefact: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        parts = [
            f"  benchmark ground truth (for evaluation only): {self.n_artefact} of {self.n_images} training images carry the artefact"
        ]
        if self.retrieval_auroc is not None:
            parts.append(
                f"CAV retrieval AUROC {self.retrieval_auroc:.3f}, average precision {self.retrieval_average_precision:.3f}"
            )
        if self.localisation_iou is not None:
            parts.append(
                f"mask IoU {self.localisation_iou:.3f} over {self.n_localised_artefact} localised artefact images"
            )
        return "; ".join(parts)


def concept_evaluation(
    scores: np.ndarray,
    poisoned: np.ndarray,
    localised_masks: Optional[np.ndarray] = None,
    true_masks: Optional[np.ndarray] = None,
    localised_poisoned: Optional[np.ndarray] = None,
) -> ConceptEvaluation:
    """``scores``/``poisoned``: per training image; ``localised_masks``/``true_masks`` (N, H, W) and
    ``localised_poisoned`` (N,): the localised images, their true masks, and which of them carry the artefact
    (leave the masks out for an artefact without a place)."""
    truth = np.asarray(poisoned, bool)
    auroc, ap = _auroc_ap(np.asarray(scores, np.float64), truth)
    iou, n_loc = None, 0
    if localised_masks is not None and true_masks is not None and localised_poisoned is not None:
        keep = np.asarray(localised_poisoned, bool)
        n_loc = int(keep.sum())
        if n_loc:
            iou = float(mask_iou(np.asarray(localised_masks)[keep], np.asarray(true_masks)[keep] != 0).mean())
    return ConceptEvaluation(len(truth), int(truth.sum()), auroc, ap, iou, n_loc)


def concept_against_truth(
    truth: GroundTruth,
    indices: np.ndarray,
    scores: np.ndarray,
    localised: np.ndarray,
    masks: Optional[np.ndarray],
) -> ConceptEvaluation:
    """:func:`concept_evaluation` of a concept's ``scores`` of the training images ``indices`` and its ``masks``
    of the ``localised`` images, against an artefact benchmark's ground truth (no IoU for an artefact without a
    place, or without masks)."""
    placed = truth.has_place and masks is not None
    return concept_evaluation(
        scores,
        truth.train_poisoned[indices],
        masks if placed else None,
        truth.train_masks[localised] if placed else None,
        truth.train_poisoned[localised] if placed else None,
    )
