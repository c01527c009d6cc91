"""A study's statistics: per (regime, arm) the accuracy summary over seeds, the paired comparisons with the
regime's baseline and with the lambda=0 control (Holm-adjusted per family), the verdicts, the timings, and
the end-of-study table printed from them."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from teachx.evaluation.stats import holm, paired_compare, summarize, verdict
from teachx.runs.plan import teacher_training
from teachx.runs.records import ArtefactShares
from teachx.studies.records import StudyRecord, StudyRow, UnitRecord
from teachx.studies.spec import BASELINE, STUDY_VERSION, StudySpec
from teachx.utils.numbers import interval, number, p_value, signed
from teachx.training.methods import METHODS, build_method, recorded_method


#: the unannotated reveal's headline measures (teachx.runs.reveal_benchmark), as tables name them
REVEAL_MEASURES = {
    "top_is_artefact": "top group is the artefact (share of seeds)",
    "top_f1": "top group F1",
    "detection_auroc": "suspicion-score AUROC",
    "retrieval_auroc": "CAV retrieval AUROC",
    "retrieval_ap": "CAV retrieval AP",
    "mask_iou": "mask IoU",
}


def summarize_study(
    spec: StudySpec, cells: dict[tuple[str, str], dict[int, str]], units: dict[str, UnitRecord]
) -> StudyRecord:
    """The study record over the finished units: a row per (regime, arm), the verdicts, the timings."""
    rows: list[StudyRow] = []
    seeds = spec.seeds
    for regime in spec.regimes:
        for arm in [BASELINE, *spec.arms, *spec.extra_rows]:
            if not spec.runs(regime, arm):
                continue
            keys = cells[(regime, arm)]
            mine = [units[keys[s]] for s in seeds]
            accs = [u.test_acc for u in mine]
            if arm in spec.revise_rows:
                rows.append(_revision_row(spec, regime, arm, keys, mine, units))
                continue
            cfg = spec.config(regime, arm if arm != BASELINE else None, seeds[0])
            # the arm's method (the baseline and ceiling rows have none)
            trained = build_method(cfg) if arm != BASELINE and not spec.is_ceiling(arm) else None
            row = StudyRow(
                regime=regime,
                arm=arm,
                kind=trained.unit_kind if trained else "classifier",
                method=trained.name if trained else BASELINE,
                overrides=spec.ceiling if spec.is_ceiling(arm) else spec.arms.get(arm, {}),
                regime_overrides=spec.regimes[regime],
                seeds=seeds,
                units=[keys[s] for s in seeds],
                test_acc=accs,
                summary=summarize(accs).to_dict(),
            )
            if spec.is_ceiling(arm):  # a reference baseline trained on other data: compared by seed with the regime's
                base = [units[cells[(regime, BASELINE)][s]].test_acc for s in seeds]
                row.vs_baseline = {**paired_compare(accs, base).to_dict(), "baseline": BASELINE}
            if trained is not None:
                _, row.teacher_backbone, _ = teacher_training(cfg)
                row.teacher = cfg.teacher.method
                row.method_fields = trained.study_row(mine[0].to_dict())
                row.vs_baseline = paired_compare(accs, [units[u.baseline_unit].test_acc for u in mine]).to_dict()
                own = {u.baseline_unit for u in mine} != {cells[(regime, BASELINE)][s] for s in seeds}
                row.vs_baseline["baseline"] = "own (the arm changes data/model/train)" if own else BASELINE
                t_units = [u.teacher_unit for u in mine]
                if t_units[0] != mine[0].baseline_unit:
                    row.teacher_test_acc = summarize([units[t].test_acc for t in t_units]).to_dict()
                control = spec.control_of(arm)
                if control and arm != control and not trained.is_control():
                    ckeys = cells[(regime, control)]
                    row.vs_control = paired_compare(accs, [units[ckeys[s]].test_acc for s in seeds]).to_dict()
                    row.vs_control["control"] = control
                quality = [u.map_quality for u in mine]
                if all(quality):
                    row.map_quality = {
                        m: summarize([q[m] for q in quality]).to_dict()
                        for m in (
                            "corr",
                            "corr_mean_map",
                            "corr_mean_map_augmented",
                            "r2_vs_mean_map",
                            "r2_vs_mean_map_affine",
                        )
                        if all(m in q for q in quality)
                    }  # units evaluated before a measure existed lack it
                    row.map_quality.update(_builtin_faith_summary([q.get("faithfulness") for q in quality]))
                faith = [u.faithfulness for u in mine]
                if all(faith):
                    row.faithfulness = _faith_summary(faith)
            _unit_measures(row, mine)
            rows.append(row)
    _split_comparisons(spec, rows, units)
    # Holm over each family (all vs-baseline tests; all vs-control tests; per test split, all vs-baseline tests)
    families = [[getattr(row, f) for row in rows if getattr(row, f) is not None] for f in ("vs_baseline", "vs_control")]
    split_names = dict.fromkeys(n for row in rows for n in (row.splits_vs_baseline or {}))
    families += [
        [row.splits_vs_baseline[n] for row in rows if n in (row.splits_vs_baseline or {})] for n in split_names
    ]
    for members in families:
        for m, adj in zip(members, holm([m.get("p_ttest") for m in members])):
            m["p_ttest_holm"] = adj
    verdicts = []
    for row in rows:
        if row.vs_control is not None:
            c = row.vs_control
            ok = c.get("p_ttest") is not None and c["p_ttest"] < spec.alpha and c["mean_diff"] > 0
            text = verdict(c, spec.alpha)
            verdicts.append(
                {
                    "regime": row.regime,
                    "arm": row.arm,
                    "control": c["control"],
                    "beats_control": bool(ok),
                    "mean_diff": c["mean_diff"],
                    "ci_low": c.get("ci_low"),
                    "ci_high": c.get("ci_high"),
                    "p_ttest": c.get("p_ttest"),
                    "p_ttest_holm": c.get("p_ttest_holm"),
                    "p_wilcoxon": c.get("p_wilcoxon"),
                    "n": c["n"],
                    "text": f"regime {row.regime}: {row.arm} vs {c['control']}: {text}",
                }
            )
    timings = _timings(units)
    return StudyRecord(
        version=STUDY_VERSION,
        study=spec.to_dict(),
        base_config=spec.config(next(iter(spec.regimes)), None, seeds[0]).to_dict(),
        alpha=spec.alpha,
        rows=rows,
        verdicts=verdicts,
        units=units,
        timings=timings,
        notes=[
            "accuracies are test-set accuracies of the best-validation checkpoint; comparisons are paired by seed",
            "p_ttest: paired t-test; p_wilcoxon: Wilcoxon signed-rank (zeros dropped; exact/permutation for small n); "
            "p_ttest_holm: Holm-adjusted within the family (all vs-baseline or all vs-control tests)",
            "with fewer than 6 seeds the Wilcoxon test cannot reach p < 0.05 (smallest p = 2/2^n)",
        ],
    )


def _summaries(blocks: list[Optional[dict[str, Any]]], skip: tuple[str, ...] = ()) -> Optional[dict[str, Any]]:
    """Per numeric key that every block has, its summary over the blocks (None when a block is missing)."""
    if not blocks or not all(blocks):
        return None
    first = blocks[0] or {}
    keys = [k for k in first if k not in skip and all(isinstance((b or {}).get(k), (int, float)) for b in blocks)]
    return {k: summarize([float(b[k]) for b in blocks]).to_dict() for k in keys}  # type: ignore[index]


def _unit_measures(row: StudyRow, mine: list[UnitRecord]) -> None:
    """The row's summaries over seeds of what every seed's unit measured: the attribution shares on an artefact,
    the accuracy per test split of an artefact benchmark, the baselines' unannotated reveal."""
    # each unit's shares as read today: a unit measured before the ratio was recorded gets it from its shares;
    # only the measures every seed has (units made by older teachx may lack the built-in map's)
    row.shortcut = _summaries(
        [ArtefactShares.from_dict(u.shortcut).to_dict() if u.shortcut else None for u in mine], skip=("images",)
    )
    splits = [u.test_splits for u in mine]
    if all(splits):  # an artefact benchmark: accuracy on its clean, attacked and ch test splits
        row.test_splits = {
            name: summarize([s[name]["acc"] for s in splits]).to_dict()  # type: ignore[index]
            for name in splits[0]  # type: ignore[union-attr]
            if all(name in s for s in splits)  # type: ignore[operator]
        }
    # the baselines' unannotated reveal, scored against the ground truth
    row.reveal = _summaries([(u.reveal or {}).get("headline") for u in mine])


