"""The figures of the reports: training curves, accuracies per seed, faithfulness curves, confusion matrices and
example grids, each drawn from what a run or study stored and returned as PNG bytes.

The example grids themselves (symmetric colour maps, colour bars) are drawn by :mod:`teachx.runs.figures`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from teachx.runs import figures
from teachx.runs.figures import VAL_LOSS_LABEL
from teachx.studies.records import StudyRow


def _plt():
    return figures._plt()


def _png(fig, dpi: int = 90) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def curves_figure(histories: dict[str, list[list[dict[str, Any]]]], title: str = "") -> bytes:
    """Validation accuracy and loss per epoch: mean over seeds (line) and min-max band, one colour per arm."""
    return _png(_curves(histories, title))


def _curves(histories: dict[str, list[list[dict[str, Any]]]], title: str):
    """The figure of :func:`curves_figure`. Validation loss is cross-entropy alone for every arm; an arm
    without a validation split shows its training values instead, dashed and named so in the legend."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fallback = False
    for i, (name, runs) in enumerate(histories.items()):
        runs = [h for h in runs if h]
        if not runs:
            continue
        n_ep = min(len(h) for h in runs)
        ep = [runs[0][e]["epoch"] for e in range(n_ep)]
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            vals = np.array(
                [[h[e].get(key, np.nan) if h[e].get(key) is not None else np.nan for e in range(n_ep)] for h in runs],
                float,
            )
            label, style = f"{name} (n={len(runs)})", "-"
            if np.all(np.isnan(vals)):
                key_train = key.replace("val", "train")
                vals = np.array([[h[e].get(key_train, np.nan) for e in range(n_ep)] for h in runs], float)
                label, style, fallback = f"{name} (n={len(runs)}): training values, no validation split", "--", True
            ax.plot(ep, np.nanmean(vals, 0), style, color=f"C{i}", label=label)
            if len(runs) > 1:
                ax.fill_between(ep, np.nanmin(vals, 0), np.nanmax(vals, 0), color=f"C{i}", alpha=0.15)
    axes[0].set_ylabel("validation accuracy"), axes[1].set_ylabel(VAL_LOSS_LABEL)
    if fallback:
        axes[1].set_ylabel("loss (dashed: training loss;\nsolid: validation, cross-entropy only)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_figure(
    rows: list[StudyRow], regimes: Sequence[str], arms: Sequence[str], control: Optional[str] = None
) -> bytes:
    """One panel per regime: every seed's test accuracy (dots), mean and 95% t-interval (bar) per arm;
    the dashed line is the lambda=0 control's mean, the dotted one the baseline's."""
    plt = _plt()
    by = {(r.regime, r.arm): r for r in rows}
    widths = [max(3, sum((reg, a) in by for a in arms)) for reg in regimes]
    fig, axes = plt.subplots(
        1,
        len(regimes),
        figsize=(0.32 * sum(widths) + 1.2 * len(regimes) + 0.6, 3.6),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for ax, reg in zip(axes[0], regimes):
        here = [a for a in arms if (reg, a) in by]  # arms limited by study.arm_regimes leave no empty slot
        for i, arm in enumerate(here):
            r = by[(reg, arm)]
            s = r.summary
            accs = [a for a in r.test_acc if a is not None]
            jitter = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
            ax.scatter(i + np.asarray(jitter), accs, s=9, color=f"C{arms.index(arm) % 10}", alpha=0.6, zorder=2)
            if s.get("ci_low") is not None:
                ax.errorbar(
                    i,
                    s["mean"],
                    yerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]],
                    fmt="_",
                    color="k",
                    markersize=14,
                    capsize=4,
                    zorder=3,
                )
            else:
                ax.plot([i - 0.2, i + 0.2], [s["mean"]] * 2, color="k", zorder=3)
        for ref, style in ((control, "--"), ("baseline", ":")):
            r = by.get((reg, ref)) if ref else None
            if r:
                ax.axhline(r.summary["mean"], color="0.4", ls=style, lw=0.8, zorder=1)
        ax.set_xticks(range(len(here)), here, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"regime {reg}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    fig.tight_layout()
    return _png(fig, dpi=110)


def splits_figure(rows: list[StudyRow], regimes: Sequence[str]) -> bytes:
    """One panel per regime of an artefact benchmark: each row's mean accuracy on clean test images (x) against
    attacked ones (y), with the seeds' standard deviations; the baseline and the ceiling are marked. A correction
    that works moves up (attacked) without moving left (clean)."""
    plt = _plt()
    regimes = [g for g in regimes if any(r.regime == g and r.test_splits for r in rows)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.6 * len(regimes) + 2.6, 4.0), squeeze=False)
    names = list(dict.fromkeys(r.arm for r in rows if r.test_splits))
    markers = {"baseline": "s", "ceiling": "*"}
    for ax, reg in zip(axes[0], regimes):
        for r in (r for r in rows if r.regime == reg and r.test_splits):
            clean, attacked = r.test_splits.get("clean"), r.test_splits.get("attacked")
            if not clean or not attacked:
                continue
            ax.errorbar(
                clean["mean"],
                attacked["mean"],
                xerr=clean.get("std") or 0,
                yerr=attacked.get("std") or 0,
                fmt=markers.get(r.arm, "o"),
                markersize=9 if r.arm in markers else 6,
                color=f"C{names.index(r.arm) % 10}",
                label=r.arm,
                capsize=2,
                lw=0.8,
            )
        ax.set_title(f"regime {reg}", fontsize=9)
        ax.set_xlabel("accuracy on clean test images")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on attacked test images\n(the artefact in every image)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (4.6 * len(regimes) + 2.6), 1))
    return _png(fig, dpi=110)


