"""The HTML/Markdown report: self-contained, holds the tables and images, for studies and single runs."""

from __future__ import annotations

import base64
import json
import re

import pytest

from teachx.errors import RunDirError
from teachx.reporting.report import write_report


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _assert_self_contained(html: str) -> None:
    assert not re.search(r"https?://", html), "the report must not reference external URLs"
    assert not re.search(r"<(link|script)\b", html)
    assert not re.search(r'src="(?!data:)', html)


@pytest.mark.slow
def test_study_report(study_dir):  # the tiny study of tests/test_study.py (conftest.py)
    out = study_dir["root"] / "out"
    html_path, md_path = write_report(out, study_dir["root"] / "rep" / "r.html")
    html = html_path.read_text()
    _assert_self_contained(html)
    pngs = _images(html)
    # curves (1 regime) + examples (2 arms with lambda > 0) + faithfulness (3 arms)
    assert len(pngs) >= 6 and all(p.startswith(b"\x89PNG") for p in pngs)
    data = json.loads((out / "study.json").read_text())
    rows = {r["arm"]: r for r in data["rows"]}
    # the table shows the stored numbers
    assert "Test accuracy" in html and "p (Wilcoxon)" in html and "Ablation table" in html and "Stage timings" in html
    s = rows["impactx"]["summary"]
    assert f"{s['mean']:.4f} ± {s['std']:.4f}" in html
    assert f"{rows['impactx']['vs_control']['mean_diff']:+.4f}" in html
    assert "Does the gain come from the explanations?" in html and "impactx vs lambda0" in html
    assert "MoRF" in html and "the teacher method post hoc on the same model" in html
    md = md_path.read_text()
    assert "| regime | arm | n |" in md
    assert "r_files/accuracy.png" in md and "dashed: the λ=0 control" in html
    for link in re.findall(r"\]\((r_files/[^)]+)\)", md):
        assert (html_path.parent / link).read_bytes().startswith(b"\x89PNG")
    # the two trained IMPACTX arms' built-in maps side by side on the same images
    assert "r_files/side_by_side_" in md and "the own maps of " in html
    from teachx.evaluation.base import measure

    for name in ("test_accuracy", "pixel_flipping_morf", "pixel_flipping_lerf"):  # each measure shown, in plain words
        assert f"**{name}**: {measure(name).sentence()}" in md


def test_run_report(tmp_path):
    """A `teachx run`-like directory (no statistics): accuracy table, curves, config."""
    run = tmp_path / "run"
    (run / "baseline").mkdir(parents=True)
    (run / "impactx").mkdir()
    hist = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.45 + e / 10}
        for e in (1, 2, 3)
    ]
    (run / "baseline" / "stage.json").write_text(json.dumps({"history": hist}))
    (run / "impactx" / "stage.json").write_text(json.dumps({"history": hist}))
    (run / "config.yaml").write_text("command: run\nseed: 0\n")
    (run / "results.json").write_text(
        json.dumps(
            {
                "dataset": "tiny",
                "backbone": "lenet5",
                "teacher": "deepshap",
                "baseline_test_acc": 0.61234,
                "impactx_test_acc": 0.65432,
                "lam": 1.0,
                "maps": "teacher",
                "map_quality": {"corr": 0.5, "corr_mean_map": 0.3, "r2_vs_mean_map": 0.2},
                "stage_seconds": {"baseline": 1.5},
                "wall_seconds": 3.0,
            }
        )
    )
    html_path, md_path = write_report(run)
    html = html_path.read_text()
    _assert_self_contained(html)
    assert "0.6123" in html and "0.6543" in html and "no statistics" in html and len(_images(html)) == 1
    assert html_path == run / "report.html" and md_path == run / "report.md"


def test_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not a teachx run or study"):
        write_report(tmp_path)


