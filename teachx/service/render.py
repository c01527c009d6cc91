"""Maps and images as bytes: PNG with a symmetric diverging colour map, and ``.npy`` arrays.

The colour map is matplotlib's ``bwr`` (blue -> white -> red, linear), the one the reports use,
computed here without matplotlib so the page (``static/app.js``) draws exactly the same colours:
white is 0, red positive evidence, blue negative, and the scale is symmetric, ``[-vmax, vmax]``
with ``vmax = max |map|`` unless given.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Optional

import numpy as np
from teachx.runs import figures


def symmetric_vmax(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    v = float(finite.max()) if finite.size else 0.0
    return v if v > 0 else 1.0


def bwr(values: np.ndarray, vmax: Optional[float] = None) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, blue (-vmax) / white (0) / red (+vmax)."""
    vmax = symmetric_vmax(values) if vmax is None or vmax <= 0 else float(vmax)
    t = np.clip(np.nan_to_num(values.astype(np.float64)) / vmax, -1.0, 1.0)
    r = np.where(t < 0, 1.0 + t, 1.0)
    g = 1.0 - np.abs(t)
    b = np.where(t > 0, 1.0 - t, 1.0)
    return np.round(np.stack([r, g, b], -1) * 255).astype(np.uint8)


def png_bytes(rgb_or_gray: np.ndarray, scale: int = 1) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes, optionally enlarged by an integer factor."""
    from PIL import Image

    a = np.asarray(rgb_or_gray)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if scale > 1:
        a = a.repeat(scale, 0).repeat(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def map_png(m: np.ndarray, vmax: Optional[float] = None, scale: int = 1) -> bytes:
    """(C, H, W) map (channels summed) -> colour-mapped PNG bytes."""
    return png_bytes(bwr(m.sum(0) if m.ndim == 3 else m, vmax), scale)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


#: matplotlib's pyplot is not thread-safe and the server answers from a thread pool: one figure at a time
_FIGURE_LOCK = threading.Lock()


def grid_png(images: np.ndarray, columns: dict[str, np.ndarray], labels: list[str]) -> bytes:
    """(K, H, W, C) uint8 inputs and (K, C, H, W) maps per column -> the report's example grid as PNG bytes."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    with _FIGURE_LOCK:
        return figures.example_grid_png(x, {k: torch.from_numpy(v) for k, v in columns.items()}, labels, dpi=80)
