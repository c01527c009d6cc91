"""Thread count under CPU contention: what a training step costs when another process is busy.

    python bench/bench_threads.py            # ~4 minutes on a 2-core CPU; results in bench/results/threads.json

On a 2-core machine a second busy process (another study worker, a test suite, a browser) leaves one
core to teachx. With OpenMP's default wait policy, torch's worker threads spin at every parallel
region's barrier waiting for a thread that is descheduled, and a 2-thread training step can become
tens of times slower than a 1-thread one. This benchmark measures, in fresh processes, a LeNet-5
training step (batch 128, 32x32x3, Adam) for each thread policy, on an idle machine and next to a
competitor (stopped after the measurement): a pure-Python loop pinned to one core, or a second torch
job (matrix products) with 1 or 2 threads, as a second study worker or a test suite would be:

- ``threads=N``: torch.set_num_threads(N), OpenMP's default wait policy;
- ``threads=N passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers);
- ``teachx default``: whatever teachx.utils.runtime.configure_threads() picks with no setting.

Each variant reports the median step time over its measured steps (after warm-up steps), capped in
wall time so the badly oversubscribed variants finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys, time
variant = json.loads(sys.argv[1])
from teachx.utils.runtime import configure_threads, tune_cpu_allocator
tune_cpu_allocator()
import torch
if variant["threads"] is None:
    configure_threads(None)
else:
    torch.set_num_threads(variant["threads"])
from teachx.models import build_model
torch.manual_seed(0)
model = build_model("lenet5", 3, 10, (32, 32))
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.randn(128, 3, 32, 32)
y = torch.randint(0, 10, (128,))
def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
for _ in range(variant["warmup"]):
    step()
times = []
t_end = time.perf_counter() + variant["max_seconds"]
while len(times) < variant["steps"] and time.perf_counter() < t_end:
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"threads_used": torch.get_num_threads(), "step_times": times,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
"""

BUSY = "import os, time\nos.sched_setaffinity(0, {%d})\nt = time.time() + %f\nwhile time.time() < t:\n    pass\n"
# a second torch job (e.g. another study worker or test suite) with its own thread count
TORCH_JOB = (
    "import time, torch\ntorch.set_num_threads(%d)\na = torch.randn(256, 256)\nt = time.time() + %f\n"
    "while time.time() < t:\n    (a @ a).sum()\n"
)
LOADS = {"idle": None, "one busy core": "busy", "another torch job, 1 thread": 1, "another torch job, 2 threads": 2}


def run_variant(variant: dict, env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TEACHX_THREADS")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(variant)], env=env, check=True, capture_output=True, text=True
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["median_step_s"] = statistics.median(rec["step_times"])
    rec["steps_measured"] = len(rec.pop("step_times"))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="wall-time cap per variant's measured steps")
    ap.add_argument("--busy-core", type=int, default=1, help="the core the competitor process is pinned to")
    ap.add_argument("--out", default=str(HERE / "results" / "threads.json"))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    variants = [
        ("threads=1", {"threads": 1}, {}),
        (f"threads={cores}", {"threads": cores}, {}),
        (f"threads={cores} passive", {"threads": cores}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("teachx default", {"threads": None}, {}),
    ]
    rows = []
    for load, competitor in LOADS.items():
        for label, v, env in variants:
            variant = {**v, "steps": args.steps, "warmup": args.warmup, "max_seconds": args.max_seconds}
            busy = None
            if competitor is not None:
                code = (
                    BUSY % (args.busy_core, 4 * args.max_seconds + 60)
                    if competitor == "busy"
                    else TORCH_JOB % (competitor, 4 * args.max_seconds + 60)
                )
                busy = subprocess.Popen(
                    [sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
                )
                time.sleep(0.5)
            try:
                rec = run_variant(variant, env)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            rec.update(load=load, variant=label)
            rows.append(rec)
            print(
                f"{load:14s} {label:22s} {1000 * rec['median_step_s']:9.1f} ms/step ({rec['steps_measured']} steps, "
                f"{rec['threads_used']} threads)",
                flush=True,
            )
    by = {(r["load"], r["variant"]): r["median_step_s"] for r in rows}
    for r in rows:
        r["slowdown_vs_idle_same_variant"] = r["median_step_s"] / by[("idle", r["variant"])]
        r["vs_best_idle"] = r["median_step_s"] / min(v for (ld, _), v in by.items() if ld == "idle")
    from teachx.utils.io import write_json_atomic

    write_json_atomic(
        args.out,
        {
            "benchmark": "threads",
            "cores": cores,
            "batch": 128,
            "model": "lenet5",
            "machine": f"{os.cpu_count()} CPUs",
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
