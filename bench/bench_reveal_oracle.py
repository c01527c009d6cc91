"""Benchmark: how well can a concept direction retrieve an artefact at all? The oracle ceiling of the unannotated
reveal on a study's trained baselines: per classifier unit of an artefact benchmark, a CAV fitted on the *true*
artefact labels of the poisoned class, at each layer (the model's nonlinearities) with max and mean spatial
pooling, as a pattern CAV on the raw values and as a logistic CAV on standardised units, and on all those layers
side by side (teachx.reveal.features.LayerStack); each scores every training image, and the AUROC says how well
it finds the artefact's images among all of them; for an artefact with a place, the mask IoU of artefact images
localised (LRP, gradient x input) from each layer's oracle pattern CAV. Where these stay below a target, a reveal
that never reads the truth is unlikely to reach it.

    python bench/bench_reveal_oracle.py --study runs/study-r2r-fm --json bench/results/reveal_oracle.json

Run single-threaded (OMP_NUM_THREADS=1 TEACHX_THREADS=1); about 3 seconds a unit on a 2-core CPU (LeNet-5,
18,000 training images). Prints a Markdown table of the means over seeds per regime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

POOLS = ("max", "mean")


def unit_features(unit: Path) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, np.ndarray, Optional[dict]]:
    """One baseline's pooled activations of every nonlinearity over its training images ({pool: {layer: (N, D)}}),
    which of them carry the artefact, which are of the poisoned class, and (for an artefact with a place) what
    localising needs."""
    from teachx.config.load import load_config
    from teachx.data.artefacts import ground_truth
    from teachx.data.transforms import normalize
    from teachx.reveal.features import activation_layers, find_module, layer_shapes
    from teachx.runs.plan import make_plan
    from teachx.runs.recovery import stage_checkpoint, stage_done
    from teachx.runs.stages import load_classifier
    from teachx.runs.teacher import as_nchw

    config = json.loads((unit / "unit.json").read_text())["config"]
    cfg = load_config(base={k: config[k] for k in ("seed", "device", "data", "model")})
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    model = load_classifier(stage_checkpoint(unit, stage_done(unit) or {}), ds).eval()
    train_idx = np.sort(np.asarray(plan.train_idx))

    def batch(idx: np.ndarray) -> torch.Tensor:
        return normalize(as_nchw(ds.train.images[idx]), plan.mean, plan.std)

    layers = activation_layers(model, layer_shapes(model, batch(train_idx[:1])))
    rows: dict[str, dict[str, list[np.ndarray]]] = {p: {name: [] for name in layers} for p in POOLS}
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        find_module(model, name).register_forward_hook(lambda _m, _a, o, name=name: outs.__setitem__(name, o))
        for name in layers
    ]
    try:
        with torch.no_grad():
            for s in range(0, len(train_idx), 512):
                model(batch(train_idx[s : s + 512]))
                for name, o in outs.items():
                    rows["max"][name].append((o.amax((2, 3)) if o.dim() == 4 else o).numpy())
                    rows["mean"][name].append((o.mean((2, 3)) if o.dim() == 4 else o).numpy())
    finally:
        for h in hooks:
            h.remove()
    feats = {p: {name: np.concatenate(v) for name, v in by.items()} for p, by in rows.items()}
    label = int(cfg.data.artefact.classes[0])
    truth = ground_truth(ds)
    poisoned = truth.train_poisoned[train_idx]
    in_class = np.asarray(ds.train.labels)[train_idx] == label
    where = None
    if truth.has_place:  # what localisation needs: the model, its inputs, the true masks
        where = {"model": model, "batch": batch, "train_idx": train_idx, "masks": truth.train_masks}
    return feats, poisoned, in_class, where


def oracle(feats: dict[str, dict[str, np.ndarray]], poisoned: np.ndarray, in_class: np.ndarray) -> dict[str, float]:
    """Retrieval AUROC over all training images of CAVs fitted on the poisoned class's true labels."""
    from teachx.reveal.cav import auroc, fit_cav
    from teachx.reveal.features import LayerStack

    out: dict[str, float] = {}
    for pool, by in feats.items():
        for name, x in by.items():
            out[f"pattern/{pool}/{name}"] = auroc(fit_cav(x[in_class], poisoned[in_class]).scores(x), poisoned)
            z = LayerStack.fit([name], [x.shape[1]], x[in_class]).transform(x)
            out[f"logistic/{pool}/{name}"] = auroc(
                fit_cav(z[in_class], poisoned[in_class], "logistic").scores(z), poisoned
            )
        names = list(by)
        raw = np.concatenate([by[n] for n in names], 1)
        z = LayerStack.fit(names, [by[n].shape[1] for n in names], raw[in_class]).transform(raw)
        for kind in ("pattern", "logistic"):
            out[f"{kind}/{pool}/all layers"] = auroc(fit_cav(z[in_class], poisoned[in_class], kind).scores(z), poisoned)
    return out


