"""Benchmark: IMPACTX training and inference costs against the baseline, side by side in one process.

Measures, at batch 64 on 32x32x3 inputs (medians of --repeats):
- training step time: baseline vs IMPACTX (lambda=1, maps read from a memory-mapped store) vs IMPACTX
  with lambda=0 (no explanation loss) -> the epoch ratio target (<= 2.5x baseline);
- where the IMPACTX step's time goes: M, LEP, decoder + map loss and classifier + CE each timed
  forward+backward alone, plus the optimizer step (their sum is reported next to the whole step), and
  each part's multiply-adds per image;
- map reading: the same IMPACTX step with maps from the store vs maps already in memory (target <= 5%);
- inference: built-in maps (one forward) vs the baseline forward (target <= 2.5x) and vs post-hoc
  shap.DeepExplainer with a background of 100 on the same model (target >= 100x).
- with ``--decoders paper,unet,unet_input,additive,lite@16`` (``impactx.decoder``, ``@W`` its
  ``impactx.decoder_width``, default 32; ``--per-class``,
  ``--map-loss``, ``--faith-weight`` and ``--reads-m`` as the config options of the same names): for each decoder,
  the built-in maps' forward vs the baseline forward and the IMPACTX training step vs the baseline
  step, side by side at batch 64, and the decoder's multiply-adds per image (``decoders`` in the JSON).
Writes bench/results/impactx.json atomically and prints a table.

    python bench/bench_impactx.py [--models lenet5,mobilenet] [--repeats 5] [--threads N] [--posthoc-models lenet5,mobilenet]
    python bench/bench_impactx.py --models lenet5 --decoders unet_input,lite@16,lite_additive@16 --per-class --map-loss pearson --out bench/results/impactx_decoders_per_class.json
    python bench/bench_impactx.py --models lenet5 --decoders paper,unet,unet_input,additive [--per-class] [--map-loss pearson] [--faith-weight 0.1] --out bench/results/impactx_decoders.json
    python bench/bench_impactx.py --models lenet5 --decoders unet_input,unet_input@64 --per-class --map-loss pearson --reads-m --threads 2 --out bench/results/impactx_decoders_reads_m.json
    python bench/bench_impactx.py --models lenet5 --decoders unet_input@64,unet_input@16,additive@16,additive_fast@16,unet@16,lite@16 --per-class --map-loss pearson --reads-m --self-teach-every 1 --threads 1 --repeats 30 --clock cpu --out bench/results/impactx_faithful_default.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from teachx.models import build_model
from teachx.models.impactx import build_impactx
from teachx.teachers import build as build_teacher
from teachx.teachers.postprocess import postprocess
from teachx.teachers.store import fill_store, open_store
from teachx.training.impactx import ImpactxTask, MapSource
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

B, SIZE, C, K = 64, 32, 3, 10
#: the clock of ``timed``: wall time, or with ``--clock cpu`` this process's CPU time (on a shared machine a
#: process waiting for a core is not charged for it; with one thread it is the work each step does)
CLOCK = time.perf_counter


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def macs_per_image(module: torch.nn.Module, inp: torch.Tensor) -> int:
    """Multiply-adds of the Conv/Linear layers for one input (forward hooks; the rest is cheap)."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features
        else:  # ConvNd: each output element needs (in/groups) * kernel multiply-adds
            total += out[0].numel() * (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            module(inp[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def bench_model(name: str, repeats: int, steps: int, store_dir: Path, posthoc: bool = True) -> dict:
    torch.manual_seed(0)
    n = B * steps
    x_all = torch.randn(n, C, SIZE, SIZE)
    y_all = torch.randint(0, K, (n,))
    store = open_store(store_dir, {"bench": name}, n, (1, SIZE, SIZE), log=lambda s: None)
    fill_store(store, np.arange(n), lambda i: torch.randn(len(i), 1, SIZE, SIZE), 4096, progress=False)
    in_memory = store.read(np.arange(n))

    base = build_model(name, C, K, SIZE)
    opt_b = torch.optim.Adam(base.parameters(), 1e-3)
    imp = build_impactx(name, C, K, (SIZE, SIZE), decoder="paper")
    opt_i = torch.optim.Adam([p for p in imp.parameters() if p.requires_grad], 1e-3)
    source = MapSource(store, "teacher", np.arange(n), 0)
    task = ImpactxTask(imp, source, 1.0)
    task0 = ImpactxTask(imp, None, 0.0)

    def epoch_baseline():
        base.train()
        for s in range(steps):
            sl = slice(s * B, (s + 1) * B)
            opt_b.zero_grad(set_to_none=True)
            F.cross_entropy(base(x_all[sl]), y_all[sl]).backward()
            opt_b.step()

    def epoch_impactx(t, from_store: bool):
        imp.train()
        for s in range(steps):
            idx = torch.arange(s * B, (s + 1) * B)
            maps = (t.maps_for(idx) if from_store else in_memory[idx]) if t.lam > 0 else None
            opt_i.zero_grad(set_to_none=True)
            loss, _, _ = t.loss(x_all[idx], y_all[idx], maps)
            loss.backward()
            opt_i.step()

    t_base = timed(epoch_baseline, repeats)
    t_imp = timed(lambda: epoch_impactx(task, True), repeats)
    t_imp_mem = timed(lambda: epoch_impactx(task, False), repeats)
    t_imp0 = timed(lambda: epoch_impactx(task0, True), repeats)
    t_read = timed(lambda: [source(torch.arange(s * B, (s + 1) * B)) for s in range(steps)], repeats)

    # where the IMPACTX step goes: each component's forward+backward timed alone in training mode (a
    # uniform upstream gradient stands in for the rest of the graph), plus the optimizer step; their
    # sum is reported next to the whole step, and the forwards alone are kept for the inference figures
    xb, yb = x_all[:B], y_all[:B]
    maps_b = in_memory[:B]
    imp.train()
    with torch.no_grad():
        m_feat = imp.m.features(xb)
        z = imp.lep.features(xb)

    def fwd_bwd(fn, inp):
        def run():
            out = fn(inp)
            out.backward(torch.ones_like(out) / out.numel())

        return run

    def decoder_loss(zz):
        return F.mse_loss(imp.decoder(zz), maps_b)

    def head_loss(feats):
        return F.cross_entropy(imp.classifier(feats), yb)

    z_leaf = z.clone().requires_grad_(True)
    feats_leaf = torch.cat([m_feat, z], 1).requires_grad_(True)

    def whole_step():
        opt_i.zero_grad(set_to_none=True)
        loss, _, _ = task.loss(xb, yb, maps_b)
        loss.backward()
        opt_i.step()

    def optimizer_step():
        opt_i.step()

    step_parts = {
        "M forward+backward": timed(fwd_bwd(imp.m.features, xb), repeats),
        "LEP forward+backward": timed(fwd_bwd(imp.lep.features, xb), repeats),
        "decoder + map MSE forward+backward": timed(fwd_bwd(decoder_loss, z_leaf), repeats),
        "classifier + CE forward+backward": timed(fwd_bwd(head_loss, feats_leaf), repeats),
        "optimizer step": timed(optimizer_step, repeats),
    }
    t_step = timed(whole_step, repeats)
    opt_b.zero_grad(set_to_none=True)
    t_base_step = timed(
        lambda: (opt_b.zero_grad(set_to_none=True), F.cross_entropy(base(xb), yb).backward(), opt_b.step()), repeats
    )
    imp.eval()
    with torch.no_grad():
        parts = {
            "M forward": timed(lambda: imp.m.features(xb), repeats),
            "LEP forward": timed(lambda: imp.lep.features(xb), repeats),
            "decoder forward": timed(lambda: imp.decoder(z), repeats),
            "classifier forward": timed(lambda: imp.classifier(torch.cat([m_feat, z], 1)), repeats),
        }

    # inference: built-in maps vs baseline forward vs post-hoc DeepExplainer (background 100)
    base.eval()
    with torch.no_grad():
        t_fwd = timed(lambda: base(xb), repeats)
        t_builtin = timed(lambda: imp.forward_all(xb), repeats)
    shap_ips = None
    shap_error = "skipped (not in --posthoc-models)"
    if posthoc:
        try:
            import shap
            from shap.explainers._deep import deep_pytorch as dp

            dp.op_handler.setdefault("SiLU", dp.nonlinear_1d)  # EfficientNet's activation (ReLU6 left as measured)
            bg = x_all[:100]
            exp = shap.DeepExplainer(_posthoc_target(imp), bg)
            xs = xb[:8]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_shap = timed(
                    lambda: exp.shap_values(xs, ranked_outputs=1, check_additivity=False),
                    max(1, repeats // 2),
                    warmup=1,
                )
            shap_ips = len(xs) / t_shap
        except Exception as exc:  # shap absent or failing: say so in the results
            shap_error = f"{type(exc).__name__}: {exc}"
    builtin_ips = B / t_builtin
    out = {
        "model": name,
        "batch": B,
        "steps_per_epoch": steps,
        "baseline_epoch_s": t_base,
        "impactx_epoch_s": t_imp,
        "impactx_epoch_in_memory_maps_s": t_imp_mem,
        "impactx_lambda0_epoch_s": t_imp0,
        "map_read_s": t_read,
        "ratio_impactx_to_baseline": t_imp / t_base,
        "ratio_impactx_lambda0_to_baseline": t_imp0 / t_base,
        # direct cost of the reads (timed alone) relative to an epoch; the A/B epoch difference is
        # reported too but is dominated by run-to-run noise when the reads cost well under 1%
        "map_reading_overhead": t_read / t_imp_mem,
        "map_reading_ab_difference": t_imp / t_imp_mem - 1.0,
        "forward_parts_s": parts,
        "step_parts_s": step_parts,
        "macs_per_image": {
            "baseline": macs_per_image(base, xb),
            "M": macs_per_image(_Features(imp.m), xb),
            "LEP": macs_per_image(_Features(imp.lep), xb),
            "decoder": macs_per_image(imp.decoder, z),
        },
        "step_s": t_step,
        "baseline_step_s": t_base_step,
        "baseline_forward_s": t_fwd,
        "builtin_maps_forward_s": t_builtin,
        "ratio_builtin_maps_to_forward": t_builtin / t_fwd,
        "builtin_maps_img_per_s": builtin_ips,
        "posthoc_deepexplainer_img_per_s": shap_ips,
        "speedup_builtin_vs_deepexplainer": (builtin_ips / shap_ips) if shap_ips else None,
    }
    if shap_ips is None:
        out["deepexplainer_error"] = shap_error
    return out


def bench_decoders(
    name: str,
    decoders: list[str],
    repeats: int,
    per_class: bool = False,
    map_loss: str = "mse",
    faith_weight: float = 0.0,
    reads_m: bool = False,
    self_teach_every: int = 0,
    self_teach_method: str = "gradient_x_input",
) -> list[dict]:
    """Per decoder: built-in maps (one forward) / baseline forward, IMPACTX step / baseline step, MACs; with
    ``self_teach_every``, also the step with self-teaching's refreshes amortised over it."""
    torch.manual_seed(0)
    xb, yb = torch.randn(B, C, SIZE, SIZE), torch.randint(0, K, (B,))
    maps_b = torch.randn(B, 1, SIZE, SIZE)
    base = build_model(name, C, K, SIZE)
    opt_b = torch.optim.Adam(base.parameters(), 1e-3)

    def base_step():
        base.train()
        opt_b.zero_grad(set_to_none=True)
        F.cross_entropy(base(xb), yb).backward()
        opt_b.step()

    base.eval()
    with torch.no_grad():
        t_fwd = timed(lambda: base(xb), repeats)
    t_base_step = timed(base_step, repeats)
    rows = []
    from teachx.models.decoders import DECODERS

    for item in decoders:
        decoder, _, width = item.partition("@")  # "lite@16": impactx.decoder_width 16 (default 32, the config's)
        width = int(width or 32)
        if per_class and not DECODERS.get(decoder).supports_per_class:
            print(f"{name}: decoder {decoder} makes one map only; skipped with --per-class")
            continue
        torch.manual_seed(0)
        imp = build_impactx(
            name, C, K, (SIZE, SIZE), decoder=decoder, per_class=per_class, decoder_width=width, decoder_reads_m=reads_m
        )
        opt_i = torch.optim.Adam([p for p in imp.parameters() if p.requires_grad], 1e-3)

        class _Source:  # in-memory maps; the explained class is the label
            def __call__(self, idx):
                return maps_b[idx]

            def classes_for(self, idx):
                return yb[idx]

        task = ImpactxTask(imp, _Source(), 1.0, map_loss=map_loss, faith_weight=faith_weight)
        idx = torch.arange(B)

        def imp_step():
            imp.train()
            opt_i.zero_grad(set_to_none=True)
            loss, _, _ = task.loss(xb, yb, task.maps_for(idx))
            loss.backward()
            opt_i.step()

        t_step = timed(imp_step, repeats)
        t_refresh = None
        if self_teach_every:  # one refresh batch: the self-teaching method's maps of B training images
            teacher = build_teacher(self_teach_method)

            def refresh():
                imp.eval()
                postprocess(teacher.attribute(imp, xb, yb), reduce="sum", normalize="maxabs", smooth=0.0)

            t_refresh = timed(refresh, repeats)
        imp.eval()
        with torch.no_grad():
            t_builtin = timed(lambda: imp.forward_all(xb), repeats)
        macs_builtin = macs_per_image(_BuiltInPath(imp), xb)
        macs_branches = macs_per_image(_Features(imp.lep), xb) + (
            macs_per_image(_Features(imp.m), xb) if reads_m else 0
        )  # the branches the map path runs
        rows.append(
            {
                "model": name,
                "decoder": decoder,
                "decoder_width": width,
                "per_class": per_class,
                "map_loss": map_loss,
                "faith_weight": faith_weight,
                "decoder_reads_m": reads_m,
                "batch": B,
                "baseline_forward_s": t_fwd,
                "builtin_maps_forward_s": t_builtin,
                "ratio_builtin_maps_to_forward": t_builtin / t_fwd,
                "baseline_step_s": t_base_step,
                "impactx_step_s": t_step,
                "ratio_impactx_step_to_baseline": t_step / t_base_step,
                "self_teach_every": self_teach_every,
                "self_teach_method": self_teach_method if self_teach_every else None,
                "refresh_batch_s": t_refresh,
                # a refresh re-explains every training image once every K epochs: one refresh batch per K steps
                "ratio_impactx_step_with_refresh_to_baseline": (t_step + t_refresh / self_teach_every) / t_base_step
                if t_refresh is not None
                else None,
                "macs_per_image": {"baseline": macs_per_image(base, xb), "decoder": macs_builtin - macs_branches},
                "decoder_parameters": sum(p.numel() for p in imp.decoder.parameters()),
            }
        )
    return rows


class _BuiltInPath(torch.nn.Module):
    """LEP + decoder (the built-in map path without M and C), for the MAC count."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.all_maps(x)


class _Features(torch.nn.Module):
    """A backbone's feature extractor as a module (for the MAC count)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.features(x)


class _posthoc_target(torch.nn.Module):
    """The IMPACTX classifier as a plain logits model, for post-hoc SHAP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,mobilenet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or the process's CPU time (steadier on a shared machine; use with --threads 1)",
    )
    ap.add_argument(
        "--posthoc-models",
        default="lenet5,mobilenet",
        help="models also timed with post-hoc shap.DeepExplainer (minutes per image on large nets)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "impactx.json"))
    ap.add_argument(
        "--decoders",
        default=None,
        help="time these map decoders (impactx.decoder) against the baseline instead of the default benchmark",
    )
    ap.add_argument("--per-class", action="store_true", help="with --decoders: one map per class (impactx.per_class)")
    ap.add_argument("--map-loss", default="mse", help="with --decoders: impactx.map_loss of the timed step")
    ap.add_argument(
        "--faith-weight", type=float, default=0.0, help="with --decoders: impactx.faith_weight of the timed step"
    )
    ap.add_argument(
        "--self-teach-every",
        type=int,
        default=0,
        help="with --decoders: also time a self-teaching refresh (impactx.self_teach_method's maps of one batch), "
        "amortised over K epochs (impactx.self_teach_every)",
    )
    ap.add_argument("--self-teach-method", default="gradient_x_input", help="with --self-teach-every: the method")
    ap.add_argument(
        "--reads-m",
        action="store_true",
        help="with --decoders: the decoder also reads M's pyramid (impactx.decoder_reads_m)",
    )
    args = ap.parse_args()
    for item in (args.decoders or "").split(","):
        width = item.partition("@")[2]
        if width and not (width.isdigit() and int(width) > 0):
            ap.error(f"--decoders: '{item}': the width after @ must be a positive integer, e.g. lite@16")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    malloc_tuned = tune_cpu_allocator()  # as the CLI, Trainer and map stores do: the speed users get
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decoders:
        rows = []
        for name in args.models.split(","):
            rows += bench_decoders(
                name,
                args.decoders.split(","),
                args.repeats,
                args.per_class,
                args.map_loss,
                args.faith_weight,
                args.reads_m,
                args.self_teach_every,
                args.self_teach_method,
            )
        for r in rows:
            print(
                f"{r['model']:10s} {r['decoder'] + '@' + str(r['decoder_width']):16s} built-in maps {r['ratio_builtin_maps_to_forward']:.2f}x forward | "
                f"step {r['ratio_impactx_step_to_baseline']:.2f}x baseline | decoder MACs "
                f"{r['macs_per_image']['decoder'] / r['macs_per_image']['baseline']:.2f}x the baseline model's"
                + (
                    f" | step with self-teaching refreshes {r['ratio_impactx_step_with_refresh_to_baseline']:.2f}x"
                    if r["self_teach_every"]
                    else ""
                )
            )
        write_json_atomic(
            args.out,
            {
                "benchmark": "impactx_decoders",
                "threads": torch.get_num_threads(),
                "clock": args.clock,
                "torch": torch.__version__,
                "malloc_tuned": malloc_tuned,
                "decoders": rows,
            },
        )
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            steps = args.steps if name == "lenet5" else max(2, args.steps // 10)
            r = bench_model(name, args.repeats, steps, Path(tmp) / name, posthoc=name in args.posthoc_models.split(","))
            results.append(r)
            print(
                f"{name:10s} epoch impactx/baseline {r['ratio_impactx_to_baseline']:.2f}x (lambda0 {r['ratio_impactx_lambda0_to_baseline']:.2f}x) | "
                f"map reading +{100 * r['map_reading_overhead']:.1f}% | built-in maps {r['ratio_builtin_maps_to_forward']:.2f}x forward, "
                f"{r['speedup_builtin_vs_deepexplainer'] or float('nan'):.0f}x DeepExplainer"
            )
    write_json_atomic(
        args.out,
        {
            "benchmark": "impactx",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "malloc_tuned": malloc_tuned,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
