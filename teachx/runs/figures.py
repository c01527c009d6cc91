"""Figures people read: example grids (input | maps) and training curves.

Signed attribution maps use a diverging colormap symmetric around zero (white = 0) with a
colorbar, so positive and negative evidence can be told apart and compared across columns.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from teachx.utils.io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _image(x_u8: torch.Tensor) -> np.ndarray:
    """(C,H,W) uint8 -> (H,W[,3]) for imshow."""
    a = x_u8.permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[2] == 1 else a


def _map(m: torch.Tensor) -> np.ndarray:
    m = m.float().cpu()
    return (m.sum(0) if m.dim() == 3 else m).numpy()


def save_example_grid(
    path: str | Path,
    images_u8: torch.Tensor,
    columns: dict[str, torch.Tensor],
    row_labels: Sequence[str] | None = None,
    dpi: int = 110,
) -> Path:
    """One row per image: the input, then each named map set (symmetric colour scale per map)."""
    return _save(_example_grid(images_u8, columns, row_labels), path, dpi)


def example_grid_png(
    images_u8: torch.Tensor,
    columns: dict[str, torch.Tensor],
    row_labels: Sequence[str] | None = None,
    dpi: int = 110,
) -> bytes:
    """:func:`save_example_grid`'s figure as PNG bytes (for reports and the service; no file)."""
    fig = _example_grid(images_u8, columns, row_labels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    return buf.getvalue()


def _example_grid(images_u8: torch.Tensor, columns: dict[str, torch.Tensor], row_labels: Sequence[str] | None):
    plt = _plt()
    n = images_u8.shape[0]
    ncol = 1 + len(columns)
    fig, axes = plt.subplots(n, ncol, figsize=(2.1 * ncol + 0.6, 2.0 * n), squeeze=False)
    for r in range(n):
        ax = axes[r, 0]
        img = _image(images_u8[r])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if r == 0:
            ax.set_title("input", fontsize=9)
        if row_labels is not None:
            ax.set_ylabel(row_labels[r], fontsize=8)
        for c, (name, maps) in enumerate(columns.items(), start=1):
            ax = axes[r, c]
            m = _map(maps[r])
            lim = float(np.abs(m).max()) or 1.0
            im = ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def save_overlay(
    path: str | Path,
    image_u8: torch.Tensor,
    amap: torch.Tensor,
    title: str = "",
    dpi: int = 120,
    map_title: str = "built-in map",
) -> Path:
    """Input | map | map over the greyscale input, for `teachx explain`; ``map_title`` names the map
    (a post-hoc map is not the model's built-in one)."""
    return _save(_overlay(image_u8, amap, title, map_title), path, dpi)


def _overlay(image_u8: torch.Tensor, amap: torch.Tensor, title: str, map_title: str):
    plt = _plt()
    img = _image(image_u8)
    m = _map(amap)
    lim = float(np.abs(m).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(7.4, 2.6))
    axes[0].imshow(img, cmap="gray" if img.ndim == 2 else None)
    axes[0].set_title("input", fontsize=9)
    im = axes[1].imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
    axes[1].set_title(map_title, fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.03)
    grey = img if img.ndim == 2 else img.mean(2)
    axes[2].imshow(grey, cmap="gray")
    axes[2].imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


#: the y-axis label of every validation-loss curve: validation scores the classifier alone, for every method
VAL_LOSS_LABEL = "validation loss (cross-entropy only)"


def save_training_curves(
    path: str | Path,
    histories: dict[str, list[dict[str, Any]]],
    dpi: int = 110,
    losses: Optional[dict[str, str]] = None,
) -> Path:
    """Training loss, validation loss and accuracy per epoch for each named run.

    ``losses``: each run's training loss in words (``TrainingMethod.training_loss``, e.g. "CE + λ·(1 − Pearson)"),
    shown in the training-loss legend; validation loss is cross-entropy alone for every run.
    """
    return _save(_training_curves(histories, losses or {}), path, dpi)


def _training_curves(histories: dict[str, list[dict[str, Any]]], losses: dict[str, str]):
    plt = _plt()
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(12, 3.6))
    for i, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] for h in hist]
        color = f"C{i}"
        a0.plot(
            ep,
            [h["train_loss"] for h in hist],
            "--",
            color=color,
            label=f"{name}: {losses[name]}" if name in losses else name,
        )
        a1.plot(ep, [h["val_loss"] for h in hist], "-", color=color, label=name)
        a2.plot(ep, [h["train_acc"] for h in hist], "--", color=color, label=f"{name} training")
        a2.plot(ep, [h["val_acc"] for h in hist], "-", color=color, label=f"{name} validation")
    a0.set_ylabel("training loss"), a1.set_ylabel(VAL_LOSS_LABEL), a2.set_ylabel("accuracy")
    for ax in (a0, a1, a2):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    plt = _plt()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def save_reveal_figure(
    path: str | Path,
    embedding: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[int],
    group_titles: Sequence[str],
    prototypes: Sequence[torch.Tensor],
    prototype_maps: Optional[Sequence[torch.Tensor]] = None,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """One class's reveal: the 2-D embedding coloured by group (left), and per listed group (most suspicious
    first) a row of its prototype images, with their maps under them when given."""
    plt = _plt()
    n_rows = max(1, len(groups)) * (2 if prototype_maps is not None else 1)
    n_cols = max([len(p) for p in prototypes] + [1])
    fig = plt.figure(figsize=(4.2 + 1.3 * n_cols, max(3.6, 1.3 * n_rows)))
    grid = fig.add_gridspec(n_rows, n_cols + 3)
    ax = fig.add_subplot(grid[:, :3])
    cmap = plt.get_cmap("tab10")
    for g in np.unique(labels):
        pts = embedding[labels == g]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=cmap(int(g) % 10), label=f"group {int(g)}")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    for r, (g, label, imgs) in enumerate(zip(groups, group_titles, prototypes)):
        row = r * (2 if prototype_maps is not None else 1)
        for c in range(len(imgs)):
            a = fig.add_subplot(grid[row, 3 + c])
            a.imshow(_image(imgs[c]), cmap="gray" if imgs[c].shape[0] == 1 else None)
            a.set_axis_off()
            if c == 0:
                a.set_title(label, fontsize=7, loc="left", color=cmap(int(g) % 10))
            if prototype_maps is not None:
                m = _map(prototype_maps[r][c])
                lim = float(np.abs(m).max()) or 1.0
                b = fig.add_subplot(grid[row + 1, 3 + c])
                b.imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
                b.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, dpi)
