"""Pixel-flipping throughput: teachx's batched MoRF vs real Quantus (where it loads) and a
Quantus-style per-sample loop, over 1,000 32x32x3 images on a LeNet-5-like model, in one process.

Quantus is loaded by tests/_quantus.py (the same shims as the tests: a stub for cv2/torchvision
where they do not import, np.trapz aliased during use). Its features are the C*H*W elements and
its step must divide H*W, so our 16 pixel steps are every 3rd point of its 48-point curve
(features_in_step = H*W/16): both curves are checked point for point (max |difference|). The
per-sample loop is the fallback reference when Quantus is not installed. Writes
bench/results/metrics.json atomically.

    python bench/bench_metrics.py [--images 1000] [--steps 16] [--reference-images 100] [--threads 1] [--note TEXT]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from teachx.evaluation import FaithfulnessCorrelation, PixelFlippingMoRF
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"
QUANTUS_LOADER = Path(__file__).resolve().parent.parent / "tests" / "_quantus.py"


def quantus_loader():
    """tests/_quantus.py, imported by path (one loader for tests and bench)."""
    spec = importlib.util.spec_from_file_location("_teachx_quantus_loader", QUANTUS_LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lenet5(channels: int = 3, classes: int = 10, size: int = 32) -> tuple[nn.Module, str]:
    """teachx's registered LeNet-5 when the models package provides it, else a local copy."""
    try:
        from teachx.models import build_model  # type: ignore[attr-defined]

        return build_model("lenet5", channels, classes, size), "teachx.models.build_model('lenet5')"
    except Exception:  # the models package may not be there yet
        pass
    side = ((size - 4) // 2 - 4) // 2
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, classes),
    )
    return model, "local LeNet-5 (teachx.models.build_model unavailable)"


def per_sample_reference(model, x, y, maps, steps):
    """Quantus-style PixelFlipping: numpy, one image at a time, features flipped cumulatively,
    one forward per step (plus the unperturbed point), softmax of the target class."""
    curves = np.empty((x.shape[0], steps + 1))
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i].cpu().numpy().copy()
            rel = maps[i].cpu().numpy().sum(0).ravel()
            order = np.argsort(-rel, kind="stable")
            width = xi.shape[2]
            current = xi.copy()
            pred = lambda img: torch.softmax(model(torch.from_numpy(img)[None]), 1)[0, int(y[i])].item()  # noqa: E731
            curves[i, 0] = pred(current)
            done = 0
            for k in range(1, steps + 1):
                upto = rel.size * k // steps
                rows, cols = np.divmod(order[done:upto], width)
                current[:, rows, cols] = 0.0
                done = upto
                curves[i, k] = pred(current)
    return curves


def quantus_pixel_flipping(quantus, pixels: int, steps: int):
    """Quantus's PixelFlipping in the setting compared with ours: zero baseline, raw maps, H*W/steps per step."""
    return quantus.PixelFlipping(
        features_in_step=pixels // steps, perturb_baseline=0.0, normalise=False, disable_warnings=True
    )


