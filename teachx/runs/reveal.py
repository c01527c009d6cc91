"""`teachx reveal RUN_DIR`: look for a trained classifier's shortcuts in its own training data, class by class,
and (with a concept) fit a CAV for a group, retrieve every training image that carries it and localise it.

Layout in the run directory (every file written atomically; JSON records carry their digest and the sha256
of their arrays, both verified on read):

- ``reveal/<method>/class_<c>.json``: the typed record of class ``c`` (settings, eigengap, the candidate
  groups in ranking order: by specificity, or most suspicious first) -- written last, so it marks the class as
  done;
- ``reveal/<method>/class_<c>.npz``: per sample its dataset index, score, group, 2-D embedding and the
  features it was ranked on (the layer's pooled activations, or the class-standardised stack of every
  nonlinearity's); ``class_<c>.png``: the embedding coloured by group and each top group's prototypes with
  their maps;
- ``reveal/concepts/<name>.json`` / ``.npz``: a named concept (its CAV, layer, model digest, members, the
  CAV score of every training image, and heatmaps and masks of the images that carry it), which a later
  `teachx revise` reads.

A class whose record is there, intact and made with the same settings (method, options, features, ranking,
layer, teacher, model) is skipped, so an interrupted reveal resumes. A method's folder holds one reveal: records
made with other settings (an older default, another model) are refused in one line before anything runs, and
``replace=True`` (``--replace``) removes them when the first new record is written, so that results of two
settings are never mixed.

Why one module of over 500 lines: the class records, the concept record and the figure are written and read
back in one place, so that their layout and digests are defined once for the CLI, the viewer and `teachx revise`.
"""

from __future__ import annotations

import copy
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from teachx.config.loader import from_dict
from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.errors import CheckpointError, ConfigError, CorruptionError, DataError, RunDirError
from teachx.reveal import ALGORITHM_VERSION, REVEAL_METHODS, CandidateGroup, Evidence, RevealResult
from teachx.reveal import build as build_method
from teachx.reveal.cav import CAV_KINDS, auroc, fit_cav, grow_concept
from teachx.reveal.evaluate import concept_against_truth, detection
from teachx.data.artefacts import ground_truth, has_ground_truth
from teachx.reveal.features import (
    LayerStack,
    activation_layers,
    check_layer,
    classifier_input,
    default_layer,
    find_module,
    layer_shapes,
    pooled_activations,
    pooled_relevances,
    stacked_activations,
)
from teachx.reveal.specificity import rank_by_specificity
from teachx.reveal.localise import CHANGED, NEIGHBOURS, concept_masks, reference_indices
from teachx.teachers import TEACHERS
from teachx.utils.hashing import hash_json, sha256_file
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic
from teachx.utils.runtime import configure_threads
from teachx.utils.seeding import choose_device
from teachx.runs import figures
from teachx.models import BUILT_IN_MAP_MODELS
from teachx.runs.explain import load_impactx
from teachx.runs.plan import make_plan
from teachx.runs.recovery import stage_checkpoint, stage_done
from teachx.runs.rundir import run_dir_kind, saved_run_config
from teachx.runs.stages import load_stage_model
from teachx.runs.teacher import as_nchw, teacher_maps

