"""The whole unannotated reveal of a trained classifier on an artefact benchmark, scored against its truth.

What an R2R study measures per trained baseline (``study.eval.reveal``), in one call: for each class that
carries the artefact, the reveal method's groups (as `teachx reveal --class C` finds them), then the concept
of its top-ranked group (as ``--concept top``: the CAV, retrieval over the training split, localisation),
with no person in the loop, so the numbers say how far the pipeline gets on its own. The ground truth
(:func:`teachx.data.artefacts.ground_truth`) is read only after each step, to score it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.errors import ConfigError
from teachx.data.artefacts import ground_truth, has_ground_truth
from teachx.data.transforms import normalize
from teachx.reveal import build as build_method
from teachx.reveal.base import Evidence
from teachx.reveal.cav import Cav, fit_cav, refine_cav
from teachx.reveal.evaluate import concept_against_truth, detection
from teachx.reveal.features import (
    check_layer,
    classifier_input,
    find_module,
    layer_shapes,
    pooled_activations,
    pooled_relevances,
)
from teachx.reveal.localise import artefact_mask, heatmaps_in_batches
from teachx.runs.reveal import LATENTS
from teachx.runs.teacher import as_nchw, teacher_maps
from teachx.teachers import TEACHERS
from teachx.training.trainer import DataPlan


@dataclass
class RevealSettings:
    """How a study's units are revealed (``study.eval.reveal``)."""

    method: str = "spray_latent"  # a reveal method (`teachx reveal --method`)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (e.g. n_neighbors)
    latent: str = "relevances"  # what spray_latent reads of the layer: activations | relevances (`--latent`)
    teacher: Optional[str] = "lrp"  # the maps of the map-based methods (None: the run's teacher method)
    layer: Optional[str] = None  # the latent and CAV layer (None: the features the classifier reads)
    cav: str = "pattern"  # pattern | svm | logistic
    refine: int = 0  # rounds the CAV is refitted on the class's images it retrieves (teachx.reveal.cav.refine_cav)
    localise: str = "lrp"  # lrp | gradient
    max_localise: int = 500  # images localised per concept (its members first, then the best-scoring)


@dataclass(frozen=True)
class TopConcept:
    """The concept of a class's top-ranked group, as a correction reads it (`teachx revise`, a study's
    ``study.revise``): the CAV at ``layer``, its score for every training image ``indices`` and the images it
    localised with their masks (None for an artefact without a place). Not part of the scored record."""

    label: int
    layer: str
    cav: Cav
    members: np.ndarray  # the top group: the CAV's positive samples
    indices: np.ndarray  # the training split
    scores: np.ndarray  # one per ``indices``
    localised: np.ndarray
    masks: Optional[np.ndarray]


@dataclass
class RevealBenchmark:
    """One classifier's unannotated reveal, scored: per artefact class its detection and its top group's
    concept (retrieval and localisation), and the seconds each part took. ``concepts``: each class's top
    concept itself, for a correction (not written with the record)."""

    settings: dict[str, Any]
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {"detection", "concept"}
    seconds: dict[str, float] = field(default_factory=dict)
    concepts: dict[str, TopConcept] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "classes": self.classes, "seconds": self.seconds}

    def headline(self) -> dict[str, Optional[float]]:
        """The numbers a study table shows, averaged over the artefact classes: whether the top group is the
        artefact (share of classes), the detection AUROC, the CAV retrieval AUROC and the mask IoU."""
        rows = list(self.classes.values())
        concepts = [r["concept"] or {} for r in rows]

        def mean(values: list[Optional[float]]) -> Optional[float]:
            vals = [v for v in values if v is not None]
            return float(np.mean(vals)) if vals else None

        return {
            "top_is_artefact": mean([float(r["detection"]["top_is_artefact"]) for r in rows]),
            "top_f1": mean([r["detection"]["top"]["f1"] for r in rows]),
            "detection_auroc": mean([r["detection"]["auroc"] for r in rows]),
            "retrieval_auroc": mean([c.get("retrieval_auroc") for c in concepts]),
            "retrieval_ap": mean([c.get("retrieval_average_precision") for c in concepts]),
            "mask_iou": mean([c.get("localisation_iou") for c in concepts]),
        }


