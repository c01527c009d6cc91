"""Benchmark: LRP cost relative to one plain forward+backward of the same model and batch.

Runs side by side in one process, per model: the plain input gradient of the target logits
(forward + ``autograd.grad`` w.r.t. the input, what Saliency costs), a plain training-style
forward+backward (``loss.backward()`` into the parameters, for reference), and the ``Lrp`` teacher
with the ``epsilon`` and ``epsilon_plus_flat`` composites (BatchNorm merged, residual canonizer).
Repeats are interleaved (plain, epsilon, epsilon_plus_flat, plain, ...) so drifting machine load
hits all methods alike; medians are reported. Writes ``bench/results/lrp.json`` atomically.

    python bench/bench_lrp.py                       # lenet5 + mobilenet, batch 64, 32x32
    python bench/bench_lrp.py --models lenet5 mobilenet resnet18 efficientnet_b0 --repeats 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from teachx.models import build_model
from teachx.teachers.lrp import Lrp
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

RESULTS = Path(__file__).resolve().parent / "results" / "lrp.json"


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give an untrained model realistic BatchNorm statistics (otherwise many units are dead)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def plain_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), xg)
    return grad


def plain_training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), target).backward()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, batch: int, size: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, 3, 10, size)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))
    calibrate_batchnorm(model, x)
    for p in model.parameters():
        p.requires_grad_(True)
    methods: dict[str, Callable[[], object]] = {
        "plain_input_grad": lambda: plain_input_gradient(model, x, target),
        "plain_train_step": lambda: plain_training_step(model, x, target),
    }
    for composite in ("epsilon", "epsilon_plus_flat"):
        teacher = Lrp(composite)
        methods[f"lrp_{composite}"] = (lambda t: lambda: t.attribute(model, x, target))(teacher)
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for key, fn in methods.items():
            times[key].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["plain_input_grad"]
    result = {
        "model": name,
        "batch": batch,
        "image_size": size,
        "repeats": repeats,
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "ratio_vs_plain_input_grad": {k: round(v / base, 3) for k, v in medians.items() if k.startswith("lrp")},
        "ratio_vs_plain_train_step": {
            k: round(v / medians["plain_train_step"], 3) for k, v in medians.items() if k.startswith("lrp")
        },
    }
    model.zero_grad(set_to_none=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "mobilenet"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    malloc_tuned = tune_cpu_allocator()  # as the CLI, Trainer and map stores do: the speed users get
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        res = bench_model(name, args.batch, args.size, args.repeats, args.warmup)
        print(
            f"{name:16s} "
            + "  ".join(f"{k}={v:.1f}ms" for k, v in res["median_ms"].items())
            + "  ratios(input-grad): "
            + ", ".join(f"{k}={v:.2f}x" for k, v in res["ratio_vs_plain_input_grad"].items()),
            flush=True,
        )
        results.append(res)
    write_json_atomic(
        args.out,
        {
            "benchmark": "lrp_vs_plain_forward_backward",
            "torch": torch.__version__,
            "threads": args.threads,
            "device": "cpu",
            "malloc_tuned": malloc_tuned,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "targets": {"lrp_epsilon": 1.5, "lrp_epsilon_plus_flat": 2.0},
            "results": results,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
