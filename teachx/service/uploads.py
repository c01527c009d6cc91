"""Answers about an uploaded image: decoded as the model takes it, its prediction and maps."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Optional

import numpy as np
import torch

from teachx.runs.explain import conform_image
from teachx.service.errors import BadUpload
from teachx.service.loading import Explained, Loaded
from teachx.service.maps import MapViews


MAX_PIXELS = 40_000_000  # uploads larger than this many pixels are refused before decoding


class Uploads(MapViews):
    """Prediction and maps of an uploaded image; nothing of it is cached."""

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
        trust = None
        if built is not None:
            trust = self.trust(lm, float(self.trust_values(lm, x, torch.tensor([k], device=lm.device), built)[0]), ex)
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
            "trust": trust,
            "provenance": self.provenance(lm, split=None, source="computed", upload_sha256=sha, explained=ex),
        }