REVEAL_DIR = "reveal"
CONCEPTS = "concepts"
RECORD_VERSION = 1
#: what the latent methods read of the layer: its pooled activations, or its LRP relevances for the class
LATENTS = ("activations", "relevances")
#: the reveal method of `teachx reveal` without --method (with FEATURES[0] and RANKS[0]: a study's reveal)
DEFAULT_METHOD = "spray_latent"
#: what the groups are found and ranked on: every nonlinearity's pooled activations side by side, each unit
#: standardised over the class (teachx.reveal.features.LayerStack), or one layer's raw pooled activations
FEATURES = ("stack", "layer")
#: how the candidate groups are ranked: by their concept's specificity against the other classes
#: (teachx.reveal.specificity), or by the reveal method's own suspicion score
RANKS = ("specificity", "method")
#: with the specificity ranking: the class split in this many groups (methods that take n_groups), and the top
#: group merged with the next ones as specific within this AUROC (measured: docs/studies/r2r-fashion-mnist.md)
SPECIFIC_GROUPS = 6
MERGE = 0.02
#: a study's reveal grows the top group for at most this many rounds before its CAV is fitted
#: (teachx.reveal.cav.grow_concept; measured: docs/studies/r2r-fashion-mnist.md); `teachx reveal --refine`
REFINE = 5
#: the settings a record made before the features and ranking were options holds implicitly
_FORMER = {"features": "layer", "rank": "method"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ConceptChoice:
    """What --concept names: a candidate group of the class (``group``; -1 with ``top``: the top-ranked one)
    or dataset indices a person marks (``indices``)."""

    group: Optional[int] = None
    indices: Optional[tuple[int, ...]] = None

    @classmethod
    def parse(cls, text: str) -> "ConceptChoice":
        t = text.strip()
        if t == "top":
            return cls(group=-1)
        if re.fullmatch(r"\d+", t):
            return cls(group=int(t))
        parts = [p.strip() for p in t.split(",")]
        if "," in t and all(re.fullmatch(r"\d+", p) for p in parts if p):
            idx = tuple(int(p) for p in parts if p)
            if len(set(idx)) < 2:
                raise ConfigError(
                    f"--concept {text}: a concept needs at least 2 samples; mark 2 or more training indices, e.g. --concept 4,17,23"
                )
            return cls(indices=tuple(sorted(set(idx))))
        raise ConfigError(
            f"--concept {text}: pass a group number of the class (e.g. --concept 2), 'top' for the top-ranked group, "
            "or 2 or more training-image indices separated by commas (e.g. --concept 4,17,23)"
        )


@dataclass(frozen=True)
class ClassRecord:
    """The saved reveal of one class (``class_<c>.json`` and its arrays)."""

    label: int
    class_name: str
    key: str
    settings: dict[str, Any]
    result: RevealResult
    activations: np.ndarray


def find_classifier(run_dir: Path) -> Path:
    """The stage directory of the run's trained classifier: ``baseline/`` of `teachx run` / `demo`, or the
    directory itself for `teachx train`; a one-line error when there is none yet."""
    for stage in (run_dir / "baseline", run_dir):
        if (stage / "stage.json").is_file() and stage_done(stage):
            return stage
    raise CheckpointError(
        f"run directory '{run_dir}' has no trained classifier yet; train one there first "
        f"(`teachx train --out {run_dir}` or `teachx run --out {run_dir}`, or let the running one finish)"
    )


def _builtin_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of the run's finished model with built-in maps (IMPACTX or ABN stage)."""
    for stage in BUILT_IN_MAP_MODELS:
        if (run_dir / stage / "stage.json").is_file() and stage_done(run_dir / stage):
            return _classifier_checkpoint(run_dir / stage)
    raise CheckpointError(
        f"run directory '{run_dir}' has no finished IMPACTX or ABN model for --teacher builtin; finish `teachx run` "
        "there (method impactx or abn), or pass a teacher method with --teacher (`teachx teachers`)"
    )


def _classifier_checkpoint(stage: Path) -> Path:
    return stage_checkpoint(stage, stage_done(stage) or {})


def _check_run_dir(run_dir: Path) -> RunConfig:
    kind = run_dir_kind(run_dir)
    if kind != "teachx" or not (run_dir / "config.yaml").is_file():
        raise RunDirError(
            f"'{run_dir}' is not a teachx run directory; pass the --out folder of `teachx train`, `teachx run` or `teachx demo`"
        )
    _, data = saved_run_config(run_dir)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"the config in '{run_dir / 'config.yaml'}': {exc}") from None


def _read_class(path: Path, key: str) -> Optional[ClassRecord]:
    """The saved class record at ``path`` when complete, intact and made with settings ``key``; None otherwise.
    A damaged record or arrays: CorruptionError with the fix."""
    if not path.is_file():
        return None
    fix = f"remove '{path.parent}' and run the same `teachx reveal` again"
    rec = read_trusted_json(path, fix, "reveal record")
    if rec.get("key") != key:
        return None
    arrays = path.with_suffix(".npz")
    if not arrays.is_file() or sha256_file(arrays) != rec.get("arrays_sha256"):
        raise CorruptionError.of(arrays, "missing, or its content does not match its record", fix, "reveal arrays")
    with np.load(arrays) as z:
        a = {k: z[k] for k in z.files}
    result = RevealResult(
        method=rec["method"],
        indices=a["indices"],
        scores=a["scores"],
        labels=a["labels"],
        embedding=a["embedding"],
        groups=tuple(CandidateGroup.from_dict(g) for g in rec["groups"]),
        eigenvalues=np.asarray(rec["eigenvalues"]) if rec.get("eigenvalues") is not None else None,
        n_groups_eigengap=rec.get("n_groups_eigengap"),
        options=dict(rec.get("options") or {}),
    )
    return ClassRecord(int(rec["class"]), str(rec["class_name"]), key, dict(rec["settings"]), result, a["activations"])


