"""Benchmark: CPU tuning options for training, each in a fresh process: threads, channels_last, torch.compile.

For LeNet-5 (baseline and IMPACTX, lambda=1) and MobileNet v1 at batch 128 on 32x32x3 inputs
(synthetic data, Adam), every variant runs in its own subprocess (malloc tuning applied, as in
teachx training) and reports:
- the median training-step time over --steps steps after warm-up (torch.compile's compile time is
  reported separately, it is paid once per process and shape);
- whether results change: the max abs difference of the logits of a fixed batch, and of the loss
  after 3 identical training steps, against the eager/contiguous run with the same initial weights.
Writes bench/results/cpu_tuning.json atomically and prints a table.

    python bench/bench_cpu_tuning.py [--steps 40] [--threads 2] [--models lenet5,impactx_lenet5,mobilenet]
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
import json, statistics, sys, time, warnings
import torch, torch.nn.functional as F
warnings.filterwarnings("ignore")
from teachx.utils.runtime import tune_cpu_allocator
from teachx.models import build_model
from teachx.models.impactx import build_impactx
tune_cpu_allocator()
name, variant, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
B = 128
torch.manual_seed(0)
impactx = name.startswith("impactx_")
model = build_impactx(name[len("impactx_"):], 3, 10, (32, 32), decoder="paper") if impactx else build_model(name, 3, 10, 32)
g = torch.Generator().manual_seed(1)
xs = torch.randn(4, B, 3, 32, 32, generator=g)
ys = torch.randint(0, 10, (4, B), generator=g)
maps = torch.randn(4, B, 1, 32, 32, generator=g)
cl = "channels_last" in variant
if cl:
    model = model.to(memory_format=torch.channels_last)
    xs = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in xs])

def loss_fn(x, y, m):
    if impactx:
        logits, pred = model.forward_all(x)
        return F.cross_entropy(logits, y) + F.mse_loss(pred.float(), m)
    return F.cross_entropy(model(x), y)

fn = torch.compile(loss_fn) if "compile" in variant else loss_fn
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)

def step(i):
    x = xs[i % 4]
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    loss = fn(x, ys[i % 4], maps[i % 4])
    loss.backward()
    opt.step()
    return loss.detach()

model.eval()
with torch.no_grad():
    logits = (model.forward_all(xs[0])[0] if impactx else model(xs[0])).clone()
model.train()
t0 = time.perf_counter()
first = [step(i).item() for i in range(3)]  # identical steps in every variant (compile happens here)
warm = time.perf_counter() - t0
for i in range(3, 6):
    step(i)
times = []
for i in range(steps):
    t = time.perf_counter()
    step(i)
    times.append(time.perf_counter() - t)
print(json.dumps({"median_step_s": statistics.median(times), "warmup_s": warm, "first_losses": first, "logits": logits[:8].tolist()}))
"""

VARIANTS = ["eager", "channels_last", "compile", "compile_channels_last"]


def run(model: str, variant: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, variant, str(steps), str(threads)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="lenet5,impactx_lenet5,mobilenet")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_tuning.json"))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        steps = args.steps if "lenet" in name else max(8, args.steps // 4)
        ref = None
        for variant in VARIANTS:
            r = run(name, variant, steps, args.threads)
            r.update(model=name, variant=variant, threads=args.threads, steps=steps)
            if "error" not in r:
                if ref is None:
                    ref = dict(r)
                r["speedup_vs_eager"] = ref["median_step_s"] / r["median_step_s"]
                r["max_abs_logit_diff"] = max(
                    abs(a - b) for ra, rb in zip(r["logits"], ref["logits"]) for a, b in zip(ra, rb)
                )
                r["max_abs_loss_diff_3_steps"] = max(abs(a - b) for a, b in zip(r["first_losses"], ref["first_losses"]))
                del r["logits"]
                print(
                    f"{name:16s} {variant:22s} {1000 * r['median_step_s']:8.1f} ms/step  {r['speedup_vs_eager']:.2f}x  warm-up {r['warmup_s']:.1f}s  "
                    f"logit diff {r['max_abs_logit_diff']:.1e}  loss diff {r['max_abs_loss_diff_3_steps']:.1e}",
                    flush=True,
                )
            else:
                print(f"{name:16s} {variant:22s} failed: {r['error']}", flush=True)
            rows.append(r)
        if args.threads > 1:  # the thread count itself: the same eager step on one thread
            r = run(name, "eager", steps, 1)
            r.update(model=name, variant="eager", threads=1, steps=steps)
            r.pop("logits", None)
            if "error" not in r and ref is not None:
                r["speedup_vs_eager"] = ref["median_step_s"] / r["median_step_s"]
                print(
                    f"{name:16s} {'eager, 1 thread':22s} {1000 * r['median_step_s']:8.1f} ms/step  {r['speedup_vs_eager']:.2f}x",
                    flush=True,
                )
            rows.append(r)
    import torch

    write_json_atomic(
        args.out,
        {"benchmark": "cpu_tuning", "batch": 128, "image": [3, 32, 32], "torch": torch.__version__, "results": rows},
    )


if __name__ == "__main__":
    main()
