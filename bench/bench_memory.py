"""Benchmark: peak memory of each benchmarked operation, each in a fresh process.

For every (model, operation) a fresh subprocess builds the model and its inputs, runs the
operation once on 2 images (pages in the kernels' code, lazy initialisation, optimizer state),
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs it once on the full batch and
reports ``VmHWM - VmRSS`` before that call: the extra resident memory the call needed at its peak
(activations, gradients, workspaces), excluding the Python/torch runtime, the model and the inputs.
A fresh process each, because freed heap memory stays resident (teachx keeps it on purpose, see
``teachx.utils.runtime``) and would hide a later operation's peak. Linux only. Writes
bench/results/memory.json atomically.

Operations (batch 64 of 32x32x3 inputs, 10 classes, as in the speed benchmarks):
forward, input_gradient (forward + input-gradient backward), train_step (baseline, Adam),
impactx_train_step, builtin_maps (IMPACTX logits + map, no grad), lrp_epsilon,
lrp_epsilon_plus_flat, deepshap (background 50) and shap_deepexplainer (same background);
for lenet5 also pixel flipping over 1,000 images (teachx vs Quantus, as in bench_metrics.py).

    python bench/bench_memory.py [--models lenet5,mobilenet] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench_scaling import status_kb

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
OPERATIONS = [
    "forward",
    "input_gradient",
    "train_step",
    "impactx_train_step",
    "builtin_maps",
    "lrp_epsilon",
    "lrp_epsilon_plus_flat",
    "deepshap",
    "shap_deepexplainer",
]
PIXEL_FLIPPING = ["pixel_flipping_teachx", "pixel_flipping_quantus"]


def measure(call: Callable[[], object]) -> dict:
    """Peak extra resident memory (MB) and wall time of one ``call()``."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"peak_extra_mb": (status_kb("VmHWM") - before) / 1024, "seconds": seconds, "rss_before_mb": before / 1024}


def prepare(model_name: str, operation: str, batch: int) -> Callable[[int], object]:
    """Build the model and inputs (not measured); return the call to measure, on the first ``k`` images."""
    from teachx.models import build_model
    from teachx.models.impactx import build_impactx

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    background = torch.randn(50, 3, 32, 32, generator=g)
    if operation in ("impactx_train_step", "builtin_maps"):
        imp = build_impactx(model_name, 3, 10, (32, 32), decoder="paper")
        maps = torch.randn(batch, 1, 32, 32, generator=g)
        if operation == "builtin_maps":
            imp.eval()
            return lambda k: _no_grad(lambda: imp.forward_all(x[:k]))
        from teachx.training.impactx import ImpactxTask

        task = ImpactxTask(imp, None, 1.0)
        opt = torch.optim.Adam([p for p in imp.parameters() if p.requires_grad], 1e-3)
        return lambda k: _step(opt, lambda: task.loss(x[:k], y[:k], maps[:k])[0])
    model = build_model(model_name, 3, 10, 32)
    if operation == "train_step":
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        return lambda k: _step(opt, lambda: F.cross_entropy(model(x[:k]), y[:k]))
    model.eval()
    if operation == "forward":
        return lambda k: _no_grad(lambda: model(x[:k]))
    if operation == "input_gradient":

        def input_gradient(k: int):
            xg = x[:k].clone().requires_grad_(True)
            return torch.autograd.grad(model(xg).gather(1, y[:k].view(-1, 1)).sum(), xg)

        return input_gradient
    for p in model.parameters():
        p.requires_grad_(False)
    if operation.startswith("lrp_"):
        from teachx.teachers.lrp import Lrp

        teacher = Lrp(operation[4:])
        return lambda k: teacher.attribute(model, x[:k], y[:k])
    if operation == "deepshap":
        from teachx.teachers.shap import DeepShap

        teacher = DeepShap(background)
        return lambda k: teacher.attribute(model, x[:k], y[:k])
    if operation == "shap_deepexplainer":
        from bench_shap import shap_values

        return lambda k: shap_values(model, x[:k], background, y[:k])
    if operation in PIXEL_FLIPPING:
        return _pixel_flipping(model, operation)
    raise SystemExit(f"unknown operation {operation!r}; choose from {', '.join(OPERATIONS + PIXEL_FLIPPING)}")


def _pixel_flipping(model: torch.nn.Module, operation: str) -> Callable[[int], object]:
    """The throughput benchmark's setting: 1,000 images, 16 steps, zero baseline, softmax."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1000, 3, 32, 32), generator=g)
    y = torch.randint(0, 10, (1000,), generator=g)
    maps = torch.rand((1000, 1, 32, 32), generator=g)
    if operation == "pixel_flipping_teachx":
        from teachx.evaluation import PixelFlippingMoRF

        metric = PixelFlippingMoRF(steps=16, baseline="zero", output="probability", batch_size=256)
        return lambda k: metric(model, x[:k], y[:k], maps[:k])
    from bench_metrics import quantus_loader, quantus_pixel_flipping

    loader = quantus_loader()
    metric = quantus_pixel_flipping(loader.load_quantus(), 32 * 32, 16)
    arrays = dict(model=model, softmax=True)

    def run(k: int):
        with loader.numpy_compat():
            return metric(**{**arrays, "x_batch": x[:k].numpy(), "y_batch": y[:k].numpy(), "a_batch": maps[:k].numpy()})

    return run


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


def _step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()


def run_one(model_name: str, operation: str, batch: int, threads: int) -> dict:
    from teachx.utils.runtime import tune_cpu_allocator

    malloc_tuned = tune_cpu_allocator()  # as the CLI, Trainer and map stores do
    torch.set_num_threads(threads)
    call = prepare(model_name, operation, batch)
    call(2)  # warm-up
    full = 1000 if operation in PIXEL_FLIPPING else batch
    return {
        "model": model_name,
        "operation": operation,
        "images": full,
        "malloc_tuned": malloc_tuned,
        **measure(lambda: call(full)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,mobilenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--operations", default=",".join(OPERATIONS), help="comma-separated subset")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "OPERATION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.batch, args.threads)))
        return
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench_memory.py needs Linux (/proc/self/clear_refs); nothing measured")
    from teachx.utils.io import write_json_atomic

    rows = []
    for model_name in args.models.split(","):
        ops = args.operations.split(",") + (PIXEL_FLIPPING if model_name == "lenet5" else [])
        for op in ops:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    model_name,
                    op,
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rows.append({"model": model_name, "operation": op, "error": err})
                print(f"{model_name:10s} {op:24s} failed: {err}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{model_name:10s} {op:24s} peak +{row['peak_extra_mb']:8.1f} MB  ({row['seconds']:.2f} s)", flush=True
            )
    write_json_atomic(
        args.out,
        {
            "benchmark": "peak memory per operation (fresh process each)",
            "batch": args.batch,
            "threads": args.threads,
            "torch": torch.__version__,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
