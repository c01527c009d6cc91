"""How much of a teacher's maps is one fixed pattern, and how much of that a model trained under augmentation can learn.

For an evaluated IMPACTX study unit (or any unit whose evaluation names its map stores), from the stored teacher
maps alone (verified as they are read): the correlation of each test map with the mean training map, with that
mean map averaged over the unit's training augmentation (every crop offset and flip: the best a map that is the
same for every image can reach when trained on augmented targets, `map_quality`'s ``corr_mean_map_augmented``),
and with the flip-averaged mean map; and the mean map's parity structure (a pattern tied to pixel positions, as
strided convolutions leave, differs between odd and even rows or columns). Next to them, the unit's own built-in
maps' correlation.

    python scripts/teacher_map_structure.py runs/study-cifar10-efficientnet_b2-cpu/units/x-1100186e0ee33452
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from teachx.data.transforms import Augment
from teachx.evaluation.builtin_maps import map_corr
from teachx.runs.explain import run_config_of
from teachx.runs.plan import training_augment
from teachx.studies.runner import read_unit_evaluation
from teachx.teachers.store import read_store


def structure(unit: Path) -> dict:
    evals = sorted(unit.glob("eval-*.json"))
    if not evals:
        raise SystemExit(f"'{unit}' has no eval-*.json: pass an evaluated IMPACTX study unit")
    ev = read_unit_evaluation(evals[0])
    cfg = run_config_of(unit / "unit.json")  # the unit's own config, read from its unit.json (verified)
    train, test = read_store(ev["map_store"]["train"]), read_store(ev["map_store"]["test"])
    train_rows, test_rows = np.flatnonzero(np.asarray(train.done)), np.flatnonzero(np.asarray(test.done))
    mean = train.mean_map(train_rows).unsqueeze(0)
    target = test.read(test_rows)
    augment = training_augment(cfg) or Augment(0, hflip=False)  # as make_plan resolves it (the dataset's flip default)
    variants = {
        "mean map": mean,
        "mean map, flip-averaged": (mean + mean.flip(-1)) / 2,
        f"mean map under the training augmentation ({augment!r})": augment.expectation(mean),
    }
    out = {name: float(map_corr(m.expand_as(target), target).mean()) for name, m in variants.items()}
    m = mean[0].mean(0).double().numpy()
    m = m / max(np.abs(m).max(), 1e-12)
    out["mean map (max |value| = 1): mean on even / odd rows, even / odd columns"] = [
        round(float(m[0::2].mean()), 3),
        round(float(m[1::2].mean()), 3),
        round(float(m[:, 0::2].mean()), 3),
        round(float(m[:, 1::2].mean()), 3),
    ]
    out["built-in maps (the unit's evaluation)"] = ev["map_quality"]["corr"]
    out["test maps"], out["training maps"] = int(len(test_rows)), int(len(train_rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("units", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {str(u): structure(u) for u in args.units}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for unit, r in res.items():
        print(unit)
        for k, v in r.items():
            print(f"  correlation with the test maps, {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


if __name__ == "__main__":
    main()
