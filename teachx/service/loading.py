"""Loading a catalog entry: its model, its test data, and the provenance of every answer.

:class:`ModelStore` is the base of :class:`teachx.service.engine.Service`: it discovers the runs and
studies (:mod:`teachx.service.catalog`), holds the service's state (loaded models, data, caches) and
loads a model and its test split the first time they are asked for; a unit whose checkpoint or data is
damaged reports its error, the others keep working.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.loader import from_dict
from teachx.config.schema import RunConfig
from teachx.errors import TeachxError
from teachx.evaluation.builtin_maps import TRUST_THRESHOLD
from teachx.models import BUILT_IN_MAP_MODELS, any_model_from_spec
from teachx.runs.plan import make_plan
from teachx.runs.records import ArtefactShares
from teachx.service.batching import Coalescer
from teachx.service.cache import ArrayCache
from teachx.service.catalog import ModelEntry, RunEntry, discover
from teachx.service.errors import NotFound, ServiceError, Unavailable
from teachx.training.checkpoint import load_checkpoint, load_state_into
from teachx.utils.cache_admin import cache_root
from teachx.utils.hashing import hash_json, sha256_file
import teachx


def _per_class(kind: str, cfg: dict[str, Any]) -> bool:
    """Whether a catalogued model makes one built-in map per class (IMPACTX with impactx.per_class)."""
    from teachx.training.methods import method_of_model

    method = method_of_model(kind)
    return method is not None and method.per_class_maps(cfg)


def _shares(shares: ArtefactShares) -> dict[str, Any]:
    """A model's stored attribution on the artefact as the API gives it: every field, null where not measured."""
    out = {k: getattr(shares, k) for k in ("gradient", "lrp", "built_in", "honesty", "area")}
    return {**out, "images": shares.extra.get("images"), "reference": shares.reference}


@functools.lru_cache(maxsize=1)
def teachx_version() -> str:
    try:
        from importlib.metadata import version

        return version("teachx")
    except Exception:  # not installed as a distribution (source tree)
        return teachx.__version__


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
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


class ModelStore:
    """Runs and models of one or more directories, with their caches; safe to call from threads."""

    def __init__(
        self,
        paths: list[str | Path],
        cache_dir: Optional[str | Path] = None,
        device: str = "cpu",
        steps: int = 16,
        batch_size: int = 256,
        log: Callable[[str], None] = lambda _m: None,
        trust_threshold: float = TRUST_THRESHOLD,
    ):
        self.runs: list[RunEntry] = discover(paths)
        self.entries: dict[str, ModelEntry] = {m.id: m for r in self.runs for m in r.models}
        self.run_of: dict[str, RunEntry] = {m.id: r for r in self.runs for m in r.models}
        self.cache_root = Path(cache_dir) if cache_dir else cache_root() / "serve"
        self.device = torch.device(device)
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.trust_threshold = float(trust_threshold)  # a built-in map correlating below it is flagged
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

    def input_image(self, model_id: str, index: int) -> np.ndarray:
        """uint8 (H, W, C) test image."""
        lm = self.loaded(model_id)
        d = self.check_index(lm, index)
        return np.asarray(d.test.images[index])

    # -- provenance and what the catalog knows ----------------------------------------------------

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
            "method_options": jsonable(options or {}),
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
            "info": jsonable(e.info),
            "error": self.status(model_id),
            "dataset": (cfg.get("data") or {}).get("name"),
            "teacher_method": (cfg.get("teacher") or {}).get("method"),
            "class_names": None,
            "image_size": None,
            "channels": None,
            "n_images": None,
            "test_data": None,
            "loaded": model_id in self._loaded,
            "shortcut": None if e.shortcut is None else _shares(e.shortcut),
        }
        lm = self._loaded.get(model_id)
        if lm is not None:
            out.update(class_names=lm.class_names, image_size=list(lm.image_size), channels=lm.channels)
            d = self._data.get(lm.data_key)
            if d is not None:
                out["n_images"], out["test_data"] = d.n, d.fingerprint
        return out
