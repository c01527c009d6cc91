"""`teachx revise RUN_DIR --concept NAME --method M`: correct a run's classifier for a concept `teachx reveal`
saved, and measure before and after (the second half of Reveal-to-Revise).

The concept (``reveal/concepts/NAME.json``) names its CAV, layer and the checkpoint it was fitted on (by
sha256: a concept is never applied to other weights). It becomes a correction concept
(:mod:`teachx.training.concepts`) whose two groups are the training images the CAV retrieves (score at or
above the concept's threshold: carrying the artefact) and the rest. Then either

- a **post-hoc transform** (no training): ``pclarc`` projects the layer's activations onto the clean
  images' mean along the CAV, ``rclarc`` only where the CAV score says the artefact is there
  (:func:`teachx.training.clarc.attach`); or
- a **fine-tuning method** (``rrclarc``, ``aclarc``, ``rrr_revealed``: :mod:`teachx.training.methods`) starting
  from that checkpoint, with the Reveal-to-Revise recipe by default: a few epochs at a tenth of the run's learning
  rate, the feature extractor frozen (every default can be overridden with ``KEY=VALUE``); or
- a **method trained anew** with the run's training settings (``impactx_cleaned``: IMPACTX towards the run's
  teacher maps of the classifier, with the artefact the concept localised zeroed in them).

Both are measured with the same yardstick, before and after: accuracy on the test split (on an artefact
benchmark: on its clean, attacked and ch splits), the share of the input gradient on the artefact of the
attacked images (artefact benchmarks with a place), and along the CAV the TCAV score (the share of test
images whose true-class logit grows along the CAV) and the sensitivity (the mean of ``|v . d logit / d a|``
over images and classes: RR-ClArC drives it down).

Layout: ``revise/<method>-<concept>/`` holds ``concept.json`` / ``.npz`` (the correction concept),
``model/`` (the fine-tuned stage, resumable like any stage) and ``revision.json`` (the typed record, written
last, digest-checked on read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from teachx.config.loader import from_dict, parse_override, set_dotted, to_dict
from teachx.config.schema import RunConfig
from teachx.data.artefacts import ground_truth, has_ground_truth
from teachx.data.transforms import normalize
from teachx.errors import CheckpointError, ConfigError, CorruptionError
from teachx.evaluation.shortcut import artefact_share
from teachx.registry import suggest
from teachx.reveal.cav import fit_cav
from teachx.reveal.features import check_layer, classifier_input, find_module, layer_shapes, pooled_activations
from teachx.reveal.localise import concept_masks, reference_indices
from teachx.runs.pipeline import train_method_stage
from teachx.runs.plan import make_plan
from teachx.runs.reveal import CONCEPTS, REVEAL_DIR, _check_run_dir, read_concept
from teachx.runs.stages import artefact_splits, load_stage_model
from teachx.runs.teacher import as_nchw, teacher_maps
from teachx.training.clarc import attach, cav_sensitivity, gradient_along, Capture
from teachx.training.concepts import Concept, concept_from_scores, layer_module, model_digest, save_concept
from teachx.training.methods import METHODS, build_method
from teachx.training.trainer import ClassifierTask, DataPlan, evaluate
from teachx.utils.hashing import sha256_file
from teachx.utils.io import read_trusted_json, write_json_atomic
from teachx.utils.seeding import choose_device

REVISE_DIR = "revise"
RECORD = "revision.json"
#: the post-hoc corrections: name -> the ClArC hook's mode (no training)
POST_HOC = {"pclarc": "project", "rclarc": "reactive"}
#: the corrections that train: the training methods that correct along a concept file (``corrects_concept``)
TRAINED = tuple(n for n in METHODS.names() if METHODS.get(n).corrects_concept)
#: the Reveal-to-Revise recipe for fine-tuning, applied unless a KEY=VALUE sets the key
RECIPE_EPOCHS = 5
RECIPE_LR_FACTOR = 0.1
#: test images (at most) for the artefact share and the CAV measures
MEASURE_IMAGES = 512
#: how a correction concept chooses and localises the images whose masks it carries; a change to either is a new
#: number, so study units that read the masks (``concept_needs_masks``) are keyed anew rather than reusing old masks
#: (2: the concept's own group first, then its class's images by CAV score, masks contrasted with the class's images
#: the CAV scores lowest; before it, the best scores of any class and 0.3 x each heatmap's maximum)
CONCEPT_MASKS_VERSION = 2


def revise_methods() -> list[str]:
    return [*POST_HOC, *TRAINED]


@dataclass
class Measures:
    """One model measured: test accuracy (and per artefact-benchmark split), artefact share, CAV measures."""

    test_acc: float
    test_splits: Optional[dict[str, dict[str, Any]]] = None
    artefact_share: Optional[dict[str, float]] = None  # input gradient (and area) on the attacked split
    tcav: Optional[float] = None  # share of test images whose true-class logit grows along the CAV
    sensitivity: Optional[float] = None  # mean |v . d logit_k / d a| over images and classes


@dataclass
class Revision:
    """What `teachx revise` did and measured (``revision.json``)."""

    method: str
    concept: dict[str, Any]
    options: dict[str, Any]
    before: Measures
    after: Measures
    train: Optional[dict[str, Any]] = None  # the fine-tuning stage's record summary
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Revision":
        return cls(
            method=d["method"],
            concept=d["concept"],
            options=d.get("options", {}),
            before=Measures(**d["before"]),
            after=Measures(**d["after"]),
            train=d.get("train"),
            notes=list(d.get("notes", [])),
        )


def read_revision(path: str | Path) -> Revision:
    path = Path(path)
    rec = read_trusted_json(path, f"run the same `teachx revise` command again to write '{path.name}' anew", "revision")
    try:
        return Revision.from_dict(rec)
    except (KeyError, TypeError) as exc:
        raise CorruptionError.of(
            path, f"not a revision record ({exc})", "run `teachx revise` again", "revision"
        ) from None


def _concept_path(run_dir: Path, name: str) -> Path:
    folder = run_dir / REVEAL_DIR / CONCEPTS
    path = folder / f"{name}.json"
    if not path.is_file():
        saved = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        have = f"; saved concepts: {', '.join(saved)}{suggest(name, saved)}" if saved else ""
        raise ConfigError(
            f"'{run_dir}' has no concept '{name}'{have}; make one with `teachx reveal {run_dir} --class C "
            f"--concept top --name {name}`"
        )
    return path


def recipe_config(
    cfg: RunConfig, method: str, concept_file: Path, items: list[str]
) -> tuple[RunConfig, dict[str, Any]]:
    """The run's config with the correcting method, its concept, the recipe (for a method that fine-tunes the
    baseline; one trained anew keeps the run's epochs and learning rate) and the user's KEY=VALUE. A method with
    typed options of the run's method (impactx_cleaned: IMPACTX's) starts from the run's values of them.
    Returns the config and the options the correction records: its own, and the typed ones the user set."""
    data = to_dict(cfg)
    options_type = METHODS.get(method).options_type
    typed = {f.name for f in fields(options_type)} if options_type else set()
    run_typed = METHODS.get(cfg.method.name).options_type is options_type  # e.g. an IMPACTX run, impactx_cleaned
    start = {k: v for k, v in cfg.method.options.items() if k in typed} if run_typed else {}
    data["method"] = {"name": method, "options": {"concept": str(concept_file), **start}}
    if METHODS.get(method).fine_tunes_baseline:
        data["train"]["epochs"] = RECIPE_EPOCHS
        data["train"]["lr"] = float(cfg.train.lr) * RECIPE_LR_FACTOR
    typed_given: set[str] = set()  # method.options.KEY the user gave for a typed option
    for item in items:
        keys, value = parse_override(item)
        if keys[0] not in ("train", "method"):
            raise ConfigError(
                f"'{item}': teachx revise takes train.* and method.options.* overrides (the data and model are the run's)"
            )
        if keys[:2] == ["method", "name"]:
            raise ConfigError(f"'{item}': choose the correction with --method")
        if keys[:2] == ["method", "options"] and len(keys) == 3 and keys[2] in typed:
            typed_given.add(keys[2])
        set_dotted(data, ".".join(keys), value)
    try:
        tuned = from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"teachx revise --method {method}: {exc}") from None
    opts = dict(tuned.method.options)
    return tuned, {
        **{k: v for k, v in opts.items() if k != "concept" and k not in typed},
        **{k: opts[k] for k in typed_given},
        "train.epochs": tuned.train.epochs,
        "train.lr": tuned.train.lr,
    }


def attacked_share(
    model: torch.nn.Module, plan: DataPlan, device: torch.device, seed: int = 0
) -> Optional[dict[str, float]]:
    """On an artefact benchmark whose artefact has a place: the share of the model's |input gradient| of the
    true class on the artefact, over (at most ``MEASURE_IMAGES``, seeded) images of the attacked test split,
    with the artefact's share of the image (``area``); None elsewhere. The one yardstick of the artefact's
    attribution for baselines, arms and corrections alike."""
    ds = plan.dataset
    if not has_ground_truth(ds):
        return None
    truth = ground_truth(ds)
    source = truth.test_splits["attacked"]
    if not truth.has_place or getattr(source, "masks", None) is None:
        return None
    pick = np.sort(np.random.default_rng(seed).permutation(len(source))[:MEASURE_IMAGES])
    x = normalize(as_nchw(source.images[pick]).to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(source.labels)[pick]).long().to(device)
    masks = torch.from_numpy(np.ascontiguousarray(np.asarray(source.masks)[pick])).float().to(device)
    return artefact_share(model.to(device).eval(), x, y, masks, methods=("gradient",))


def measure(
    model: torch.nn.Module,
    plan: DataPlan,
    layer: Optional[str],
    cav: Optional[np.ndarray],
    device: torch.device,
    batch_size: int = 256,
    seed: int = 0,
) -> Measures:
    """The yardstick of a revision (see the module docstring), in the model's current state (hooks included);
    without a ``layer`` and ``cav``, everything but the measures along the CAV."""
    ds = plan.dataset
    model = model.to(device).eval()
    task = ClassifierTask(model)
    test = evaluate(task, plan, ds.test, np.arange(len(ds.test)), batch_size, device)
    splits = artefact_splits(task, plan, batch_size, device)
    share = attacked_share(model, plan, device, seed)
    if layer is None or cav is None:
        return Measures(test_acc=float(test["acc"]), test_splits=splits, artefact_share=share)
    # the CAV measures on the attacked split (every image carries the artefact: where the CAV matters)
    source = ground_truth(ds).test_splits["attacked"] if has_ground_truth(ds) else ds.test
    rng = np.random.default_rng([seed, 1])
    pick = np.sort(rng.permutation(len(source))[:MEASURE_IMAGES])
    x = normalize(as_nchw(source.images[pick]).to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(source.labels)[pick]).long().to(device)
    module = layer_module(model, layer)
    v = torch.as_tensor(np.asarray(cav), dtype=torch.float32, device=device)
    v = v / v.norm().clamp_min(1e-12)
    with torch.enable_grad(), Capture(module, need_grad=True) as cap:
        logits = model(x)
        (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), cap.out)
    tcav = float((gradient_along(g, v) > 0).float().mean())
    return Measures(
        test_acc=float(test["acc"]),
        test_splits=splits,
        artefact_share=share,
        tcav=tcav,
        sensitivity=cav_sensitivity(model, module, v, x),
    )


def correction_concept(
    name: str,
    layer: str,
    cav: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    model: torch.nn.Module,
    info: Optional[dict[str, Any]] = None,
    arrays: Optional[dict[str, np.ndarray]] = None,
) -> Concept:
    """The correction concept of a revealed one: its CAV, and as the images carrying the artefact the training
    images whose CAV score reaches the reveal's retrieval threshold (the rest are the clean ones); ``arrays`` go
    with it (the localisation masks ``rrr_revealed`` reads). Refused when that leaves no image on one side."""
    retrieved = np.asarray(scores) >= threshold
    if retrieved.all() or not retrieved.any():
        raise ConfigError(
            f"concept '{name}': {int(retrieved.sum())} of {len(retrieved)} training images score above its threshold; "
            "a correction needs images with and without the artefact: fit the concept on another group"
        )
    return concept_from_scores(
        name, layer, cav, scores, retrieved, model_digest(model), info=dict(info or {}), arrays=dict(arrays or {})
    )


def fit_correction_concept(
    name: str,
    model: torch.nn.Module,
    plan: DataPlan,
    device: torch.device,
    label: int,
    carrying: np.ndarray,
    layer: Optional[str] = None,
    cav_kind: str = "pattern",
    info: Optional[dict[str, Any]] = None,
    batch_size: int = 256,
    localise: int = 0,
) -> Concept:
    """A correction concept for a group of class ``label``'s training images said to carry an artefact (a
    revealed group, or the annotated images of a reference): the CAV of the group against the class's other
    training images at ``layer`` (None: the features the classifier reads, where the ClArC corrections act), on
    max-pooled activations; the images carrying the artefact, as the correction knows them, are the training
    images of any class whose CAV score reaches the midpoint of the group's and the rest's mean scores.

    The layer is the correction's, not the reveal's: a reveal may group images on several layers at once, and a
    correction needs one direction at one layer. ``localise`` > 0: at most that many images carrying the artefact
    are localised along the CAV (LRP from the layer, contrasted with the class's images it scores lowest and cut
    at an Otsu split, as the reveal's masks are): the group itself, then the class's other images by CAV score;
    their masks go with the concept (arrays ``masks`` and ``localised``, what ``rrr_revealed`` and
    ``impactx_cleaned`` read)."""
    ds = plan.dataset
    model = model.to(device).eval()

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]).to(device), plan.mean, plan.std)

    train_idx = np.sort(np.asarray(plan.train_idx))
    shapes = layer_shapes(model, batch(train_idx[:1]))
    where = check_layer(layer, shapes) if layer else classifier_input(shapes)
    in_class = np.asarray(ds.train.labels)[train_idx] == label
    members = train_idx[in_class]
    flags = np.isin(members, np.asarray(carrying))
    if flags.sum() < 2 or (~flags).sum() < 2:
        raise ConfigError(
            f"concept '{name}': {int(flags.sum())} of class {label}'s {len(members)} training images are said to carry "
            "the artefact; a correction concept needs at least two with it and two without"
        )
    acts = pooled_activations(model, batch, train_idx, where, batch_size)  # the class's rows are among them
    cav = fit_cav(acts[in_class], flags, cav_kind, where)
    scores = cav.scores(acts)
    extra = {**dict(info or {}), "class": int(label), "group": int(flags.sum()), "cav": cav_kind}
    extra["carrying"] = int((scores >= cav.threshold).sum())
    arrays: dict[str, np.ndarray] = {}
    if localise > 0:
        # the group said to carry the artefact first, then the class's other images its CAV retrieves: the CAV
        # separates the group from the rest of its class, so other classes' scores along it say little (on the
        # timestamp benchmark a tenth of their best-scoring images carried it, against 97% of a grown group)
        _, chosen = cav.retrieve(scores[in_class], members, members[flags], localise)
        # contrasted with the class's images the CAV scores lowest, as the reveal's masks are
        references = reference_indices(scores[in_class], members)
        module = find_module(model, where)
        _, masks = concept_masks(model, batch, chosen, references, module, cav.direction, "lrp", batch_size)
        arrays = {"masks": masks, "localised": chosen}
    return correction_concept(name, where, cav.direction, scores, cav.threshold, model, info=extra, arrays=arrays)


@dataclass
class Correction:
    """A correction applied and measured: the model before and after, and the fine-tuning stage's summary."""

    before: Measures
    after: Measures
    train: Optional[dict[str, Any]] = None


def apply_correction(
    method: str,
    tuned: Optional[RunConfig],
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    concept: Concept,
    model_dir: Path,
    log: Callable[[str], None],
    progress: bool,
    device: torch.device,
    before: Optional[Measures] = None,
    wait: bool = True,
) -> Correction:
    """Correct the trained classifier ``model`` for ``concept`` (saved where ``tuned``'s method options name it)
    with ``method``: post hoc (a hook, taken off again) or by training with ``tuned`` into ``model_dir``
    (resumable like any stage: a copy of ``model`` fine-tuned, or a model trained anew on the teacher maps of
    ``model`` when the method reads teacher maps); measure before (unless given) and after along the concept's
    CAV. ``wait=False``: Busy while another process makes those teacher maps. What `teachx revise` and a study's
    ``study.revise`` both run."""
    model = model.to(device)
    if before is None:
        before = measure(model, plan, concept.layer, concept.cav, device, seed=cfg.seed)
    if method in POST_HOC:
        with attach(model, concept, POST_HOC[method]):
            after = measure(model, plan, concept.layer, concept.cav, device, seed=cfg.seed)
        return Correction(before, after)
    assert tuned is not None and METHODS.get(method) is not None
    tuned.train.progress = progress
    store, teacher = None, None
    if build_method(tuned).needs_teacher_maps():  # the run's teacher method on the classifier being corrected
        teacher = model
        store = teacher_maps(tuned, plan, teacher, "train", plan.train_idx, device, log, progress, wait=wait)
    record, fixed = train_method_stage(tuned, plan, store, teacher, model_dir, log, None, baseline=lambda: model)
    train = {k: record.get(k) for k in ("best_epoch", "val_acc", "test_acc", "seconds", "seconds_per_epoch")}
    if METHODS.get(method).fine_tunes_baseline:
        after = measure(fixed, plan, concept.layer, concept.cav, device, seed=cfg.seed)
    else:  # a model trained anew has no place for the baseline's CAV: no TCAV or sensitivity along it
        after = measure(fixed, plan, None, None, device, seed=cfg.seed)
    return Correction(before, after, train)


def revise_run(
    run_dir: str | Path,
    concept: str,
    method: str,
    overrides: Optional[list[str]] = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Iterator[str]:
    """Run the revision in ``run_dir`` (held by the caller); yields the lines to print. Every check on the
    user's input runs before anything is written."""
    run_dir = Path(run_dir)
    if method not in revise_methods():
        raise ConfigError(
            f"unknown correction '{method}'{suggest(method, revise_methods())}; choose one of {', '.join(revise_methods())}"
        )
    cfg = _check_run_dir(run_dir)
    saved = read_concept(_concept_path(run_dir, concept))
    if (saved.record.get("reveal") or {}).get("teacher") == "builtin":
        raise ConfigError(
            f"concept '{concept}' was fitted on the built-in-map model; teachx revise corrects the run's classifier: "
            f"fit the concept on it with `teachx reveal {run_dir} --class {saved.label} --concept ... --name {concept}`"
        )
    checkpoint = run_dir / saved.checkpoint
    if not checkpoint.is_file():
        raise CheckpointError(f"concept '{concept}' names '{checkpoint}', which is missing; run `teachx reveal` again")
    if sha256_file(checkpoint) != saved.model_digest:
        raise ConfigError(
            f"concept '{concept}' was fitted on other weights than '{checkpoint}' holds now (the classifier was trained "
            f"again since); fit it anew: `teachx reveal {run_dir} --class {saved.label} --concept ... --name {concept}`"
        )
    items = list(overrides or [])
    if method in POST_HOC and items:
        raise ConfigError(f"--method {method} trains nothing, so it takes no KEY=VALUE options (got {items[0]})")
    out = run_dir / REVISE_DIR / f"{method}-{concept}"
    stage_dir = checkpoint.parent.parent
    plan = make_plan(cfg, progress=False)
    device = choose_device(cfg.device)
    model = load_stage_model(stage_dir).to(device)
    layer_module(model, saved.layer)  # the layer exists in this model (one line listing the valid ones if not)
    corr = correction_concept(
        concept,
        saved.layer,
        saved.cav,
        saved.scores,
        saved.threshold,
        model,
        # the artefact masks reveal localised and the training images they belong to (rrr_revealed reads them)
        arrays={"masks": saved.masks, "localised": saved.localised},
        info={"reveal_concept": saved.name, "class": saved.label, "checkpoint_sha256": saved.model_digest},
    )
    retrieved = saved.scores >= saved.threshold
    tuned, options = (None, {}) if method in POST_HOC else recipe_config(cfg, method, out / "concept.json", items)
    yield (
        f"revising the classifier of {run_dir} for concept '{concept}' (class {saved.label}, layer {saved.layer}; "
        f"{int(retrieved.sum())} of {len(retrieved)} training images carry it by its CAV score) with {method}"
    )
    out.mkdir(parents=True, exist_ok=True)
    concept_file = save_concept(corr, out / "concept.json", overwrite=True)
    fixed = apply_correction(method, tuned, cfg, plan, model, corr, out / "model", log, progress, device)
    yield _line("before", fixed.before)
    yield _line("after", fixed.after)
    before, after, train = fixed.before, fixed.after, fixed.train
    rec = Revision(
        method=method,
        concept={
            "name": concept,
            "class": saved.label,
            "layer": saved.layer,
            "checkpoint": saved.checkpoint,
            "checkpoint_sha256": saved.model_digest,
            "file": concept_file.relative_to(run_dir).as_posix(),
            "n_carrying": int(retrieved.sum()),
        },
        options=options,
        before=before,
        after=after,
        train=train,
    )
    write_json_atomic(out / RECORD, rec.to_dict(), digest=True)
    yield f"-> {out / RECORD}"


def _line(when: str, m: Measures) -> str:
    parts = [f"{when}: test accuracy {m.test_acc:.4f}"]
    if m.test_splits:
        parts.append(", ".join(f"{k} {v['acc']:.4f}" for k, v in m.test_splits.items()))
    if m.artefact_share:
        parts.append(
            f"gradient share on the artefact {m.artefact_share['gradient']:.3f} (its area {m.artefact_share['area']:.3f})"
        )
    if m.tcav is not None and m.sensitivity is not None:
        parts.append(f"TCAV {m.tcav:.3f}, sensitivity along the CAV {m.sensitivity:.4g}")
    return "; ".join(parts)


def revisions(run_dir: str | Path) -> dict[str, Revision]:
    """Every revision saved in a run (``<method>-<concept>`` -> record), verified."""
    folder = Path(run_dir) / REVISE_DIR
    return {p.parent.name: read_revision(p) for p in sorted(folder.glob(f"*/{RECORD}"))} if folder.is_dir() else {}