def _revision_row(
    spec: StudySpec, regime: str, arm: str, keys: dict[int, str], mine: list[UnitRecord], units: dict[str, UnitRecord]
) -> StudyRow:
    """The row of a correction along each seed's revealed concept (``study.revise``), compared with the baseline
    it corrected."""
    accs = [u.test_acc for u in mine]
    row = StudyRow(
        regime=regime,
        arm=arm,
        kind="revision",
        method=spec.revise_rows[arm],
        overrides=(spec.revise.options.get(spec.revise_rows[arm]) if spec.revise else None) or {},
        regime_overrides=spec.regimes[regime],
        seeds=spec.seeds,
        units=[keys[s] for s in spec.seeds],
        test_acc=accs,
        summary=summarize(accs).to_dict(),
    )
    row.vs_baseline = paired_compare(accs, [units[u.baseline_unit].test_acc for u in mine]).to_dict()
    row.vs_baseline["baseline"] = BASELINE
    _unit_measures(row, mine)
    revisions = [u.revision or {} for u in mine]
    corrected = [r for r in revisions if (r.get("concept") or {}).get("name")]
    row.revision = {
        "concept_source": spec.revise.source(arm) if spec.revise else None,
        "seeds_with_a_concept": len(corrected),
        "before": _summaries([r.get("before") for r in corrected], skip=("test_acc",)) if corrected else None,
        "after": _summaries([r.get("after") for r in corrected], skip=("test_acc",)) if corrected else None,
        "n_carrying": summarize([float(r["concept"]["n_carrying"]) for r in corrected]).to_dict()
        if corrected and all(isinstance(r["concept"].get("n_carrying"), (int, float)) for r in corrected)
        else None,
        "notes": sorted({n for r in revisions for n in r.get("notes") or []}),
    }
    return row


