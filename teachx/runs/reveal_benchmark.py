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
from teachx.reveal.cav import auroc, fit_cav, fit_concept_cav, grow_concept
from teachx.reveal.evaluate import concept_against_truth, detection
from teachx.reveal.features import (
    LayerStack,
    check_layers,
    find_module,
    layer_shapes,
    pooled_relevances,
    stacked_activations,
)
from teachx.reveal.localise import concept_masks, reference_indices
from teachx.reveal.specificity import rank_by_specificity
from teachx.runs.reveal import LATENTS, MERGE, RANKS, REFINE, SPECIFIC_GROUPS
from teachx.runs.teacher import as_nchw, teacher_maps
from teachx.teachers import TEACHERS
from teachx.training.trainer import DataPlan


@dataclass
class RevealSettings:
    """How a study's units are revealed (``study.eval.reveal``).

    The defaults were chosen on the Fashion-MNIST artefact benchmarks (docs/studies/r2r-fashion-mnist.md):
    the pooled activations of every nonlinearity side by side (:class:`teachx.reveal.features.LayerStack`) for
    the clustering and the CAV; the class split in six groups, ranked by specificity, and the top group merged
    with the next ones that are as specific (:mod:`teachx.reveal.specificity`); a logistic CAV.

    Why six groups and a merge, not the eigengap's number: the concept is fitted on the top group alone, and a
    pure group gives a clean direction (the timestamp at p = 0.5: a top group of 92 to 100 % timestamp images
    retrieves them with AUROC 0.92, a half of the class at 57 % with 0.74); the eigengap's few groups mix the
    artefact with clean images, or break an artefact half into pieces (the colour shift at p = 0.5: the top group
    was the artefact in 1 of 5 seeds), and the merge joins such pieces again. ``options: null`` asks for six groups from a method that takes
    ``n_groups`` (the SpRAy methods), ``{}`` for the method's defaults (the eigengap).

    Why a logistic CAV: retrieval is decoding, where a filter (Haufe et al.'s term) cancels what the group shares
    with the rest of the dataset; the pattern CAV describes the concept, but retrieved worse on the timestamp,
    band-aid and frame (mean AUROC over the five learnt benchmarks 0.87 against 0.90).

    Why the top group grows (``refine``, :func:`teachx.reveal.cav.grow_concept`) before its CAV is fitted: a pure
    top group is often one piece of the artefact (the timestamp at p = 0.5: precision 0.98, a quarter of its
    images, the ones in one corner); grown against the other classes, the set the CAV is fitted on holds most of
    the artefact (recall 0.90 at precision 0.97) and its CAV retrieves the timestamp with AUROC 0.995 instead of
    0.916; no benchmark got worse. ``refine: 0`` fits the CAV on the top group alone.

    Why the grown set's CAV that retrieves is fitted against every other image (the rest of its class and the
    other classes, :func:`teachx.reveal.cav.fit_concept_cav`), and the one the masks trace against the rest of
    its class: retrieval scores every training image, and a direction fitted within the class alone need not
    tell the concept from the other classes' images (the band-aid at p = 0.5: retrieval AUROC 0.936 to 0.946);
    the masks contrast the concept with the class's images without it, which the within-class direction
    describes (fitted against everything, the masks lost 0.02 of IoU on the timestamp)."""

    method: str = "spray_latent"  # a reveal method (`teachx reveal --method`)
    # the method's options (None: six groups where the method takes n_groups, see above; else its defaults)
    options: Optional[dict[str, Any]] = None
    latent: str = "activations"  # what spray_latent reads of the layers: activations | relevances (`--latent`)
    teacher: Optional[str] = "lrp"  # the maps of the map-based methods (None: the run's teacher method)
    layer: Optional[str] = None  # the latent and CAV layers, comma-separated (None: every nonlinearity's output)
    rank: str = "specificity"  # specificity | method (see RANKS)
    merge: Optional[float] = MERGE  # with rank=specificity: the top group takes in next groups as specific within this
    standardise: bool = True  # each unit scaled by the class's spread (LayerStack); false: the raw pooled values
    cav: str = "logistic"  # pattern | svm | logistic: the logistic filter retrieves, the pattern describes (below)
    refine: int = REFINE  # rounds the top group grows to the class's images that share its concept (below)
    localise: str = "lrp"  # lrp | gradient
    max_localise: int = 500  # images localised per concept (its members first, then the best-scoring)

    def __post_init__(self) -> None:  # a bad value fails when the study is read, before anything runs
        build_method(self.method, **self.method_options())
        if self.latent not in LATENTS:
            raise ConfigError(f"unknown study.eval.reveal.latent '{self.latent}'; valid: {', '.join(LATENTS)}")
        if self.rank not in RANKS:
            raise ConfigError(f"unknown study.eval.reveal.rank '{self.rank}'; valid: {', '.join(RANKS)}")
        if not isinstance(self.refine, int) or isinstance(self.refine, bool) or self.refine < 0:
            raise ConfigError(
                f"study.eval.reveal.refine is {self.refine!r}; pass a number of rounds, 0 or more "
                f"(0: the top group alone), e.g. study.eval.reveal.refine={REFINE}"
            )

    def method_options(self) -> dict[str, Any]:
        """The reveal method's options: ``options``, or six groups where the method takes ``n_groups``."""
        if self.options is not None:
            return dict(self.options)
        return {"n_groups": SPECIFIC_GROUPS} if "n_groups" in build_method(self.method).options() else {}