def _save_npz(path: Path, **arrays: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return sha256_file(path)


def _write_class(path: Path, rec: ClassRecord) -> None:
    r = rec.result
    sha = _save_npz(
        path.with_suffix(".npz"),
        indices=r.indices,
        scores=r.scores,
        labels=r.labels,
        embedding=r.embedding,
        activations=rec.activations.astype(np.float32),
    )
    write_json_atomic(
        path,
        {
            "version": RECORD_VERSION,
            "class": rec.label,
            "class_name": rec.class_name,
            "method": r.method,
            "options": r.options,
            "key": rec.key,
            "settings": rec.settings,
            "n_samples": int(len(r.indices)),
            "n_groups_eigengap": r.n_groups_eigengap,
            "eigenvalues": None if r.eigenvalues is None else [float(v) for v in r.eigenvalues],
            "ranking": [g.group for g in r.groups],
            "groups": [g.to_dict() for g in r.groups],
            "arrays": path.with_suffix(".npz").name,
            "arrays_sha256": sha,
        },
        digest=True,
    )


def reveal_run(
    run_dir: str | Path,
    method: str = DEFAULT_METHOD,
    layer: Optional[str] = None,
    teacher: Optional[str] = None,
    classes: Optional[list[int]] = None,
    concept: Optional[str] = None,
    name: Optional[str] = None,
    cav_kind: str = "pattern",
    localise_with: str = "lrp",
    latent: str = "activations",
    features: str = "stack",
    rank: Optional[str] = None,
    replace: bool = False,
    refine: int = 0,
    max_localise: int = 500,
    batch_size: int = 128,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Iterator[str]:
    """Run reveal in ``run_dir`` (held by the caller); yields the lines to print (``log``: progress notes, such
    as the teacher maps being made). Every check that can fail on the user's input runs before anything is
    written.

    ``features``: what the groups are found on (latent methods) and ranked on (``rank="specificity"``): ``stack``,
    every nonlinearity's pooled activations (:class:`LayerStack`, as a study's reveal), or ``layer``, the raw
    pooled activations of ``layer``. ``rank``: ``specificity`` (six groups where the method takes a number, the
    top group merged with as specific ones) or ``method`` (the method's own ranking); None: specificity for the
    methods that find groups. ``layer``: the one layer of a concept's CAV, retrieval and localisation (None: the
    classifier's input features with the stack, as a study's corrections use; the last feature maps with one
    layer); with ``features="layer"`` also the layer grouped on. ``refine``: a concept's images are first grown
    for at most this many rounds (:func:`teachx.reveal.cav.grow_concept`; 0: the group or marked images alone).

    A teacher's maps come from (or go into) the shared teacher-map store, keyed by the model's weights: the
    maps a `teachx run` made of its baseline are reused, and maps made here are kept for the next reveal."""
    run_dir = Path(run_dir)
    cfg = _check_run_dir(run_dir)
    builtin = teacher == "builtin"
    # the model analysed: the trained classifier, or with --teacher builtin the model whose built-in maps are used
    checkpoint = _builtin_checkpoint(run_dir) if builtin else _classifier_checkpoint(find_classifier(run_dir))
    reveal = build_method(method)
    if features not in FEATURES:
        raise ConfigError(f"unknown --features '{features}'; valid: {', '.join(FEATURES)}")
    if rank is not None and rank not in RANKS:
        raise ConfigError(f"unknown --rank '{rank}'; valid: {', '.join(RANKS)}")
    if rank == "specificity" and reveal.finds != "groups":
        raise ConfigError(
            f"--rank specificity ranks groups that share a feature, and {reveal.name} flags single unusual images "
            "instead; use --rank method with it, or a method that finds groups (--method spray_latent or spray)"
        )
    rank = rank or ("specificity" if reveal.finds == "groups" else "method")
    if rank == "specificity" and "n_groups" in reveal.options():
        reveal = build_method(method, n_groups=SPECIFIC_GROUPS)
    choice = ConceptChoice.parse(concept) if concept is not None else None
    if latent not in LATENTS:
        raise ConfigError(f"unknown latent '{latent}'; valid: {', '.join(LATENTS)}")
    if cav_kind not in CAV_KINDS:
        raise ConfigError(f"unknown CAV kind '{cav_kind}'; valid: {', '.join(CAV_KINDS)}")
    if refine < 0:
        raise ConfigError(
            f"--refine {refine}: pass a number of rounds, 0 or more (0: no growing), e.g. --refine {REFINE}"
        )
    if choice is not None and (classes is None or len(classes) != 1):
        raise ConfigError("--concept needs exactly one --class: the class whose samples form the concept")
    if name is not None and not _NAME.match(name):
        raise ConfigError(f"--name '{name}': use letters, digits, '.', '_' and '-' (at most 64), e.g. --name tag")
    if teacher is not None and not builtin:
        teacher = TEACHERS.canonical(teacher)
    teacher_name = teacher or TEACHERS.canonical(cfg.teacher.method)

    configure_threads(cfg.train.threads)  # train.threads / $TEACHX_THREADS, as the run trained
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    model = load_impactx(checkpoint)[0] if builtin else load_stage_model(checkpoint.parent.parent)
    device = choose_device("auto" if cfg.device in (None, "auto") else cfg.device)
    model.to(device)
    model_digest = sha256_file(checkpoint)

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]).to(device), plan.mean, plan.std)

    shapes = layer_shapes(model, batch(plan.train_idx[:1]))
    if layer is not None:
        layer = check_layer(layer, shapes)
    stacked = features == "stack"
    layer = layer or (classifier_input(shapes) if stacked else default_layer(shapes))
    layers = activation_layers(model, shapes) if stacked else [layer]
    sizes = [shapes[n][0] for n in layers]
    labels = np.asarray(ds.train.labels)
    train_idx = np.sort(np.asarray(plan.train_idx))
    wanted = list(range(ds.num_classes)) if classes is None else list(dict.fromkeys(classes))
    for c in wanted:
        if not 0 <= c < ds.num_classes:
            raise ConfigError(f"--class {c}: the dataset has {ds.num_classes} classes (0-{ds.num_classes - 1})")
    members_of = {c: train_idx[labels[train_idx] == c] for c in wanted}
    for c in wanted:
        if len(members_of[c]) < reveal.min_samples:
            raise DataError(
                f"class {c} ({ds.class_names[c]}) has {len(members_of[c])} training images; {method} needs at least "
                f"{reveal.min_samples} to find groups; choose another class with --class"
            )
    if choice is not None and choice.indices is not None:
        _check_marked(choice.indices, wanted[0], train_idx, labels, ds.class_names)
    needs_maps = reveal.source == "maps"
    settings = {
        "method": reveal.name,
        "options": reveal.options(),
        "layer": None if stacked else layer,  # the stack's groups do not depend on the concept's layer
        "teacher": teacher_name if needs_maps else None,
        "latent": None if needs_maps else latent,
        "model": checkpoint.relative_to(run_dir).as_posix(),
        "model_digest": model_digest,
        "split": "train",
    }
    if {"features": features, "rank": rank} != _FORMER:  # the former settings keep their key: such records resume
        settings.update(
            features=features,
            layers=layers,
            rank=rank,
            merge=MERGE if rank == "specificity" else None,
            algorithm=ALGORITHM_VERSION,  # a later change to the algorithm keys the records anew
        )
    key = hash_json(settings)
    out = run_dir / REVEAL_DIR / reveal.name
    stale = _other_settings(out, key, settings, replace)
    from tqdm.auto import tqdm

    todo = {c: None for c in wanted}
    for c in wanted:
        todo[c] = _read_class(out / f"class_{c}.json", key)
    total = sum(len(members_of[c]) for c in wanted if todo[c] is None)
    explain = None
    if needs_maps and total and builtin:

        def explain(model: torch.nn.Module, idx: np.ndarray) -> torch.Tensor:  # the label's map (per-class models)
            with torch.no_grad():
                return model.explain(batch(idx), torch.from_numpy(labels[idx]).long().to(device))

    elif needs_maps and total:
        tcfg = cfg
        if teacher_name != TEACHERS.canonical(cfg.teacher.method):  # another method than the run's: its defaults
            tcfg = copy.deepcopy(cfg)
            tcfg.teacher.method, tcfg.teacher.options = teacher_name, {}
        needed = np.concatenate([members_of[c] for c in wanted if todo[c] is None])
        store = teacher_maps(tcfg, plan, model, "train", needed, device, log=log, progress=progress)

        def explain(model: torch.nn.Module, idx: np.ndarray) -> torch.Tensor:
            return store.read(idx)

    # the specificity ranking compares each class with the others: the features of every training image
    every = None
    if total and (stacked or rank == "specificity"):
        every = stacked_activations(model, batch, train_idx, layers, batch_size)
    scale = LayerStack.fit if stacked else LayerStack.raw

    def clear_stale() -> None:  # --replace: the records made with other settings go, right before a new one is written
        while stale:
            stale.pop().unlink(missing_ok=True)

    # an artefact benchmark: how well each class's reveal found the artefact (read after the method ran, never by it)
    truth = ground_truth(ds) if has_ground_truth(ds) else None
    found: dict[str, Any] = {}
    with tqdm(total=total, unit="img", desc="reveal", disable=not progress or not total, leave=False) as bar:
        for c in wanted:
            rec = todo[c]
            if rec is not None:
                yield f"class {c} ({rec.class_name}): done, skipped"
            else:
                idx = members_of[c]
                in_class = labels[train_idx] == c
                if every is None:
                    stack, acts = None, pooled_activations(model, batch, idx, layer, batch_size)
                else:
                    stack = scale(layers, sizes, every[in_class])
                    acts = stack.transform(every[in_class]).astype(np.float32)
                maps = None
                if explain is not None:
                    rows = [
                        explain(model, idx[s : s + batch_size]).float().cpu().numpy()
                        for s in range(0, len(idx), batch_size)
                    ]
                    maps = np.concatenate(rows)
                bar.update(len(idx))
                latents = acts
                if not needs_maps and latent == "relevances":  # each unit's share of the class's logit
                    rel = np.concatenate(
                        [pooled_relevances(model, batch, idx, labels[idx], n, batch_size) for n in layers], 1
                    )
                    latents = scale(layers, sizes, rel).transform(rel) if stacked else rel
                result = reveal.reveal(Evidence(indices=idx, maps=maps, activations=latents, label=c))
                if rank == "specificity":
                    where = {int(i): k for k, i in enumerate(idx)}
                    class_x = acts[[where[int(i)] for i in result.indices]]
                    result = rank_by_specificity(result, class_x, stack.transform(every[~in_class]), MERGE)
                rec = ClassRecord(c, ds.class_names[c], key, settings, result, acts)
                if choice is not None:
                    _concept_rows(choice, rec)  # a missing group fails here, before this class is written
                clear_stale()
                _class_figure(out / f"class_{c}.png", rec, ds, maps)
                _write_class(out / f"class_{c}.json", rec)  # last: the record marks the class as done
            yield _summary_line(rec)
            scored = None if truth is None else detection(rec.result, truth.train_poisoned[rec.result.indices], c)
            if scored is not None:
                found[str(c)] = scored.to_dict()
                yield scored.line()
    clear_stale()  # every class asked for was done already: the others made with other settings still go
    if found:
        _merge_evaluation(out / GROUND_TRUTH, key, found)
    if choice is None:
        return
    rec = todo[wanted[0]] or _read_class(out / f"class_{wanted[0]}.json", key)
    yield from _concept(
        run_dir,
        rec,
        choice,
        name,
        cav_kind,
        layer,
        model,
        batch,
        train_idx,
        labels,
        checkpoint,
        model_digest,
        localise_with,
        max_localise,
        batch_size,
        progress,
        truth,
        refine,
    )


