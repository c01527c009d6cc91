"""The report of a study (``teachx study``): verdicts, accuracies with paired statistics, the ablation table,
shortcut scores, map quality, faithfulness, curves, examples and timings, from the study's study.json and the
example arrays of its units."""

from __future__ import annotations

import json
from pathlib import Path

from teachx.reporting.page import Page, read_record
from teachx.reporting.run_report import HONESTY_TEXT
from teachx.reporting.plots import (
    accuracy_figure,
    arms_examples_figure,
    curves_figure,
    examples_figure,
    faithfulness_figure,
    splits_figure,
)
from teachx.studies.records import StudyRecord, StudyRow
from teachx.studies.statistics import REVEAL_MEASURES
from teachx.utils.numbers import interval, mean_std, number, p_value, signed

#: built-in maps of at most this many arms in one side-by-side figure of a study report
MAX_SIDE_BY_SIDE = 6


def _own_map_row(d: Path, row: StudyRow) -> bool:
    """Whether a study row's first unit stored example arrays of the model's own map (IMPACTX's built-in map, ABN's
    attention map, a B-cos model's contributions: every unit the study evaluates beyond accuracy stores them); a
    lambda=0 control's map learnt nothing, so it is left out."""
    return bool(row.units) and row.lam != 0 and (d / "units" / row.units[0] / "examples.npz").exists()


