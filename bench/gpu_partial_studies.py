"""Read the study archives that bench/gpu.sh brings back and summarise what they hold, finished or not.

A study stopped by the device's time limit writes no study.json; its finished units are still complete records
(each unit's stage.json holds its test accuracy, digest-checked here). This lists every unit and, for each arm
whose seeds all finished, the paired comparison with the baseline (paired t-test, Wilcoxon, Holm over the arms
compared) -- the same statistics `teachx study` computes, on fewer arms.

    python bench/gpu_partial_studies.py ARCHIVE_OR_DIR... [--out bench/results/gpu/study-5k-partial.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from teachx.evaluation.stats import holm, paired_compare, summarize
from teachx.utils.io import read_trusted_json, write_json_atomic


def _study_dir(source: Path, tmp: Path) -> Path:
    """An unpacked study directory: ``source`` itself, or the one folder its .tgz archive holds, unpacked into ``tmp``."""
    if source.is_dir():
        return source
    with tarfile.open(source, "r:gz") as tar:
        tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of tmp and device files
    (top,) = [p for p in tmp.iterdir() if p.is_dir()]
    return top


def _spec_arms(root: Path) -> dict[str, str]:
    """unit key -> arm, exactly as the study's own study.yaml defines them (the runner's keys); {} without one."""
    if not (root / "study.yaml").is_file():
        return {}
    from teachx.studies.spec import load_study_dir, unit_names

    return {key: where["arm"] for key, where in unit_names(load_study_dir(root)).items()}


def _arm(unit: dict[str, Any]) -> str:
    """The study arm a unit belongs to, guessed from its config when the study.yaml is missing (baseline, an
    IMPACTX variant or a training method)."""
    cfg = unit["config"]
    if unit["kind"] == "classifier":
        return "baseline"
    if unit["kind"] == "method":
        return cfg["method"]["name"]
    # IMPACTX's options: method.options, or the impactx: section of units made before they moved there
    imp = {**cfg.get("impactx", {}), **((cfg.get("method") or {}).get("options") or {})}
    if imp.get("lam") == 0:
        return "lambda0"
    return "shuffled" if imp.get("maps") == "shuffled" else "impactx"


def summarise(source: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return _summarise(source, _study_dir(source, Path(tmp)))


def _summarise(source: Path, root: Path) -> dict[str, Any]:
    fix = "it came back damaged from the device machine: run bench/gpu.sh again"
    units = []
    arms = _spec_arms(root)
    for d in sorted(p for p in (root / "units").iterdir() if (p / "unit.json").is_file()):
        info = read_trusted_json(d / "unit.json", fix, "unit record")
        stage = read_trusted_json(d / "stage.json", fix, "unit result") if (d / "stage.json").is_file() else None
        hist = json.loads((d / "history.json").read_text()) if (d / "history.json").is_file() else []
        secs = [h["seconds"] for h in hist if isinstance(h, dict) and "seconds" in h]
        units.append(
            {
                "unit": d.name,
                "arm": arms.get(d.name) or _arm(info),
                "arm_from": "study.yaml" if d.name in arms else "config",
                "seed": info["config"]["seed"],
                "backbone": info["config"]["model"]["backbone"],
                "finished": stage is not None,
                "epochs_done": len(hist),
                "epochs": info["config"]["train"]["epochs"],
                "test_acc": stage.get("test_acc") if stage else None,
                "median_s_per_epoch": statistics.median(secs) if secs else None,
            }
        )
    by_arm: dict[str, dict[int, float]] = defaultdict(dict)
    for u in units:
        if u["finished"] and u["test_acc"] is not None:
            by_arm[u["arm"]][u["seed"]] = u["test_acc"]
    seeds = sorted({u["seed"] for u in units})
    complete = {arm: accs for arm, accs in by_arm.items() if sorted(accs) == seeds}
    rows: dict[str, Any] = {}
    for arm, accs in complete.items():
        vals = [accs[s] for s in seeds]
        s = summarize(vals)
        rows[arm] = {"seeds": seeds, "test_acc": vals, "mean": s.mean, "std": s.std}
    compared = [a for a in complete if a != "baseline"] if "baseline" in complete else []
    cmps = {
        a: paired_compare([complete[a][s] for s in seeds], [complete["baseline"][s] for s in seeds]) for a in compared
    }
    adj = holm([c.p_ttest for c in cmps.values()])
    for (arm, c), p_holm in zip(cmps.items(), adj):
        rows[arm]["vs_baseline"] = {
            "mean_diff": c.mean_diff,
            "p_ttest": c.p_ttest,
            "p_wilcoxon": c.p_wilcoxon,
            "p_ttest_holm": p_holm,
            "wins": c.wins,
            "losses": c.losses,
        }
    unfinished = sorted({u["arm"] for u in units} - set(complete))
    return {
        "source": source.name,
        "backbone": units[0]["backbone"] if units else None,
        "units": units,
        "units_finished": sum(u["finished"] for u in units),
        "units_total": len(units),
        "arms_complete": rows,
        "arms_unfinished": unfinished,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = [summarise(s) for s in args.sources]
    for r in results:
        print(
            f"{r['source']} ({r['backbone']}): {r['units_finished']}/{r['units_total']} units finished; "
            f"arms not finished: {', '.join(r['arms_unfinished']) or 'none'}"
        )
        for arm, row in r["arms_complete"].items():
            accs = ", ".join(f"{100 * a:.1f}" for a in row["test_acc"])
            line = f"  {arm:<10} {100 * row['mean']:.1f} ± {100 * row['std']:.1f}  [{accs}]"
            if "vs_baseline" in row:
                v = row["vs_baseline"]
                line += (
                    f"  vs baseline {100 * v['mean_diff']:+.1f} pts, p {v['p_ttest']:.2g} (Holm {v['p_ttest_holm']:.2g}),"
                    f" wins {v['wins']}/{len(row['seeds'])}"
                )
            print(line)
    if args.out:
        write_json_atomic(args.out, {"what": "partial study results from bench/gpu.sh archives", "studies": results})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