def same_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The :func:`reveal_run` options that reveal with a class record's ``settings`` again (its key matches): what
    the viewer passes to reveal another class of the same folder, or to fit a concept on a saved reveal."""
    return {
        "layer": settings.get("layer"),
        "teacher": settings.get("teacher"),
        "latent": settings.get("latent") or "activations",
        "features": settings.get("features", _FORMER["features"]),
        "rank": settings.get("rank", _FORMER["rank"]),
    }


def saved_settings(run_dir: str | Path, method: str) -> Optional[dict[str, Any]]:
    """The settings of a run's saved reveal by ``method`` (those of its first class record), None when none."""
    out = Path(run_dir) / REVEAL_DIR / REVEAL_METHODS.canonical(method)
    for path in sorted(out.glob("class_*.json")):
        return dict(
            read_trusted_json(path, f"remove '{out}' and run `teachx reveal` again", "reveal record")["settings"]
        )
    return None


def _other_settings(out: Path, key: str, settings: dict[str, Any], replace: bool) -> list[Path]:
    """The files of the class records in ``out`` made with other settings than ``key`` (with their arrays and
    figures), to remove with ``replace``; without it, a one-line error naming the differences and both fixes."""
    stale: list[Path] = []
    for path in sorted(out.glob("class_*.json")):
        rec = read_trusted_json(path, f"remove '{out}' and run the same `teachx reveal` again", "reveal record")
        if rec.get("key") == key:
            continue
        if not replace:
            old = {**_FORMER, **dict(rec.get("settings") or {})}
            shown = {"options": lambda v: "other", "model_digest": lambda v: str(v)[:8]}
            diff = [k for k in _ORDER if old.get(k) != settings.get(k)]
            # what follows from another choice: the stack has no one layer, the ranking sets the number of groups
            diff = [k for k in diff if (k, "features") not in _FOLLOWS or "features" not in diff]
            diff = [k for k in diff if (k, "rank") not in _FOLLOWS or "rank" not in diff]
            what = "; ".join(
                f"{k.replace('_', ' ')} {shown.get(k, str)(old.get(k))}, now {shown.get(k, str)(settings.get(k))}"
                for k in diff[:2]
            )
            same = "" if {"model", "model_digest"} & set(diff) else f"pass {_options_of(old)} to add to it, or "
            raise ConfigError(
                f"'{out}' holds a reveal made with other settings ({what}); {same}add --replace to reveal anew "
                "with these"
            )
        stale += [path, path.with_suffix(".npz"), path.with_suffix(".png")]
    if stale:
        stale.append(out / GROUND_TRUTH)
    return stale