def test_arms_side_by_side_columns_and_mismatched_images(tmp_path, monkeypatch):
    """One teacher column per distinct teacher map set, then each arm's built-in maps, on identical images;
    units that stored different images are refused instead of drawn next to each other."""
    import numpy as np

    from teachx.reporting import plots
    from teachx.runs import figures

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 3, 8, 8), dtype=np.uint8)
    teacher_a, teacher_b = (
        rng.normal(size=(3, 1, 8, 8)).astype(np.float32),
        rng.normal(size=(3, 1, 8, 8)).astype(np.float32),
    )

    def unit(name, teacher, index=(4, 7, 9)):
        path = tmp_path / f"{name}.npz"
        np.savez(
            path,
            index=np.array(index),
            images=images,
            labels=np.array([0, 1, 2]),
            teacher=teacher,
            built_in=rng.normal(size=(3, 1, 8, 8)).astype(np.float32),
            post_hoc=teacher,
        )
        return name, path

    drawn = {}

    def fake_grid(imgs, columns, labels, dpi=110):
        drawn.update(columns=columns, labels=labels, images=imgs)
        return b"\x89PNG fake"

    monkeypatch.setattr(figures, "example_grid_png", fake_grid)
    cells = [unit("paper", teacher_a), unit("unet", teacher_a), unit("smooth", teacher_b)]
    assert plots.arms_examples_figure(cells, ["cat", "dog", "car"]) == b"\x89PNG fake"
    assert list(drawn["columns"]) == [
        "teacher\n(paper)",
        "teacher\n(smooth)",
        "own map:\npaper",
        "own map:\nunet",
        "own map:\nsmooth",
    ]
    with np.load(cells[1][1]) as z:
        assert np.array_equal(drawn["columns"]["own map:\nunet"].numpy(), z["built_in"])
    assert np.array_equal(drawn["columns"]["teacher\n(smooth)"].numpy(), teacher_b)
    assert drawn["labels"] == ["#4 cat", "#7 dog", "#9 car"] and np.array_equal(drawn["images"].numpy(), images)
    with pytest.raises(ValueError, match="other example images"):
        plots.arms_examples_figure([cells[0], unit("other", teacher_a, index=(4, 7, 10))])
    assert plots.arms_examples_figure([cells[0], ("missing", tmp_path / "none.npz")]) is None  # one arm: no figure


# -- figure labels say what is plotted, and fit ---------------------------------------------------------