def _split_comparisons(spec: StudySpec, rows: list[StudyRow], units: dict[str, UnitRecord]) -> None:
    """On artefact benchmarks: every non-baseline row's accuracy per test split compared by seed with the regime's
    baseline (the model trained on the benchmark's data: also for arms that train on other data, such as a
    clean-data ceiling), and (with ``study.revise.oracle``) the share of the baseline-to-oracle gap it recovers."""
    by_cell = {(row.regime, row.arm): row for row in rows}
    oracle = spec.revise.oracle if spec.revise else None

    def split_accs(row: Optional[StudyRow]) -> Optional[dict[str, list[float]]]:
        if row is None:
            return None
        recs = [units[k] for k in row.units]
        if not all(r.test_splits for r in recs):
            return None
        names = [n for n in recs[0].test_splits if all(n in r.test_splits for r in recs)]  # type: ignore[union-attr]
        return {n: [r.test_splits[n]["acc"] for r in recs] for n in names}  # type: ignore[index]

    for row in rows:
        if row.is_baseline or row.test_splits is None:
            continue
        mine, base = split_accs(row), split_accs(by_cell.get((row.regime, BASELINE)))
        if not mine or not base:
            continue
        row.splits_vs_baseline = {n: paired_compare(mine[n], base[n]).to_dict() for n in mine if n in base}
        target = by_cell.get((row.regime, oracle)) if oracle else None
        if target is not None and target is not row:
            theirs = split_accs(target)
            if theirs:
                gap = {}
                for n in mine:
                    if n in base and n in theirs:
                        span = float(np.mean(theirs[n]) - np.mean(base[n]))
                        gap[n] = (float(np.mean(mine[n]) - np.mean(base[n])) / span) if abs(span) > 1e-12 else None
                row.gap_recovered = gap


