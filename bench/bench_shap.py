"""Benchmark: teachx DeepShap vs shap.DeepExplainer vs the cost bound, side by side.

The bound is the least work the exact computation needs: one forward of the B inputs, K background
forwards, and B*K plain input-gradient-only backwards of the unmodified model (only the backward is
timed for those; its graph is built untimed). All timings are medians of ``--repeats`` runs in one
process. Writes bench/results/shap.json atomically and prints a table.

    python bench/bench_shap.py [--models lenet5,mobilenet] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from teachx.teachers.shap import DeepShap
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator


def build(name: str, in_channels: int, num_classes: int, size: int) -> torch.nn.Module:
    try:
        from teachx.models import build_model
    except ImportError:  # the models registry may not be wired yet
        from teachx.models import lenet as _l, mobilenet as _m  # noqa: F401
        from teachx.models._common import MODELS

        return MODELS.get(name)(in_channels, num_classes, (size, size))
    return build_model(name, in_channels, num_classes, (size, size))


def warm_up_model(model: torch.nn.Module, size: int, steps: int = 3, seed: int = 0) -> torch.nn.Module:
    """A few SGD steps on random data so ReLUs are not degenerate; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, size, size, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # batch-norm statistics of the trained weights (else a deep net's eval output can be constant)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size, generator=g))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def time_it(fn, repeats: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def bound_time(model, x, bg, target, chunk_rows: int) -> float:
    """Forward of x + forward of bg + timed plain input-only backward over all B*K pairs."""
    total = 0.0
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
        model(bg)
        total += time.perf_counter() - t0
    nb, nk = x.shape[0], bg.shape[0]
    for start in range(0, nb, chunk_rows):
        rows = slice(start, min(start + chunk_rows, nb))
        n = rows.stop - rows.start
        pairs = bg.repeat(n, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            out = model(pairs)
            sel = out.gather(1, target[rows].repeat_interleave(nk).view(-1, 1)).sum()
            t0 = time.perf_counter()
            torch.autograd.grad(sel, pairs)
            total += time.perf_counter() - t0
    return total


def register_shap_handlers() -> None:
    """shap 0.51 has no DeepExplainer handler for ReLU6 (MobileNet) or SiLU (EfficientNet): give them
    the rescale rule teachx uses, so both sides compute the same values."""
    from shap.explainers._deep import deep_pytorch as dp

    dp.op_handler.setdefault("ReLU6", dp.nonlinear_1d)
    dp.op_handler.setdefault("SiLU", dp.nonlinear_1d)


def shap_values(model, x, bg, target):
    import shap

    register_shap_handlers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = shap.DeepExplainer(model, bg)
        sv, ranks = e.shap_values(x, ranked_outputs=1, check_additivity=False)
    return torch.from_numpy(np.asarray(sv)[..., 0]).float(), torch.as_tensor(ranks[:, 0]).long()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet5,mobilenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--background", type=int, default=50)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shap-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shap.json"))
    ap.add_argument("--merge", action="store_true", help="keep other models' entries already in --out")
    args = ap.parse_args()
    malloc_tuned = tune_cpu_allocator()  # as the CLI, Trainer and map stores do: the speed users get
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "background": args.background,
        "size": args.size,
        "torch": torch.__version__,
        "malloc_tuned": malloc_tuned,
        "models": {},
    }
    for name in args.models.split(","):
        model = warm_up_model(build(name, 3, 10, args.size), args.size)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        bg = torch.randn(args.background, 3, args.size, args.size, generator=g)
        with torch.no_grad():
            target = model(x).argmax(1)
        teacher = DeepShap(bg)
        teacher.attribute(model, x[:2], target[:2])  # warm-up (allocator, tracing)
        # the bound's chunking only bounds memory: take the fastest of a few chunk sizes (strictest bound)
        # (chosen on the first 16 inputs)
        rows = min((1, 4, 16), key=lambda r: bound_time(model, x[:16], bg, target[:16], r))
        # interleave ours and the bound so load from other processes hits both alike
        ours_all, bound_all = [], []
        for _ in range(args.repeats):
            t, _, ours = time_it(lambda: teacher.attribute(model, x, target), 1)
            ours_all.append(t)
            bound_all.append(time_it(lambda: bound_time(model, x, bg, target, rows), 1)[0])
        ours_t, bound_t = statistics.median(ours_all), statistics.median(bound_all)
        shap_t, shap_all, (ref, ranks) = time_it(lambda: shap_values(model, x, bg, target), args.shap_repeats)
        assert torch.equal(ranks, target)
        diff = (ours - ref).abs().max().item()
        scale = ref.abs().max().item()
        r = {
            "ours_img_s": args.batch / ours_t,
            "bound_img_s": args.batch / bound_t,
            "shap_img_s": args.batch / shap_t,
            "bound_rows_per_pass": rows,
            "ratio_to_bound": bound_t / ours_t,
            "speedup_vs_shap": shap_t / ours_t,
            "max_abs_diff": diff,
            "max_abs_value": scale,
            "rel_diff": diff / scale,
            "times_s": {"ours": ours_all, "bound": bound_all, "shap": shap_all},
        }
        results["models"][name] = r
        print(
            f"{name:10s} ours {r['ours_img_s']:8.1f} img/s | bound {r['bound_img_s']:8.1f} | shap "
            f"{r['shap_img_s']:7.1f} | ours/bound {r['ratio_to_bound']:.2f} | x shap {r['speedup_vs_shap']:.2f} "
            f"| max|diff| {diff:.2e} (rel {diff / scale:.1e})",
            flush=True,
        )
    if args.merge and Path(args.out).exists():
        import json

        old = json.loads(Path(args.out).read_text())
        results["models"] = {**old.get("models", {}), **results["models"]}
    write_json_atomic(args.out, results)
    print(f"threads={results['threads']}; wrote {args.out}")


if __name__ == "__main__":
    main()
