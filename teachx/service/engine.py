"""The explanation service behind `teachx serve`: models, data, maps, metrics, cache, provenance.

``Service(paths)`` discovers the runs and studies (:mod:`teachx.service.catalog`), loads a model
the first time it is asked for (``load_checkpoint``; a unit whose checkpoint is damaged reports
its error, the others keep working) and answers from the offline cache
(:mod:`teachx.service.cache`), computing only the rows that are missing and keeping them:

- *view* rows (cheap, one forward pass): class probabilities and the IMPACTX built-in map;
- *map* rows per method: a registered teacher applied to this model, post-processed as the run's
  config says (``teacher.reduce``, ``normalize``, ``smooth``), one set for the predicted class and
  one for the true label;
- *metric* rows (expensive): the most-relevant-first pixel-flipping curve of the model's primary
  map (built-in for IMPACTX, the run's teacher method for a classifier), computed by
  :class:`teachx.evaluation.PixelFlippingMoRF`, and the agreement of the built-in map with the
  teacher method's map on the same model (:func:`teachx.evaluation.map_agreement`), all for the
  predicted class.

Every answer about one image explains one class (:class:`Explained`): the predicted class unless
``class=label`` (the true class) or ``class=K`` asks for another. Every map, difference, agreement
and curve of the answer is of that class -- a map loss trained against the true label's teacher
map would otherwise be compared with the predicted class's built-in map -- and the provenance says
which (``explained_class``, ``explained_choice``). Classes other than the predicted one are
computed on request (the true label's teacher maps are cached too).

Every answer carries a provenance record: run directory, checkpoint and its sha256, config hash,
teachx version, method and options, dataset, split and index (or the upload's sha256).

Errors are :class:`ServiceError` subclasses with an HTTP status and a one-line message.
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.loader import from_dict
from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.errors import TeachxError
from teachx.evaluation import build_metric, map_agreement
from teachx.evaluation.base import trapezoid_auc
from teachx.models import BUILT_IN_MAP_MODELS, any_model_from_spec, shared_map_text
from teachx.runs.explain import conform_image
from teachx.runs.plan import make_plan
from teachx.runs.teacher import map_recipe
from teachx.runs.teacher import as_nchw, make_teacher
from teachx.service.batching import Coalescer
from teachx.service.cache import ArrayCache, cache_key
from teachx.service.catalog import ModelEntry, RunEntry, discover
from teachx.teachers import TEACHERS, build
from teachx.teachers.postprocess import postprocess
from teachx.training.checkpoint import load_checkpoint, load_state_into
from teachx.training.map_losses import INVARIANCE, MAP_LOSSES, comparable
from teachx.utils.cache_admin import cache_root
from teachx.utils.hashing import hash_json, sha256_file
import teachx

AGREEMENT = ("spearman", "pearson", "cosine", "top_k_intersection")
SORT_KEYS = ("index", "confidence", "true_prob", "agreement", "morf_auc")
MAX_PIXELS = 40_000_000  # uploads larger than this many pixels are refused before decoding


class ServiceError(TeachxError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    """The model or its data cannot be used (damaged checkpoint, dataset not present)."""

    status = 409


class MethodFailed(ServiceError):
    status = 422


class BadClass(ServiceError):
    status = 422


class BadUpload(ServiceError):
    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status


_DIFFERENCE = {
    "none": "built-in map minus teacher map, as they are (the map loss compares values)",
    "scale": "built-in map minus teacher map, each divided by its max |value| (the map loss leaves the scale free)",
    "affine": "built-in map minus teacher map, each z-scored (the map loss leaves scale and offset free)",
}


def _per_class(kind: str, cfg: dict[str, Any]) -> bool:
    """Whether a catalogued model makes one built-in map per class (IMPACTX with impactx.per_class)."""
    from teachx.training.methods import method_of_model

    method = method_of_model(kind)
    return method is not None and method.per_class_maps(cfg)


@functools.lru_cache(maxsize=1)
def teachx_version() -> str:
    try:
        from importlib.metadata import version

        return version("teachx")
    except Exception:  # not installed as a distribution (source tree)
        return teachx.__version__


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return f"tensor{tuple(obj.shape)}"
    return str(obj)


@dataclass(frozen=True)
class Explained:
    """The one class an answer about a test image explains, and how it was chosen."""

    cls: int
    name: str
    choice: str  # "predicted" (the default), "label" (the true class) or "index" (class=K)
    predicted: int
    label: Optional[int]  # None for an uploaded image

    @property
    def target(self) -> Optional[str]:
        """The cached map set that holds this class's maps ("predicted", "label"), or None: computed on request."""
        return "predicted" if self.cls == self.predicted else "label" if self.cls == self.label else None

    def provenance(self) -> dict[str, Any]:
        return {"explained_class": self.cls, "explained_class_name": self.name, "explained_choice": self.choice}


@dataclass
class Loaded:
    entry: ModelEntry
    run: RunEntry
    model: torch.nn.Module
    impactx: bool
    cfg: Any  # RunConfig
    sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]
    lock: threading.RLock = field(default_factory=threading.RLock)  # teachers hook into the model: one user at a time
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @functools.cached_property
    def data_key(self) -> str:
        """Models whose data config is the same share one loaded test split."""
        return hash_json(self.cfg.to_dict()["data"])


@dataclass
class Data:
    plan: Any  # DataPlan
    fingerprint: str

    @property
    def test(self):
        return self.plan.dataset.test

    @property
    def n(self) -> int:
        return len(self.plan.dataset.test)


