"""A tiny image dataset with a planted artefact, for the reveal tests: three classes told apart by a bright
quadrant; in class 0, a fixed share of the training images also carries a small magenta-and-green
checkerboard in the top-left corner (the shortcut to find: a colour and texture found nowhere else).
``artefact_in(images)`` is the ground truth, read from the pixels."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
SQUARE = 6  # the artefact: a SQUARE x SQUARE checkerboard at the top-left corner


def _checkerboard() -> np.ndarray:
    """(SQUARE, SQUARE, 3) uint8: magenta and green 1-pixel checks."""
    even = (np.add.outer(np.arange(SQUARE), np.arange(SQUARE)) % 2 == 0)[..., None]
    return np.where(even, np.array([255, 0, 255], np.uint8), np.array([0, 255, 0], np.uint8)).astype(np.uint8)


ARTEFACT = _checkerboard()
CLASSES = ("a", "b", "c")


def make_artefact_zip(path: Path, n_train: int = 60, n_test: int = 10, share: float = 0.35, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", n_train), ("test", n_test)):
            for c, name in enumerate(CLASSES):
                planted = set(rng.choice(n, int(round(share * n)), replace=False).tolist()) if c == 0 else set()
                for i in range(n):
                    a = rng.integers(0, 90, (SIZE, SIZE, 3)).astype(np.uint8)
                    r0, c0 = (0, 16) if c == 0 else (16, 0) if c == 1 else (16, 16)
                    a[r0 : r0 + 16, c0 : c0 + 16] += 60
                    if i in planted and split == "train":
                        a[:SQUARE, :SQUARE] = ARTEFACT
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="PNG")
                    zf.writestr(f"{split}/{name}/{i:03d}.png", buf.getvalue())
    return path


def artefact_in(images: np.ndarray) -> np.ndarray:
    """(N,) bool: which uint8 (N, H, W, C) images carry the planted checkerboard (every pixel of it)."""
    return (images[:, :SQUARE, :SQUARE, :] == ARTEFACT).all(axis=(1, 2, 3))


def artefact_masks(n: int) -> np.ndarray:
    """(n, H, W) bool: where the square is."""
    m = np.zeros((n, SIZE, SIZE), bool)
    m[:, :SQUARE, :SQUARE] = True
    return m
