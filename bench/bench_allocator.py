"""Benchmark: the malloc tuning in teachx.utils.runtime, measured in fresh processes.

Each configuration runs in its own subprocess (glibc settings are per process): LeNet-5 and
MobileNet training steps (Adam, batch 128, 32x32x3, synthetic data), median step time over the
first --steps steps. Writes bench/results/allocator.json.

    python bench/bench_allocator.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from teachx.utils.io import write_json_atomic

CHILD = r"""
import json, statistics, sys, time, torch, torch.nn.functional as F
from teachx.models import build_model
from teachx.utils.runtime import tune_cpu_allocator
applied = tune_cpu_allocator()
name, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
m = build_model(name, 3, 10, 32)
opt = torch.optim.Adam(m.parameters(), 1e-3)
times = []
for i in range(steps):
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"applied": applied, "median_step_s": statistics.median(times), "first_10_median_s": statistics.median(times[:10])}))
"""


def run(model: str, steps: int, tuned: bool) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if not tuned:
        env["TEACHX_NO_MALLOPT"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(steps)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--models", default="lenet5,mobilenet")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "allocator.json"))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        steps = args.steps if name == "lenet5" else max(6, args.steps // 10)
        off, on = run(name, steps, False), run(name, steps, True)
        rows.append(
            {
                "model": name,
                "steps": steps,
                "default_malloc": off,
                "tuned": on,
                "speedup": off["median_step_s"] / on["median_step_s"],
            }
        )
        print(
            f"{name:10s} default {1000 * off['median_step_s']:.1f} ms/step  tuned {1000 * on['median_step_s']:.1f} ms/step  -> {rows[-1]['speedup']:.1f}x"
        )
    write_json_atomic(args.out, {"benchmark": "allocator", "batch": 128, "image": [3, 32, 32], "results": rows})


if __name__ == "__main__":
    main()