class Service:
    """Runs and models of one or more directories, with their caches; safe to call from threads."""

    def __init__(
        self,
        paths: list[str | Path],
        cache_dir: Optional[str | Path] = None,
        device: str = "cpu",
        steps: int = 16,
        batch_size: int = 256,
        log: Callable[[str], None] = lambda _m: None,
    ):
        self.runs: list[RunEntry] = discover(paths)
        self.entries: dict[str, ModelEntry] = {m.id: m for r in self.runs for m in r.models}
        self.run_of: dict[str, RunEntry] = {m.id: r for r in self.runs for m in r.models}
        self.cache_root = Path(cache_dir) if cache_dir else cache_root() / "serve"
        self.device = torch.device(device)
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.log = log
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._loaded: dict[str, Loaded] = {}
        self._errors: dict[str, str] = {}
        self._data: dict[str, Data] = {}
        self._data_errors: dict[str, str] = {}
        self._caches: dict[str, ArrayCache] = {}
        self._teachers: dict[tuple[str, str], Any] = {}
        self._views: dict[str, ArrayCache] = {}
        self._methods: dict[tuple[str, str], tuple[ArrayCache, Any, Any]] = {}
        self._coalescers: dict[str, Coalescer] = {}

    # -- models -----------------------------------------------------------------------------------

    def entry(self, model_id: str) -> ModelEntry:
        e = self.entries.get(model_id)
        if e is None:
            known = ", ".join(list(self.entries)[:20]) + (" ..." if len(self.entries) > 20 else "")
            raise NotFound(f"unknown model '{model_id}'; known models: {known or 'none'}")
        return e

    def status(self, model_id: str) -> Optional[str]:
        """The model's error, if one is known (from its records, or from a failed load)."""
        e = self.entry(model_id)
        return e.error or self._errors.get(model_id)

    def loaded(self, model_id: str) -> Loaded:
        e = self.entry(model_id)
        if e.error:
            raise Unavailable(f"model '{model_id}' is not available: {e.error}")
        lm = self._loaded.get(model_id)
        if lm is not None:
            return lm
        with self._lock:
            lock = self._model_locks.setdefault(model_id, threading.Lock())
        with lock:
            if model_id in self._loaded:
                return self._loaded[model_id]
            if model_id in self._errors:
                raise Unavailable(f"model '{model_id}' is not available: {self._errors[model_id]}")
            try:
                lm = self._load(e)
            except Exception as exc:  # one bad unit must not take the server down
                msg = str(exc) if isinstance(exc, TeachxError) else f"{type(exc).__name__}: {exc}"
                self._errors[model_id] = " ".join(msg.split())
                raise Unavailable(f"model '{model_id}' is not available: {self._errors[model_id]}") from None
            self._loaded[model_id] = lm
            return lm

    def _load(self, e: ModelEntry) -> Loaded:
        cfg = from_dict(RunConfig, e.config)
        ck = load_checkpoint(e.checkpoint)
        spec = ck.meta.get("model_spec") or {}
        impactx = spec.get("name") in BUILT_IN_MAP_MODELS  # a model that gives its own map (IMPACTX, ABN)
        if impactx != (e.kind in BUILT_IN_MAP_MODELS):
            raise Unavailable(
                f"checkpoint '{e.checkpoint}' holds a {spec.get('name') if impactx else 'classifier'} model, its record says {e.kind}"
            )
        model = any_model_from_spec(spec)
        load_state_into(model, ck.group("model"), f"checkpoint '{e.checkpoint}'")
        model = model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        names = ck.meta.get("class_names") or [str(i) for i in range(int(spec["num_classes"]))]
        return Loaded(
            e,
            self.run_of[e.id],
            model,
            impactx,
            cfg,
            sha256_file(e.checkpoint),
            tuple(ck.meta.get("mean") or (0.0,)),
            tuple(ck.meta.get("std") or (1.0,)),
            list(names),
            int(spec["in_channels"]),
            (int(spec["image_size"][0]), int(spec["image_size"][1])),
            device=self.device,
        )

    # -- data -------------------------------------------------------------------------------------

    def data(self, lm: Loaded) -> Data:
        key = lm.data_key
        if key in self._data:
            return self._data[key]
        with self._lock:
            lock = self._model_locks.setdefault("data:" + key, threading.Lock())
        with lock:
            if key in self._data:
                return self._data[key]
            if key in self._data_errors:
                raise Unavailable(self._data_errors[key])
            try:
                d = self._load_data(lm)
            except Exception as exc:
                msg = str(exc) if isinstance(exc, TeachxError) else f"{type(exc).__name__}: {exc}"
                self._data_errors[key] = (
                    f"the test images of model '{lm.entry.id}' are not available: {' '.join(msg.split())}"
                )
                raise Unavailable(self._data_errors[key]) from None
            self._data[key] = d
            return d

    def _load_data(self, lm: Loaded) -> Data:
        plan = make_plan(lm.cfg, progress=False)
        ds = plan.dataset
        if ds.channels != lm.channels or tuple(ds.image_size) != lm.image_size:
            raise Unavailable(
                f"dataset {ds.name} has {ds.channels}x{ds.image_size} images, the model expects {lm.channels}x{lm.image_size}"
            )
        h = hashlib.sha256()
        h.update(str(ds.test.images.shape).encode())
        h.update(np.ascontiguousarray(ds.test.images).view(np.uint8).data)
        h.update(np.ascontiguousarray(ds.test.labels).astype(np.int64).tobytes())
        return Data(plan, h.hexdigest())

    def check_index(self, lm: Loaded, index: int) -> Data:
        d = self.data(lm)
        if not 0 <= index < d.n:
            raise NotFound(
                f"image index {index} is out of range: the test split of {d.plan.dataset.name} has {d.n} images (0..{d.n - 1})"
            )
        return d

    def ready(self, model_id: str, index: int, name: Optional[str] = None) -> bool:
        """Whether the image view (``name`` None) or built-in map of ``index`` is answered from memory and
        the cache alone -- no loading, no model call -- so the server may answer it without a worker thread."""
        lm = self._loaded.get(model_id)
        cache = self._views.get(model_id)
        if lm is None or cache is None or not 0 <= index < cache.n:
            return False
        if name is None:
            return cache.has("probs", index) and (not lm.impactx or cache.has("built_in", index))
        return name == "built_in" and lm.impactx and cache.has("built_in", index)

    def input_image(self, model_id: str, index: int) -> np.ndarray:
        """uint8 (H, W, C) test image."""
        lm = self.loaded(model_id)
        d = self.check_index(lm, index)
        return np.asarray(d.test.images[index])

    # -- caches -----------------------------------------------------------------------------------

    def _cache(self, material: dict[str, Any], n: int, fields: dict[str, tuple[tuple[int, ...], str]]) -> ArrayCache:
        key = cache_key(material)
        c = self._caches.get(key)
        if c is None:
            with self._lock:
                c = self._caches.get(key)
                if c is None:
                    c = ArrayCache(self.cache_root, material, n, fields, self.log)
                    self._caches[key] = c
        return c

    def _morf(self):
        return build_metric("pixel_flipping_morf", steps=self.steps)

    def view_cache(self, lm: Loaded) -> ArrayCache:
        """The model's cache of cheap rows (probabilities, built-in maps) and metric rows."""
        c = self._views.get(lm.entry.id)
        if c is None:
            c = self._views[lm.entry.id] = self._view_cache(lm)
        return c

    def _view_cache(self, lm: Loaded) -> ArrayCache:
        d = self.data(lm)
        morf = self._morf()
        t = lm.cfg.teacher
        material = {
            "kind": "view",
            "checkpoint_sha256": lm.sha256,
            "data": d.fingerprint,
            "split": "test",
            "n": d.n,
            "teacher": {
                "method": t.method,
                "options": _jsonable(t.options),
                "target": t.target,
                "reduce": t.reduce,
                "normalize": t.normalize,
                "smooth": t.smooth,
                "background_size": t.background_size,
            },
            "metric": {"name": morf.name, **_jsonable(morf.options())},
            "explained": "predicted",
        }  # the class of the cached curves and agreements
        fields: dict[str, tuple[tuple[int, ...], str]] = {
            "probs": ((len(lm.class_names),), "f4"),
            "morf": ((self.steps + 1,), "f4"),
            "agreement": ((len(AGREEMENT),), "f4"),
        }
        if lm.impactx:
            spec = getattr(lm.model, "spec", None) or {}
            fields["built_in"] = ((int(spec.get("map_channels", 1)), *self._map_hw(lm)), "f2")
        return self._cache(material, d.n, fields)

    @staticmethod
    def _map_hw(lm: Loaded) -> tuple[int, int]:
        spec = getattr(lm.model, "spec", None) or {}
        ms = spec.get("map_size") or lm.image_size
        return int(ms[0]), int(ms[1])

    def _teacher(self, lm: Loaded, method: str):
        """(teacher, its config) for a registered method applied to this model."""
        try:
            name = TEACHERS.canonical(method)
        except TeachxError as exc:
            raise NotFound(str(exc)) from None
        own = TEACHERS.canonical(lm.cfg.teacher.method)
        tcfg = lm.cfg.teacher if name == own else replace(lm.cfg.teacher, method=name, options={})
        key = (lm.entry.id, name)
        if key not in self._teachers:
            if name in ("deepshap", "expected_gradients") and "background" not in tcfg.options:
                plan = self.data(lm).plan  # background images come from the training split
                teacher = make_teacher(replace(lm.cfg, teacher=tcfg), plan, lm.device)
            else:
                try:
                    teacher = build(name, **dict(tcfg.options))
                except TeachxError as exc:
                    raise MethodFailed(str(exc)) from None
            self._teachers[key] = (teacher, tcfg)
        return self._teachers[key]

    def method_cache(self, lm: Loaded, method: str, target: str = "predicted") -> tuple[ArrayCache, Any, Any]:
        """(cache of ``method``'s maps on this model for the ``target`` class of each image -- "predicted"
        or "label" --, the teacher, its config)."""
        key = (lm.entry.id, method, target)
        if key not in self._methods:
            self._methods[key] = self._method_cache(lm, method, target)
        return self._methods[key]

    def _method_cache(self, lm: Loaded, method: str, target: str) -> tuple[ArrayCache, Any, Any]:
        teacher, tcfg = self._teacher(lm, method)
        tcfg = replace(tcfg, target=target)
        d = self.data(lm)
        c = 1 if tcfg.reduce != "none" else lm.channels
        material = {
            "kind": "maps",
            "checkpoint_sha256": lm.sha256,
            "data": d.fingerprint,
            "split": "test",
            "n": d.n,
            **_jsonable(map_recipe(replace(lm.cfg, teacher=tcfg), teacher)),
            "background_size": tcfg.background_size,
            "split_seed": lm.cfg.data.split_seed,
        }
        return self._cache(material, d.n, {"map": ((c, *lm.image_size), "f2")}), teacher, tcfg

    # -- computing rows ---------------------------------------------------------------------------

    def _x(self, lm: Loaded, images_u8: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(images_u8).to(lm.device), lm.mean, lm.std)

    def _fill(
        self,
        cache: ArrayCache,
        max_batch: int,
        indices: np.ndarray,
        missing: Callable[[np.ndarray], np.ndarray],
        compute: Callable[[np.ndarray], None],
        progress: Optional[Callable[[int], None]],
    ) -> None:
        """Compute the rows of ``indices`` that ``missing`` names. Concurrent requests share batches through
        the cache's coalescer; a precompute (``progress``) walks the whole split alone, with no one to share with."""
        if progress:
            compute(missing(np.asarray(indices, dtype=np.int64)))
            return
        c = self._coalescers.get(cache.key)
        if c is None:
            with self._lock:
                c = self._coalescers.setdefault(cache.key, Coalescer(max_batch))
        c.run(indices, missing, compute)

    def fill_view(self, lm: Loaded, indices: np.ndarray, progress: Optional[Callable[[int], None]] = None) -> None:
        """Probabilities (and built-in maps) for the rows of ``indices`` that are not cached. Concurrent
        callers share batches (``_fill``); ``progress`` (precompute) counts rows as they are stored."""
        cache = self.view_cache(lm)
        d = self.data(lm)

        def missing(idx: np.ndarray) -> np.ndarray:
            todo = cache.missing("probs", idx)
            return np.union1d(todo, cache.missing("built_in", idx)).astype(np.int64) if lm.impactx else todo

        def compute(todo: np.ndarray) -> None:
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s : s + self.batch_size]
                x = self._x(lm, d.test.images[idx])
                with lm.lock, torch.no_grad():
                    if lm.impactx:
                        logits, maps = lm.model.forward_all(x)  # one pass: every built-in-map model (IMPACTX, ABN)
                        cache.put("built_in", idx, maps.float().cpu().numpy())
                    else:
                        logits = lm.model(x)
                cache.put("probs", idx, logits.float().softmax(1).cpu().numpy())
                if progress:
                    progress(len(idx))

        self._fill(cache, self.batch_size, indices, missing, compute, progress)

    def _targets(self, lm: Loaded, tcfg, idx: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        d = self.data(lm)
        if tcfg.target == "label":
            return torch.from_numpy(np.asarray(d.test.labels[idx])).long().to(lm.device)
        cache = self.view_cache(lm)
        self.fill_view(lm, idx)
        return torch.from_numpy(cache.get("probs", idx).argmax(1)).long().to(lm.device)

    def _attribute(self, lm: Loaded, teacher, tcfg, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        try:
            with lm.lock:
                raw = teacher.attribute(lm.model, x, target)
            return (
                postprocess(raw.detach(), reduce=tcfg.reduce, normalize=tcfg.normalize, smooth=tcfg.smooth)
                .float()
                .cpu()
            )
        except TeachxError as exc:
            raise MethodFailed(
                f"{teacher.name if hasattr(teacher, 'name') else tcfg.method} on model '{lm.entry.id}': {exc}"
            ) from None
        except Exception as exc:  # a method that does not support this architecture
            raise MethodFailed(
                f"{tcfg.method} failed on model '{lm.entry.id}': {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            ) from None

    def fill_maps(
        self,
        lm: Loaded,
        method: str,
        indices: np.ndarray,
        progress: Optional[Callable[[int], None]] = None,
        target: str = "predicted",
    ) -> ArrayCache:
        """``method``'s maps of the ``target`` class for the rows of ``indices`` that are not cached (concurrent
        callers share batches)."""
        cache, teacher, tcfg = self.method_cache(lm, method, target)
        d = self.data(lm)
        bs = max(1, int(tcfg.batch_size))

        def compute(todo: np.ndarray) -> None:
            for s in range(0, len(todo), bs):
                idx = todo[s : s + bs]
                x = self._x(lm, d.test.images[idx])
                maps = self._attribute(lm, teacher, tcfg, x, self._targets(lm, tcfg, idx, x))
                cache.put("map", idx, maps.numpy())
                if progress:
                    progress(len(idx))

        def missing(idx: np.ndarray) -> np.ndarray:
            return cache.missing("map", idx)

        self._fill(cache, bs, indices, missing, compute, progress)
        return cache

    def _auc(self, curves: np.ndarray) -> np.ndarray:
        """Pixel-flipping AUCs of cached (K, steps + 1) curves, as the metric computes them."""
        xs = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        return trapezoid_auc(torch.from_numpy(np.asarray(curves)).double(), xs).numpy()

    def primary_map(self, lm: Loaded) -> str:
        return "built_in" if lm.impactx else "teacher"

    def fill_metrics(self, lm: Loaded, indices: np.ndarray, progress: Optional[Callable[[int], None]] = None) -> None:
        """Pixel-flipping curves of the primary map and (IMPACTX) built-in vs teacher agreement, all of the
        predicted class: the curve ranks pixels by its map and tracks its probability."""
        cache = self.view_cache(lm)
        d = self.data(lm)
        todo = np.union1d(cache.missing("morf", indices), cache.missing("agreement", indices) if lm.impactx else [])
        todo = todo.astype(np.int64)
        morf = self._morf()
        for s in range(0, len(todo), 64):
            idx = todo[s : s + 64]
            self.fill_view(lm, idx)
            tmaps = torch.from_numpy(self.fill_maps(lm, lm.cfg.teacher.method, idx).get("map", idx)).float()
            x = self._x(lm, d.test.images[idx])
            y = torch.from_numpy(cache.get("probs", idx).argmax(1)).long().to(lm.device)
            if lm.impactx:
                built = torch.from_numpy(cache.get("built_in", idx)).float()
                primary = built
                if built.shape[-2:] == tmaps.shape[-2:]:
                    agr = map_agreement(built, tmaps)
                    cache.put("agreement", idx, torch.stack([agr[k] for k in AGREEMENT], 1).float().numpy())
                else:
                    cache.put("agreement", idx, np.full((len(idx), len(AGREEMENT)), np.nan, np.float32))
            else:
                primary = tmaps
            with lm.lock:
                curves = (
                    morf.curves(lm.model, x, y, primary.to(lm.device)) if primary.shape[-2:] == x.shape[-2:] else None
                )
            if curves is not None:
                cache.put("morf", idx, curves.float().cpu().numpy())
            else:
                cache.put("morf", idx, np.full((len(idx), self.steps + 1), np.nan, np.float32))
            if progress:
                progress(len(idx))

    # -- answers ----------------------------------------------------------------------------------

    def provenance(
        self,
        lm: Loaded,
        *,
        method: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
        index: Optional[int] = None,
        split: Optional[str] = "test",
        source: str = "cache",
        upload_sha256: Optional[str] = None,
        cache_key: Optional[str] = None,
        explained: Optional[Explained] = None,
        explained_choice: Optional[str] = None,
    ) -> dict[str, Any]:
        """``explained``: the class the answer explains; ``explained_choice`` alone: an answer over several
        images, each explaining its own class chosen that way."""
        return {
            **(
                explained.provenance()
                if explained is not None
                else {"explained_class": None, "explained_class_name": None, "explained_choice": explained_choice}
            ),
            "run_dir": str(lm.run.path),
            "model_id": lm.entry.id,
            "checkpoint": str(lm.entry.checkpoint),
            "checkpoint_sha256": lm.sha256,
            "config_hash": lm.entry.config_hash,
            "teachx_version": teachx_version(),
            "method": method,
            "method_options": _jsonable(options or {}),
            "dataset": lm.cfg.data.name if split else "upload",
            "split": split,
            "index": index,
            "upload_sha256": upload_sha256,
            "source": source,
            "cache_key": cache_key,
        }

    def model_info(self, model_id: str, load: bool = False) -> dict[str, Any]:
        """What the catalog knows; ``load=True`` also loads the model and its test data (class names,
        sizes, number of test images), turning a failure into ``error``."""
        e = self.entry(model_id)
        if load:
            try:
                self.data(self.loaded(model_id))
            except NotFound:
                raise
            except ServiceError as exc:
                return {**self.model_info(model_id), "error": str(exc)}
        cfg = e.config
        out = {
            "id": e.id,
            "run_id": e.run_id,
            "name": e.name,
            "label": e.label,
            "kind": e.kind,
            "role": e.role,
            "has_built_in": e.kind in BUILT_IN_MAP_MODELS,
            "per_class": _per_class(e.kind, cfg),
            "test_acc": e.test_acc,
            "checkpoint": str(e.checkpoint) if e.checkpoint else None,
            "config_hash": e.config_hash,
            "config": cfg,
            "info": _jsonable(e.info),
            "error": self.status(model_id),
            "dataset": (cfg.get("data") or {}).get("name"),
            "teacher_method": (cfg.get("teacher") or {}).get("method"),
            "class_names": None,
            "image_size": None,
            "channels": None,
            "n_images": None,
            "test_data": None,
            "loaded": model_id in self._loaded,
        }
        lm = self._loaded.get(model_id)
        if lm is not None:
            out.update(class_names=lm.class_names, image_size=list(lm.image_size), channels=lm.channels)
            d = self._data.get(lm.data_key)
            if d is not None:
                out["n_images"], out["test_data"] = d.n, d.fingerprint
        return out

    def list_images(
        self,
        model_id: str,
        label: Optional[int] = None,
        predicted: Optional[int] = None,
        correct: Optional[bool] = None,
        min_agreement: Optional[float] = None,
        max_agreement: Optional[float] = None,
        min_morf: Optional[float] = None,
        max_morf: Optional[float] = None,
        sort: str = "index",
        order: str = "asc",
        offset: int = 0,
        limit: int = 100,
    ) -> dict[str, Any]:
        if sort not in SORT_KEYS:
            raise ServiceError(f"unknown sort key '{sort}'; valid: {', '.join(SORT_KEYS)}")
        if order not in ("asc", "desc"):
            raise ServiceError(f"order must be asc or desc, got '{order}'")
        lm = self.loaded(model_id)
        d = self.data(lm)
        cache = self.view_cache(lm)
        self.fill_view(lm, np.arange(d.n))
        probs = cache.get("probs", slice(None))
        labels = np.asarray(d.test.labels).astype(np.int64)
        pred = probs.argmax(1)
        conf = probs.max(1)
        true_p = probs[np.arange(d.n), labels]
        morf_done = cache.done["morf"].copy()
        agr_done = cache.done["agreement"].copy() if lm.impactx else np.zeros(d.n, bool)
        morf_auc = np.full(d.n, np.nan)
        if morf_done.any():
            morf_auc[morf_done] = self._auc(cache.get("morf", morf_done))
        spear = np.full(d.n, np.nan)
        if agr_done.any():
            spear[agr_done] = cache.get("agreement", agr_done)[:, 0]
        keep = np.ones(d.n, bool)
        if label is not None:
            keep &= labels == label
        if predicted is not None:
            keep &= pred == predicted
        if correct is not None:
            keep &= (pred == labels) == correct
        for lo, hi, values in ((min_agreement, max_agreement, spear), (min_morf, max_morf, morf_auc)):
            if lo is not None or hi is not None:
                with np.errstate(invalid="ignore"):
                    keep &= (
                        np.isfinite(values)
                        & (values >= (lo if lo is not None else -np.inf))
                        & (values <= (hi if hi is not None else np.inf))
                    )
        idx = np.flatnonzero(keep)
        key = {
            "index": idx.astype(float),
            "confidence": conf[idx],
            "true_prob": true_p[idx],
            "agreement": spear[idx],
            "morf_auc": morf_auc[idx],
        }[sort]
        if sort in ("agreement", "morf_auc"):  # images without the metric go last, either order
            key = np.where(np.isfinite(key), key if order == "asc" else -key, np.inf)
            idx = idx[np.lexsort((idx, key))]
        else:
            idx = idx[np.lexsort((idx, key if order == "asc" else -key))]
        page = idx[offset : offset + limit]

        def num(v: float) -> Optional[float]:
            return float(v) if np.isfinite(v) else None

        items = [
            {
                "index": int(i),
                "label": int(labels[i]),
                "predicted": int(pred[i]),
                "correct": bool(pred[i] == labels[i]),
                "confidence": float(conf[i]),
                "true_prob": float(true_p[i]),
                "agreement": num(spear[i]),
                "morf_auc": num(morf_auc[i]),
            }
            for i in page
        ]
        return {
            "model_id": model_id,
            "total": int(len(idx)),
            "n_images": d.n,
            "offset": offset,
            "limit": limit,
            "items": items,
            "class_names": lm.class_names,
            "coverage": {"predictions": d.n, "morf": int(morf_done.sum()), "agreement": int(agr_done.sum())},
            "provenance": self.provenance(
                lm,
                method=self.primary_map(lm),
                split="test",
                source="cache",
                cache_key=cache.key,
                explained_choice="predicted",
            ),
        }

    def image(self, model_id: str, index: int) -> dict[str, Any]:
        lm = self.loaded(model_id)
        self.check_index(lm, index)
        cache = self.view_cache(lm)
        source = "cache" if cache.has("probs", index) else "computed"
        ex = self.explained(lm, index)
        probs = cache.get("probs", index)
        agreement = None
        if lm.impactx and cache.has("agreement", index):
            agreement = {
                n: (float(v) if np.isfinite(v) else None) for n, v in zip(AGREEMENT, cache.get("agreement", index))
            }
        morf_auc = None
        if cache.has("morf", index):
            v = self._auc(cache.get("morf", [index]))[0]
            morf_auc = float(v) if np.isfinite(v) else None
        maps = ["built_in", "teacher", "difference"] if lm.impactx else ["teacher"]
        return {
            "model_id": model_id,
            "index": index,
            "label": ex.label,
            "label_name": lm.class_names[ex.label],
            "predicted": ex.predicted,
            "predicted_name": lm.class_names[ex.predicted],
            "correct": ex.predicted == ex.label,
            "probabilities": [
                {"class_index": i, "name": lm.class_names[i], "p": float(p)} for i, p in enumerate(probs)
            ],
            "maps": maps,
            "teacher_method": lm.cfg.teacher.method,
            "agreement": agreement,
            "morf_auc": morf_auc,
            "provenance": self.provenance(
                lm, method=None, index=index, source=source, cache_key=cache.key, explained=ex
            ),
        }

    def explained(self, lm: Loaded, index: int, cls: Optional[str | int] = None) -> Explained:
        """The class an answer about test image ``index`` explains: ``cls`` None or "predicted" the predicted
        class, "label" the true class, or a class index."""
        d = self.check_index(lm, index)
        self.fill_view(lm, np.array([index]))
        predicted = int(self.view_cache(lm).get("probs", index).argmax())
        label = int(d.test.labels[index])
        k = len(lm.class_names)
        if cls is None or cls == "predicted":
            c, choice = predicted, "predicted"
        elif cls == "label":
            c, choice = label, "label"
        else:
            try:
                c, choice = int(cls), "index"
            except (TypeError, ValueError):
                raise BadClass(f"class must be predicted, label or a class index (0-{k - 1}), got '{cls}'") from None
            if not 0 <= c < k:
                raise NotFound(f"class {c} does not exist: this model has {k} classes (0-{k - 1})")
        return Explained(c, lm.class_names[c], choice, predicted, label)

    def map_names(self, lm: Loaded) -> list[str]:
        return (["built_in", "difference"] if lm.impactx else []) + ["teacher", *TEACHERS.names()]

    def map(
        self, model_id: str, index: int, name: str, cls: Optional[str | int] = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """(C, H, W) float32 map ``name`` of test image ``index``, and its provenance; ``cls`` picks the class
        it explains (:meth:`explained`: default the predicted class)."""
        lm = self.loaded(model_id)
        self.check_index(lm, index)
        if name in ("built_in", "difference") and not lm.impactx:
            raise NotFound(
                f"model '{model_id}' is a plain classifier: it has no built-in map (maps: teacher or a method: {', '.join(TEACHERS.names())})"
            )
        return self._map(lm, index, name, self.explained(lm, index, cls))

    def _map(self, lm: Loaded, index: int, name: str, ex: Explained) -> tuple[np.ndarray, dict[str, Any]]:
        if name == "built_in":
            return self._built_in(lm, index, ex)
        method = lm.cfg.teacher.method if name in ("teacher", "difference") else name
        if ex.target is not None:
            cache, teacher, tcfg = self.method_cache(lm, method, ex.target)
            source, cache_key = ("cache" if cache.has("map", index) else "computed"), cache.key
            self.fill_maps(lm, method, np.array([index]), target=ex.target)
            tmap = cache.get("map", index).astype(np.float32)
        else:  # a class that is neither the predicted one nor the true one: computed for this request
            teacher, tcfg = self._teacher(lm, method)
            source, cache_key = "computed", None
            x = self._x(lm, self.data(lm).test.images[[index]])
            tmap = self._attribute(lm, teacher, tcfg, x, torch.tensor([ex.cls], device=lm.device))[0].numpy()
        options = {
            "method": teacher.name if hasattr(teacher, "name") else method,
            "options": teacher.options(),
            "target": ex.choice,
            "reduce": tcfg.reduce,
            "normalize": tcfg.normalize,
            "smooth": tcfg.smooth,
        }
        if name != "difference":
            return tmap, self.provenance(
                lm,
                method=options["method"],
                options=options,
                index=index,
                source=source,
                cache_key=cache_key,
                explained=ex,
            )
        built, prov = self._built_in(lm, index, ex)
        if built.shape[-2:] != tmap.shape[-2:]:
            raise Unavailable(
                f"the built-in map ({built.shape[-2]}x{built.shape[-1]}) and the teacher map differ in size; no difference map"
            )
        # compared on the terms the built-in map was trained on: what its map loss leaves free (scale, or
        # scale and offset: the default 1 - Pearson) is removed from both maps first
        invariance = self._invariance(lm)
        diff = comparable(built.sum(0, keepdims=True), invariance) - comparable(tmap.sum(0, keepdims=True), invariance)
        options = {**options, "difference": _DIFFERENCE[invariance], "built_in": prov["method_options"]["classes"]}
        return diff, self.provenance(
            lm,
            method=f"built_in - {options['method']}",
            options=options,
            index=index,
            source="cache" if source == "cache" and prov["source"] == "cache" else "computed",
            cache_key=cache_key,
            explained=ex,
        )

    @staticmethod
    def _invariance(lm: Loaded) -> str:
        """What the model's map loss leaves free in its built-in map ("none", "scale", "affine"); models whose
        built-in map was not trained towards the teacher's (ABN's attention) are compared up to scale."""
        from teachx.training.methods import method_of_model

        method = method_of_model(lm.entry.kind)
        if method is None or not method.map_follows_teacher:
            return "scale"
        spec_decoder = getattr(lm.model, "decoder_name", None)
        if spec_decoder is not None and spec_decoder != lm.cfg.impactx.decoder:
            return "none"  # a record older than impactx.decoder: the paper's decoder, trained with MSE
        return INVARIANCE.get(MAP_LOSSES.canonical(lm.cfg.impactx.map_loss), "affine")

    @staticmethod
    def _built_in_options(lm: Loaded) -> dict[str, Any]:
        """The provenance options of a built-in map: how it is made, and whether it depends on the class."""
        per_class = bool(getattr(lm.model, "per_class", False))
        return {
            "decoder": "D(LEP(x))",
            "classes": "one built-in map per class" if per_class else shared_map_text(lm.entry.kind),
        }

    def _built_in(self, lm: Loaded, index: int, ex: Explained) -> tuple[np.ndarray, dict[str, Any]]:
        """The built-in map of the explained class: cached for the predicted class (and for every class of a
        model whose one map is shared by all); another class of a per-class model costs one decoder pass."""
        options = self._built_in_options(lm)
        if getattr(lm.model, "per_class", False) and ex.cls != ex.predicted:
            x = self._x(lm, self.data(lm).test.images[[index]])
            with lm.lock, torch.no_grad():
                _, maps = lm.model.forward_all(x, torch.tensor([ex.cls], device=x.device))
            return maps[0].float().cpu().numpy(), self.provenance(
                lm, method="built_in", options=options, index=index, source="computed", explained=ex
            )
        cache = self.view_cache(lm)
        source = "cache" if cache.has("built_in", index) else "computed"
        self.fill_view(lm, np.array([index]))
        return cache.get("built_in", index).astype(np.float32), self.provenance(
            lm, method="built_in", options=options, index=index, source=source, cache_key=cache.key, explained=ex
        )

    def metrics(
        self, model_id: str, index: int, map_name: Optional[str] = None, cls: Optional[str | int] = None
    ) -> dict[str, Any]:
        """Pixel-flipping (MoRF) curve of one map of one image and built-in vs teacher agreement, all for the
        class ``cls`` names (:meth:`explained`): the curve ranks pixels by that class's map and tracks that
        class's probability."""
        lm = self.loaded(model_id)
        d = self.check_index(lm, index)
        map_name = map_name or self.primary_map(lm)
        if map_name in ("built_in", "difference") and not lm.impactx:
            self.map(model_id, index, map_name)  # the 404 that names the maps there are
        ex = self.explained(lm, index, cls)
        cache = self.view_cache(lm)
        xs = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        morf = self._morf()
        cached = ex.target == "predicted"  # the cached rows are the predicted class's
        if cached and map_name in (self.primary_map(lm), lm.cfg.teacher.method if not lm.impactx else None):
            source = (
                "cache"
                if cache.has("morf", index) and (not lm.impactx or cache.has("agreement", index))
                else "computed"
            )
            self.fill_metrics(lm, np.array([index]))
            curve = torch.from_numpy(cache.get("morf", [index])).double()
        else:
            m, _ = self._map(lm, index, map_name, ex)
            source = "computed"
            x = self._x(lm, d.test.images[[index]])
            y = torch.tensor([ex.cls], device=lm.device)
            if m.shape[-2:] != tuple(x.shape[-2:]):
                raise Unavailable(
                    f"map '{map_name}' is {m.shape[-2]}x{m.shape[-1]}, the image {x.shape[-2]}x{x.shape[-1]}; no pixel-flipping curve"
                )
            with lm.lock:
                curve = morf.curves(lm.model, x, y, torch.from_numpy(m)[None].to(lm.device)).double().cpu()
        agreement = None
        if lm.impactx:
            if cached and cache.has("agreement", index):
                values = cache.get("agreement", index)
                agreement = {n: (float(v) if np.isfinite(v) else None) for n, v in zip(AGREEMENT, values)}
            else:
                b, _ = self._map(lm, index, "built_in", ex)
                t, _ = self._map(lm, index, "teacher", ex)
                if b.shape[-2:] == t.shape[-2:]:
                    agr = map_agreement(torch.from_numpy(b)[None], torch.from_numpy(t)[None])
                    agreement = {k: (float(v[0]) if torch.isfinite(v[0]) else None) for k, v in agr.items()}
                else:
                    agreement = dict.fromkeys(AGREEMENT)
        auc = float(trapezoid_auc(curve, xs)[0])
        return {
            "model_id": model_id,
            "index": index,
            "map": map_name,
            "pixel_flipping": {
                "metric": morf.name,
                "options": _jsonable(morf.options()),
                "x": xs.tolist(),
                "curve": [float(v) for v in curve[0].tolist()],
                "auc": auc,
                "higher_is_better": False,
            },
            "agreement": agreement,
            "agreement_between": ["built_in", lm.cfg.teacher.method] if lm.impactx else None,
            "provenance": self.provenance(
                lm,
                method=map_name,
                options=_jsonable(morf.options()),
                index=index,
                source=source,
                cache_key=cache.key,
                explained=ex,
            ),
        }

    # -- uploads ----------------------------------------------------------------------------------

    def decode_upload(self, lm: Loaded, data: bytes) -> tuple[np.ndarray, str]:
        """uint8 (H, W, C) image as the model takes it, and a notice of what was changed (colours, size)."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise BadUpload("the upload is empty; send a PNG or JPEG file", 400)
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadUpload(
                        f"the image is {w}x{h} pixels, more than the {MAX_PIXELS:,} this server decodes; send a smaller image",
                        413,
                    )
                im.load()
                arr, notes = conform_image(im, lm.channels, lm.image_size)
        except BadUpload:
            raise
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
            EOFError,
        ) as exc:
            raise BadUpload(
                f"the upload is not an image Pillow can read ({type(exc).__name__}); send a PNG, JPEG, BMP, GIF or WebP file"
            ) from None
        return arr, "; ".join(notes)

    def predict_upload(self, model_id: str, data: bytes, method: Optional[str] = None) -> dict[str, Any]:
        lm = self.loaded(model_id)
        arr, notice = self.decode_upload(lm, data)
        sha = hashlib.sha256(data).hexdigest()
        x = self._x(lm, arr[None])
        with lm.lock, torch.no_grad():
            if lm.impactx:
                logits, built = lm.model.forward_all(x)
            else:
                logits, built = lm.model(x), None
        probs = logits.float().softmax(1)[0].cpu().numpy()
        k = int(probs.argmax())
        ex = Explained(k, lm.class_names[k], "predicted", k, None)
        maps: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        if built is not None:
            maps["built_in"] = (
                built[0].float().cpu().numpy(),
                self.provenance(
                    lm,
                    method="built_in",
                    options=self._built_in_options(lm),
                    split=None,
                    source="computed",
                    upload_sha256=sha,
                    explained=ex,
                ),
            )
        if method:
            teacher, tcfg = self._teacher(lm, lm.cfg.teacher.method if method == "teacher" else method)
            m = self._attribute(lm, teacher, tcfg, x, torch.tensor([k], device=lm.device))[0].numpy()
            options = {
                "options": teacher.options(),
                "target": "predicted",
                "reduce": tcfg.reduce,
                "normalize": tcfg.normalize,
                "smooth": tcfg.smooth,
            }
            maps[tcfg.method] = (
                m,
                self.provenance(
                    lm,
                    method=tcfg.method,
                    options=options,
                    split=None,
                    source="computed",
                    upload_sha256=sha,
                    explained=ex,
                ),
            )
        return {
            "model_id": model_id,
            "predicted": k,
            "predicted_name": lm.class_names[k],
            "probabilities": [
                {"class_index": i, "name": lm.class_names[i], "p": float(p)} for i, p in enumerate(probs)
            ],
            "notice": notice,
            "image": arr,
            "maps": maps,
            "provenance": self.provenance(lm, split=None, source="computed", upload_sha256=sha, explained=ex),
        }

    # -- offline precompute -----------------------------------------------------------------------

    def precompute(
        self,
        model_ids: Optional[list[str]] = None,
        metrics: bool = True,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> dict[str, str]:
        """Fill every model's cache for the whole test split; returns model id -> 'ok' or its error."""
        from tqdm.auto import tqdm

        out: dict[str, str] = {}
        for mid in model_ids or list(self.entries):
            try:
                lm = self.loaded(mid)
                d = self.data(lm)
                cache = self.view_cache(lm)
                all_idx = np.arange(d.n)
                steps = [
                    (
                        "predictions",
                        lambda cb: self.fill_view(lm, all_idx, cb),
                        len(np.union1d(cache.missing("probs"), cache.missing("built_in") if lm.impactx else [])),
                    )
                ]
                if metrics:
                    steps.append(
                        (
                            f"{lm.cfg.teacher.method} maps",
                            lambda cb: self.fill_maps(lm, lm.cfg.teacher.method, all_idx, cb),
                            len(self.method_cache(lm, lm.cfg.teacher.method)[0].missing("map")),
                        )
                    )
                    steps.append(
                        (
                            "pixel flipping" + (" + agreement" if lm.impactx else ""),
                            lambda cb: self.fill_metrics(lm, all_idx, cb),
                            len(np.union1d(cache.missing("morf"), cache.missing("agreement") if lm.impactx else [])),
                        )
                    )
                for what, fn, todo in steps:
                    if not todo:
                        continue
                    with tqdm(total=todo, desc=f"{mid}: {what}", unit="img", disable=not progress, leave=False) as bar:
                        fn(bar.update)
                for c in list(self._caches.values()):
                    c.flush()
                out[mid] = "ok"
                log(f"{mid}: {d.n} test images cached in {cache.path or 'memory'}")
            except ServiceError as exc:
                out[mid] = str(exc)
                log(f"{mid}: skipped: {exc}")
        return out
