"""The reveal view of `teachx serve`: the person-in-the-loop step of Reveal-to-Revise, over what
`teachx reveal` saved in a run directory (:mod:`teachx.runs.reveal`).

Routes, under ``/api/v1/runs/{run_id}/reveal`` (typed by the models below, so ``/openapi.json`` is the
contract):

- ``GET  .../reveal``: the classes of the run, which reveal methods have results for each, the saved concepts;
- ``GET  .../reveal/{method}/classes/{c}``: a class's 2-D embedding (a point per training image: index,
  group, suspicion score) and its candidate groups, most suspicious first;
- ``GET  .../reveal/{method}/classes/{c}/groups/{g}/images``: a page of a group's images with the maps the
  reveal read (rendered as the viewer renders maps);
- ``POST .../reveal/{method}/classes/{c}``: reveal one class, as ``teachx reveal RUN --class C`` does, for a
  class of at most ``max_reveal_images`` training images (larger: the answer gives the command);
- ``POST .../reveal/concepts``: fit a concept from a group or marked images, as ``teachx reveal --concept``
  does, and answer its retrieval list and localisation; ``GET .../reveal/concepts/{name}``: a saved one.

Both POSTs run the CLI's own code (:func:`teachx.runs.reveal.reveal_run`) holding the run directory's lock
as the CLI does: a run directory another command holds is a 409. Bad input is a 4xx with one line.

Why one module of over 500 lines: the view's typed request and response models are its API contract and
are kept next to the routes that use them, as the rest of the service does in ``schemas.py`` and ``app.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Literal, Optional

import numpy as np
from fastapi import HTTPException, Query
from pydantic import BaseModel, Field

from teachx.errors import RunDirError, TeachxError
from teachx.reveal import REVEAL_METHODS
from teachx.runs import reveal as runs_reveal
from teachx.service import render
from teachx.service.engine import Service
from teachx.service.errors import NotFound, Unavailable
from teachx.service.schemas import ErrorResponse

log = logging.getLogger("teachx.serve")

#: a class with more training images than this is not revealed from the page (the answer gives the command)
DEFAULT_MAX_REVEAL_IMAGES = 2000
PAGE_MAX = 48  # images (with their maps) in one page of a group
TOP_MAX = 200  # images in a concept's retrieval list
LOCALISED_MAX = 16  # images with heatmaps and masks in a concept's answer
MARKED_MAX = 10_000  # indices in one concept request

ERRORS = {
    404: {"model": ErrorResponse, "description": "unknown run, method, class, group or concept, or no reveal yet"},
    409: {"model": ErrorResponse, "description": "the run directory is held by another command, or the name is used"},
    422: {"model": ErrorResponse, "description": "bad parameters (too few samples, samples of another class, ...)"},
}


# -- the contract ---------------------------------------------------------------------------------


class RevealClassEntry(BaseModel):
    label: int = Field(description="class index")
    name: str
    n_images: int = Field(description="training images of the class (what a reveal analyses)")
    methods: list[str] = Field(description="reveal methods with saved results for this class")


class ConceptEntry(BaseModel):
    name: str
    label: int = Field(description="the class whose images define the concept")
    source: str = Field(description="'group G' or 'marked'")
    layer: str
    n_members: int


class RevealIndex(BaseModel):
    run_id: str
    run_dir: str
    methods: list[str] = Field(description="every reveal method (`teachx reveal --method`)")
    classes: list[RevealClassEntry]
    concepts: list[ConceptEntry]
    max_reveal_images: int = Field(description="the largest class the page may reveal; larger ones: the CLI")


class RevealPoint(BaseModel):
    index: int = Field(description="training-image index in the dataset")
    group: int = Field(description="the candidate group of the image (-1: in none)")
    score: float = Field(
        description="the image's score (see score_name): its group's specificity, or its suspicion score from the "
        "reveal method (higher: more suspicious)"
    )
    x: float
    y: float


class RevealGroup(BaseModel):
    group: int
    rank: int = Field(description="1 = first in the ranking (most specific, or most suspicious)")
    size: int
    score: float = Field(
        description="the ranking score (see score_name): the specificity of the group's concept against the other "
        "classes (AUROC), or the method's suspicion score (SpRAy: mean silhouette x (1 - share of the class))"
    )
    parts: dict[str, float] = Field(description="what the score was made of")
    prototypes: list[int] = Field(description="the group's most typical images (closest to its centre)")


class RevealClass(BaseModel):
    run_id: str
    method: str
    label: int
    name: str
    n_images: int
    settings: dict = Field(description="the reveal's settings: method, options, layer, teacher, model and its digest")
    n_groups_eigengap: Optional[int] = Field(None, description="groups the eigengap suggests (spectral methods)")
    score_name: str = Field(description="what the scores are: 'specificity' or 'suspicion score'")
    score_meaning: str = Field(description="the scores explained in a sentence")
    embedding: str = Field(description="what the 2-D coordinates are")
    points: list[RevealPoint]
    groups: list[RevealGroup]


class RevealImage(BaseModel):
    index: int
    label: int
    score: float = Field(description="the image's suspicion score from the reveal method")
    image_png: str = Field(description="the training image, a PNG data URL")
    map_png: str = Field(description="its map on the viewer's scale: bwr, symmetric [-vmax, vmax]")
    vmax: float


class GroupImages(BaseModel):
    run_id: str
    method: str
    label: int
    group: int
    size: int
    offset: int
    map_name: str = Field(description="what the maps are")
    items: list[RevealImage]


class ConceptRequest(BaseModel):
    label: int = Field(alias="class", ge=0, description="the class whose images define the concept")
    method: str = Field("spray", description="the reveal method whose results the group refers to")
    group: Optional[int] = Field(None, ge=0, description="a candidate group of the class")
    indices: Optional[list[int]] = Field(
        None, max_length=MARKED_MAX, description="training images of the class marked by hand (2 or more)"
    )
    name: str = Field(min_length=1, max_length=64, description="the concept's name (letters, digits, '.', '_', '-')")
    layer: Optional[str] = Field(
        None,
        description="the layer of the CAV; default: the layer of the class's reveal, or the classifier's input "
        "features when it grouped on the stack of every nonlinearity",
    )
    cav: Literal["pattern", "svm", "logistic"] = "pattern"
    localise: Literal["lrp", "gradient"] = "lrp"
    replace: bool = Field(False, description="replace a saved concept of the same name")

    model_config = {"populate_by_name": True}


class RetrievedImage(BaseModel):
    index: int
    label: int
    class_name: str
    score: float = Field(description="the CAV score (see score_meaning)")
    member: bool = Field(description="one of the images the concept was fitted from")
    above_threshold: bool
    image_png: str


class LocalisedImage(BaseModel):
    index: int
    label: int
    class_name: str
    image_png: str
    heatmap_png: str = Field(description="the concept's heatmap: bwr, symmetric [-vmax, vmax]")
    vmax: float
    mask_png: str = Field(description="the artefact mask: white where the heatmap is >= threshold x its maximum")
    mask_fraction: float = Field(description="share of the image's pixels in the mask")


class ConceptSummary(BaseModel):
    run_id: str
    name: str
    label: int
    class_name: str
    source: str
    layer: str
    cav_kind: str
    n_members: int
    auroc_in_class: Optional[float] = Field(
        None, description="how well the CAV score separates the members in the class"
    )
    threshold: float = Field(description="midway between the members' and the rest's mean CAV score")
    n_retrieved: int = Field(description="training images (all classes) scoring at or above the threshold")
    n_images: int = Field(description="training images scored")
    score_meaning: str
    localisation: str = Field(description="how the heatmaps were made and the masks cut")
    top: list[RetrievedImage] = Field(description="the highest CAV scores over all classes, highest first")
    localised: list[LocalisedImage]
    path: str = Field(description="the saved concept record")
    notes: list[str] = Field(default_factory=list, description="what `teachx reveal` printed")


# -- the work ---------------------------------------------------------------------------------------


def _score_text(res) -> dict[str, str]:
    """What a class's scores are, for the page: specificities (``--rank specificity``) or suspicion scores."""
    if runs_reveal.ranked_by_specificity(res):
        merged = int(res.groups[0].parts.get("merged", 0)) if res.groups else 0
        note = f" The top group took in {merged} more group(s) that were as specific." if merged else ""
        return {
            "score_name": "specificity",
            "score_meaning": "Specificity: how well the direction that sets the group apart from the rest of its "
            "class also sets it apart from the other classes' images (AUROC, 0.5 to 1); high: the group shares a "
            "feature the rest of the data lacks, as a shortcut does. An image's score is its group's." + note,
        }
    if res.method.startswith("spray"):
        meaning = (
            "Score: the group's mean silhouette (how much closer its images are to each other than to another group, "
            "-1 to 1) times one minus its share of the class; high: a small, tight group apart from the rest."
        )
    else:
        meaning = "Score: the method's ranking score of the group (higher: more suspicious)."
    return {"score_name": "suspicion score", "score_meaning": meaning}


