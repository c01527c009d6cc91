"""One report per run or study: a self-contained HTML file and a Markdown file.

The HTML embeds every figure as a base64 PNG and its CSS inline, so it can be mailed or archived
alone (no external assets, no URLs). The Markdown file links PNGs written next to it
(``<name>_files/``). Both are written atomically. The report only reads what the run or study
wrote (``results.json``/``study.json``, stage records, ``examples.npz``): no model is re-run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import teachx.evaluation.shortcut  # noqa: F401  (the modules that declare the measures reports show)
import teachx.runs.evaluation  # noqa: F401
from teachx.errors import RunDirError
from teachx.evaluation.base import measure
from teachx.runs import figures
from teachx.runs.figures import VAL_LOSS_LABEL
from teachx.runs.recovery import run_dir_fix
from teachx.runs.rundir import run_config_hash, saved_run_config
from teachx.studies.records import StudyRecord, StudyRow
from teachx.utils.numbers import interval, mean_std, number, p_value, signed
from teachx.utils.io import read_trusted_json, write_bytes_atomic, write_text_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.l{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.82em}
.verdict{padding:.4em .8em;margin:.3em 0;border-left:4px solid #888;background:#fafafa}
.yes{border-color:#2a7}.no{border-color:#c84}.note{color:#666;font-size:.85em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
"""


