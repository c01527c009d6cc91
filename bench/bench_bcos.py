"""Benchmark: the training step of the B-cos backbones against the standard ones, same batch, one process.

Pairs (standard, B-cos): lenet5 / bcos_lenet5 (B-cos v2's design, and with MaxOut and max pooling as
configs/cifar10-bcos-lenet5.yaml trains it) and resnet_cifar / bcos_resnet at the same depth and width.
One optimiser step (cross-entropy, backward, Adam step) on a fixed random CIFAR-sized batch is timed in
``--repeats`` rounds that each time both models of a pair for ``--steps`` steps in turn (after a warm-up),
and the B-cos/standard ratio is taken within each round, its median reported, so a drift of the machine's
speed does not bias one side. Also timed: one exact explanation (``contributions``) of the batch. The epoch
estimate is the step time times the steps of a 45,000-image epoch (data decoding left out).

Writes bench/results/bcos.json atomically and prints a table.

    python bench/bench_bcos.py [--batch 128] [--threads 1] [--depth 20] [--repeats 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from teachx.models import build_model
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

EPOCH_IMAGES = 45_000


def make_step(name: str, options: dict, batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one Adam step, one explanation of the batch) for backbone ``name`` on a fixed random batch."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10, 32, **options).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def explain() -> None:
        if hasattr(model, "contributions"):
            model.eval()
            model.contributions(x, y)
            model.train()

    return step, explain


def timed(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bcos.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    pairs = [
        ("lenet5", {}, "bcos_lenet5", {}),
        ("lenet5", {}, "bcos_lenet5", {"max_out": 2, "pool": "max"}),  # configs/cifar10-bcos-lenet5.yaml
        ("resnet_cifar", {"depth": args.depth}, "bcos_resnet", {"depth": args.depth}),
    ]
    steps_per_epoch = math.ceil(EPOCH_IMAGES / args.batch)
    rows = []
    for std_name, std_opts, bcos_name, bcos_opts in pairs:
        std_step, _ = make_step(std_name, std_opts, args.batch)
        bcos_step, bcos_explain = make_step(bcos_name, bcos_opts, args.batch)
        for fn in (std_step, bcos_step, bcos_explain):  # warm-up
            fn()
        std_times, bcos_times, ratios, explain_times = [], [], [], []
        for _ in range(args.repeats):
            s = timed(std_step, args.steps)
            b = timed(bcos_step, args.steps)
            std_times.append(s)
            bcos_times.append(b)
            ratios.append(b / s)
            explain_times.append(timed(bcos_explain, 1))
        row = {
            "standard": std_name,
            "bcos": bcos_name,
            "options": bcos_opts,
            "standard_step_s": statistics.median(std_times),
            "bcos_step_s": statistics.median(bcos_times),
            "ratio": statistics.median(ratios),
            "bcos_explain_batch_s": statistics.median(explain_times),
            "bcos_epoch_estimate_s": statistics.median(bcos_times) * steps_per_epoch,
            "standard_epoch_estimate_s": statistics.median(std_times) * steps_per_epoch,
        }
        rows.append(row)
        print(
            f"{bcos_name:12s} {json.dumps(bcos_opts):32s} vs {std_name:12s}  step {row['bcos_step_s'] * 1000:7.1f} ms vs "
            f"{row['standard_step_s'] * 1000:7.1f} ms  ratio {row['ratio']:.2f}  "
            f"epoch ~{row['bcos_epoch_estimate_s'] / 60:.1f} min vs ~{row['standard_epoch_estimate_s'] / 60:.1f} min  "
            f"explain a batch {row['bcos_explain_batch_s'] * 1000:.0f} ms"
        )
    write_json_atomic(
        Path(args.out),
        {
            "batch": args.batch,
            "threads": args.threads,
            "repeats": args.repeats,
            "steps": args.steps,
            "epoch_images": EPOCH_IMAGES,
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