def _png(a: np.ndarray) -> str:
    return render.data_url(render.png_bytes(np.asarray(a)))


class RevealViews:
    """The reveal view's answers for the runs of ``service`` (reads the files `teachx reveal` wrote)."""

    def __init__(self, service: Service, max_reveal_images: int = DEFAULT_MAX_REVEAL_IMAGES):
        self.service = service
        self.max_reveal_images = int(max_reveal_images)
        self._lock = threading.Lock()
        self._computing = threading.Lock()  # a teacher hooks into its model: one page of maps at a time
        self._maps: dict[tuple[str, str], runs_reveal.RevealMaps] = {}

    def run(self, run_id: str):
        for r in self.service.runs:
            if r.id == run_id:
                if r.kind != "run":
                    raise NotFound(
                        f"'{run_id}' is a study; reveal works on a run directory (`teachx run` or `teachx demo`)"
                    )
                return r
        known = ", ".join(r.id for r in self.service.runs if r.kind == "run")
        raise NotFound(f"unknown run '{run_id}'; known runs: {known or 'none'}")

    def data(self, run_id: str):
        """The run's training data (the data of its first usable model: all its stages share one config)."""
        r = self.run(run_id)
        for m in r.models:
            if not self.service.status(m.id):
                try:
                    return self.service.data(self.service.loaded(m.id)).plan
                except Unavailable:
                    continue
        raise Unavailable(f"run '{run_id}' has no usable model: {r.error or 'no finished stage'}")

    def _class_members(self, run_id: str, label: int) -> tuple[np.ndarray, list[str]]:
        plan = self.data(run_id)
        ds = plan.dataset
        if not 0 <= label < ds.num_classes:
            raise NotFound(f"unknown class {label}: the dataset has {ds.num_classes} classes (0-{ds.num_classes - 1})")
        train_idx = np.sort(np.asarray(plan.train_idx))
        return train_idx[np.asarray(ds.train.labels)[train_idx] == label], list(ds.class_names)

    def _method(self, method: str) -> str:
        try:
            return REVEAL_METHODS.canonical(method)
        except TeachxError:
            raise NotFound(f"unknown reveal method '{method}'; valid: {', '.join(REVEAL_METHODS.names())}") from None

    def index(self, run_id: str) -> dict:
        r = self.run(run_id)
        plan = self.data(run_id)
        ds = plan.dataset
        train_idx = np.asarray(plan.train_idx)
        counts = np.bincount(np.asarray(ds.train.labels)[train_idx], minlength=ds.num_classes)
        root = r.path / runs_reveal.REVEAL_DIR
        classes = [
            {
                "label": c,
                "name": ds.class_names[c],
                "n_images": int(counts[c]),
                "methods": [m for m in REVEAL_METHODS.names() if (root / m / f"class_{c}.json").is_file()],
            }
            for c in range(ds.num_classes)
        ]
        concepts = []
        for path in sorted((root / runs_reveal.CONCEPTS).glob("*.json")):
            try:
                rec = runs_reveal.read_concept(path).record
            except TeachxError as exc:  # a damaged concept is listed by the page's error line, the others stay
                log.warning("teachx serve: %s", exc)
                continue
            concepts.append(
                {
                    "name": rec["name"],
                    "label": rec["class"],
                    "source": rec["source"],
                    "layer": rec["layer"],
                    "n_members": len(rec["members"]),
                }
            )
        return {
            "run_id": run_id,
            "run_dir": str(r.path),
            # the default of `teachx reveal` first: what the page picks
            "methods": sorted(REVEAL_METHODS.names(), key=lambda m: m != runs_reveal.DEFAULT_METHOD),
            "classes": classes,
            "concepts": concepts,
            "max_reveal_images": self.max_reveal_images,
        }

    def record(self, run_id: str, method: str, label: int) -> runs_reveal.ClassRecord:
        r = self.run(run_id)
        method = self._method(method)
        self._class_members(run_id, label)  # an unknown class is a 404 naming the classes
        rec = runs_reveal.read_class(r.path, method, label)
        if rec is None:
            raise NotFound(
                f"class {label} has no {method} reveal yet; reveal it from the page, or run "
                f"`teachx reveal {r.path} --class {label} --method {method}`"
            )
        return rec

    def klass(self, run_id: str, method: str, label: int) -> dict:
        rec = self.record(run_id, method, label)
        res = rec.result
        return {
            "run_id": run_id,
            "method": res.method,
            "label": rec.label,
            "name": rec.class_name,
            "n_images": int(len(res.indices)),
            "settings": rec.settings,
            "n_groups_eigengap": res.n_groups_eigengap,
            **_score_text(res),
            "embedding": f"the {res.method} method's 2-D embedding of the class's images (axes have no unit)",
            "points": [
                {"index": int(i), "group": int(g), "score": float(s), "x": float(e[0]), "y": float(e[1])}
                for i, g, s, e in zip(res.indices, res.labels, res.scores, res.embedding)
            ],
            "groups": [
                {
                    "group": g.group,
                    "rank": k + 1,
                    "size": g.size,
                    "score": g.score,
                    "parts": dict(g.parts),
                    "prototypes": list(g.prototypes),
                }
                for k, g in enumerate(res.groups)
            ],
        }

    def _maps_of(self, run_id: str, settings: dict) -> runs_reveal.RevealMaps:
        key = (run_id, settings.get("model_digest", "") + str(settings.get("teacher")))
        with self._lock:
            if key not in self._maps:
                self._maps[key] = runs_reveal.RevealMaps(self.run(run_id).path, settings, str(self.service.device))
            return self._maps[key]

    def group_images(self, run_id: str, method: str, label: int, group: int, offset: int, limit: int) -> dict:
        rec = self.record(run_id, method, label)
        res = rec.result
        try:
            g = res.group(group)
        except KeyError:
            groups = ", ".join(str(x.group) for x in res.groups)
            raise NotFound(f"class {label} has no group {group}; its groups are {groups}") from None
        members = np.asarray(g.members, dtype=np.int64)
        page = members[offset : offset + limit]
        maps = self._maps_of(run_id, rec.settings)
        with self._computing:
            m = maps(page) if len(page) else np.zeros((0, 1, 1, 1), np.float32)
        ds = maps.plan.dataset
        score = {int(i): float(s) for i, s in zip(res.indices, res.scores)}
        teacher = maps.teacher
        return {
            "run_id": run_id,
            "method": res.method,
            "label": rec.label,
            "group": g.group,
            "size": g.size,
            "offset": offset,
            "map_name": "built-in map of the model analysed"
            if teacher == "builtin"
            else f"{teacher} map of the true class",
            "items": [
                {
                    "index": int(i),
                    "label": int(ds.train.labels[i]),
                    "score": score[int(i)],
                    "image_png": _png(ds.train.images[i]),
                    "map_png": render.data_url(render.map_png(mi)),
                    "vmax": render.symmetric_vmax(mi),
                }
                for i, mi in zip(page, m)
            ],
        }

    def _hold(self, run_id: str) -> contextlib.ExitStack:
        """The run directory held as the CLI holds it (its lock); held by another command: a 409."""
        from teachx.runs.rundir import hold_run_dir

        stack = contextlib.ExitStack()
        try:
            stack.enter_context(hold_run_dir(self.run(run_id).path, wait=False, log=lambda m: log.warning("%s", m)))
        except RunDirError as exc:
            raise HTTPException(409, str(exc)) from None
        return stack

    def reveal_class(self, run_id: str, method: str, label: int) -> dict:
        r = self.run(run_id)
        method = self._method(method)
        members, _ = self._class_members(run_id, label)
        if len(members) > self.max_reveal_images:
            raise HTTPException(
                422,
                f"class {label} has {len(members)} training images, more than this server reveals from the page "
                f"({self.max_reveal_images}); run `teachx reveal {r.path} --class {label} --method {method}` "
                "(or start teachx serve with a larger --reveal-max-images)",
            )
        notes: list[str] = []
        with self._hold(run_id):
            # the settings of the method's classes revealed already, so that one folder holds one reveal; else
            # the defaults of `teachx reveal`
            saved = runs_reveal.saved_settings(r.path, method)
            same = runs_reveal.same_settings(saved) if saved is not None else {}
            for _line in runs_reveal.reveal_run(
                r.path, method=method, classes=[label], progress=False, log=notes.append, **same
            ):
                pass
        return self.klass(run_id, method, label)

    def concept(self, run_id: str, req: ConceptRequest) -> dict:
        r = self.run(run_id)
        rec = self.record(run_id, req.method, req.label)
        if (req.group is None) == (req.indices is None):
            raise HTTPException(422, "give either a group of the class or 2 or more marked training indices")
        if not runs_reveal._NAME.match(req.name):
            raise HTTPException(422, f"name '{req.name}': use letters, digits, '.', '_' and '-' (at most 64), e.g. tag")
        res = rec.result
        if req.group is not None:
            try:
                n = res.group(req.group).size
            except KeyError:
                groups = ", ".join(str(x.group) for x in res.groups)
                raise NotFound(f"class {req.label} has no group {req.group}; its groups are {groups}") from None
            if n < 2:
                raise HTTPException(422, f"group {req.group} has {n} image; a concept needs at least 2")
            choice = str(req.group)
        else:
            marked = sorted(set(req.indices))
            if len(marked) < 2:
                raise HTTPException(422, f"{len(marked)} image marked; a concept needs at least 2")
            members, names = self._class_members(run_id, req.label)
            known = set(members.tolist())
            outside = [i for i in marked if i not in known]
            if outside:
                plan = self.data(run_id)
                labels = np.asarray(plan.dataset.train.labels)
                i = outside[0]
                where = (
                    f"belongs to class {int(labels[i])} ({names[int(labels[i])]})"
                    if 0 <= i < len(labels) and i in set(np.asarray(plan.train_idx).tolist())
                    else "is not a training image of this run"
                )
                raise HTTPException(
                    422,
                    f"image {i} {where}, not class {req.label}; mark images of one class ({len(outside)} outside it)",
                )
            choice = ",".join(map(str, marked))
        n_in = len(marked) if req.group is None else n
        if len(res.indices) - n_in < 2:
            raise HTTPException(
                422,
                f"the concept holds {n_in} of the class's {len(res.indices)} images; leave at least 2 outside it "
                "(the CAV contrasts them with the rest of the class)",
            )
        layer = rec.settings["layer"]  # None: grouped on the stack of layers, the concept at any one layer
        if layer is None:
            layer = req.layer
        elif req.layer is not None and req.layer != layer:
            shown = choice if len(choice) <= 60 else "INDICES"
            raise HTTPException(
                422,
                f"class {req.label} was revealed at layer {layer}; for a concept at layer {req.layer} reveal it there: "
                f"`teachx reveal {r.path} --class {req.label} --method {rec.result.method} --layer {req.layer} "
                f"--concept {shown} --name {req.name}`",
            )
        dest = r.path / runs_reveal.REVEAL_DIR / runs_reveal.CONCEPTS / f"{req.name}.json"
        if dest.exists() and not req.replace:
            raise HTTPException(
                409, f"a concept named '{req.name}' is saved already; choose another name, or replace it"
            )
        notes: list[str] = []
        with self._hold(run_id):
            for line in runs_reveal.reveal_run(
                r.path,
                **{**runs_reveal.same_settings(rec.settings), "layer": layer},
                method=rec.result.method,
                classes=[req.label],
                concept=choice,
                name=req.name,
                cav_kind=req.cav,
                localise_with=req.localise,
                progress=False,
                log=notes.append,
            ):
                notes.append(line)
        return {**self.saved_concept(run_id, req.name), "notes": notes}

    def saved_concept(self, run_id: str, name: str, top: int = 24, localised: int = 8) -> dict:
        r = self.run(run_id)
        if not runs_reveal._NAME.match(name):
            raise NotFound(f"no concept named '{name}' (names are letters, digits, '.', '_' and '-')")
        path = r.path / runs_reveal.REVEAL_DIR / runs_reveal.CONCEPTS / f"{name}.json"
        if not path.is_file():
            raise NotFound(f"run '{run_id}' has no concept named '{name}'; mark a group or images and name it")
        c = runs_reveal.read_concept(path)
        plan = self.data(run_id)
        ds = plan.dataset
        labels = np.asarray(ds.train.labels)
        members = set(c.members.tolist())
        order = np.argsort(-c.scores, kind="stable")[:top]
        loc = c.record.get("localisation") or {}
        rec = c.record
        shown = []
        for k in range(min(localised, len(c.localised))):
            i, heat, mask = int(c.localised[k]), c.heatmaps[k], c.masks[k]
            shown.append(
                {
                    "index": i,
                    "label": int(labels[i]),
                    "class_name": ds.class_names[int(labels[i])],
                    "image_png": _png(ds.train.images[i]),
                    "heatmap_png": render.data_url(render.map_png(heat)),
                    "vmax": render.symmetric_vmax(heat),
                    "mask_png": _png(mask.astype(np.uint8) * 255),
                    "mask_fraction": float(mask.mean()),
                }
            )
        return {
            "run_id": run_id,
            "name": c.name,
            "label": c.label,
            "class_name": str(rec.get("class_name", ds.class_names[c.label])),
            "source": str(rec.get("source", "")),
            "layer": c.layer,
            "cav_kind": c.cav_kind,
            "n_members": int(len(c.members)),
            "auroc_in_class": rec.get("auroc_in_class"),
            "threshold": c.threshold,
            "n_retrieved": int(rec.get("n_retrieved", 0)),
            "n_images": int(len(c.indices)),
            "score_meaning": (
                f"CAV score: the projection of the image's activations at layer {c.layer} (spatial maxima per "
                f"channel) on the unit concept direction ({c.cav_kind} CAV); the members score "
                f"{rec['cav']['concept_mean']:.3g} on average, the rest of their class {rec['cav']['rest_mean']:.3g}"
            ),
            "localisation": (
                f"heatmap: the concept's relevance traced from layer {c.layer} to the pixels "
                f"({'LRP' if loc.get('method') == 'lrp' else 'gradient x input'}, started at activations x CAV); "
                + (
                    f"mask: where the heatmap is at least {loc['mask_threshold']} x its maximum"
                    if "mask_threshold" in loc
                    else f"mask: where the heatmap exceeds that of the {loc.get('neighbours', 5)} most similar images "
                    "of the class the concept scores lowest and the image differs from them (the high part of an "
                    "Otsu split)"
                )
            ),
            "top": [
                {
                    "index": int(c.indices[j]),
                    "label": int(labels[c.indices[j]]),
                    "class_name": ds.class_names[int(labels[c.indices[j]])],
                    "score": float(c.scores[j]),
                    "member": int(c.indices[j]) in members,
                    "above_threshold": bool(c.scores[j] >= c.threshold),
                    "image_png": _png(ds.train.images[c.indices[j]]),
                }
                for j in order
            ],
            "localised": shown,
            "path": str(path),
            "notes": [],
        }


