"""Cached rows of a model's test split, and computing the rows that are missing.

The offline cache (:mod:`teachx.service.cache`) keeps, per model:

- *view* rows (cheap, one forward pass): class probabilities and the IMPACTX built-in map;
- *map* rows per method: a registered teacher applied to this model, post-processed as the run's
  config says (``teacher.reduce``, ``normalize``, ``smooth``), one set for the predicted class and
  one for the true label;
- *metric* rows (expensive): the most-relevant-first pixel-flipping curve of the model's primary
  map (built-in for IMPACTX, the run's teacher method for a classifier), computed by
  :class:`teachx.evaluation.PixelFlippingMoRF`, and the agreement of the built-in map with the
  teacher method's map on the same model (:func:`teachx.evaluation.map_agreement`), all for the
  predicted class.

Concurrent requests share batches (:mod:`teachx.service.batching`); :meth:`RowStore.precompute`
fills every row of the whole split offline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.data.transforms import normalize
from teachx.errors import TeachxError
from teachx.evaluation import build_metric, map_agreement
from teachx.evaluation.base import trapezoid_auc
from teachx.evaluation.builtin_maps import TRUST_METHOD, disagrees, map_trust
from teachx.runs.teacher import map_recipe
from teachx.runs.teacher import as_nchw, make_teacher
from teachx.service.batching import Coalescer
from teachx.service.cache import ArrayCache, cache_key
from teachx.service.errors import MethodFailed, NotFound, ServiceError
from teachx.service.loading import Loaded, ModelStore, jsonable
from teachx.teachers import TEACHERS, build
from teachx.teachers.postprocess import postprocess


AGREEMENT = ("spearman", "pearson", "cosine", "top_k_intersection")


class RowStore(ModelStore):
    """The model store with its cached rows: what the answers about test images are read from."""

    def ready(self, model_id: str, index: int, name: Optional[str] = None) -> bool:
        """Whether the image view (``name`` None) or built-in map of ``index`` is answered from memory and
        the cache alone -- no loading, no model call -- so the server may answer it without a worker thread."""
        lm = self._loaded.get(model_id)
        cache = self._views.get(model_id)
        if lm is None or cache is None or not 0 <= index < cache.n:
            return False
        if name is None:
            return cache.has("probs", index) and (
                not lm.impactx or (cache.has("built_in", index) and cache.has("trust", index))
            )
        return name == "built_in" and lm.impactx and cache.has("built_in", index)

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
                "options": jsonable(t.options),
                "target": t.target,
                "reduce": t.reduce,
                "normalize": t.normalize,
                "smooth": t.smooth,
                "background_size": t.background_size,
            },
            "metric": {"name": morf.name, **jsonable(morf.options())},
            "explained": "predicted",
            # the trust signal: Pearson correlation of the channel-summed built-in map with this post-hoc map
            "trust": {"method": TRUST_METHOD, "measure": "pearson of channel sums"},
        }  # the class of the cached curves, agreements and trust values
        fields: dict[str, tuple[tuple[int, ...], str]] = {
            "probs": ((len(lm.class_names),), "f4"),
            "morf": ((self.steps + 1,), "f4"),
            "agreement": ((len(AGREEMENT),), "f4"),
        }
        if lm.impactx:
            spec = getattr(lm.model, "spec", None) or {}
            fields["built_in"] = ((int(spec.get("map_channels", 1)), *self._map_hw(lm)), "f2")
            fields["trust"] = ((1,), "f4")
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
            **jsonable(map_recipe(replace(lm.cfg, teacher=tcfg), teacher)),
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

    def fill_trust(self, lm: Loaded, indices: np.ndarray, progress: Optional[Callable[[int], None]] = None) -> None:
        """The trust values of the predicted class for the rows of ``indices`` not cached (models with a built-in
        map): one forward and one backward pass per batch, kept apart from the cheap view rows so that a built-in
        map alone never waits for a backward pass."""
        if not lm.impactx:
            return
        cache = self.view_cache(lm)
        d = self.data(lm)

        def missing(idx: np.ndarray) -> np.ndarray:
            return cache.missing("trust", idx)

        def compute(todo: np.ndarray) -> None:
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s : s + self.batch_size]
                x = self._x(lm, d.test.images[idx])
                with lm.lock:
                    with torch.no_grad():
                        logits, maps = lm.model.forward_all(x)  # the predicted class's map, in float32
                    cache.put("trust", idx, self.trust_values(lm, x, logits.argmax(1), maps)[:, None])
                if progress:
                    progress(len(idx))

        self._fill(cache, self.batch_size, np.asarray(indices, dtype=np.int64), missing, compute, progress)

    def trust_values(self, lm: Loaded, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
        """(B,) float32 trust values (:func:`teachx.evaluation.builtin_maps.map_trust`) of built-in ``maps``."""
        try:
            with lm.lock:
                return map_trust(lm.model, x, target, maps.float(), TRUST_METHOD).float().cpu().numpy()
        except Exception as exc:  # a model gradient x input cannot differentiate: say so, never crash
            raise MethodFailed(
                f"{TRUST_METHOD} on model '{lm.entry.id}' failed, so its built-in maps cannot be checked: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            ) from None

    def trust(self, lm: Loaded, value: Optional[float], explained) -> Optional[dict[str, Any]]:
        """The API's trust block of one image and class (None for a model without a built-in map)."""
        if not lm.impactx:
            return None
        value = None if value is None or not np.isfinite(value) else float(value)
        return {
            "value": value,
            "disagrees": disagrees(value, self.trust_threshold),
            "threshold": self.trust_threshold,
            "method": TRUST_METHOD,
            "explained_class": explained.cls,
            "explained_class_name": explained.name,
        }

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
                    if lm.impactx:
                        steps.append(
                            (
                                "built-in map vs gradient x input",
                                lambda cb: self.fill_trust(lm, all_idx, cb),
                                len(cache.missing("trust")),
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