#: (setting, the choice it follows from): a mismatch names the choice only
_FOLLOWS = {("layer", "features"), ("options", "rank")}
#: the settings a mismatch names, the ones a user chooses first
_ORDER = ("features", "rank", "layer", "latent", "teacher", "options", "algorithm", "model", "model_digest")


def _options_of(settings: dict[str, Any]) -> str:
    """The `teachx reveal` options that reveal with a record's ``settings`` again."""
    s = same_settings(settings)
    opts = f"--features {s['features']} --rank {s['rank']}"
    if s["layer"]:
        opts += f" --layer {s['layer']}"
    if s["latent"] != "activations":
        opts += f" --latent {s['latent']}"
    if s["teacher"]:
        opts += f" --teacher {s['teacher']}"
    return opts


def _check_marked(indices, cls: int, train_idx: np.ndarray, labels: np.ndarray, class_names) -> None:
    known = set(train_idx.tolist())
    outside = [i for i in indices if i not in known]
    if outside:
        raise ConfigError(
            f"--concept: {', '.join(map(str, outside[:5]))} {'is not a training image' if len(outside) == 1 else 'are not training images'} "
            f"of this run; use indices from reveal/<method>/class_{cls}.json"
        )
    other = [i for i in indices if labels[i] != cls]
    if other:
        raise ConfigError(
            f"--concept mixes classes: {', '.join(map(str, other[:5]))} belong to class {int(labels[other[0]])} "
            f"({class_names[int(labels[other[0]])]}), not class {cls}; mark samples of one class"
        )