def mount(app, service: Service, max_reveal_images: int = DEFAULT_MAX_REVEAL_IMAGES) -> None:
    """Add the reveal view's routes to ``app`` (on the app itself, not an included router, so that the app's
    check of query parameters sees them)."""
    views = RevealViews(service, max_reveal_images)
    base = "/api/v1/runs/{run_id}/reveal"

    def get(path: str, **kw):
        return app.get(base + path, tags=["reveal"], responses=ERRORS, **kw)

    def post(path: str, **kw):
        return app.post(base + path, tags=["reveal"], responses=ERRORS, **kw)

    @get("", response_model=RevealIndex)
    def reveal_index(run_id: str):
        """The run's classes, which reveal methods have results for each, and the saved concepts."""
        return views.index(run_id)

    @get("/concepts/{name}", response_model=ConceptSummary)
    def concept(
        run_id: str,
        name: str,
        top: int = Query(24, ge=1, le=TOP_MAX, description="images in the retrieval list"),
        localised: int = Query(8, ge=0, le=LOCALISED_MAX, description="images with heatmap and mask"),
    ):
        """A saved concept: its retrieval list over all classes and the heatmaps and masks of a few images."""
        return views.saved_concept(run_id, name, top, localised)

    @post("/concepts", response_model=ConceptSummary)
    def new_concept(run_id: str, req: ConceptRequest):
        """Fit a concept (CAV) from a group or marked images of a class, score every training image by it and
        localise it, as `teachx reveal RUN --class C --concept ... --name NAME` does; saved in the run."""
        return views.concept(run_id, req)

    @get("/{method}/classes/{label}", response_model=RevealClass)
    def reveal_class(run_id: str, method: str, label: int):
        """A class's saved reveal: a point per training image and the candidate groups, most suspicious first."""
        return views.klass(run_id, method, label)

    @post("/{method}/classes/{label}", response_model=RevealClass)
    def run_reveal(run_id: str, method: str, label: int):
        """Reveal one class now, as `teachx reveal RUN --class C --method M` does (classes up to the server's
        limit of training images)."""
        return views.reveal_class(run_id, method, label)

    @get("/{method}/classes/{label}/groups/{group}/images", response_model=GroupImages)
    def group_images(
        run_id: str,
        method: str,
        label: int,
        group: int,
        offset: int = Query(0, ge=0),
        limit: int = Query(24, ge=1, le=PAGE_MAX),
    ):
        """A page of a group's images (dataset-index order) with the maps the reveal read."""
        return views.group_images(run_id, method, label, group, offset, limit)