def faithfulness_figure(curves: dict[str, dict[str, dict[str, Any]]], title: str = "") -> bytes:
    """MoRF (left, lower is better) and LeRF (right, higher is better) curves: one line per map set."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, metric, label in zip(
        axes,
        ("pixel_flipping_morf", "pixel_flipping_lerf"),
        ("MoRF (lower AUC = more faithful)", "LeRF (higher AUC = more faithful)"),
    ):
        for i, (name, by_metric) in enumerate(curves.items()):
            c = by_metric.get(metric) or {}
            if c.get("curve") and c.get("curve_x"):
                auc = (c.get("auc") or {}).get("mean")
                ax.plot(
                    c["curve_x"],
                    c["curve"],
                    color=f"C{i}",
                    ls="--" if "random" in name else "-",
                    label=f"{name} (AUC {auc:.3f})" if auc is not None else name,
                )
        (
            ax.set_title(label, fontsize=9),
            ax.set_xlabel("fraction of pixels perturbed"),
            ax.set_ylabel("target-class probability"),
        )
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(counts: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "") -> bytes:
    """The test confusion matrix: rows the true class, columns the predicted one; colour = the share of
    the true class's images (so the diagonal is each class's accuracy), counts written in the cells."""
    return _png(_confusion(counts, class_names, title), dpi=100)


def _confusion(counts: Sequence[Sequence[int]], class_names: Sequence[str], title: str):
    plt = _plt()
    m = np.asarray(counts, dtype=float)
    k = m.shape[0]
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    names = [str(n) for n in class_names][:k] + [str(i) for i in range(len(class_names), k)]
    side = max(4.8, 0.42 * k + 2.4)
    longest = max((len(n) for n in names), default=1) + 6  # "name (NN%)"
    fig, ax = plt.subplots(figsize=(side + 1.0 + 0.07 * longest, side + 0.05 * longest), layout="constrained")
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7 if k > 12 else 8,
                    color="white" if share[i, j] > 0.6 else "black",
                )
    fs = 8 if k <= 20 else 5
    ax.set_xticks(range(k), names, rotation=45 if k <= 10 else 90, ha="right" if k <= 10 else "center", fontsize=fs)
    ax.set_yticks(range(k), [f"{n} ({share[i, i]:.0%})" for i, n in enumerate(names)], fontsize=fs)
    ax.set_xlabel("predicted class"), ax.set_ylabel("true class (its accuracy)")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def examples_figure(npz: Path, class_names: Optional[Sequence[str]] = None) -> Optional[bytes]:
    """Input | teacher map | the model's own map | the teacher method post hoc on the same model (symmetric colour
    scales, colorbars); the own map is IMPACTX's built-in map, ABN's attention map or a B-cos model's contributions."""
    import torch

    if not npz.exists():
        return None
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    columns = {"teacher": torch.from_numpy(arrays["teacher"]), "own map": torch.from_numpy(arrays["built_in"])}
    if "post_hoc" in arrays:
        columns["teacher method on this model"] = torch.from_numpy(arrays["post_hoc"])
    names = list(class_names or [])
    labels = [
        f"#{int(i)} {names[int(c)] if int(c) < len(names) else int(c)}"
        for i, c in zip(arrays["index"], arrays["labels"])
    ]
    return figures.example_grid_png(torch.from_numpy(arrays["images"]), columns, labels, dpi=70)


def arms_examples_figure(
    cells: Sequence[tuple[str, Path]], class_names: Optional[Sequence[str]] = None
) -> Optional[bytes]:
    """Input | each distinct teacher map | each arm's built-in map, for the same test images.

    ``cells``: (arm name, the unit's examples.npz) pairs, one unit per arm (of one seed). A study picks its
    example images by test labels and a fixed seed, so every unit of a regime stores the same ones; units
    whose images differ are a ValueError rather than a figure that lines up different images. Arms whose
    teachers made the same maps share one teacher column.
    """
    import torch

    loaded = []
    for arm, npz in cells:
        if not Path(npz).exists():
            continue
        with np.load(npz) as z:
            loaded.append((arm, {k: z[k] for k in z.files}))
    if len(loaded) < 2:
        return None
    first = loaded[0][1]
    for arm, arrays in loaded[1:]:
        if not np.array_equal(arrays["index"], first["index"]):
            raise ValueError(
                f"arm {arm!r} stored other example images than arm {loaded[0][0]!r}; they cannot share a figure"
            )
    columns: dict[str, torch.Tensor] = {}
    shown: list[np.ndarray] = []
    for arm, arrays in loaded:
        if not any(np.array_equal(arrays["teacher"], t) for t in shown):
            shown.append(arrays["teacher"])
            columns[f"teacher\n({arm})"] = torch.from_numpy(arrays["teacher"])
    for arm, arrays in loaded:
        columns[f"own map:\n{arm}"] = torch.from_numpy(arrays["built_in"])
    names = list(class_names or [])
    labels = [
        f"#{int(i)} {names[int(c)] if int(c) < len(names) else int(c)}" for i, c in zip(first["index"], first["labels"])
    ]
    return figures.example_grid_png(torch.from_numpy(first["images"]), columns, labels, dpi=70)
