"""How far do the cheap post-hoc maps of one IMPACTX model agree with each other and with blurred copies of themselves?

The ceiling a learned (smooth) built-in map can reach on self-agreement: prints, for the run's IMPACTX model on its
first 256 test images (explaining the predicted class), the mean per-image correlation between gradient x input,
LRP-epsilon, Integrated Gradients, gradient x input blurred by sigma 1 and 2 px, and the built-in map, and each
map set's MoRF AUC on the model.

    python scripts/post_hoc_ceiling.py RUN_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from teachx.data.transforms import normalize
from teachx.evaluation.builtin_maps import builtin_map_faithfulness, map_corr
from teachx.runs.explain import load_impactx
from teachx.runs.plan import make_plan
from teachx.runs.resolve import resolve_config
from teachx.runs.teacher import as_nchw
from teachx.teachers import build
from teachx.teachers.postprocess import postprocess

SECTIONS = ("seed", "device", "data", "model", "train", "teacher", "impactx", "method")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_impactx(args.run_dir / "impactx" / "checkpoints" / "best.safetensors")
    model.eval()
    raw = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    plan = make_plan(resolve_config(base={k: v for k, v in raw.items() if k in SECTIONS}))
    x = normalize(as_nchw(plan.dataset.test.images[np.arange(args.images)]), plan.mean, plan.std)
    with torch.no_grad():
        logits, built = model.forward_all(x)
    target = logits.argmax(1)

    def maps(method: str, sigma: float = 0.0, **options) -> torch.Tensor:
        raw_maps = build(method, **options).attribute(model, x, target)
        return postprocess(raw_maps, reduce="sum", normalize="maxabs", smooth=sigma)

    sets = {
        "gradient_x_input": maps("gradient_x_input"),
        "lrp_epsilon": maps("lrp", composite="epsilon"),
        "integrated_gradients": maps("integrated_gradients"),
        "gradient_x_input_sigma1": maps("gradient_x_input", 1.0),
        "gradient_x_input_sigma2": maps("gradient_x_input", 2.0),
    }
    every = {**sets, "built_in": built.float()}
    for a in every:
        print(a, " ".join(f"{b}: {float(map_corr(every[a], every[b]).mean()):.3f}" for b in every if b != a))
    out = builtin_map_faithfulness(model, x, target, built.float(), None, references=sets)
    print("MoRF AUC", json.dumps({k: round(v, 4) for k, v in out["auc"]["pixel_flipping_morf"].items()}))


if __name__ == "__main__":
    main()