def study_report(d: Path) -> Page:
    """The page of the study in ``d``, from its study.json (the statistics are read, not computed again)."""
    data = StudyRecord.from_dict(read_record(d / "study.json"))
    study, rows, units = data.study, data.rows, data.units
    base = data.base_config
    doc = Page(f"teachx study: {base['data']['name']} / {base['model']['backbone']} ({len(study['seeds'])} seeds)")
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
        accuracy_figure(rows, list(study["regimes"]), list(dict.fromkeys(r.arm for r in rows)), study.get("control")),
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
                "honesty: built-in ÷ gradient share",
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
                    mean_std(r.honesty, 2) if r.honesty else "—",
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
        if any(r.honesty for r in sc):
            doc.p(HONESTY_TEXT + " Mean ± std over seeds of each seed's ratio.", "note")
        doc.measures(["gradient_share", "lrp_share", "built_in_share", "honesty", "artefact_area"])
    # artefact benchmarks (data.artefact): accuracy per test split, and the baselines' unannotated reveal
    sp = [r for r in rows if r.test_splits]
    if sp:
        names = list(sp[0].test_splits)
        doc.h("Did the model learn the artefact? Test accuracy per split (mean ± std over seeds)")
        doc.table(
            ["regime", "arm", "method", *names],
            [[r.regime, r.arm, r.method or "", *[mean_std(r.test_splits.get(n)) for n in names]] for r in sp],
        )
        doc.figure(
            "splits.png",
            splits_figure(rows, list(study["regimes"])),
            "mean accuracy over seeds on clean test images (x) and attacked ones (y), ± one standard deviation; "
            "square: the baseline, star: the ceiling",
        )
        doc.p(
            "clean: test images without the artefact; attacked: the artefact in every test image, of every class; ch: "
            "test images poisoned as the training images were. A model that took the shortcut is less accurate on "
            "attacked than on clean images and calls many attacked images the poisoned class.",
            "note",
        )
    cmp_rows = [r for r in rows if r.splits_vs_baseline]
    if cmp_rows:
        split = (
            "attacked" if "attacked" in cmp_rows[0].splits_vs_baseline else next(iter(cmp_rows[0].splits_vs_baseline))
        )
        doc.h(f"Corrections and other arms against the baseline on the {split} test split (paired by seed)")

        def cell(r: StudyRow, name: str, what: str) -> str:
            c = (r.splits_vs_baseline or {}).get(name)
            if not c:
                return "—"
            if what == "diff":
                return f"{signed(c.get('mean_diff'))} {interval(c.get('ci_low'), c.get('ci_high'), sign=True)}"
            return p_value(c.get("p_ttest_holm"))

        def share(r: StudyRow) -> str:
            sc = r.shortcut or {}
            if not sc.get("gradient"):
                return "—"
            ratio = ""
            if sc.get("area") and sc["area"].get("mean"):
                ratio = f" ({sc['gradient']['mean'] / sc['area']['mean']:.1f}× its area)"
            return mean_std(sc["gradient"], 3) + ratio

        doc.table(
            [
                "regime",
                "arm",
                f"{split} accuracy",
                f"{split}: difference from the baseline [95% CI]",
                "p (Holm)",
                "clean: difference from the baseline",
                "p (Holm)",
                "share of the baseline-to-oracle gap recovered",
                "gradient share on the artefact",
                "seeds with a revealed concept",
            ],
            [
                [
                    r.regime,
                    r.arm,
                    mean_std((r.test_splits or {}).get(split)),
                    cell(r, split, "diff"),
                    cell(r, split, "p"),
                    cell(r, "clean", "diff"),
                    cell(r, "clean", "p"),
                    number((r.gap_recovered or {}).get(split), 2) if r.gap_recovered else "—",
                    share(r),
                    f"{r.revision['seeds_with_a_concept']} of {len(r.seeds)}" if r.revision else "—",
                ]
                for r in cmp_rows
            ],
        )
        doc.p(
            "Rows named reveal+METHOD correct each seed's baseline along the concept its unannotated reveal found (the "
            "top-ranked group of the poisoned class, its CAV and the training images the CAV retrieves), post hoc or "
            "by fine-tuning; no annotation is read. Rows named annotated+METHOD do the same along the CAV fitted on "
            "the benchmark's true labels: a reference that needs the annotations. Differences are means over seeds of the row's accuracy minus the "
            "baseline's on the same seed, with paired t-tests Holm-adjusted over the rows of each split. The gap "
            "recovered is (row − baseline) / (oracle − baseline) on that split, the oracle being the study's "
            "annotated reference arm. The gradient share is the share of the model's |input gradient| on the artefact "
            "of attacked test images; a model blind to the artefact puts about the artefact's area there. A seed "
            "without a revealed concept keeps its baseline unchanged.",
            "note",
        )
    rv = [r for r in rows if r.reveal]
    if rv:
        measures = list(REVEAL_MEASURES)
        doc.h("Reveal without annotations: did it find the artefact? (scored against the benchmark's ground truth)")
        doc.table(
            ["regime", "arm", *[REVEAL_MEASURES[m] for m in measures]],
            [
                [r.regime, r.arm, *[mean_std(r.reveal.get(m), 3) if r.reveal.get(m) else "—" for m in measures]]
                for r in rv
            ],
        )
        doc.p(
            "Per seed, each class that carries the artefact is revealed without annotations (its training images grouped "
            "by how the model explains them), the top-ranked group's concept (CAV) retrieves images over the whole "
            "training split and is localised; the benchmark's ground truth, which the reveal never reads, then scores it. "
            "Top group is the artefact: at least half of its images carry the artefact and it holds at least half of "
            "them. AUROCs are 0.5 for a guess and 1 for a perfect ranking; mask IoU compares the concept's masks with the "
            "artefact's true place.",
            "note",
        )
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
            doc.h("Do the built-in maps explain the model that makes them? (predicted class; mean ± std over seeds)")
            sets = ("built_in", "teacher_post_hoc", "mean_map", "random")
            doc.table(
                ["regime", "arm", "corr. with post-hoc (self)", "mean map's"]
                + [f"MoRF {k} (↓)" for k in sets]
                + ["LeRF built_in (↑)", "insertion built_in (↑)", "corr. with best post-hoc", "MoRF ÷ best post-hoc"],
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
                        mean_std(r.map_quality.get("best_post_hoc.corr_self"), 3),
                        mean_std(r.map_quality.get("best_post_hoc.morf_ratio"), 2),
                    ]
                    for r in bf
                ],
            )
            doc.p(
                "All map sets explain the predicted class of the model with the built-in map (IMPACTX, ABN's attention map, or a B-cos model's contributions); teacher_post_hoc is the teacher method applied to that model, "
                "best post-hoc the most faithful (lowest MoRF) of gradient × input, LRP-epsilon and Integrated Gradients applied to it, unsmoothed "
                "(empty for runs made before it was measured), "
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
        if not _own_map_row(d, r):
            continue
        names = (units[r.units[0]].examples or {}).get("class_names")
        png = examples_figure(d / "units" / r.units[0] / "examples.npz", names)
        if png:
            doc.figure(
                f"examples_{_safe(r.regime)}_{_safe(r.arm)}.png",
                png,
                f"regime {r.regime}, arm {r.arm}, seed {r.seeds[0]}: input | teacher map | the model's own map (IMPACTX's "
                "built-in map, ABN's attention map, a B-cos model's contributions) | the teacher method post hoc on the "
                "same model (diverging colour scale symmetric around 0 per map)",
            )
            shown += 1
    if not shown:
        doc.p("no example arrays stored (study.eval.examples: 0)", "note")
    # the built-in maps of several arms on the same images: does a design change what the map shows?
    for reg in regimes:
        trained = [r for r in rows if r.regime == reg and r.seeds and _own_map_row(d, r)]
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
                f"regime {reg}, seed {trained[0].seeds[0]}: input | the teachers' maps | the own maps of {arms_shown} "
                f"(the first {MAX_SIDE_BY_SIDE} arms whose models give their own map; the same test images)",
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
    """``name`` as part of a figure's file name: letters, digits, - and _ only."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))
