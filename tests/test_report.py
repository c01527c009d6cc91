"""The HTML/Markdown report: self-contained, holds the tables and images, for studies and single runs."""

from __future__ import annotations

import base64
import json
import re

import pytest

from teachx.errors import RunDirError
from teachx.reporting.report import write_report

from tests.test_study import study_dir  # noqa: F401  (module-scoped fixture: the tiny study)


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _assert_self_contained(html: str) -> None:
    assert not re.search(r"https?://", html), "the report must not reference external URLs"
    assert not re.search(r'<(link|script)\b', html)
    assert not re.search(r'src="(?!data:)', html)


def test_study_report(study_dir):  # noqa: F811
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
    assert "MoRF" in html and "teacher post hoc on IMPACTX" in html
    md = md_path.read_text()
    assert "| regime | arm | n |" in md
    assert "r_files/accuracy.png" in md and "dashed: the λ=0 control" in html
    for link in re.findall(r"\]\((r_files/[^)]+)\)", md):
        assert (html_path.parent / link).read_bytes().startswith(b"\x89PNG")
    # the two trained IMPACTX arms' built-in maps side by side on the same images
    assert "r_files/side_by_side_" in md and "the built-in maps of " in html


def test_run_report(tmp_path):
    """A `teachx run`-like directory (no statistics): accuracy table, curves, config."""
    run = tmp_path / "run"
    (run / "baseline").mkdir(parents=True)
    (run / "impactx").mkdir()
    hist = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.45 + e / 10} for e in (1, 2, 3)]
    (run / "baseline" / "stage.json").write_text(json.dumps({"history": hist}))
    (run / "impactx" / "stage.json").write_text(json.dumps({"history": hist}))
    (run / "config.yaml").write_text("command: run\nseed: 0\n")
    (run / "results.json").write_text(json.dumps({
        "dataset": "tiny", "backbone": "lenet5", "teacher": "deepshap", "baseline_test_acc": 0.61234, "impactx_test_acc": 0.65432,
        "lam": 1.0, "maps": "teacher", "map_quality": {"corr": 0.5, "corr_mean_map": 0.3, "r2_vs_mean_map": 0.2},
        "stage_seconds": {"baseline": 1.5}, "wall_seconds": 3.0}))
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

    from teachx.reporting import figures, report

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 3, 8, 8), dtype=np.uint8)
    teacher_a, teacher_b = rng.normal(size=(3, 1, 8, 8)).astype(np.float32), rng.normal(size=(3, 1, 8, 8)).astype(np.float32)

    def unit(name, teacher, index=(4, 7, 9)):
        path = tmp_path / f"{name}.npz"
        np.savez(path, index=np.array(index), images=images, labels=np.array([0, 1, 2]), teacher=teacher,
                 built_in=rng.normal(size=(3, 1, 8, 8)).astype(np.float32), post_hoc=teacher)
        return name, path

    drawn = {}

    def fake_grid(imgs, columns, labels, dpi=110):
        drawn.update(columns=columns, labels=labels, images=imgs)
        return b"\x89PNG fake"

    monkeypatch.setattr(figures, "example_grid_png", fake_grid)
    cells = [unit("paper", teacher_a), unit("unet", teacher_a), unit("smooth", teacher_b)]
    assert report.arms_examples_figure(cells, ["cat", "dog", "car"]) == b"\x89PNG fake"
    assert list(drawn["columns"]) == ["teacher\n(paper)", "teacher\n(smooth)", "built-in:\npaper", "built-in:\nunet", "built-in:\nsmooth"]
    with np.load(cells[1][1]) as z:
        assert np.array_equal(drawn["columns"]["built-in:\nunet"].numpy(), z["built_in"])
    assert np.array_equal(drawn["columns"]["teacher\n(smooth)"].numpy(), teacher_b)
    assert drawn["labels"] == ["#4 cat", "#7 dog", "#9 car"] and np.array_equal(drawn["images"].numpy(), images)
    with pytest.raises(ValueError, match="other example images"):
        report.arms_examples_figure([cells[0], unit("other", teacher_a, index=(4, 7, 10))])
    assert report.arms_examples_figure([cells[0], ("missing", tmp_path / "none.npz")]) is None  # one arm: no figure


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

    from teachx.interfaces.config import resolve_config
    from teachx.reporting import figures
    from teachx.reporting.report import _curves
    from teachx.training.methods.base import build_method

    loss = {o: build_method(resolve_config(None, list(o))).training_loss()
            for o in [(), ("impactx.decoder=paper",), ("impactx.lam=0",), ("impactx.faith_weight=0.1",), ("method.name=baseline",)]}
    assert loss[()] == "CE + λ·(1 − Pearson)" and loss[("impactx.decoder=paper",)] == "CE + λ·MSE"
    assert loss[("impactx.lam=0",)] == "CE" and loss[("method.name=baseline",)] == "CE"
    assert loss[("impactx.faith_weight=0.1",)] == "CE + λ·(1 − Pearson) + faithfulness term"

    hist = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.9 / e, "train_acc": 0.3 + e / 10, "val_acc": 0.3 + e / 10} for e in (1, 2, 3)]
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