def _concept_rows(choice: ConceptChoice, rec: ClassRecord) -> tuple[np.ndarray, str]:
    """(boolean mask over the class's samples, description) of the concept; a one-line error for a group the
    class does not have."""
    r = rec.result
    if choice.indices is not None:
        return np.isin(r.indices, np.asarray(choice.indices)), "marked"
    groups = r.groups
    g = groups[0] if choice.group == -1 else next((x for x in groups if x.group == choice.group), None)
    if g is None:
        raise ConfigError(
            f"--concept {choice.group}: class {rec.label} has no group {choice.group}; its groups are "
            f"{', '.join(str(x.group) for x in groups)} (most suspicious first)"
        )
    mask = np.isin(r.indices, np.asarray(g.members))
    if mask.sum() < 2:
        raise ConfigError(f"--concept {g.group}: the group has {int(mask.sum())} sample; a concept needs at least 2")
    return mask, f"group {g.group}"


def _concept(
    run_dir,
    rec,
    choice,
    name,
    cav_kind,
    layer,
    model,
    batch,
    train_idx,
    labels,
    checkpoint,
    model_digest,
    localise_with,
    max_localise,
    batch_size,
    progress,
    truth=None,
    refine: int = 0,
) -> Iterator[str]:
    mask, source = _concept_rows(choice, rec)
    if len(mask) - mask.sum() < 2:
        raise ConfigError(
            f"--concept: the concept holds {int(mask.sum())} of the class's {len(mask)} samples; leave at least 2 outside it"
        )
    name = name or (
        f"class{rec.label}-group{source.split()[-1]}" if choice.indices is None else f"class{rec.label}-marked"
    )
    from tqdm.auto import tqdm

    with tqdm(total=len(train_idx), unit="img", desc="retrieve", disable=not progress, leave=False) as bar:
        all_acts = pooled_activations(model, batch, train_idx, layer, batch_size, bar.update)
    # fitted at the one layer --layer names, on the class's rows of that pass (the groups may come from a stack
    # of layers; a correction needs one direction at one layer)
    class_acts = all_acts[np.searchsorted(train_idx, rec.result.indices)]
    chosen_by = int(mask.sum())
    if refine:  # grown to the class's images that share the concept, against the other classes' images
        mask = grow_concept(class_acts, mask, all_acts[labels[train_idx] != rec.label], refine)
    cav = fit_cav(class_acts, mask, cav_kind, layer)
    in_class = auroc(cav.scores(class_acts), mask)
    scores = cav.scores(all_acts)
    threshold = cav.threshold
    members = rec.result.indices[mask]
    retrieved, chosen = cav.retrieve(scores, train_idx, members, max_localise)
    module = find_module(model, layer)
    # the class's images least like the concept stand for it without the concept (see teachx.reveal.localise)
    references = reference_indices(cav.scores(class_acts), rec.result.indices)
    with tqdm(total=len(chosen), unit="img", desc="localise", disable=not progress, leave=False) as bar:
        heat, masks = concept_masks(
            model, batch, chosen, references, module, cav.direction, localise_with, batch_size, bar.update
        )
    # an artefact benchmark: retrieval and localisation against the truth (not used above)
    scored = None if truth is None else concept_against_truth(truth, train_idx, scores, chosen, masks)
    dest = run_dir / REVEAL_DIR / CONCEPTS / f"{name}.json"
    if dest.is_file():
        yield f"notice: replacing the concept '{name}' an earlier `teachx reveal` saved (choose another with --name)"
    sha = _save_npz(
        dest.with_suffix(".npz"),
        cav=cav.direction.astype(np.float64),
        indices=train_idx,
        scores=scores,
        members=members,
        localised=chosen,
        heatmaps=heat.astype(np.float16),
        masks=masks,
    )
    write_json_atomic(
        dest,
        {
            "version": RECORD_VERSION,
            "name": name,
            "class": rec.label,
            "class_name": rec.class_name,
            "source": source,
            **({"grown": {"rounds": refine, "from": chosen_by, "to": int(mask.sum())}} if refine else {}),
            "reveal": rec.settings,
            "layer": layer,
            "cav": cav.to_dict(),
            "model_digest": model_digest,
            "checkpoint": Path(checkpoint).relative_to(run_dir).as_posix(),
            "members": [int(i) for i in members],
            "auroc_in_class": in_class,
            "retrieval_threshold": threshold,
            "n_retrieved": int(len(retrieved)),
            "localisation": {
                "method": localise_with,
                "mask": "contrast",
                "references": int(len(references)),
                "neighbours": NEIGHBOURS,
                "changed": CHANGED,
                "n_images": int(len(chosen)),
            },
            "arrays": dest.with_suffix(".npz").name,
            "arrays_sha256": sha,
            **({"ground_truth": {**scored.to_dict(), "note": GROUND_TRUTH_NOTE}} if scored is not None else {}),
        },
        digest=True,
    )
    grown = f", grown from {chosen_by}" if refine else ""
    yield (
        f"concept '{name}' ({source} of class {rec.label}, {int(mask.sum())} samples{grown}): {cav_kind} CAV at {layer}, "
        f"in-class AUROC {in_class:.3f}; {len(retrieved)} training images score above its threshold; "
        f"{len(chosen)} localised -> {dest}"
    )
    if scored is not None:
        yield scored.line()


