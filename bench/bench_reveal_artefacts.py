"""Benchmark: does the unannotated reveal find an R2R artefact that a baseline learnt? Per artefact kind and
poisoned share p, a LeNet-5 baseline on Fashion-MNIST (`teachx train fashion-mnist-timestamp`, trained here
when --runs has none), its clean / attacked test accuracy (how much it relies on the artefact), then
:func:`teachx.runs.reveal_benchmark.reveal_benchmark` with each settings variant: whether the top group of the
poisoned class is the artefact, its F1, the detection AUROC of the per-sample scores, the CAV's retrieval
AUROC / AP over all training images and the mask IoU. The ground truth is read only to score.

Variants: ``default`` (RevealSettings(): spray_latent in six groups on the standardised max-pooled activations of
every nonlinearity, ranked by specificity, the top group merged with the next ones as specific, logistic CAV
there, LRP epsilon_plus localisation),
``refine2`` (the same with the top group grown for 2 rounds before its CAV is fitted), ``neck_relevances`` (the default until
the reveal algorithms' version 3: spray_latent on the LRP relevances of the features the classifier reads, the
eigengap's number of groups ranked by silhouette, the pattern CAV on the raw activations there) and
``spray_maps`` (the one before: SpRAy on 8x8 LRP maps, CAV on the last feature maps). Writes a JSON list of
rows (--json) and prints a Markdown table.

    python bench/bench_reveal_artefacts.py --runs /tmp/r2r                     # timestamp, p 0.5 and 0.1
    python bench/bench_reveal_artefacts.py --runs /tmp/r2r --kinds timestamp,bandaid,frame --p 0.5
    python bench/bench_reveal_artefacts.py --runs /tmp/r2r --train-size 12000 --epochs 8   # the weak baselines

Run single-threaded (OMP_NUM_THREADS=1 TEACHX_THREADS=1); a baseline on 54,000 images and 12 epochs takes
about 3 minutes on a 2-core CPU, each benchmark row 10 to 60 seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: the settings of the pipeline as it was (the method's own groups and ranking, one layer's raw values, pattern CAV)
_FORMER = {"options": {}, "rank": "method", "standardise": False, "cav": "pattern"}
VARIANTS = {
    "default": {},
    "refine2": {"refine": 2},
    "neck_relevances": {**_FORMER, "latent": "relevances", "layer": "neck"},
    "spray_maps": {**_FORMER, "method": "spray", "latent": "activations", "layer": "body"},
}


def train(run: Path, kind: str, p: float, train_size: int, epochs: int) -> None:
    """A LeNet-5 baseline with the artefact in share ``p`` of class Shirt, unless ``run`` has one already."""
    if (run / "results.json").exists():
        return
    cmd = [sys.executable, "-m", "teachx", "train", "fashion-mnist-timestamp", "--out", str(run), "-q"]
    cmd += [f"data.train_size={train_size}", f"train.epochs={epochs}", f"data.artefact.kind={kind}"]
    cmd += [f"data.artefact.p={p}", "train.progress=false"]
    subprocess.run(cmd, check=True)


def bench(run: Path, variant: dict) -> dict:
    import torch

    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir, _classifier_checkpoint, find_classifier
    from teachx.runs.reveal_benchmark import RevealSettings, reveal_benchmark
    from teachx.runs.stages import load_stage_model

    cfg = _check_run_dir(run)
    plan = make_plan(cfg, progress=False)
    model = load_stage_model(_classifier_checkpoint(find_classifier(run)).parent.parent)
    t = time.perf_counter()
    out = reveal_benchmark(cfg, plan, model, torch.device("cpu"), RevealSettings(**variant))
    row = {k: (None if v is None else round(v, 3)) for k, v in out.headline().items()}
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="folder of the baselines (trained when missing)")
    ap.add_argument("--kinds", default="timestamp", help="artefact kinds, comma-separated")
    ap.add_argument("--p", default="0.5,0.1", help="poisoned shares, comma-separated")
    ap.add_argument("--train-size", type=int, default=54000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        for p in (float(v) for v in args.p.split(",")):
            run = args.runs / f"{kind}-p{p}-n{args.train_size}-e{args.epochs}"
            train(run, kind, p, args.train_size, args.epochs)
            acc = {k: v["acc"] for k, v in json.loads((run / "results.json").read_text())["test_splits"].items()}
            for name in args.variants.split(","):
                row = {"kind": kind, "p": p, "clean": acc["clean"], "attacked": acc["attacked"], "variant": name}
                row.update(bench(run, VARIANTS[name]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    cols = ["kind", "p", "clean", "attacked", "variant", "top_is_artefact", "top_f1", "detection_auroc"]
    cols += ["retrieval_auroc", "retrieval_ap", "mask_iou", "seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