@dataclass
class RevealBenchmark:
    """One classifier's unannotated reveal, scored: per artefact class its detection and its top group's
    concept (retrieval and localisation), and the seconds each part took. ``top_groups``: each class's top group
    itself (its training images), which a correction fits its own concept on (not written with the record)."""

    settings: dict[str, Any]
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {"detection", "concept"}
    seconds: dict[str, float] = field(default_factory=dict)
    top_groups: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    #: each class's top group grown against the other classes (``settings.refine`` > 0): the set its CAV is fitted on
    grown_groups: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

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
    reveal = build_method(settings.method, **settings.method_options())
    model = model.to(device).eval()

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]).to(device), plan.mean, plan.std)

    train_idx = np.sort(np.asarray(plan.train_idx))
    labels = np.asarray(ds.train.labels)
    shapes = layer_shapes(model, batch(train_idx[:1]))
    layers = check_layers(settings.layer, model, shapes)
    sizes = [shapes[name][0] for name in layers]
    out = RevealBenchmark({**asdict(settings), "options": reveal.options(), "layer": ",".join(layers)})
    seconds = {"maps": 0.0, "reveal": 0.0, "retrieval": 0.0, "localisation": 0.0}
    t = time.perf_counter()
    all_raw = stacked_activations(model, batch, train_idx, layers, batch_size)
    seconds["maps"] += time.perf_counter() - t
    for c in sorted({int(labels[i]) for i in train_idx}):
        in_class = labels[train_idx] == c
        members = train_idx[in_class]
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
        stack = (LayerStack.fit if settings.standardise else LayerStack.raw)(layers, sizes, all_raw[in_class])
        acts = stack.transform(all_raw[in_class])
        latents = acts
        if reveal.source == "activations" and settings.latent == "relevances":  # each unit's share of the logit
            rel = np.concatenate(
                [pooled_relevances(model, batch, members, labels[members], name, batch_size) for name in layers], 1
            )
            latents = (LayerStack.fit if settings.standardise else LayerStack.raw)(layers, sizes, rel).transform(rel)
        t1 = time.perf_counter()
        result = reveal.reveal(Evidence(indices=members, maps=maps, activations=latents, label=c))
        class_x = _rows(acts, members, result.indices)
        other_x = stack.transform(all_raw[~in_class])
        if settings.rank == "specificity":
            result = rank_by_specificity(result, class_x, other_x, settings.merge)
        t2 = time.perf_counter()
        found = detection(result, _truth(ds).train_poisoned[result.indices], c)
        top = np.isin(result.indices, np.asarray(result.groups[0].members))
        out.top_groups[str(c)] = np.asarray(result.indices[top])
        concept = None
        if 2 <= top.sum() <= len(top) - 2:
            fitted = grow_concept(class_x, top, other_x, settings.refine) if settings.refine else top
            # ``local`` tells the concept from the rest of its class, which the masks contrast it with; the grown
            # set's retrieving CAV also from the other classes, whose images it scores too (fit_concept_cav)
            local = fit_cav(class_x, fitted, settings.cav, ",".join(layers))
            cav = fit_concept_cav(class_x, fitted, other_x, settings.cav, local.layer) if settings.refine else local
            if settings.refine:
                out.grown_groups[str(c)] = np.asarray(result.indices[fitted])
            scores = cav.scores(stack.transform(all_raw))
            t3 = time.perf_counter()
            _, chosen = cav.retrieve(scores, train_idx, result.indices[fitted], settings.max_localise)
            truth = _truth(ds)
            masks = None
            if truth.has_place:  # traced back from the first layer, the sharpest, against the class's least-like images
                where, direction = stack.part(local.direction, 0)
                references = reference_indices(local.scores(class_x), result.indices)
                _, masks = concept_masks(
                    model,
                    batch,
                    chosen,
                    references,
                    find_module(model, where),
                    direction,
                    settings.localise,
                    batch_size,
                )
            t4 = time.perf_counter()
            concept = concept_against_truth(truth, train_idx, scores, chosen, masks).to_dict()
            if settings.refine:  # the grown set the CAV was fitted on, and retrieval within the class alone
                concept["fitted"] = _set_match(fitted, truth.train_poisoned[result.indices])
                concept["retrieval_auroc_in_class"] = auroc(cav.scores(class_x), truth.train_poisoned[result.indices])
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


def _set_match(chosen: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """A set of a class's images (bool) against which of them carry the artefact: its size, precision, recall."""
    hits = int((chosen & poisoned).sum())
    return {
        "size": int(chosen.sum()),
        "precision": hits / max(1, int(chosen.sum())),
        "recall": hits / max(1, int(poisoned.sum())),
    }


def _rows(acts: np.ndarray, members: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``acts`` (rows in the order of ``members``) in the order of ``order`` (the reveal result's indices)."""
    where = {int(i): k for k, i in enumerate(members)}
    return acts[[where[int(i)] for i in order]]