@dataclass(frozen=True)
class SavedConcept:
    """A concept `teachx reveal --concept` saved: what a correction step reads.

    ``cav``: the unit direction at ``layer`` (pooled activations, spatial maxima); ``model_digest``: the sha256
    of the checkpoint (``checkpoint``, relative to the run) it was fitted on; ``members``: the dataset indices
    it was fitted from; ``scores``: the CAV score of every training image ``indices``; ``localised``: the
    images with a ``heatmaps`` (N, H, W) and ``masks`` (N, H, W) entry (the members and the images scoring
    above ``threshold``).
    """

    name: str
    label: int
    layer: str
    cav_kind: str
    cav: np.ndarray
    model_digest: str
    checkpoint: str
    members: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    threshold: float
    localised: np.ndarray
    heatmaps: np.ndarray
    masks: np.ndarray
    record: dict[str, Any]


def read_concept(path: str | Path) -> SavedConcept:
    """A saved concept, its record and arrays verified; a damaged one is one line with the fix."""
    path = Path(path)
    fix = f"run `teachx reveal` with --concept again to write '{path.name}' anew"
    rec = read_trusted_json(path, fix, "concept record")
    arrays = path.with_suffix(".npz")
    if not arrays.is_file() or sha256_file(arrays) != rec.get("arrays_sha256"):
        raise CorruptionError.of(arrays, "missing, or its content does not match its record", fix, "concept arrays")
    with np.load(arrays) as z:
        a = {k: z[k] for k in z.files}
    return SavedConcept(
        name=str(rec["name"]),
        label=int(rec["class"]),
        layer=str(rec["layer"]),
        cav_kind=str(rec["cav"]["kind"]),
        cav=a["cav"],
        model_digest=str(rec["model_digest"]),
        checkpoint=str(rec["checkpoint"]),
        members=a["members"],
        indices=a["indices"],
        scores=a["scores"],
        threshold=float(rec["retrieval_threshold"]),
        localised=a["localised"],
        heatmaps=a["heatmaps"].astype(np.float32),
        masks=a["masks"],
        record=rec,
    )


#: in each method's folder: how its classes' reveal did against an artefact benchmark's ground truth
GROUND_TRUTH = "ground_truth.json"
GROUND_TRUTH_NOTE = (
    "how the reveal did against the benchmark's ground truth (which images carry the artefact, and where); "
    "the reveal methods never read it"
)


def _merge_evaluation(path: Path, key: str, classes: dict[str, Any]) -> None:
    """Add ``classes`` to the evaluation record ``path``; a reveal made with other settings (another ``key``)
    replaces the classes of the earlier one."""
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = read_trusted_json(path, "", "evaluation record")
        except CorruptionError:
            old = {}  # a summary of other records, rebuilt here: a damaged one is replaced
    kept = old.get("classes", {}) if old.get("key") == key else {}
    write_json_atomic(path, {"key": key, "note": GROUND_TRUTH_NOTE, "classes": {**kept, **classes}}, digest=True)


