"""Print a study's rows as the Markdown tables the documentation's study pages use: accuracy, paired comparisons, wrong-reason shares,
and, where units measured them, the built-in maps' quality (agreement, self-agreement, pixel flipping on the model).

    python scripts/study_table.py runs/study-decoy/study.json
"""

from __future__ import annotations

import json
import sys

from teachx.evaluation.stats import paired_compare
from teachx.studies.records import StudyRecord, StudyRow
from teachx.utils.numbers import number, p_value, points


def pct(s):
    return f"{points(s['mean'])} ± {points(s['std'])}" if s and s.get("std") is not None else "n/a"


def diff(c, key="p_ttest_holm"):
    if not c:
        return ""
    return f"{points(c['mean_diff'], sign=True)} (p {p_value(c.get('p_ttest'))}, Holm {p_value(c.get(key))})"


def main(path: str) -> None:
    data = StudyRecord.from_dict(json.load(open(path)))
    rows = data.rows
    has_sc = any(r.shortcut for r in rows)
    per_arm_controls = bool(data.study.get("controls"))  # study.controls: name each row's control
    control_head = "Δ vs its λ = 0 control, pts" if per_arm_controls else f"Δ vs {data.study.get('control')}, pts"
    head = ["arm", "method", "test acc % (mean ± std)", "Δ vs baseline, pts", control_head]
    if has_sc:
        head += ["gradient share", "LRP share", "built-in map share", "honesty (built-in ÷ gradient)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = {r.regime: r for r in rows if r.is_baseline}
    for r in rows:
        vb = r.vs_baseline
        if vb and str(vb.get("baseline", "")).startswith(
            "own"
        ):  # e.g. the clean-data ceiling: compare with the study's baseline
            vb = paired_compare(r.test_acc, base[r.regime].test_acc).to_dict()
            vb["p_ttest_holm"] = None
        cells = [
            r.arm,
            r.method or "",
            pct(r.summary),
            diff(vb),
            diff(r.vs_control) + (f" vs {r.vs_control['control']}" if per_arm_controls and r.vs_control else ""),
        ]
        if has_sc:
            sc = r.shortcut or {}
            cells += [number(sc[m]["mean"], 3) if m in sc else "—" for m in ("gradient", "lrp", "built_in")]
            cells.append(number(r.honesty["mean"], 2) if r.honesty else "—")
        print("| " + " | ".join(cells) + " |")
    area = next((r.shortcut["area"]["mean"] for r in rows if r.shortcut), None)
    if area is not None:
        print(f"\nartefact area (chance share): {number(area, 3)}; seeds {data.study['seeds']}")
    maps_table(rows)
    splits_table(rows)


def _header(head: list[str]) -> None:
    """A Markdown table's header after a blank line."""
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))


def splits_table(rows: list[StudyRow]) -> None:
    """On artefact benchmarks: per regime, each row's accuracy on the clean and attacked test splits, its paired
    differences from the baseline (Holm over the rows of each split), the share of the baseline-to-oracle gap it
    recovers on the attacked split, and the gradient's share on the artefact (÷ its area)."""
    rows = [r for r in rows if r.test_splits]
    if not rows:
        return
    head = [
        "regime",
        "row",
        "clean acc %",
        "attacked acc %",
        "Δ attacked vs baseline, pts (p Holm)",
        "Δ clean vs baseline, pts (p Holm)",
        "gap recovered (attacked)",
        "gradient share ÷ area",
        "seeds with a concept",
    ]
    _header(head)
    for r in rows:
        c = r.splits_vs_baseline or {}

        def d(name: str) -> str:
            if name not in c:
                return "—"
            return f"{points(c[name]['mean_diff'], sign=True)} ({p_value(c[name].get('p_ttest_holm'))})"

        sc = r.shortcut or {}
        share = number(sc["gradient"]["mean"] / sc["area"]["mean"], 1) if sc.get("gradient") and sc.get("area") else "—"
        gap = (r.gap_recovered or {}).get("attacked")
        cells = [
            r.regime,
            r.arm,
            pct(r.test_splits.get("clean")),
            pct(r.test_splits.get("attacked")),
            d("attacked"),
            d("clean"),
            "—" if gap is None else number(gap, 2),
            share,
            f"{r.revision['seeds_with_a_concept']}/{len(r.seeds)}" if r.revision else "",
        ]
        print("| " + " | ".join(cells) + " |")


def maps_table(rows: list[StudyRow]) -> None:
    """Built-in map quality (map_quality of each unit with a built-in map: IMPACTX, ABN or a B-cos model, means over seeds), with
    the yardstick that matters most: the most faithful unsmoothed post-hoc map of the same model."""
    rows = [r for r in rows if (r.map_quality or {}).get("pixel_flipping_morf.built_in")]
    if not rows:
        return
    m = lambda r, k: (r.map_quality.get(k) or {}).get("mean")  # noqa: E731
    f = lambda v: "—" if v is None else number(v, 3)  # noqa: E731
    aug = any(m(r, "corr_mean_map_augmented") is not None for r in rows)
    head = [
        "regime",
        "arm",
        "teacher",
        "corr with teacher (mean map" + ("; under augmentation)" if aug else ")"),
        "R² vs mean map",
        "self-agreement (mean map)",
        "MoRF: built-in / post hoc / mean map / random",
        "built-in ÷ post hoc",
        "insertion: built-in / post hoc",
        "best post-hoc map",
        "self-agreement with it",
        "MoRF ÷ its MoRF",
    ]
    _header(head)
    for r in rows:
        morf = [m(r, f"pixel_flipping_morf.{k}") for k in ("built_in", "teacher_post_hoc", "mean_map", "random")]
        ratio = morf[0] / morf[1] if morf[0] is not None and morf[1] else None
        print(
            "| "
            + " | ".join(
                [
                    r.regime,
                    r.arm,
                    str(r.teacher if r.teacher is not None else ""),
                    f"{f(m(r, 'corr'))} ({f(m(r, 'corr_mean_map'))}"
                    + (f"; {f(m(r, 'corr_mean_map_augmented'))})" if aug else ")"),
                    f(m(r, "r2_vs_mean_map")),
                    f"{f(m(r, 'corr_self'))} ({f(m(r, 'corr_self_mean_map'))})",
                    " / ".join(f(v) for v in morf),
                    "—" if ratio is None else f"{number(ratio, 2)}x",
                    f"{f(m(r, 'insertion.built_in'))} / {f(m(r, 'insertion.teacher_post_hoc'))}",
                    _best_method(r),
                    f(m(r, "best_post_hoc.corr_self")),
                    "—"
                    if m(r, "best_post_hoc.morf_ratio") is None
                    else f"{number(m(r, 'best_post_hoc.morf_ratio'), 2)}x",
                ]
            )
            + " |"
        )


def _best_method(r: StudyRow) -> str:
    """The unsmoothed post-hoc method with the lowest MoRF on the arm's models, mean over seeds (each seed's
    ratio above is to its own best, so the two can differ where the seeds disagree)."""
    q = r.map_quality or {}
    morf = {
        k[len("pixel_flipping_morf.post_hoc_") :]: v.get("mean")
        for k, v in q.items()
        if k.startswith("pixel_flipping_morf.post_hoc_")
    }
    morf = {k: v for k, v in morf.items() if v is not None}
    return min(morf, key=morf.get).replace("_", " ") if morf else "—"


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    main(sys.argv[1])