def reveal_benchmark(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    device: torch.device,
    settings: RevealSettings = RevealSettings(),
    batch_size: int = 128,
) -> Optional[RevealBenchmark]:
    """Reveal ``model`` (trained on ``plan``) class by class and score it; None when the data is no artefact
    benchmark."""
    ds = plan.dataset
    if not has_ground_truth(ds):
        return None
    if settings.latent not in LATENTS:
        raise ConfigError(f"unknown latent '{settings.latent}'; valid: {', '.join(LATENTS)}")
    reveal = build_method(settings.method, **settings.options)
    model = model.to(device).eval()

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]).to(device), plan.mean, plan.std)

    train_idx = np.sort(np.asarray(plan.train_idx))
    labels = np.asarray(ds.train.labels)
    shapes = layer_shapes(model, batch(train_idx[:1]))
    layer = check_layer(settings.layer, shapes) if settings.layer else classifier_input(shapes)
    out = RevealBenchmark({**asdict(settings), "layer": layer})
    seconds = {"maps": 0.0, "reveal": 0.0, "retrieval": 0.0, "localisation": 0.0}
    all_acts: Optional[np.ndarray] = None
    for c in sorted({int(labels[i]) for i in train_idx}):
        members = train_idx[labels[train_idx] == c]
        truth_c = _truth(ds).train_poisoned[members]
        if not truth_c.any() or len(members) < reveal.min_samples:
            continue
        t0 = time.perf_counter()
        maps = None
        if reveal.source == "maps":
            tcfg = copy.deepcopy(cfg)
            if settings.teacher and TEACHERS.canonical(settings.teacher) != TEACHERS.canonical(cfg.teacher.method):
                tcfg.teacher.method, tcfg.teacher.options = TEACHERS.canonical(settings.teacher), {}
            store = teacher_maps(tcfg, plan, model, "train", members, device, log=lambda line: None, progress=False)
            maps = store.read(members).float().numpy()
        acts = pooled_activations(model, batch, members, layer, batch_size)
        latents = acts
        if reveal.source == "activations" and settings.latent == "relevances":  # each unit's share of the logit
            latents = pooled_relevances(model, batch, members, labels[members], layer, batch_size)
        t1 = time.perf_counter()
        result = reveal.reveal(Evidence(indices=members, maps=maps, activations=latents, label=c))
        t2 = time.perf_counter()
        found = detection(result, _truth(ds).train_poisoned[result.indices], c)
        top = np.isin(result.indices, np.asarray(result.groups[0].members))
        concept = None
        if 2 <= top.sum() <= len(top) - 2:
            cav = refine_cav(_rows(acts, members, result.indices), top, settings.cav, layer, settings.refine)
            if all_acts is None:
                all_acts = pooled_activations(model, batch, train_idx, layer, batch_size)
            scores = cav.scores(all_acts)
            t3 = time.perf_counter()
            _, chosen = cav.retrieve(scores, train_idx, result.indices[top], settings.max_localise)
            truth = _truth(ds)
            masks = None
            if truth.has_place:
                heat = heatmaps_in_batches(
                    model, batch, chosen, find_module(model, layer), cav.direction, settings.localise, batch_size
                )
                masks = artefact_mask(heat)
            t4 = time.perf_counter()
            concept = concept_against_truth(truth, train_idx, scores, chosen, masks).to_dict()
            out.concepts[str(c)] = TopConcept(
                c,
                layer,
                cav,
                result.indices[top],
                train_idx,
                scores,
                chosen,
                None if masks is None else np.asarray(masks),
            )
            seconds["retrieval"] += t3 - t2
            seconds["localisation"] += t4 - t3
        seconds["maps"] += t1 - t0
        seconds["reveal"] += t2 - t1
        out.classes[str(c)] = {"detection": found.to_dict() if found else None, "concept": concept}
    out.seconds = seconds
    return out


def _truth(ds):
    """The benchmark's ground truth: read only to score what the reveal found (never by the reveal)."""
    return ground_truth(ds)


def _rows(acts: np.ndarray, members: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``acts`` (rows in the order of ``members``) in the order of ``order`` (the reveal result's indices)."""
    where = {int(i): k for k, i in enumerate(members)}
    return acts[[where[int(i)] for i in order]]


def annotated_concept(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    device: torch.device,
    settings: RevealSettings = RevealSettings(),
    batch_size: int = 128,
) -> Optional[TopConcept]:
    """The oracle of :func:`reveal_benchmark`'s concept: the CAV (``settings.cav``, at the layer the reveal uses)
    fitted on the first artefact class's training images with the benchmark's true labels (which images carry
    the artefact) instead of a discovered group, scored over the training split like a revealed concept. It reads
    the annotations: a reference that separates a correction's quality from the reveal's, never a reveal method.
    None when the data is no artefact benchmark."""
    ds = plan.dataset
    if not has_ground_truth(ds):
        return None
    model = model.to(device).eval()

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]).to(device), plan.mean, plan.std)

    train_idx = np.sort(np.asarray(plan.train_idx))
    labels = np.asarray(ds.train.labels)
    shapes = layer_shapes(model, batch(train_idx[:1]))
    layer = check_layer(settings.layer, shapes) if settings.layer else classifier_input(shapes)
    poisoned = _truth(ds).train_poisoned
    for c in sorted({int(labels[i]) for i in train_idx}):
        members = train_idx[labels[train_idx] == c]
        carry = poisoned[members]
        if not carry.any() or carry.all():
            continue
        acts = pooled_activations(model, batch, members, layer, batch_size)
        cav = fit_cav(acts, carry, settings.cav, layer)
        scores = cav.scores(pooled_activations(model, batch, train_idx, layer, batch_size))
        return TopConcept(c, layer, cav, members[carry], train_idx, scores, members[carry], None)
    return None
