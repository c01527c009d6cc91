"""Benchmark: what the ClArC corrections cost -- P-ClArC (and R-ClArC) hooks against a plain forward pass,
and an RR-ClArC / A-ClArC training step against the baseline's step.

Everything on LeNet-5, one process, the same random batch for every variant. Forward passes are in eval
mode without gradients (as a corrected model is deployed); a training step is loss, backward and the
optimiser step, with the method's model and task built exactly as a run builds them (from a baseline and
a concept file at the second conv block). Timings are taken in rounds that each time every variant in turn
(after a warm-up), in a random order per round; ratios are taken within each round and their median reported, so a drift of the
machine's speed does not favour one variant.

The P-ClArC projection is also timed alone on the layer's activations (``p_clarc_transform_share``): on a
busy machine the A/B difference of two forwards is noisier than the cost it measures.

Targets: the P-ClArC hook costs <= 5% of a forward pass; an RR-ClArC step <= 2x a baseline step.
Writes bench/results/clarc.json atomically and prints a table.

    python bench/bench_clarc.py [--batch 64] [--threads 1] [--shape 3x32x32]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench_methods import _dataset
from teachx.config.schema import MethodConfig, RunConfig
from teachx.models import build_model
from teachx.training.clarc import Capture, ClarcHook, attach, pooled
from teachx.training.concepts import concept_from_activations, model_digest, save_concept
from teachx.training.methods import MethodContext, build_method
from teachx.training.trainer import make_optimizer
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

MODES = {"p_clarc": "project", "r_clarc": "reactive"}
LAYER = "body.5"  # LeNet-5's second conv block (16 channels), where the concept is
FORWARD_TARGET = 0.05
STEP_TARGET = 2.0
#: (label, method.name, method.options): the training steps compared with the baseline's
STEPS = [
    ("baseline", "baseline", {}),
    ("rrclarc (freeze=none)", "rrclarc", {"freeze": "none"}),
    ("rrclarc (freeze=features)", "rrclarc", {}),
    ("aclarc (freeze=none)", "aclarc", {"freeze": "none"}),
]


def time_rounds(cases: dict, calls: int, repeats: int, around: Optional[dict] = None) -> dict[str, list[float]]:
    """Seconds per call of every case, in rounds that time every case once, in an order drawn afresh for
    every round, so that the position in a round (which matters on a busy machine) favours none.
    ``around[label]``: a context entered before that case's timed calls and left after them (untimed)."""
    around = around or {}
    for label, run in cases.items():
        with around.get(label, contextlib.nullcontext)():
            for _ in range(3):
                run()
    out: dict[str, list[float]] = {k: [] for k in cases}
    order = random.Random(0)
    for _ in range(repeats):
        for label in order.sample(list(cases), len(cases)):
            with around.get(label, contextlib.nullcontext)():
                cases[label]()  # untimed: what entering the context touched (a digest of the weights) is not timed
                t0 = time.perf_counter()
                for _ in range(calls):
                    cases[label]()
                out[label].append((time.perf_counter() - t0) / calls)
    return out