def quantus_throughput(model, x, y, maps, steps, ours_curves):
    """Quantus PixelFlipping (zero baseline, softmax) on the same images; curves checked against ours."""
    try:
        loader = quantus_loader()
        quantus = loader.load_quantus()
    except Exception as error:  # ImportError with the reason
        return {"available": False, "reason": f"quantus unavailable: {type(error).__name__}: {str(error)[:200]}"}
    channels, pixels = x.shape[1], x.shape[2] * x.shape[3]
    metric = quantus_pixel_flipping(quantus, pixels, steps)
    call = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=True)
    metric(**{**call, "x_batch": x[:8].numpy(), "y_batch": y[:8].numpy(), "a_batch": maps[:8].numpy()})  # warm-up
    start = time.perf_counter()
    with loader.numpy_compat():
        curves = np.asarray(metric(**call))
    seconds = time.perf_counter() - start
    aligned = curves[:, channels - 1 :: channels]  # after whole pixels: our points 1..steps
    return {
        "available": True,
        "version": quantus.__version__,
        "shims": list(loader.applied_shims()) + ["np.trapz alias (numpy_compat)"],
        "features_in_step": pixels // steps,
        "forward_passes_per_image": int(curves.shape[1]),
        "seconds": seconds,
        "images_per_s": x.shape[0] / seconds,
        "max_abs_curve_difference": float(np.abs(ours_curves[:, 1:] - aligned).max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reference-images", type=int, default=100, help="images for the slow per-sample loop")
    parser.add_argument("--batch-size", type=int, default=256, help="perturbed images per forward pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default=None, help="free text stored in the JSON (e.g. machine load)")
    args = parser.parse_args(argv)
    malloc_tuned = tune_cpu_allocator()  # as the CLI, Trainer and map stores do: the speed users get

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, model_source = lenet5()
    model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((args.images, 3, 32, 32), generator=generator)
    y = torch.randint(0, 10, (args.images,), generator=generator)
    maps = torch.rand((args.images, 1, 32, 32), generator=generator)

    metric = PixelFlippingMoRF(steps=args.steps, baseline="zero", output="probability", batch_size=args.batch_size)
    model_d, x_d, y_d, maps_d = model.to(device), x.to(device), y.to(device), maps.to(device)
    metric(model_d, x_d[:8], y_d[:8], maps_d[:8])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = metric(model_d, x_d, y_d, maps_d)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - start
    ours_ips = args.images / ours_s

    n_ref = min(args.reference_images, args.images)
    model_cpu = model.cpu()
    start = time.perf_counter()
    ref_curves = per_sample_reference(model_cpu, x[:n_ref], y[:n_ref], maps[:n_ref], args.steps)
    ref_s = time.perf_counter() - start
    ref_ips = n_ref / ref_s
    max_diff = float(np.abs(result.curves[:n_ref].cpu().numpy() - ref_curves).max())

    fc = FaithfulnessCorrelation(n_runs=20, subset_size=0.1, batch_size=args.batch_size)
    start = time.perf_counter()
    fc(model_d, x_d, y_d, maps_d)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fc_s = time.perf_counter() - start

    quantus = quantus_throughput(model_cpu, x, y, maps, args.steps, result.curves.cpu().numpy())
    baseline_ips = quantus["images_per_s"] if quantus.get("available") else ref_ips
    report = {
        "malloc_tuned": malloc_tuned,
        "benchmark": "pixel_flipping_morf throughput",
        "model": model_source,
        "images": args.images,
        "image_shape": [3, 32, 32],
        "steps": args.steps,
        "forward_passes_per_image": args.steps + 1,
        "device": str(device),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "teachx": {"seconds": ours_s, "images_per_s": ours_ips, "mean_auc": result.mean()},
        "per_sample_reference": {
            "images": n_ref,
            "seconds": ref_s,
            "images_per_s": ref_ips,
            "max_abs_curve_difference": max_diff,
        },
        "quantus": quantus,
        "speedup_vs": "quantus" if quantus.get("available") else "per_sample_reference",
        "speedup": ours_ips / baseline_ips,
        "target_speedup": 10.0,
        "faithfulness_correlation_20_runs": {"seconds": fc_s, "images_per_s": args.images / fc_s},
    }
    if quantus.get("available"):
        report["speedup_per_forward_pass"] = report["speedup"] * (args.steps + 1) / quantus["forward_passes_per_image"]
    if args.note:
        report["note"] = args.note
    write_json_atomic(args.out, report)
    if quantus.get("available"):
        print(
            f"teachx MoRF {ours_ips:,.0f} img/s, Quantus {quantus['version']} {quantus['images_per_s']:,.0f} img/s, "
            f"ratio {report['speedup']:.1f}x (target >= 10x); "
            f"max |curve diff| {quantus['max_abs_curve_difference']:.2e}",
            file=sys.stderr,
        )
    print(
        f"teachx MoRF: {ours_ips:,.0f} img/s; per-sample loop: {ref_ips:,.1f} img/s "
        f"(max |diff| {max_diff:.2e}); speedup {report['speedup']:.1f}x vs {report['speedup_vs']}; "
        f"faithfulness correlation (20 runs): {args.images / fc_s:,.0f} img/s; "
        f"{quantus.get('reason', '')} -> {args.out}",
        file=sys.stderr,
    )
    return report


if __name__ == "__main__":
    main()