def oracle_localisation(
    feats: dict[str, dict[str, np.ndarray]], poisoned: np.ndarray, in_class: np.ndarray, where: dict, n: int
) -> dict[str, float]:
    """Mask IoU of the first ``n`` artefact images of the class, localised (LRP and gradient x input) from each
    layer's pattern CAV on the true labels (max-pooled activations)."""
    from teachx.reveal.cav import fit_cav
    from teachx.reveal.features import find_module
    from teachx.reveal.localise import artefact_mask, heatmaps_in_batches, mask_iou

    chosen = where["train_idx"][np.flatnonzero(in_class & poisoned)[:n]]
    truth = where["masks"][chosen] != 0
    out = {}
    for name, x in feats["max"].items():
        cav = fit_cav(x[in_class], poisoned[in_class]).direction
        for method in ("lrp", "gradient"):
            layer = find_module(where["model"], name)
            heat = heatmaps_in_batches(where["model"], where["batch"], chosen, layer, cav, method, 64)
            out[f"{method}/{name}"] = float(mask_iou(artefact_mask(heat), truth).mean())
    return out


def table(per_regime: dict[str, list[dict[str, float]]]) -> None:
    """The means over seeds, one row per measure, one column per regime."""
    keys = list(next(iter(per_regime.values()))[0])
    print("| CAV | " + " | ".join(per_regime) + " |")
    print("|---|" + "---|" * len(per_regime))
    for key in keys:
        cells = [f"{np.mean([s[key] for s in rows]):.3f}" for rows in per_regime.values()]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a study directory with trained artefact baselines")
    ap.add_argument("--json", type=Path, default=None, help="write the per-unit numbers here")
    ap.add_argument("--localise", type=int, default=150, help="artefact images localised per unit (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    units = sorted(p for p in (args.study / "units").glob("*") if (p / "unit.json").exists())
    if not units:
        sys.exit(f"bench_reveal_oracle: error: no units in '{args.study}/units'; give a study directory (--study)")
    per_regime: dict[str, list[dict[str, float]]] = defaultdict(list)
    per_regime_iou: dict[str, list[dict[str, float]]] = defaultdict(list)
    records = []
    for unit in units:
        art = json.loads((unit / "unit.json").read_text())["config"]["data"].get("artefact")
        if not art:
            continue
        start = time.perf_counter()
        feats, poisoned, in_class, where = unit_features(unit)
        scores = oracle(feats, poisoned, in_class)
        regime = f"{art['kind']} p={art['p']}"
        per_regime[regime].append(scores)
        record = {"unit": unit.name, "regime": regime, "retrieval_auroc": scores}
        if where is not None and args.localise:
            record["mask_iou"] = oracle_localisation(feats, poisoned, in_class, where, args.localise)
            per_regime_iou[regime].append(record["mask_iou"])
        records.append(record)
        print(f"{unit.name} {regime}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if per_regime:
        print("Retrieval AUROC over all training images\n")
        table(per_regime)
    if per_regime_iou:
        print("\nMask IoU of the artefact images localised from each layer's oracle pattern CAV\n")
        table(per_regime_iou)
    if args.json:
        from teachx.utils.io import write_json_atomic

        write_json_atomic(args.json, {"benchmark": "reveal_oracle", "threads": 1, "units": records})


if __name__ == "__main__":
    main()