def _builtin_faith_summary(blocks: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """map_quality's faithfulness blocks over seeds -> summaries keyed 'corr_self', 'pixel_flipping_morf.built_in', ..."""
    if not blocks or not all(blocks):
        return {}
    flat = []
    for b in blocks:
        f = {k: b[k] for k in ("corr_self", "corr_self_mean_map", "corr_post_hoc_teacher") if b.get(k) is not None}
        best = b.get("best_post_hoc") or {}  # runs made before it have none
        f.update({f"best_post_hoc.{k}": best[k] for k in ("corr_self", "morf_ratio") if best.get(k) is not None})
        for metric, by_set in (b.get("auc") or {}).items():
            f.update({f"{metric}.{name}": v for name, v in by_set.items() if v is not None})
        flat.append(f)
    return {k: summarize([f[k] for f in flat]).to_dict() for k in flat[0] if all(k in f for f in flat)}


def _faith_summary(faith: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for set_name in faith[0]["sets"]:
        if not all(set_name in f["sets"] for f in faith):
            continue
        out[set_name] = {}
        for metric, v in faith[0]["sets"][set_name].items():
            aucs = [f["sets"][set_name][metric]["auc"] for f in faith]
            curves = [f["sets"][set_name][metric]["curve"] for f in faith]
            entry: dict[str, Any] = {
                "auc": summarize([a for a in aucs if a is not None]).to_dict()
                if any(a is not None for a in aucs)
                else None
            }
            if all(curves):
                entry["curve"] = np.nanmean(np.array(curves, dtype=float), axis=0).tolist()
                entry["curve_x"] = v.get("curve_x")
            out[set_name][metric] = entry
    return out


def _timings(units: dict[str, UnitRecord]) -> dict[str, Any]:
    def agg(vals: list[float]) -> dict[str, Any]:
        vals = [v for v in vals if v is not None]
        return {"n": len(vals), "total_s": float(sum(vals)), "mean_s": float(np.mean(vals)) if vals else None}

    # per unit kind (the methods' "method", classifiers, and each method's own, e.g. "impactx"), units that trained
    # nothing of their own left out (a method that reuses its baseline: its seconds are the baseline unit's)
    by_kind: dict[str, list[UnitRecord]] = {"method": [], "classifier": []}
    for kind in sorted({METHODS.get(n).unit_kind for n in METHODS.names()}):
        by_kind.setdefault(kind, [])
    for u in units.values():
        method = recorded_method(u.to_dict())
        if method is None or not method.reuses_baseline:
            by_kind.setdefault(u.kind, []).append(u)
    out: dict[str, Any] = {}
    for kind, members in by_kind.items():
        out[f"{kind}_training"] = agg([u.seconds for u in members])
        out[f"{kind}_seconds_per_epoch"] = agg([u.seconds_per_epoch for u in members])
    evaluated = [u.timings for u in units.values() if u.timings]  # the units evaluated beyond accuracy
    out["teacher_maps"] = agg([timings.get("maps") for timings in evaluated])
    out["evaluation"] = agg([timings.get("evaluation") for timings in evaluated])
    return out


def summary_lines(data: StudyRecord) -> list[str]:
    """The end-of-study table: accuracy per (regime, arm) with the paired comparisons."""
    head = f"{'regime':<14} {'arm':<16} {'n':>2} {'test acc mean+-std':>20} {'95% CI':>17} {'d vs base':>9} {'p_t':>7} {'d vs ctrl':>9} {'p_t':>7} {'p_w':>7}"
    lines = ["", head, "-" * len(head)]
    for row in data.rows:
        s = row.summary
        ci = interval(s["ci_low"], s["ci_high"], sep=",")
        vb, vc = row.vs_baseline, row.vs_control
        db = signed(vb["mean_diff"]) if vb else ""
        pb = p_value(vb["p_ttest"]) if vb else ""
        dc = signed(vc["mean_diff"]) if vc else ""
        pc = p_value(vc["p_ttest"]) if vc else ""
        pw = p_value(vc["p_wilcoxon"]) if vc else ""
        mean_std = number(s["mean"]) + " +- " + number(s["std"])
        lines.append(
            f"{row.regime:<14} {row.arm:<16} {s['n']:>2} {mean_std:>20} {ci:>17} {db:>9} {pb:>7} {dc:>9} {pc:>7} {pw:>7}"
        )
    shortcut_rows = [row for row in data.rows if row.shortcut]
    if shortcut_rows:
        lines.append("")
        lines.append(
            "Share of post-hoc attribution on the artefact, de-correlated test images (mean over seeds; lower = fewer wrong reasons)"
        )
        for row in shortcut_rows:
            sc = row.shortcut
            parts = [f"{m} {number(sc[m]['mean'], 3)}" for m in ("gradient", "lrp", "built_in", "area") if m in sc]
            if "honesty" in sc:
                parts.append(f"honesty (built-in / gradient) {number(sc['honesty']['mean'], 2)}")
            lines.append(f"  {row.regime:<14} {row.arm:<16} " + "  ".join(parts))
        if any("honesty" in row.shortcut for row in shortcut_rows):
            lines.append(
                "  honesty: the built-in map's share divided by the same model's gradient share; 1 = the built-in map "
                "shows the artefact as much as the model's gradient does, well below 1 = it hides it"
            )
    split_rows = [row for row in data.rows if row.test_splits]
    if split_rows:
        lines.append("")
        lines.append(
            "Test accuracy per artefact-benchmark split (mean over seeds): clean, attacked (artefact in every image), ch"
        )
        for row in split_rows:
            parts = [f"{k} {number(v['mean'])}" for k, v in row.test_splits.items()]
            lines.append(f"  {row.regime:<14} {row.arm:<16} " + "  ".join(parts))
    reveal_rows = [row for row in data.rows if row.reveal]
    if reveal_rows:
        lines.append("")
        lines.append("Reveal without annotations, scored against the benchmark's ground truth (mean over seeds)")
        for row in reveal_rows:
            parts = [f"{REVEAL_MEASURES.get(k, k)} {number(v['mean'], 3)}" for k, v in row.reveal.items()]
            lines.append(f"  {row.regime:<14} {row.arm:<16} " + "  ".join(parts))
    if data.verdicts:
        lines.append("")
        lines.append(
            f"Does the gain come from the explanations? (each arm vs the control '{data.study.get('control')}'"
            + "".join(f", {a} vs '{c}'" for a, c in (data.study.get("controls") or {}).items())
            + ", paired t-test)"
        )
        lines.extend("  " + v["text"] for v in data.verdicts)
    elif data.study.get("control") is None and data.study.get("arms"):
        lines.append(
            "(no lambda=0 control arm: add e.g. lambda0: {impactx.lam: 0} to study.arms to test whether gains come from the explanations)"
        )
    return lines
