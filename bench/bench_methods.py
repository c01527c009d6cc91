"""Benchmark: the training step of every training method against the baseline's, same batch, one process.

For each backbone and input shape, one optimiser step (loss, backward, Adam step) of every method in
``teachx.training.methods`` is timed on the same random batch, in ``--repeats`` rounds that each time
every method for ``--steps`` steps in turn (after a warm-up); the ratio to the baseline is taken within
each round and its median reported, so a drift of the machine's speed does not bias one method, with the method's model and task built exactly as ``teachx
run`` builds them. Teacher maps (IMPACTX, rrr with mask=teacher, reldrop with relevance=teacher)
come from an in-memory store, as the epoch loop reads them from a memory-mapped one. The epoch time
of a method is its step time times the steps per epoch, so the ratio to the baseline step is the
epoch ratio (data decoding is the same for every method and is left out).

Targets (issue 13): rrr <= 3x the baseline, saliency_guided and abn <= 2.5x, reldrop with stored
maps <= 1.5x. Writes bench/results/methods.json atomically and prints a table.

    python bench/bench_methods.py [--models lenet5] [--shapes 1x28x28,3x32x32] [--batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from teachx.data.base import ImageDataset, Split
from teachx.config.schema import MethodConfig, RunConfig
from teachx.training.methods import MethodContext, build_method
from teachx.training.trainer import DataPlan, make_optimizer
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

#: (label, method.name, method.options, impactx.lam)
CASES = [
    ("baseline", "baseline", {}, None),
    ("rrr (annotation masks)", "rrr", {}, None),
    ("rrr (teacher masks)", "rrr", {"mask": "teacher"}, None),
    ("saliency_guided", "saliency_guided", {}, None),
    ("abn", "abn", {}, None),
    ("reldrop (stored maps)", "reldrop", {"relevance": "teacher"}, None),
    ("reldrop (LRP every step)", "reldrop", {}, None),
    ("impactx (paper decoder)", "impactx", {}, 1.0),
]
TARGETS = {
    "rrr (annotation masks)": 3.0,
    "rrr (teacher masks)": 3.0,
    "saliency_guided": 2.5,
    "abn": 2.5,
    "reldrop (stored maps)": 1.5,
}


class _MemoryStore:
    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def read(self, idx):
        return self.maps[torch.as_tensor(np.asarray(idx))]

    def mean_map(self, idx):
        return self.read(idx).mean(0)


def _dataset(n: int, c: int, h: int, w: int) -> ImageDataset:
    rng = np.random.default_rng(0)

    def split(m):
        masks = np.zeros((m, h, w), dtype=np.uint8)
        masks[:, :4, :4] = 1
        return Split(rng.integers(0, 256, (m, h, w, c), dtype=np.uint8), rng.integers(0, 10, m), masks)

    return ImageDataset("bench", [str(i) for i in range(10)], split(n), split(8), (0.5,) * c, (0.25,) * c)


def make_step(backbone: str, shape: tuple[int, int, int], batch: int, method: str, options: dict, lam):
    """One optimiser step of the method on a fixed random batch, built as `teachx run` builds it."""
    c, h, w = shape
    ds = _dataset(batch, c, h, w)
    plan = DataPlan(ds, np.arange(batch), np.arange(0))
    cfg = RunConfig()
    cfg.model.backbone = backbone
    cfg.method = MethodConfig(method, options)
    if lam is not None:
        cfg.method.options = {**cfg.method.options, "lam": lam}  # IMPACTX's lambda
    m = build_method(cfg)
    store = _MemoryStore(torch.randn(batch, 1, h, w))
    ctx = MethodContext(cfg, plan, torch.device("cpu"), store, None, lambda s: None)
    torch.manual_seed(0)
    model = m.build_model(ctx).train()
    task = m.task(model, ctx)
    opt = make_optimizer(cfg.train, task.parameters())
    idx = torch.arange(batch)
    x = (torch.from_numpy(ds.train.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    y = torch.from_numpy(ds.train.labels).long()

    def step():
        maps = task.maps_for(idx)
        loss, _, _ = task.loss(x, y, maps.float() if maps is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_rounds(steps_by_case: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every case, measured in rounds: each round times every case once, in
    turn, so that a change of machine speed during the benchmark hits all cases alike (ratios are
    taken within a round)."""
    for step in steps_by_case.values():
        for _ in range(3):
            step()
    out: dict[str, list[float]] = {k: [] for k in steps_by_case}
    for _ in range(repeats):
        for label, step in steps_by_case.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            out[label].append((time.perf_counter() - t0) / steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5")
    ap.add_argument("--shapes", default="1x28x28,3x32x32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods.json"))
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    rows = []
    for backbone in args.models.split(","):
        for shape_text in args.shapes.split(","):
            shape = tuple(int(v) for v in shape_text.split("x"))
            cases = {
                label: make_step(backbone, shape, args.batch, method, options, lam)
                for label, method, options, lam in CASES
            }
            times = time_rounds(cases, args.steps, args.repeats)
            base = times["baseline"]
            for label in cases:
                sec = statistics.median(times[label])
                ratio = statistics.median(t / b for t, b in zip(times[label], base))  # within each round
                target = TARGETS.get(label)
                rows.append(
                    {
                        "backbone": backbone,
                        "input": shape_text,
                        "method": label,
                        "step_ms": sec * 1e3,
                        "ratio_to_baseline": ratio,
                        "ratio_per_round": [t / b for t, b in zip(times[label], base)],
                        "target": target,
                        "meets_target": (ratio <= target) if target else None,
                    }
                )
                print(
                    f"{backbone:<10} {shape_text:<8} {label:<26} {sec * 1e3:8.1f} ms  {ratio:5.2f}x"
                    + (f"  (target <= {target}x: {'met' if ratio <= target else 'MISSED'})" if target else ""),
                    flush=True,
                )
    write_json_atomic(
        args.out,
        {
            "what": "median training-step time (loss + backward + Adam step) per method; ratio = median over rounds of (method / baseline in the same round)",
            "batch": args.batch,
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
