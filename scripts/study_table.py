"""Print a study's rows as the Markdown table the README uses: accuracy, paired comparisons, wrong-reason shares.

    python scripts/study_table.py runs/study-decoy/study.json
"""

from __future__ import annotations

import json
import sys


def pct(s):
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s and s.get("std") is not None else "n/a"


def diff(c, key="p_ttest_holm"):
    if not c:
        return ""
    p = c.get("p_ttest")
    ph = c.get(key)
    fmt = lambda v: "n/a" if v is None else (f"{v:.2g}" if v >= 1e-3 else f"{v:.0e}")  # noqa: E731
    return f"{100 * c['mean_diff']:+.1f} (p {fmt(p)}, Holm {fmt(ph)})"


def main(path: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    has_sc = any(r.get("shortcut") for r in rows)
    head = ["arm", "method", "test acc % (mean ± std)", "Δ vs baseline, pts", f"Δ vs {data['study'].get('control')}, pts"]
    if has_sc:
        head += ["gradient share", "LRP share", "built-in map share"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    from teachx.evaluation.stats import paired_compare

    base = {r["regime"]: r for r in rows if r["arm"] == "baseline"}
    for r in rows:
        vb = r.get("vs_baseline")
        if vb and str(vb.get("baseline", "")).startswith("own"):  # e.g. the clean-data ceiling: compare with the study's baseline
            vb = paired_compare(r["test_acc"], base[r["regime"]]["test_acc"]).to_dict()
            vb["p_ttest_holm"] = None
        cells = [r["arm"], r.get("method", ""), pct(r["summary"]), diff(vb), diff(r.get("vs_control"))]
        if has_sc:
            sc = r.get("shortcut") or {}
            cells += [f"{sc[m]['mean']:.3f}" if m in sc else "—" for m in ("gradient", "lrp", "built_in")]
        print("| " + " | ".join(cells) + " |")
    area = next((r["shortcut"]["area"]["mean"] for r in rows if r.get("shortcut")), None)
    if area is not None:
        print(f"\nartefact area (chance share): {area:.3f}; seeds {data['study']['seeds']}")


if __name__ == "__main__":
    main(sys.argv[1])
