"""Answers about a model's metrics: the filtered, sorted list of test images, and one image's pixel-flipping
curve and built-in vs teacher agreement.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from teachx.evaluation import map_agreement
from teachx.evaluation.base import trapezoid_auc
from teachx.evaluation.builtin_maps import disagrees as disagrees_flag
from teachx.service.errors import ServiceError, Unavailable
from teachx.service.loading import jsonable
from teachx.service.rows import AGREEMENT
from teachx.service.maps import MapViews


SORT_KEYS = ("index", "confidence", "true_prob", "agreement", "morf_auc", "trust")


class MetricViews(MapViews):
    """The image list (filters and sort keys over the cached rows) and the metrics of one image."""

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
        disagrees: Optional[bool] = None,
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
        if (disagrees is not None or sort == "trust") and not lm.impactx:
            raise ServiceError(
                f"model '{model_id}' has no built-in map, so no image's built-in map can disagree with its gradient; "
                "drop the disagrees filter and the trust sort for this model"
            )
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
        if disagrees is not None or sort == "trust":  # every image's value decides: computed for all (once)
            self.fill_trust(lm, np.arange(d.n))
        trust = self._trust_column(lm, d.n)
        keep = np.ones(d.n, bool)
        if disagrees is not None:
            with np.errstate(invalid="ignore"):
                keep &= np.isfinite(trust) & ((trust < self.trust_threshold) == disagrees)
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
            "trust": trust[idx],
        }[sort]
        if sort in ("agreement", "morf_auc", "trust"):  # images without the metric go last, either order
            key = np.where(np.isfinite(key), key if order == "asc" else -key, np.inf)
            idx = idx[np.lexsort((idx, key))]
        else:
            idx = idx[np.lexsort((idx, key if order == "asc" else -key))]
        page = idx[offset : offset + limit]
        if lm.impactx and not np.isfinite(trust[page]).all():  # the page's own values: one backward pass
            self.fill_trust(lm, page)
            trust = self._trust_column(lm, d.n)

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
                "trust": num(trust[i]),
                "disagrees": disagrees_flag(num(trust[i]), self.trust_threshold) if lm.impactx else None,
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
            "trust_threshold": self.trust_threshold if lm.impactx else None,
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

    def _trust_column(self, lm, n: int) -> np.ndarray:
        """(n,) the cached trust values, NaN where not computed (and for a model without a built-in map)."""
        out = np.full(n, np.nan)
        if lm.impactx:
            cache = self.view_cache(lm)
            done = cache.done["trust"].copy()
            if done.any():
                out[done] = cache.get("trust", done)[:, 0]
        return out

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
        trust = self.explained_trust(lm, index, ex)
        return {
            "model_id": model_id,
            "index": index,
            "map": map_name,
            "pixel_flipping": {
                "metric": morf.name,
                "options": jsonable(morf.options()),
                "x": xs.tolist(),
                "curve": [float(v) for v in curve[0].tolist()],
                "auc": auc,
                "higher_is_better": False,
            },
            "agreement": agreement,
            "agreement_between": ["built_in", lm.cfg.teacher.method] if lm.impactx else None,
            "trust": trust,
            "provenance": self.provenance(
                lm,
                method=map_name,
                options=jsonable(morf.options()),
                index=index,
                source=source,
                cache_key=cache.key,
                explained=ex,
            ),
        }