def _texts_outside(fig) -> list[str]:
    """What ``fig`` draws (partly) outside itself: each axes' labels, ticks, title and legend (its tight
    bounding box), and the figure's own texts (suptitle)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox

    def outside(e) -> bool:
        return e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1

    out = [f"axes {ax.get_ylabel()!r}" for ax in fig.axes if outside(ax.get_tightbbox(renderer))]
    out += [t.get_text() for t in fig.texts if t.get_text().strip() and outside(t.get_window_extent(renderer))]
    return out


def test_loss_curves_name_the_configured_training_loss_and_validation_ce():
    """The training loss curve names each run's configured loss (the default design's 1 - Pearson, the paper's MSE,
    CE alone at lambda = 0); the validation loss is cross-entropy alone; every label fits in the figure."""
    from matplotlib import pyplot as plt

    from teachx.runs.resolve import resolve_config
    from teachx.runs import figures
    from teachx.reporting.plots import _curves
    from teachx.training.methods.base import build_method

    loss = {
        o: build_method(resolve_config(None, list(o))).training_loss()
        for o in [
            (),
            ("impactx.decoder=paper",),
            ("impactx.lam=0",),
            ("impactx.faith_weight=0.1",),
            ("method.name=baseline",),
        ]
    }
    assert loss[()] == "CE + λ·(1 − Pearson)" and loss[("impactx.decoder=paper",)] == "CE + λ·MSE"
    assert loss[("impactx.lam=0",)] == "CE" and loss[("method.name=baseline",)] == "CE"
    assert loss[("impactx.faith_weight=0.1",)] == "CE + λ·(1 − Pearson) + faithfulness term"

    hist = [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.9 / e, "train_acc": 0.3 + e / 10, "val_acc": 0.3 + e / 10}
        for e in (1, 2, 3)
    ]
    fig = figures._training_curves({"baseline": hist, "IMPACTX": hist}, {"baseline": "CE", "IMPACTX": loss[()]})
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels[0] == "training loss" and labels[1] == "validation loss (cross-entropy only)"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["baseline: CE", "IMPACTX: CE + λ·(1 − Pearson)"]
    assert not any("MSE" in label for label in labels)
    assert _texts_outside(fig) == []
    plt.close(fig)

    fig = _curves({"baseline": [hist, hist], "IMPACTX": [hist]}, "regime 5k")  # the report's curves
    assert fig.axes[1].get_ylabel() == "validation loss (cross-entropy only)"
    assert _texts_outside(fig) == []
    plt.close(fig)
    no_val = [{**h, "val_loss": None, "val_acc": None} for h in hist]
    fig = _curves({"IMPACTX": [no_val]}, "")
    assert "training" in fig.axes[1].get_ylabel() and "training values" in fig.axes[1].get_legend_handles_labels()[1][0]
    assert _texts_outside(fig) == []
    plt.close(fig)


# -- the report of a real (tiny) run: per-class accuracy, examples with wrong predictions, metric sentences ----


@pytest.mark.slow
def test_run_report_per_class_accuracy_examples_and_metric_sentences(tmp_path, monkeypatch):
    """A tiny `teachx run` (bundled Fashion-MNIST, 1 epoch): the report's confusion matrix equals scikit-learn's
    on the IMPACTX model's own test predictions (checkpoint reloaded here), its examples cover every class and show
    the wrong predictions they include as "true: X, predicted: Y", and every measure shown has its sentence."""
    import numpy as np
    import torch
    from sklearn.metrics import confusion_matrix

    from teachx.data.transforms import normalize
    from teachx.evaluation.base import measure
    from teachx.runs.resolve import resolve_config
    from teachx.runs.explain import load_impactx
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import eval_indices, make_plan
    from teachx.runs.recovery import prepare_run_dir
    from teachx.runs.teacher import as_nchw

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        None,
        [
            "data.train_size=200",
            "train.epochs=1",
            "train.batch_size=64",
            "train.threads=1",
            "teacher.background_size=4",
            "teacher.eval_images=60",
            "teacher.faith_images=8",  # the faithfulness block (DeepSHAP on all 60: most of the run) is not checked
            "teacher.batch_size=64",
        ],
    )
    run = run_pipeline(cfg, prepare_run_dir(tmp_path / "run", cfg, "run"), log=lambda _m: None, progress=False).run_dir
    plan = make_plan(cfg, progress=False)
    model, meta = load_impactx(run)
    with torch.no_grad():
        x = normalize(as_nchw(plan.dataset.test.images), tuple(meta["mean"]), tuple(meta["std"]))
        pred = torch.cat([model(x[s : s + 500]) for s in range(0, len(x), 500)]).argmax(1).numpy()
    labels = np.asarray(plan.dataset.test.labels)
    expected = confusion_matrix(labels, pred, labels=range(plan.dataset.num_classes))
    names = list(plan.dataset.class_names)

    html_path, md_path = write_report(run)
    html, md = html_path.read_text(), md_path.read_text()
    assert (run / "report_files" / "confusion.png").read_bytes().startswith(
        b"\x89PNG"
    ) and "report_files/confusion.png" in md
    assert len(_images(html)) >= 3  # curves, confusion matrix, examples
    # the matrix table: one row per true class, the counts scikit-learn finds
    table = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(names) + 1 and cells[0] in names and all(c.isdigit() for c in cells[1:]):
            table[cells[0]] = [int(c) for c in cells[1:]]
    assert [table[n] for n in names] == expected.tolist()
    for i, n in enumerate(names):  # per-class accuracy table, IMPACTX column
        assert f"| {n} | {expected[i].sum()} | " in md and f"{expected[i, i] / expected[i].sum():.3f}" in md
    # examples: every class, the wrong predictions among them labelled with the true and predicted class
    res = json.loads((run / "results.json").read_text())
    shown = res["examples"]["images"]
    assert {e["label"] for e in shown} == set(range(len(names)))
    for e in shown:
        assert e["label"] == labels[e["index"]] and e["predicted"] == pred[e["index"]]
    ev = eval_indices(cfg, plan)  # the test images with teacher maps, where the examples come from
    wrong_available = int((pred[ev] != labels[ev]).sum())
    wrong = [e for e in shown if e["label"] != e["predicted"]]
    assert len(wrong) >= min(3, wrong_available) and wrong
    for e in wrong:
        assert f"#{e['index']} true: {names[e['label']]}, predicted: {names[e['predicted']]}" in md
    # each measure shown has its plain sentence, in HTML and Markdown
    for name in ("test_accuracy", "class_accuracy", "corr", "corr_mean_map", "r2_vs_mean_map", "r2_vs_mean_map_affine"):
        sentence = measure(name).sentence()
        assert sentence.endswith(("Higher is better.", "Lower is better.", "It is a reference, not a score."))
        assert f"**{name}**: {sentence}" in md and sentence.replace("'", "&#x27;") in html


@pytest.mark.slow
def test_confusion_figure_labels_fit():
    """The confusion matrix names every class on both axes, and nothing is cut off, for 10 and 20 long names."""
    import numpy as np
    from matplotlib import pyplot as plt

    from teachx.reporting.plots import _confusion

    for k in (10, 20):
        names = [f"a long class name {i}" for i in range(k)]
        counts = np.random.default_rng(0).integers(0, 50, (k, k))
        fig = _confusion(counts, names, "IMPACTX model")
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert ax.get_xlabel() == "predicted class" and ax.get_ylabel().startswith("true class")
        assert _texts_outside(fig) == []
        plt.close(fig)