def _batch(shape: tuple[int, int, int], batch: int):
    c, h, w = shape
    ds = _dataset(batch, c, h, w)
    x = (torch.from_numpy(ds.train.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    return ds, x, torch.from_numpy(ds.train.labels).long()


def forward_cases(shape, batch: int, folder: Path):
    """(cases, hooks around them, concept path, baseline): no-grad forwards of the baseline, plain, with
    P-ClArC and with R-ClArC, and the projection alone."""
    ds, x, _ = _batch(shape, batch)
    torch.manual_seed(0)
    model = build_model("lenet5", shape[0], 10, shape[1:]).eval()
    with torch.no_grad(), Capture(dict(model.named_modules())[LAYER]) as cap:
        model(x)
    flags = np.arange(batch) % 2 == 0
    concept = concept_from_activations("bench", LAYER, pooled(cap.out), flags, model_digest(model))
    path = save_concept(concept, folder / "bench", overwrite=True)

    def forward():
        with torch.no_grad():
            model(x)

    acts = cap.out
    with ClarcHook(dict(model.named_modules())[LAYER], concept, "project") as hook:
        pass  # off the model again: only its transform is timed below

    def transform_alone():  # the projection itself on the layer's activations, without the forward around it
        with torch.no_grad():
            hook.transform(acts)

    # the same model with the hook attached (checking the digest) before its timed calls and removed after them
    cases = {"forward": forward, "p_clarc": forward, "r_clarc": forward, "transform": transform_alone}
    around = {mode: (lambda mode=mode: attach(model, concept, MODES[mode])) for mode in MODES}
    return cases, around, path, model


def step_cases(shape, batch: int, concept_path: Path, baseline: torch.nn.Module):
    """One optimiser step per method, built as a run builds it."""
    ds, x, y = _batch(shape, batch)
    from teachx.training.trainer import DataPlan

    plan = DataPlan(ds, np.arange(batch), np.arange(0))
    cases = {}
    for label, method, options in STEPS:
        cfg = RunConfig()
        cfg.model.backbone = "lenet5"
        opts = dict(options, concept=str(concept_path)) if method != "baseline" else {}
        cfg.method = MethodConfig(method, opts)
        m = build_method(cfg)
        ctx = MethodContext(cfg, plan, torch.device("cpu"), log=lambda s: None, baseline_model=lambda: baseline)
        torch.manual_seed(0)
        model = m.build_model(ctx).train()
        if method == "baseline":
            model.load_state_dict(baseline.state_dict())
        task = m.task(model, ctx)
        opt = make_optimizer(cfg.train, task.parameters())

        def step(task=task, opt=opt):
            loss, _, _ = task.loss(x, y, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        cases[label] = step
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3x32x32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "clarc.json"))
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        fwd, around, path, baseline = forward_cases(shape, args.batch, Path(tmp))
        # short rounds, many of them: a busy machine's speed changes within seconds
        fwd_times = time_rounds(fwd, 3, args.repeats * 20, around)
        step_times = time_rounds(step_cases(shape, args.batch, path, baseline), args.steps, args.repeats)
    base_f, base_s = fwd_times["forward"], step_times["baseline"]
    forward_rows = []
    transform_share = statistics.median(t / b for t, b in zip(fwd_times.pop("transform"), base_f))
    print(f"P-ClArC transform alone: {100 * transform_share:.1f}% of a forward pass", flush=True)
    for label, times in fwd_times.items():
        overhead = statistics.median(t / b - 1.0 for t, b in zip(times, base_f))
        target = FORWARD_TARGET if label == "p_clarc" else None
        forward_rows.append(
            {
                "variant": label,
                "forward_ms": 1e3 * statistics.median(times),
                "overhead_share": overhead,
                "target": target,
                "meets_target": (overhead <= target) if target is not None else None,
            }
        )
        print(
            f"forward {label:<10} {1e3 * statistics.median(times):7.3f} ms  overhead {100 * overhead:+5.1f}%"
            + (f"  (target <= {100 * target:.0f}%: {'met' if overhead <= target else 'MISSED'})" if target else ""),
            flush=True,
        )
    step_rows = []
    for label, times in step_times.items():
        ratio = statistics.median(t / b for t, b in zip(times, base_s))
        target = STEP_TARGET if label.startswith("rrclarc") else None
        step_rows.append(
            {
                "method": label,
                "step_ms": 1e3 * statistics.median(times),
                "ratio_to_baseline": ratio,
                "target": target,
                "meets_target": (ratio <= target) if target is not None else None,
            }
        )
        print(
            f"step    {label:<26} {1e3 * statistics.median(times):7.2f} ms  {ratio:5.2f}x"
            + (f"  (target <= {target}x: {'met' if ratio <= target else 'MISSED'})" if target else ""),
            flush=True,
        )
    write_json_atomic(
        args.out,
        {
            "what": "P-/R-ClArC hook overhead as a share of a no-grad forward pass, and RR-/A-ClArC training steps "
            "(loss + backward + optimiser step) against the baseline's; medians over rounds of ratios taken within a round",
            "model": "lenet5",
            "layer": LAYER,
            "input": args.shape,
            "batch": args.batch,
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "forward": forward_rows,
            "p_clarc_transform_share": transform_share,
            "steps_vs_baseline": step_rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