@dataclass
class _Doc:
    """Builds the HTML and Markdown bodies side by side."""

    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"\n## {text}\n")

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def verdict(self, text: str, good: Optional[bool]) -> None:
        cls = "verdict " + ("yes" if good else "no" if good is not None else "")
        self.html.append(f'<div class="{cls}">{html.escape(text)}</div>')
        self.md.append(f"- **{text}**")

    def measures(self, names: Sequence[str]) -> None:
        """One plain sentence per measure shown above: what it measures and which direction is better
        (the sentences live with each measure's definition, ``teachx.evaluation.base.measure``)."""
        items = [(n, measure(n).sentence()) for n in names]
        self.html.append(
            "<ul class=note>"
            + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(s)}</li>" for n, s in items)
            + "</ul>"
        )
        self.md.append("".join(f"- **{n}**: {s}\n" for n, s in items))

    def pre(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(f"\n```yaml\n{text.rstrip()}\n```\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
        self.md.append("| " + " | ".join(map(str, header)) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        self.md.append("")

    def figure(self, name: str, png: bytes, caption: str = "") -> None:
        b64 = base64.b64encode(png).decode("ascii")
        self.html.append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
            + (f"<figcaption class=note>{html.escape(caption)}</figcaption>" if caption else "")
            + "</figure>"
        )
        self.figures[name] = png
        self.md.append(f"![{caption or name}]({{files}}/{name})\n")

    def render(self, md_files_dir: str) -> tuple[str, str]:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1><p class=note>written {stamp} by teachx</p>"
        )
        md = (
            f"# {self.title}\n\n_written {stamp} by teachx_\n\n"
            + "\n".join(self.md).replace("{files}", md_files_dir)
            + "\n"
        )
        return head + "\n".join(self.html) + "</body></html>\n", md


# -- formatting --------------------------------------------------------------------------------------


# -- figures -----------------------------------------------------------------------------------------


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


#: built-in maps of at most this many arms in one side-by-side figure of a study report
MAX_SIDE_BY_SIDE = 6


def examples_figure(npz: Path, class_names: Optional[Sequence[str]] = None) -> Optional[bytes]:
    """Input | teacher map | built-in map | post-hoc teacher map on IMPACTX (symmetric colour scales, colorbars)."""
    import torch

    if not npz.exists():
        return None
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    columns = {"teacher": torch.from_numpy(arrays["teacher"]), "IMPACTX built-in": torch.from_numpy(arrays["built_in"])}
    if "post_hoc" in arrays:
        columns["teacher post hoc on IMPACTX"] = torch.from_numpy(arrays["post_hoc"])
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
        columns[f"built-in:\n{arm}"] = torch.from_numpy(arrays["built_in"])
    names = list(class_names or [])
    labels = [
        f"#{int(i)} {names[int(c)] if int(c) < len(names) else int(c)}" for i, c in zip(first["index"], first["labels"])
    ]
    return figures.example_grid_png(torch.from_numpy(first["images"]), columns, labels, dpi=70)


# -- reports -------------------------------------------------------------------------------------------


def write_report(run_or_study_dir: str | Path, out: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (or ``out`` and ``out`` with .md) for a run or study directory."""
    d = Path(run_or_study_dir)
    if (d / "study.json").exists():
        doc = _study_report(d)
    elif (d / "results.json").exists() and (d / "config.yaml").exists():
        doc = _run_report(d)
    elif d.is_dir() and (d / "study.yaml").exists():
        raise RunDirError(
            f"study '{d}' has no study.json yet; run `teachx study` to completion (it resumes) and try again "
            f"(`teachx study CONFIG --out {d} --status` shows how far it is)"
        )
    else:
        raise RunDirError(
            f"'{d}' is not a teachx run or study directory (no results.json or study.json); pass the --out folder of `teachx run`, `teachx demo` or `teachx study`"
        )
    html_path = Path(out) if out else d / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_suffix(".html")
    md_path = html_path.with_suffix(".md")
    files_dir = html_path.with_name(html_path.stem + "_files")
    _refuse_foreign(html_path, md_path, [files_dir / name for name in doc.figures])
    html_text, md_text = doc.render(files_dir.name)
    for name, png in doc.figures.items():
        write_bytes_atomic(files_dir / name, png)
    write_text_atomic(md_path, md_text)
    write_text_atomic(html_path, html_text)
    return html_path, md_path


def _written_by_teachx(path: Path) -> bool:
    """Whether ``path`` is a report teachx wrote (its 'written ... by teachx' line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192).decode("utf-8", "replace")
    except OSError:
        return False
    return "by teachx</p>" in head or "by teachx_" in head


def _refuse_foreign(html_path: Path, md_path: Path, figures: list[Path]) -> None:
    """A report replaces only an earlier report of teachx's, never a file it did not write (a
    notes.md next to --out notes.html, a picture in notes_files/)."""
    ours = any(_written_by_teachx(p) for p in (html_path, md_path))
    for p in [html_path, md_path] + ([] if ours else figures):
        if p.exists() and not (p.suffix in (".html", ".htm", ".md") and _written_by_teachx(p)):
            raise RunDirError(
                f"'{p}' exists and was not written by teachx; teachx never replaces files it did not make, "
                "so choose another --out file name for the report"
            )


def _read_json(p: Path) -> Any:
    """A record the report is built from, verified against its digest (records without one are legacy)."""
    fix = run_dir_fix(p) or (
        "re-run the same `teachx study` command (complete units are skipped; it writes study.json again)"
        if p.name == "study.json"
        else "re-run the command that made this directory (finished stages are skipped; it writes the file again)"
    )
    try:
        return read_trusted_json(p, fix)
    except OSError as exc:
        raise RunDirError(f"cannot read '{p}' ({type(exc).__name__}); re-run the command that writes it") from None


def _evaluated_row(row: StudyRow) -> bool:
    """Whether a study row's units were evaluated beyond accuracy (their example arrays, built-in maps)."""
    from teachx.training.methods import recorded_method

    method = recorded_method(row.to_dict())
    return method is not None and method.study_evaluation


def _method_row(res: dict[str, Any]) -> list[Any]:
    """The accuracy row of the run's training method, as the method names it and its settings."""
    from teachx.training.methods import recorded_method

    method = recorded_method(res)
    if method is None:  # a method this teachx does not know: its name and accuracies
        return [
            f"{res.get('method')}",
            res.get("backbone"),
            number(res.get("method_test_acc")),
            number(res.get("method_val_acc")),
        ]
    label, details = method.result_text(res)
    return [
        label + (f" ({details})" if details else ""),
        res.get("backbone"),
        number(method.result_acc(res, "test")),
        number(method.result_acc(res, "val")),
    ]


def _method_stage(res: dict[str, Any]) -> tuple[str, str]:
    """(how the report names the run's method model, the directory of its stage) from results.json."""
    from teachx.training.methods import LEGACY_METHOD, recorded_method

    known = recorded_method(res)
    stage = known.name if known is not None else str(res.get("method", LEGACY_METHOD))
    return (known.display_name() if known is not None else stage), stage


def _per_class(doc: _Doc, d: Path, res: dict[str, Any]) -> None:
    """Per-class test accuracy: the method model's confusion matrix (figure, and a table up to 20 classes) and
    each class's accuracy for the baseline and the method, from the stage records."""
    label, method = _method_stage(res)
    conf = {}
    for name, sub in (("baseline", "baseline"), (label, method)):
        st = d / sub / "stage.json"
        if st.exists() and _read_json(st).get("test_confusion"):
            conf[name] = np.asarray(_read_json(st)["test_confusion"], dtype=np.int64)
    doc.h("Per-class accuracy (test set)")
    if not conf:
        doc.p(
            "This run did not record its test predictions per class: it was made by an earlier teachx. "
            "A new run (another --out) records them.",
            "note",
        )
        return
    names = list(res.get("class_names") or [])
    k = next(iter(conf.values())).shape[0]
    names = names[:k] + [str(i) for i in range(len(names), k)]
    main = label if label in conf else "baseline"
    m = conf[main]
    doc.figure(
        "confusion.png",
        confusion_figure(m, names, f"{main} model, {int(m.sum())} test images"),
        f"confusion matrix of the {main} model on the test set: rows the true class, columns the predicted one",
    )
    rows = []
    for i, n in enumerate(names):
        off = m[i].copy()
        off[i] = -1
        j = int(off.argmax())
        rows.append(
            [n, int(m[i].sum())]
            + [f"{c[i, i] / max(c[i].sum(), 1):.3f}" for c in conf.values()]
            + [f"{names[j]} ({int(m[i, j])})" if m[i, j] > 0 else "—"]
        )
    doc.table(
        ["class", "test images"] + [f"{name} accuracy" for name in conf] + [f"{main}: most often mistaken for"], rows
    )
    if k <= 20:
        doc.p(f"Confusion matrix of the {main} model (counts; rows: true class, columns: predicted class):", "note")
        doc.table(["true ↓ predicted →", *names], [[n, *map(int, m[i])] for i, n in enumerate(names)])
    doc.measures(["class_accuracy"])


def _run_report(d: Path) -> _Doc:
    res = _read_json(d / "results.json")
    bound = run_config_hash(d)
    if bound is not None and res.get("config_hash", bound) != bound:  # results.json without a hash: an older teachx's
        command = saved_run_config(d)[0] or "run"
        raise RunDirError(
            f"'{d / 'results.json'}' was made with another config than '{d / 'config.yaml'}'; re-run the "
            f"`teachx {command}` command that made the run directory (it evaluates the run again), then the report"
        )
    doc = _Doc(
        f"teachx run: {res.get('dataset', '?')} / {res.get('backbone', '?')} / teacher {res.get('teacher', '?')}"
    )
    doc.p(
        "A single run (one seed): no statistics. Use `teachx study` for several seeds, confidence intervals and p-values.",
        "note",
    )
    doc.h("Accuracy")
    rows = [
        ["baseline", res.get("backbone"), number(res.get("baseline_test_acc")), number(res.get("baseline_val_acc"))],
        _method_row(res),
    ]
    if res.get("teacher_test_acc") is not None and res.get("teacher_backbone") != res.get("backbone"):
        rows.append(["teacher", res.get("teacher_backbone"), number(res.get("teacher_test_acc")), "n/a"])
    doc.table(["model", "backbone", "test acc", "best val acc"], rows)
    doc.measures(["test_accuracy"])
    _per_class(doc, d, res)
    sc = res.get("shortcut")
    if sc:
        doc.h("Right for the right reasons? Attribution on the artefact (de-correlated test images)")
        doc.table(
            ["model", "input gradient share (↓)", "LRP share (↓)", "artefact area (chance)"],
            [
                [name, number(b.get("gradient"), 3), number(b.get("lrp"), 3), number(b.get("area"), 3)]
                for name, b in sc.items()
                if isinstance(b, dict) and "area" in b
            ],
        )
        doc.measures(["gradient_share", "lrp_share", "artefact_area"])
    q = res.get("map_quality")
    if q:
        doc.h("Built-in maps vs teacher maps (test set)")
        doc.table(
            ["measure", "value"],
            [
                ["Pearson correlation", number(q.get("corr"), 3)],
                ["correlation of the mean training map", number(q.get("corr_mean_map"), 3)],
                [
                    "correlation of the mean map under the training augmentation (a constant map's best)",
                    number(q.get("corr_mean_map_augmented"), 3),
                ],
                ["R² vs mean map (> 0: per-image maps were learned)", number(q.get("r2_vs_mean_map"), 3)],
                [
                    "R² vs mean map, scale-free (each map's best per-image scale and offset; for 1 − Pearson / rank losses)",
                    number(q.get("r2_vs_mean_map_affine"), 3),
                ],
            ],
        )
        doc.measures(["corr", "corr_mean_map", "corr_mean_map_augmented", "r2_vs_mean_map", "r2_vs_mean_map_affine"])
        fq = q.get("faithfulness")
        if fq:
            doc.h(f"Built-in maps explain the IMPACTX model itself? ({fq.get('images')} test images, predicted class)")
            auc = fq.get("auc", {})
            names = [
                k
                for k in ("built_in", "teacher_post_hoc", "mean_map", "random")
                if k in auc.get("pixel_flipping_morf", {})
            ]
            doc.table(
                ["map set", "MoRF AUC (↓)", "LeRF AUC (↑)", "insertion AUC (↑)"],
                [
                    [
                        k,
                        number(auc.get("pixel_flipping_morf", {}).get(k), 3),
                        number(auc.get("pixel_flipping_lerf", {}).get(k), 3),
                        number(auc.get("insertion", {}).get(k), 3),
                    ]
                    for k in names
                ],
            )
            doc.p(
                f"Correlation of the built-in map with the teacher method applied post hoc to the IMPACTX model: {number(fq.get('corr_self'), 3)} "
                f"(mean map: {number(fq.get('corr_self_mean_map'), 3)}).",
                "note",
            )
            doc.measures(["pixel_flipping_morf", "pixel_flipping_lerf", "insertion", "corr_self", "corr_self_mean_map"])
    doc.h("Training curves")
    hist = {}
    for name, sub in (("baseline", "baseline"), ("teacher", "teacher"), _method_stage(res)):
        st = d / sub / "stage.json"
        if st.exists():
            hist[name] = [_read_json(st).get("history", [])]
    if hist:
        doc.figure("curves.png", curves_figure(hist))
    doc.h("Examples")
    ex = d / "figures" / "examples.png"
    if ex.exists():
        doc.figure(
            "examples.png",
            ex.read_bytes(),
            "one test image per class and wrong predictions, each row labelled with its true and "
            "predicted class: input | teacher map | built-in map (colour scale symmetric around 0 per map)",
        )
        shown = (res.get("examples") or {}).get("images") or []
        names = res.get("class_names") or []
        name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        wrong = [
            f"#{e['index']} true: {name(e['label'])}, predicted: {name(e['predicted'])}"
            for e in shown
            if e["label"] != e["predicted"]
        ]
        if shown:
            doc.p(
                f"Classes shown: {len({e['label'] for e in shown})} of {res.get('classes', len(names))}. "
                + (
                    f"Wrong predictions of the {res['examples']['model']} model shown: {'; '.join(wrong)}."
                    if wrong
                    else "The model got every image shown right."
                ),
                "note",
            )
    else:
        doc.p("no example figure in this run (figures/examples.png)", "note")
    doc.h("Stage timings")
    doc.table(
        ["stage", "seconds"],
        [[k, f"{v:.1f}"] for k, v in (res.get("stage_seconds") or {}).items()]
        + [["wall", f"{res.get('wall_seconds', 0.0):.1f}"]],
    )
    doc.p(
        f"device {res.get('device')}, torch threads {res.get('torch_threads')}; "
        f"seconds/epoch: baseline {number(res.get('baseline_seconds_per_epoch'), 2)}, IMPACTX {number(res.get('impactx_seconds_per_epoch'), 2)}",
        "note",
    )
    doc.h("Resolved config")
    doc.pre((d / "config.yaml").read_text())
    return doc


def _study_report(d: Path) -> _Doc:
    data = StudyRecord.from_dict(_read_json(d / "study.json"))
    study, rows, units = data.study, data.rows, data.units
    base = data.base_config
    doc = _Doc(f"teachx study: {base['data']['name']} / {base['model']['backbone']} ({len(study['seeds'])} seeds)")
    doc.p(
        f"seeds {study['seeds']}; arms: {', '.join(study['arms'])}; regimes: {', '.join(study['regimes'])}; "
        f"control (lambda=0): {study.get('control') or 'none'}"
        + "".join(f", for {a}: {c}" for a, c in (study.get("controls") or {}).items())
        + f"; alpha = {data.alpha}."
    )
    doc.h("Does the gain come from the explanations?")
    if data.verdicts:
        for v in data.verdicts:
            doc.verdict(
                v["text"]
                + (
                    f" (Holm-adjusted p={p_value(v.get('p_ttest_holm'))}, Wilcoxon p={p_value(v.get('p_wilcoxon'))}, n={v['n']})"
                ),
                v["beats_control"],
            )
    else:
        doc.p(
            "No lambda=0 control arm in this study: add e.g. `lambda0: {impactx.lam: 0}` to study.arms to answer this."
        )
    doc.h("Test accuracy (mean ± std over seeds, 95% t-interval, paired comparisons)")
    header = [
        "regime",
        "arm",
        "n",
        "mean ± std",
        "95% CI",
        "Δ vs baseline",
        "CI of Δ",
        "p (t)",
        "p (Wilcoxon)",
        "p (t, Holm)",
        "d_z",
        "Δ vs λ=0",
        "CI of Δ",
        "p (t)",
        "p (Wilcoxon)",
        "p (t, Holm)",
        "wins/losses vs λ=0",
    ]
    table = []
    for r in rows:
        s, vb, vc = r.summary, r.vs_baseline, r.vs_control
        cell = [r.regime, r.arm, s["n"], mean_std(s), interval(s["ci_low"], s["ci_high"])]
        for c in (vb, vc):
            if c:
                cell += [
                    signed(c["mean_diff"]),
                    interval(c.get("ci_low"), c.get("ci_high"), True),
                    p_value(c.get("p_ttest")),
                    p_value(c.get("p_wilcoxon")),
                    p_value(c.get("p_ttest_holm")),
                ]
                if c is vb:
                    cell.append(number(c.get("cohen_dz"), 2))
            else:
                cell += [""] * (6 if c is vb else 5)
        cell.append(f"{vc['wins']}/{vc['losses']}" if vc else "")
        table.append(cell)
    doc.table(header, table)
    doc.p(
        "Δ = arm − reference, paired by seed. p (t): paired t-test; p (Wilcoxon): signed-rank test (zero differences dropped, "
        "exact or sign-flip permutation for small n; with fewer than 6 seeds it cannot reach 0.05); Holm: adjusted over all "
        "comparisons of the same kind in the study; d_z: Cohen's d for paired data (vs baseline).",
        "note",
    )
    doc.measures(["test_accuracy"])
    doc.figure(
        "accuracy.png",
        accuracy_figure(rows, list(study["regimes"]), ["baseline", *study["arms"]], study.get("control")),
        "test accuracy per seed (dots), mean and 95% t-interval (black); dashed: the λ=0 control's mean, dotted: the baseline's",
    )
    teach = [r for r in rows if r.teacher_test_acc]
    if teach:
        doc.table(
            ["regime", "arm", "teacher backbone", "teacher test acc"],
            [[r.regime, r.arm, r.teacher_backbone, mean_std(r.teacher_test_acc)] for r in teach],
        )
    # ablation pivot
    doc.h("Ablation table (test accuracy; Δ and p vs λ=0)")
    regimes = list(study["regimes"])
    arms = ["baseline", *study["arms"]]
    by = {(r.regime, r.arm): r for r in rows}
    pivot = []
    for arm in arms:
        line = [arm]
        for reg in regimes:
            r = by.get((reg, arm))
            if not r:
                line.append("")
                continue
            txt = mean_std(r.summary)
            if r.vs_control:
                txt += f" (Δ {signed(r.vs_control['mean_diff'])}, p={p_value(r.vs_control.get('p_ttest'))})"
            line.append(txt)
        pivot.append(line)
    doc.table(["arm", *regimes], pivot)
    # shortcut benchmarks: the wrong-reason score
    sc = [r for r in rows if r.shortcut]
    if sc:
        doc.h(
            "Right for the right reasons? Attribution on the artefact (de-correlated test images, mean ± std over seeds)"
        )
        doc.table(
            [
                "regime",
                "arm",
                "method",
                "test accuracy",
                "input gradient share (↓)",
                "LRP share (↓)",
                "built-in map share",
                "artefact area (chance)",
            ],
            [
                [
                    r.regime,
                    r.arm,
                    r.method or "",
                    mean_std(r.summary),
                    mean_std(r.shortcut.get("gradient"), 3),
                    mean_std(r.shortcut.get("lrp"), 3),
                    mean_std(r.shortcut.get("built_in"), 3) if r.shortcut.get("built_in") else "—",
                    mean_std(r.shortcut.get("area"), 3),
                ]
                for r in sc
            ],
        )
        doc.p(
            "Share of each model's post-hoc attribution (|input gradient| and |LRP| of the true class, summed over channels) that falls "
            "on the artefact region of the test images, whose artefact is independent of the class; a model that ignores the artefact "
            "puts at most about the artefact's area there. Built-in map share: the same for the model's own map (IMPACTX, ABN).",
            "note",
        )
        doc.measures(["gradient_share", "lrp_share", "artefact_area"])
    # map quality
    mq = [r for r in rows if r.map_quality]
    if mq:
        doc.h("Built-in maps vs teacher maps (test set, mean ± std over seeds)")
        doc.table(
            [
                "regime",
                "arm",
                "λ",
                "maps",
                "teacher",
                "correlation",
                "corr. of mean map",
                "… under augmentation",
                "R² vs mean map",
                "R² vs mean map, scale-free",
            ],
            [
                [
                    r.regime,
                    r.arm,
                    r.method_fields.get("lam", "—"),
                    r.method_fields.get("maps", r.method or ""),
                    r.teacher,
                    mean_std(r.map_quality["corr"], 3),
                    mean_std(r.map_quality["corr_mean_map"], 3),
                    mean_std(r.map_quality.get("corr_mean_map_augmented"), 3),
                    mean_std(r.map_quality["r2_vs_mean_map"], 3),
                    mean_std(r.map_quality.get("r2_vs_mean_map_affine"), 3),
                ]
                for r in mq
            ],
        )
        doc.p(
            "R² > 0 means the model predicts per-image maps better than the mean training map; the λ=0 arm (untrained decoder) is the floor. "
            "Under augmentation: the mean map averaged over the training crops and flips, the best a map that is the same for every image "
            "can reach when trained on augmented targets (a fixed pattern in the teacher's maps, such as a stride artefact, is blurred there). "
            "The scale-free R² first gives each map (built-in and mean) its best scale and offset per image: the one to read for maps "
            "trained with a scale-free loss (1 − Pearson, the default decoder's).",
            "note",
        )
        doc.measures(["corr", "corr_mean_map", "corr_mean_map_augmented", "r2_vs_mean_map", "r2_vs_mean_map_affine"])
        bf = [r for r in mq if "pixel_flipping_morf.built_in" in r.map_quality]
        if bf:
            doc.h("Built-in maps explain the IMPACTX model itself? (predicted class; mean ± std over seeds)")
            sets = ("built_in", "teacher_post_hoc", "mean_map", "random")
            doc.table(
                ["regime", "arm", "corr. with post-hoc (self)", "mean map's"]
                + [f"MoRF {k} (↓)" for k in sets]
                + ["LeRF built_in (↑)", "insertion built_in (↑)"],
                [
                    [
                        r.regime,
                        r.arm,
                        mean_std(r.map_quality.get("corr_self"), 3),
                        mean_std(r.map_quality.get("corr_self_mean_map"), 3),
                    ]
                    + [mean_std(r.map_quality.get(f"pixel_flipping_morf.{k}"), 3) for k in sets]
                    + [
                        mean_std(r.map_quality.get("pixel_flipping_lerf.built_in"), 3),
                        mean_std(r.map_quality.get("insertion.built_in"), 3),
                    ]
                    for r in bf
                ],
            )
            doc.p(
                "All map sets explain the IMPACTX model's predicted class; teacher_post_hoc is the teacher method applied to the IMPACTX model, "
                "mean_map the mean training teacher map for every image, random the floor (map_quality.faithfulness in each unit).",
                "note",
            )
            doc.measures(["corr_self", "corr_self_mean_map", "pixel_flipping_morf", "pixel_flipping_lerf", "insertion"])
    # faithfulness
    fr = [r for r in rows if r.faithfulness]
    if fr:
        doc.h("Faithfulness (pixel flipping; AUC mean ± std over seeds)")
        ft = []
        for r in fr:
            for set_name, by_metric in r.faithfulness.items():
                ft.append(
                    [
                        r.regime,
                        r.arm,
                        set_name,
                        mean_std((by_metric.get("pixel_flipping_morf") or {}).get("auc")),
                        mean_std((by_metric.get("pixel_flipping_lerf") or {}).get("auc")),
                    ]
                )
        doc.table(["regime", "arm", "map set", "MoRF AUC (↓)", "LeRF AUC (↑)"], ft)
        doc.measures(["pixel_flipping_morf", "pixel_flipping_lerf"])
        doc.p(
            "built_in and teacher_post_hoc are scored on the IMPACTX model, teacher_on_baseline on the baseline; random maps are the floor for each model.",
            "note",
        )
        for r in fr:
            doc.figure(
                f"faithfulness_{_safe(r.regime)}_{_safe(r.arm)}.png",
                faithfulness_figure(r.faithfulness, f"regime {r.regime}, arm {r.arm}"),
                f"MoRF/LeRF curves, regime {r.regime}, arm {r.arm} (mean over seeds)",
            )
    # training curves
    doc.h("Training curves")
    for reg in regimes:
        hist = {}
        for arm in arms:
            r = by.get((reg, arm))
            if r:
                hist[arm] = [units[k].history for k in r.units]
        doc.figure(
            f"curves_{_safe(reg)}.png",
            curves_figure(hist, f"regime {reg}"),
            f"regime {reg}: mean over seeds, band = min-max",
        )
    # examples
    doc.h("Examples (first seed)")
    shown = 0
    for r in rows:
        if not _evaluated_row(r) or not r.lam:
            continue
        names = (units[r.units[0]].examples or {}).get("class_names")
        png = examples_figure(d / "units" / r.units[0] / "examples.npz", names)
        if png:
            doc.figure(
                f"examples_{_safe(r.regime)}_{_safe(r.arm)}.png",
                png,
                f"regime {r.regime}, arm {r.arm}, seed {r.seeds[0]}: input | teacher map | built-in map | teacher post hoc on IMPACTX "
                "(diverging colour scale symmetric around 0 per map)",
            )
            shown += 1
    if not shown:
        doc.p("no example arrays stored (study.eval.examples: 0)", "note")
    # the built-in maps of several arms on the same images: does a design change what the map shows?
    for reg in regimes:
        trained = [r for r in rows if r.regime == reg and _evaluated_row(r) and r.lam and r.seeds]
        trained = [r for r in trained if r.seeds[0] == trained[0].seeds[0]][:MAX_SIDE_BY_SIDE] if trained else []
        if len(trained) < 2:
            continue
        names = (units[trained[0].units[0]].examples or {}).get("class_names")
        png = arms_examples_figure([(r.arm, d / "units" / r.units[0] / "examples.npz") for r in trained], names)
        if png:
            arms_shown = ", ".join(r.arm for r in trained)
            doc.figure(
                f"side_by_side_{_safe(reg)}.png",
                png,
                f"regime {reg}, seed {trained[0].seeds[0]}: input | the teachers' maps | the built-in maps of {arms_shown} "
                f"(the first {MAX_SIDE_BY_SIDE} trained IMPACTX arms; the same test images)",
            )
    errors = sorted({e for u in units.values() for e in u.errors})
    if errors:
        doc.p("Diagnostics that could not be computed: " + "; ".join(errors), "note")
    # timings
    doc.h("Stage timings")
    t = data.timings
    doc.table(
        ["stage", "units", "total s", "mean s"],
        [[k, v["n"], number(v["total_s"], 1), number(v["mean_s"], 2)] for k, v in t.items()],
    )
    el = data.elapsed
    if el:
        doc.p(
            f"study wall time (first unit created {el['first_unit_created']} to last record {el['last_record_written']}, all processes and "
            f"invocations): {el['seconds'] / 60:.1f} min.",
            "note",
        )
    doc.p(
        f"models trained by the last invocation: {data.trained_this_invocation}; its wall time {data.wall_seconds_this_invocation or 0:.1f}s.",
        "note",
    )
    doc.h("Resolved config")
    study_yaml = d / "study.yaml"
    doc.pre(study_yaml.read_text() if study_yaml.exists() else json.dumps({"study": study, **base}, indent=2))
    doc.h("Notes")
    for n in data.notes:
        doc.p(n, "note")
    return doc


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))