def read_evaluation(run_dir: str | Path, method: str) -> dict[str, Any]:
    """How a run's reveal by ``method`` did per class against an artefact benchmark's ground truth ({} when
    there is none), verified; a concept's is in its own record (``SavedConcept.record["ground_truth"]``)."""
    path = Path(run_dir) / REVEAL_DIR / REVEAL_METHODS.canonical(method) / GROUND_TRUTH
    if not path.is_file():
        return {}
    return read_trusted_json(path, f"run `teachx reveal` again to write '{path.name}' anew", "evaluation record")


def read_class(run_dir: str | Path, method: str, label: int) -> Optional[ClassRecord]:
    """The saved reveal of class ``label`` by ``method`` in a run (None when there is none), verified."""
    path = Path(run_dir) / REVEAL_DIR / REVEAL_METHODS.canonical(method) / f"class_{label}.json"
    if not path.is_file():
        return None
    rec = read_trusted_json(path, f"remove '{path.parent}' and run `teachx reveal` again", "reveal record")
    return _read_class(path, rec.get("key"))


def ranked_by_specificity(result: RevealResult) -> bool:
    """Whether the groups' scores are specificities (``--rank specificity``), not the method's suspicion scores."""
    return result.options.get("rank") == "specificity"


def score_words(result: RevealResult) -> tuple[str, str]:
    """(what a group's score is called, the order of the ranking) in the words users read."""
    if ranked_by_specificity(result):
        return "specificity", "most specific to the class first"
    return "score", "most suspicious first"


def _summary_line(rec: ClassRecord) -> str:
    r = rec.result
    top = r.groups[0]
    gap = f", eigengap suggests {r.n_groups_eigengap}" if r.n_groups_eigengap is not None else ""
    what, order = score_words(r)
    ranking = "; ".join(f"group {g.group}: {g.size} images, {what} {g.score:.3f}" for g in r.groups[:3])
    merged = int(top.parts.get("merged", 0))
    joined = f", merged with {merged} as specific group{'s' if merged > 1 else ''}" if merged else ""
    return (
        f"class {rec.label} ({rec.class_name}): {len(r.indices)} images, {len(r.groups)} groups{gap}; {order}: "
        f"{ranking} (top: {top.group}{joined})"
    )


def _class_figure(path: Path, rec: ClassRecord, ds, maps: Optional[np.ndarray]) -> None:
    r = rec.result
    top = r.groups[:4]
    pos = {int(i): k for k, i in enumerate(r.indices)}
    protos = [[pos[i] for i in g.prototypes] for g in top]
    images = torch.from_numpy(np.ascontiguousarray(ds.train.images[r.indices])).permute(0, 3, 1, 2)
    figures.save_reveal_figure(
        path,
        r.embedding,
        r.labels,
        [g.group for g in top],
        [f"group {g.group}: {g.size} images, {score_words(r)[0]} {g.score:.2f}" for g in top],
        [images[p] for p in protos],
        None if maps is None else [torch.from_numpy(np.asarray(maps)[p]) for p in protos],
        title=f"class {rec.label} ({rec.class_name}): {r.method}",
    )


class RevealMaps:
    """The attribution maps a saved reveal of a class reads (its teacher's, or the built-in maps of the model
    it analysed), for any training images: what a viewer shows next to them. ``settings`` are a class record's
    (:attr:`ClassRecord.settings`); a latent method's record names no teacher, so the run's teacher is used.
    Maps come from the shared teacher-map store (those the reveal made are read, missing ones are made)."""

    def __init__(self, run_dir: str | Path, settings: dict[str, Any], device: str = "cpu"):
        self.run_dir = Path(run_dir)
        self.cfg = _check_run_dir(self.run_dir)
        run_teacher = TEACHERS.canonical(self.cfg.teacher.method)
        self.teacher = str(settings.get("teacher") or run_teacher)
        checkpoint = self.run_dir / str(settings["model"])
        builtin = self.teacher == "builtin"
        self.model = load_impactx(checkpoint)[0] if builtin else load_stage_model(checkpoint.parent.parent)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.plan = make_plan(self.cfg, progress=False)
        self.tcfg = self.cfg
        if not builtin and self.teacher != run_teacher:  # another method than the run's: its defaults
            self.tcfg = copy.deepcopy(self.cfg)
            self.tcfg.teacher.method, self.tcfg.teacher.options = self.teacher, {}

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 maps of the training images ``indices`` (each of its own label)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.teacher == "builtin":
            ds = self.plan.dataset
            x = normalize(as_nchw(ds.train.images[idx]).to(self.device), self.plan.mean, self.plan.std)
            labels = torch.from_numpy(np.asarray(ds.train.labels)[idx]).long().to(self.device)
            with torch.no_grad():
                m = self.model.explain(x, labels)
        else:
            store = teacher_maps(
                self.tcfg, self.plan, self.model, "train", idx, self.device, log=lambda _m: None, progress=False
            )
            m = store.read(idx)
        m = m.float().cpu().numpy()
        return m[:, None] if m.ndim == 3 else m
