"""Input | teacher map | built-in maps of chosen study arms, for the same test images (the built-in maps figure of the documentation).

    python scripts/builtin_maps_figure.py runs/study-builtin-maps --regime 5k \
        --arms lrp_paper_mse,lrp_input_pc_pearson [--labels "paper,per class"] --seed 0 --out docs/builtin-maps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from teachx.reporting.plots import arms_examples_figure
from teachx.utils.io import read_trusted_json, write_bytes_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--regime", default=None, help="the study regime (default: the only one)")
    ap.add_argument("--arms", required=True, help="comma-separated study arms, in column order")
    ap.add_argument("--labels", default=None, help="comma-separated column names, one per arm (default: the arm names)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = read_trusted_json(
        args.study / "study.json", "run `teachx study` on that directory again to rewrite it", "study record"
    )
    rows = data["rows"]
    regimes = sorted({r["regime"] for r in rows})
    regime = args.regime or (regimes[0] if len(regimes) == 1 else None)
    if regime not in regimes:
        raise SystemExit(f"--regime: one of {', '.join(regimes)}")
    arms = args.arms.split(",")
    labels = args.labels.split(",") if args.labels else arms
    if len(labels) != len(arms):
        raise SystemExit(f"--labels: {len(labels)} names for {len(arms)} arms")
    cells = []
    for arm, label in zip(arms, labels):
        row = next((r for r in rows if r["regime"] == regime and r["arm"] == arm), None)
        if row is None or args.seed not in row["seeds"]:
            raise SystemExit(f"no unit of arm {arm!r}, regime {regime}, seed {args.seed} in {args.study}/study.json")
        cells.append((label, args.study / "units" / row["units"][row["seeds"].index(args.seed)] / "examples.npz"))
    first_unit = data["units"].get(cells[0][1].parent.name, {})
    png = arms_examples_figure(cells, (first_unit.get("examples") or {}).get("class_names"))
    if png is None:
        raise SystemExit("fewer than two of those units stored example arrays (study.eval.examples: 0?)")
    write_bytes_atomic(args.out, png)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
