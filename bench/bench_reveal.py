"""Benchmark: `teachx reveal`'s work over N images, stage by stage, and what it implies for CIFAR-10's 45,000
training images (target: at most 5 minutes on this CPU, maps included).

The same functions `teachx reveal` runs, on CIFAR-10's real training images (the JPEG copy, --data, default
``../shared/data/cifar10-jpg.zip`` next to the repository; N of the 45,000 of its training split, all of them
at N = 45,000)
with a LeNet-5 trained on them for --epochs (1: a real model's maps and groups, not an untrained one's); where
that file is missing (or with --synthetic), on a seeded untrained LeNet-5 and seeded random 32x32x3 images of
--classes classes. The record says which (``images``, ``model``). Timed: the teacher's attribution maps (LRP
epsilon_plus_flat by default) and the pooled activations of the last feature maps for all N images, then per
class the reveal method (SpRAy: kNN graph, eigenvectors, eigengap, k-means, silhouette ranking) and its
figure, then one concept (pattern CAV, retrieval over all N, localisation of 500 images). The one part that
grows faster than linearly -- the per-class reveal -- is also timed at CIFAR-10's class size (4,500) on its
own, and the projection for 45,000 images adds 10 of those to the linear parts scaled to 45,000. Writes
``bench/results/reveal.json`` atomically.

    python bench/bench_reveal.py                 # N = 9000, 10 classes
    python bench/bench_reveal.py --n 45000 --out bench/results/reveal_45000.json   # the whole target, measured

Decoding the JPEGs (once; teachx's data cache keeps them) and training are timed apart from the reveal and not
counted in its total.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from teachx.models import build_model
from teachx.reveal import Evidence, build
from teachx.reveal.cav import fit_cav
from teachx.reveal.features import default_layer, find_module, layer_shapes, pooled_activations
from teachx.reveal.localise import concept_masks, reference_indices
from teachx.runs import figures
from teachx.teachers import build as build_teacher
from teachx.teachers.postprocess import postprocess
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator

RESULTS = Path(__file__).resolve().parent / "results" / "reveal.json"
CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"
CIFAR_TRAIN, CIFAR_CLASS = 45000, 4500


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)


def cifar10(path: Path, n: int, epochs: int, batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray, dict]:
    """LeNet-5 trained for ``epochs`` on CIFAR-10's training split (45,000 images, as `teachx train` splits it),
    and ``n`` of those images (uint8 NCHW, a seeded choice) with their labels; plus what it cost and the validation
    accuracy, for the record."""
    from teachx.config.load import load_config
    from teachx.runs.plan import make_plan
    from teachx.runs.teacher import as_nchw

    start = time.perf_counter()
    cfg = load_config(
        base={"data": {"name": f"imagefolder:{path}", "val_fraction": 0.1}, "model": {"backbone": "lenet5"}}
    )
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    train_idx = np.sort(np.asarray(plan.train_idx))
    x_all = as_nchw(ds.train.images[train_idx])
    y_all = torch.as_tensor(np.asarray(ds.train.labels)[train_idx]).long()
    mean = torch.tensor(plan.mean).view(1, -1, 1, 1)
    std = torch.tensor(plan.std).view(1, -1, 1, 1)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("lenet5", 3, ds.num_classes, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for s in torch.randperm(len(x_all)).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model((x_all[s].float() / 255 - mean) / std), y_all[s])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    val_idx = np.asarray(plan.val_idx)
    with torch.no_grad():
        xv = (as_nchw(ds.train.images[val_idx]).float() / 255 - mean) / std
        val_acc = float((model(xv).argmax(1).numpy() == np.asarray(ds.train.labels)[val_idx]).mean())
    info = {"decode_s": round(decode_s, 1), "train_s": round(time.perf_counter() - start, 1), "val_acc": val_acc}
    pick = torch.as_tensor(
        np.sort(np.random.default_rng(0).permutation(len(x_all))[:n])
    )  # all classes (sorted by class)
    return model, x_all[pick], y_all[pick].numpy(), {**info, "mean": mean, "std": std, "classes": ds.num_classes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=9000, help="images in all")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--teacher", default="lrp")
    ap.add_argument("--method", default="spray")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--class-size", type=int, default=CIFAR_CLASS, help="the class size timed on its own")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--data", type=Path, default=CIFAR_JPG, help="CIFAR-10 as a JPEG image-folder zip")
    ap.add_argument("--epochs", type=int, default=1, help="epochs the LeNet-5 is trained on the real images")
    ap.add_argument("--synthetic", action="store_true", help="random images and an untrained model even with --data")
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    real = not args.synthetic and args.data.is_file()
    if real:
        model, x_u8, labels, setup = cifar10(args.data, args.n, args.epochs, 128)
        args.n, args.classes = len(x_u8), setup.pop("classes")
        mean, std = setup.pop("mean"), setup.pop("std")
        print(
            f"CIFAR-10 from {args.data}: decoded in {setup['decode_s']}s, LeNet-5 trained {args.epochs} epoch(s) in "
            f"{setup['train_s']}s, validation accuracy {setup['val_acc']:.3f}"
        )
    else:
        model = build_model("lenet5", 3, args.classes, 32).eval()
        x_u8 = images(args.n)
        labels = np.arange(args.n) % args.classes
        mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
        setup = {}

    def batch(idx: np.ndarray) -> torch.Tensor:
        return (x_u8[torch.as_tensor(idx)].float() / 255 - mean) / std

    layer = default_layer(layer_shapes(model, batch(np.arange(1))))
    teacher = build_teacher(args.teacher)
    method = build(args.method)
    t = {}
    start = time.perf_counter()
    maps = []
    for s in range(0, args.n, args.batch):
        idx = np.arange(s, min(s + args.batch, args.n))
        xb = batch(idx)
        maps.append(postprocess(teacher.attribute(model, xb, torch.as_tensor(labels[idx]))).float().numpy())
    maps = np.concatenate(maps)
    t["maps_s"] = time.perf_counter() - start
    start = time.perf_counter()
    acts = pooled_activations(model, batch, np.arange(args.n), layer, args.batch)
    t["activations_s"] = time.perf_counter() - start
    t["reveal_s"] = t["figures_s"] = 0.0
    groups = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in range(args.classes):
            idx = np.flatnonzero(labels == c)
            start = time.perf_counter()
            res = method.reveal(Evidence(indices=idx, maps=maps[idx], activations=acts[idx], label=c))
            t["reveal_s"] += time.perf_counter() - start
            groups.append(len(res.groups))
            start = time.perf_counter()
            top = res.groups[:4]
            pos = {int(i): k for k, i in enumerate(idx)}
            protos = [[pos[i] for i in g.prototypes] for g in top]
            figures.save_reveal_figure(
                Path(tmp) / f"class_{c}.png",
                res.embedding,
                res.labels,
                [g.group for g in top],
                [f"group {g.group}" for g in top],
                [x_u8[idx][p] for p in protos],
                [torch.from_numpy(maps[idx][p]) for p in protos],
            )
            t["figures_s"] += time.perf_counter() - start
    start = time.perf_counter()
    c0 = np.flatnonzero(labels == 0)
    concept = np.zeros(len(c0), bool)
    concept[: max(2, len(c0) // 10)] = True
    cav = fit_cav(acts[c0], concept, "pattern", layer)
    scores = cav.scores(acts)
    chosen = np.argsort(-scores)[:500]
    # the masks as the reveal makes them: contrasted with the class's images the concept scores lowest
    references = reference_indices(cav.scores(acts[c0]), c0)
    concept_masks(model, batch, chosen, references, find_module(model, layer), cav.direction, "lrp", args.batch)
    t["concept_s"] = time.perf_counter() - start
    # the per-class reveal at CIFAR-10's class size, on its own
    n_c = args.class_size
    big_maps = np.concatenate([maps] * (n_c // len(maps) + 1))[:n_c] if len(maps) < n_c else maps[:n_c]
    big_maps = big_maps + np.random.default_rng(1).normal(0, 1e-3, big_maps.shape)  # no exact duplicates
    start = time.perf_counter()
    method.reveal(Evidence(indices=np.arange(n_c), maps=big_maps, activations=None, label=0))
    class_s = time.perf_counter() - start
    total = sum(t.values())
    per_image = (t["maps_s"] + t["activations_s"]) / args.n
    figure_per_class = t["figures_s"] / args.classes
    projected = per_image * CIFAR_TRAIN + 10 * (class_s + figure_per_class) + t["concept_s"] * CIFAR_TRAIN / args.n
    record = {
        "benchmark": "reveal",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "model": f"lenet5 trained {args.epochs} epoch(s) on the images" if real else "lenet5 (untrained, seeded)",
        "images": f"CIFAR-10 training split ({args.data.name})" if real else "seeded random 32x32x3",
        "setup": setup,  # decoding and training (real images only), not part of the reveal's total
        "teacher": args.teacher,
        "method": method.name,
        "method_options": method.options(),
        "layer": layer,
        "n": args.n,
        "classes": args.classes,
        "groups_per_class": groups,
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "total_s": round(total, 3),
        "class_size_timed": n_c,
        "reveal_one_class_s": round(class_s, 3),
        "projected_cifar10_45000_s": round(projected, 1),
        "target_s": 300,
        "meets_target": bool(projected <= 300),
    }
    write_json_atomic(args.out, record)
    print(f"{args.n} images, {args.classes} classes, {torch.get_num_threads()} thread(s): total {total:.1f}s")
    for k, v in t.items():
        print(f"  {k:15s} {v:8.2f}")
    print(f"  one class of {n_c}: {class_s:.2f}s; projected for 45,000 CIFAR-10 images: {projected:.0f}s (target 300s)")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
