"""Answers about one test image: its prediction, and its maps (built-in, teacher, difference).

Every answer about one image explains one class (:class:`teachx.service.loading.Explained`): the
predicted class unless ``class=label`` (the true class) or ``class=K`` asks for another. Every map and
difference of the answer is of that class, and the provenance says which.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from teachx.models import shared_map_text
from teachx.service.errors import BadClass, NotFound, Unavailable
from teachx.service.loading import Explained, Loaded
from teachx.service.rows import AGREEMENT, RowStore
from teachx.teachers import TEACHERS
from teachx.training.map_losses import INVARIANCE, MAP_LOSSES, comparable


_DIFFERENCE = {
    "none": "built-in map minus teacher map, as they are (the map loss compares values)",
    "scale": "built-in map minus teacher map, each divided by its max |value| (the map loss leaves the scale free)",
    "affine": "built-in map minus teacher map, each z-scored (the map loss leaves scale and offset free)",
}


class MapViews(RowStore):
    """Predictions and maps of the test images, read from the cached rows or computed for the request."""

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
        self.fill_trust(lm, np.array([index]))  # one backward pass the first time (ready() says when it is cached)
        trust = self.trust(lm, float(cache.get("trust", index)[0]) if lm.impactx else None, ex)
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
            "trust": trust,
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

    def explained_trust(self, lm: Loaded, index: int, ex: Explained) -> Optional[dict[str, Any]]:
        """The trust block of test image ``index`` for the explained class: cached for the predicted class, one
        backward pass (and a decoder pass for a per-class model) for another."""
        if not lm.impactx:
            return None
        if ex.cls == ex.predicted:
            self.fill_trust(lm, np.array([index]))
            return self.trust(lm, float(self.view_cache(lm).get("trust", index)[0]), ex)
        built, _ = self._built_in(lm, index, ex)
        x = self._x(lm, self.data(lm).test.images[[index]])
        target = torch.tensor([ex.cls], device=lm.device)
        return self.trust(lm, float(self.trust_values(lm, x, target, torch.from_numpy(built)[None])[0]), ex)

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
        from teachx.training.methods import impactx_options, method_of_model

        method = method_of_model(lm.entry.kind)
        if method is None or not method.map_follows_teacher:
            return "scale"
        spec_decoder = getattr(lm.model, "decoder_name", None)
        options = impactx_options(lm.cfg)
        if spec_decoder is not None and spec_decoder != options.decoder:
            return "none"  # a record older than the decoder option: the paper's decoder, trained with MSE
        return INVARIANCE.get(MAP_LOSSES.canonical(options.map_loss), "affine")

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
