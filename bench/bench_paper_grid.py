"""Benchmark: per-step costs of the IMPACTX paper grid's cells and the wall time per unit they imply.

The grid (teachx/configs/paper-<dataset>-<backbone>.yaml): LeNet-5, MobileNet v1 and EfficientNet-B2 on
CIFAR-10, CIFAR-100 and STL-10 (96x96). For each backbone (``--models``) and cell shape (``--shapes``:
3x32x32:10 = CIFAR-10, 3x32x32:100 = CIFAR-100, 3x96x96:10 = STL-10), with the cell's shipped config
(model.options, optimiser, augmentation, teacher and arms as `teachx study` reads them):

- the median time of one training step at batch ``--batch`` (default 128) of the baseline and of each
  distinct arm cost (IMPACTX with lambda 1 and its teacher maps read from memory, the lambda = 0 control,
  ABN; ``shuffled`` costs what ``impactx`` costs), each model, task and optimiser built by the method
  registry exactly as `teachx study` builds them (``teachx.training.methods``: build_model /
  build_impactx / ImpactxTask / the ABN task). A step is the Trainer's: uint8 batch to the device,
  augmentation and normalisation (``prepare_batch``), forward + loss under ``torch.autocast`` (AMP on
  CUDA unless --no-amp: bf16 where supported, else fp16 with a GradScaler, as the Trainer), the
  finiteness check, backward, optimiser step and the per-step loss/accuracy reads. teachx's settings
  apply: deterministic algorithms, no cudnn benchmark (``seed_everything``). Data decoding and
  batching on the CPU, validation and testing are left out;
- the DeepSHAP teacher-map throughput (images/s): ``teachx.teachers.build("deepshap", background=...)``
  with the config's background (50 images) on the baseline model, maps post-processed as the pipeline
  does, one call of ``--map-images`` images (default: the config's teacher.batch_size), in fp32 (the map
  stage runs without autocast);
- derived: wall time per unit = steps/epoch (the training split: CIFAR 45,000, STL-10 4,500 images
  after the 10% validation split; ceil(n / train.batch_size)) x epochs (the config's) x step time, and
  the DeepSHAP maps of the training split plus the teacher.eval_images test images, made once per cell
  (one teacher model, teacher.seed 0). A step timed at another batch than the config's is scaled
  linearly to it (said in the row and the header line).

Every row states device, threads, batch and AMP. Writes bench/results/paper_grid.json atomically and
prints a table; ``--merge`` keeps the file's rows of the cells not measured now (the top-level fields then
describe the last invocation, each row its own). ``--write-headers`` puts the measured figures into the configs' header lines (the CPU or
GPU line of "Expected wall time per unit"); ``--headers-from FILE`` does that from an earlier result file
without measuring (e.g. the GPU file bench/gpu.sh brings back).

    python bench/bench_paper_grid.py [--device cpu|cuda] [--models lenet5,mobilenet,efficientnet_b2]
        [--shapes 3x32x32:10,3x32x32:100,3x96x96:10] [--batch 128] [--repeats 5] [--steps 5] [--threads 1]
        [--note "approx., measured under load"] [--write-headers] [--quick] [--merge] [--out FILE]
    python bench/bench_paper_grid.py --headers-from bench/results/gpu/paper_grid_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.data.base import ImageDataset, Split
from teachx.data.transforms import Augment
from teachx.config.schema import MethodConfig, RunConfig
from teachx.studies.spec import StudySpec, load_study
from teachx.teachers import build as build_teacher
from teachx.teachers.postprocess import postprocess
from teachx.training.methods import MethodContext, build_method, impactx_options
from teachx.training.trainer import DataPlan, make_optimizer, prepare_batch
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import tune_cpu_allocator
from teachx.utils.seeding import seed_everything

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "teachx" / "configs"
MODELS = ("lenet5", "mobilenet", "efficientnet_b2")
#: cell shape -> the dataset of the grid with that shape
SHAPES = {"3x32x32:10": "cifar10", "3x32x32:100": "cifar100", "3x96x96:10": "stl10"}
#: the official splits: training images (before the validation split) and test images
OFFICIAL = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "stl10": (5_000, 8_000)}
HEADER_MARK = "# Expected wall time per unit"


# ------------------------------------------------------------------------------------- measuring
class _MemoryStore:
    """Teacher maps held in memory (the map store's read/mean_map interface)."""

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def read(self, idx):
        return self.maps[torch.as_tensor(np.asarray(idx))]

    def mean_map(self, idx):
        return self.read(idx).mean(0)


def parse_shape(text: str) -> tuple[str, tuple[int, int, int], int]:
    """'3x32x32:10' (or a dataset name: cifar10, cifar100, stl10) -> (dataset, (C, H, W), classes)."""
    text = text.strip()
    by_name = {v: k for k, v in SHAPES.items()}
    key = by_name.get(text, text)
    if key not in SHAPES:
        raise SystemExit(f"unknown shape '{text}': use {', '.join(SHAPES)} (or {', '.join(by_name)})")
    dims, classes = key.split(":")
    c, h, w = (int(v) for v in dims.split("x"))
    return SHAPES[key], (c, h, w), int(classes)


def cell_config(dataset: str, backbone: str) -> tuple[str, StudySpec]:
    name = f"paper-{dataset}-{backbone}"
    return name, load_study(str(CONFIGS / f"{name}.yaml"))


def arm_costs(spec: StudySpec) -> dict[str, list[str]]:
    """Distinct training costs among the study's arms: cost label -> the arms that have it."""
    regime, seed = next(iter(spec.regimes)), spec.seeds[0]
    out: dict[str, list[str]] = {}
    for arm in spec.arms:
        cfg = spec.config(regime, arm, seed)
        name = cfg.method.name
        label = ("impactx" if impactx_options(cfg).lam > 0 else "impactx_lambda0") if name == "impactx" else name
        out.setdefault(label, []).append(arm)
    return out


def _dataset(n: int, shape: tuple[int, int, int], classes: int) -> ImageDataset:
    c, h, w = shape
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), rng.integers(0, classes, n))
    return ImageDataset("bench", [str(i) for i in range(classes)], split, split, (0.5,) * c, (0.25,) * c, hflip=True)


def amp_setting(device: torch.device, amp: bool) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, GradScaler needed): the Trainer's choice."""
    if not amp or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, steps: int, repeats: int, warmup: int) -> float:
    """Median over ``repeats`` of the mean time of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - t0) / steps)
    return statistics.median(runs)


def step_time(
    cfg: RunConfig, ds: ImageDataset, batch: int, device: torch.device, amp: bool, steps: int, repeats: int, warmup: int
) -> tuple[float, torch.nn.Module]:
    """Median seconds of one Trainer step of ``cfg``'s method; also returns the trained model."""
    h, w = ds.image_size
    plan = DataPlan(
        ds,
        np.arange(len(ds.train)),
        np.arange(0),
        Augment(cfg.data.crop_padding, bool(cfg.data.hflip)) if cfg.data.augment else None,
    )
    method = build_method(cfg)
    store = _MemoryStore(torch.randn(len(ds.train), 1, h, w).clamp_(-1, 1))
    ctx = MethodContext(cfg, plan, device, store, None, lambda s: None)
    torch.manual_seed(0)
    model = method.build_model(ctx).to(device).train()
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if cfg.train.channels_last:
        model.to(memory_format=fmt)
    task = method.task(model, ctx)
    opt = make_optimizer(cfg.train, task.parameters())
    amp_dtype, use_scaler = amp_setting(device, amp)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.arange(batch)
    xb = torch.from_numpy(ds.train.images[:batch]).permute(0, 3, 1, 2).contiguous()
    yb = torch.from_numpy(ds.train.labels[:batch]).long()

    def step() -> None:
        maps = task.maps_for(idx)
        x, maps = prepare_batch(xb, plan, device, maps, gen)
        x = x.contiguous(memory_format=fmt)
        y = yb.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, logits, _ = task.loss(x, y, maps)
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"{cfg.method.name}: non-finite loss in the benchmark")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        loss.item(), (logits.argmax(1) == y).sum().item()  # the Trainer's per-step reads

    return timed(step, device, steps, repeats, warmup), model


def map_throughput(
    cfg: RunConfig,
    model: torch.nn.Module,
    ds: ImageDataset,
    n_images: int,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> float:
    """Images per second of the configured DeepSHAP teacher on ``model`` (fp32, post-processed)."""
    c, (h, w) = ds.channels, ds.image_size
    g = torch.Generator().manual_seed(1)
    background = torch.randn(cfg.teacher.background_size, c, h, w, generator=g).to(device)
    teacher = build_teacher(cfg.teacher.method, background=background, **cfg.teacher.options)
    x = torch.randn(n_images, c, h, w, generator=g).to(device)
    y = torch.randint(0, ds.num_classes, (n_images,), generator=g).to(device)
    model = model.eval()

    def run() -> None:
        raw = teacher.attribute(model, x, y)
        postprocess(raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=cfg.teacher.smooth)

    return n_images / timed(run, device, 1, repeats, warmup)


def measure_cell(backbone: str, shape_text: str, args, device: torch.device, amp: bool) -> dict[str, Any]:
    dataset, shape, classes = parse_shape(shape_text)
    config, spec = cell_config(dataset, backbone)
    regime, seed = next(iter(spec.regimes)), spec.seeds[0]
    ds = _dataset(args.batch, shape, classes)
    base_cfg = spec.config(regime, None, seed)
    base_cfg.method = MethodConfig("baseline", {})
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    steps["baseline"], base_model = step_time(
        base_cfg, ds, args.batch, device, amp, args.steps, args.repeats, args.warmup
    )
    costs = arm_costs(spec)
    for label, arms in costs.items():
        steps[label], _ = step_time(
            spec.config(regime, arms[0], seed), ds, args.batch, device, amp, args.steps, args.repeats, args.warmup
        )
    tcfg = spec.config(regime, "impactx" if "impactx" in spec.arms else None, seed)
    n_maps = args.map_images or tcfg.teacher.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeepShap's note on functional non-linearities: the cost is what is measured
        ips = map_throughput(tcfg, base_model, ds, n_maps, device, max(1, min(args.repeats, 3)), min(args.warmup, 1))
    amp_dtype, use_scaler = amp_setting(device, amp)
    row = {
        "backbone": backbone,
        "dataset": dataset,
        "config": config,
        "shape": shape_text,
        "device": device.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "amp": amp_dtype is not None,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else None,
        "grad_scaler": use_scaler,
        "steps_timed": args.steps,
        "repeats": args.repeats,
        "note": args.note or None,
        "step_s": steps,
        "ratio_to_baseline": {k: v / steps["baseline"] for k, v in steps.items()},
        "arms_by_cost": costs,
        "maps_img_per_s": ips,
        "map_images_timed": n_maps,
        "map_background": tcfg.teacher.background_size,
        "bench_seconds": time.perf_counter() - t0,
    }
    row.update(derive(row, spec, base_cfg))
    return row


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU"


# ------------------------------------------------------------------------------------- deriving
def derive(row: dict[str, Any], spec: StudySpec, cfg: RunConfig) -> dict[str, Any]:
    """Steps per epoch, epochs and the implied wall time per unit and per cell (training only + maps)."""
    n_official, n_test = OFFICIAL[row["dataset"]]
    n_train = cfg.data.train_size or (n_official - int(round(n_official * cfg.data.val_fraction)))
    batch_cfg = cfg.train.batch_size
    spe = math.ceil(n_train / batch_cfg)
    epochs = cfg.train.epochs
    scale = batch_cfg / row["batch"]
    step_cfg = {k: v * scale for k, v in row["step_s"].items()}
    unit = {k: spe * epochs * v for k, v in step_cfg.items()}
    map_images = n_train + min(cfg.teacher.eval_images or n_test, n_test)
    maps_s = map_images / row["maps_img_per_s"]
    per_seed = unit["baseline"] + sum(unit[label] * len(arms) for label, arms in row["arms_by_cost"].items())
    n_units = len(spec.seeds) * (1 + len(spec.arms))
    return {
        "schedule": {"train_images": n_train, "batch_size": batch_cfg, "steps_per_epoch": spe, "epochs": epochs},
        "step_s_at_config_batch": step_cfg,
        "scaled_from_batch": row["batch"] if scale != 1 else None,
        "unit_s": unit,
        "maps_images": map_images,
        "maps_s": maps_s,
        "seeds": len(spec.seeds),
        "units": n_units,
        "cell_s": len(spec.seeds) * per_seed + maps_s,
    }


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 100 * 3600 else f"{seconds / 3600:,.0f} h"


def _g(x: float) -> str:
    return f"{x:.3g}"


LABELS = {"baseline": "baseline", "impactx": "IMPACTX", "impactx_lambda0": "lambda0", "abn": "ABN"}


def header_lines(row: dict[str, Any], width: int = 118) -> list[str]:
    """The config header's CPU or GPU line (and its continuation lines) for one measured cell."""
    s = row["schedule"]
    kind = "GPU" if row["device"] == "cuda" else "CPU"
    what = [
        row["device_name"] if kind == "GPU" else f"{row['threads']} thread{'s' if row['threads'] != 1 else ''}",
        f"batch {s['batch_size']}",
        f"AMP {row['amp_dtype']}" if row["amp"] else "no AMP",
    ]
    if row.get("scaled_from_batch"):
        what.append(f"step timed at batch {row['scaled_from_batch']}, scaled linearly")
    if row.get("note"):
        what.append(row["note"])
    parts = [
        f"{LABELS.get(k, k)} {s['steps_per_epoch']} x {s['epochs']} x {_g(v)} s = {duration(row['unit_s'][k])}"
        for k, v in row["step_s_at_config_batch"].items()
    ]
    parts.append(
        f"+ DeepSHAP maps of {row['maps_images']:,} images at {_g(row['maps_img_per_s'])} img/s (timed on "
        f"{row['map_images_timed']}) = "
        f"{duration(row['maps_s'])} once per cell"
    )
    parts.append(f"the cell's {row['units']} units: {duration(row['cell_s'])}")
    body = [""]
    for part in parts:  # whole parts per line, '; ' between them
        if body[-1] and len("#     " + body[-1] + "; " + part) > width:
            body[-1] += ";"
            body.append("")
        body[-1] += ("; " if body[-1] else "") + part
    return [f"#   {kind} ({'; '.join(what)}):", *("#     " + line for line in body)]


def write_headers(rows: list[dict[str, Any]], configs: Path = CONFIGS) -> list[Path]:
    """Replace the CPU or GPU wall-time line (with its continuation lines) in each row's config."""
    changed = []
    for row in rows:
        path = configs / f"{row['config']}.yaml"
        lines = path.read_text().splitlines()
        kind = "GPU" if row["device"] == "cuda" else "CPU"
        try:
            mark = next(i for i, line in enumerate(lines) if line.startswith(HEADER_MARK))
            start = next(i for i in range(mark + 1, len(lines)) if lines[i].startswith(f"#   {kind}"))
        except StopIteration:
            raise SystemExit(f"{path}: no '{HEADER_MARK}' block with a '#   {kind}' line") from None
        end = start + 1
        while end < len(lines) and lines[end].startswith("#     "):
            end += 1
        lines[start:end] = header_lines(row)
        path.write_text("\n".join(lines) + "\n")
        changed.append(path)
    return changed


# ------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's default on CUDA)"
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="cell shapes C x H x W : classes (or dataset names)")
    ap.add_argument("--batch", type=int, default=128, help="images per timed step (the configs train at 128)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per case (the median is kept)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument(
        "--map-images",
        type=int,
        default=None,
        help="images per timed DeepSHAP call (default: the config's teacher.batch_size)",
    )
    ap.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA (the configs use it)")
    ap.add_argument(
        "--note",
        default="",
        help="a qualifier stored in every row and header line, e.g. 'approx., measured under load'",
    )
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: 1 step, 1 repeat, 1 warm-up, 2 map images")
    ap.add_argument(
        "--write-headers", action="store_true", help="put the measured figures into the configs' header lines"
    )
    ap.add_argument(
        "--headers-from", default=None, help="update the configs' header lines from this result file; measure nothing"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an existing --out file for cells (backbone, dataset, device) not measured now",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "paper_grid.json"))
    args = ap.parse_args(argv)
    if args.headers_from:
        rows = json.loads(Path(args.headers_from).read_text())["rows"]
        for path in write_headers(rows):
            print(f"updated {path}")
        return
    if args.quick:
        args.steps, args.repeats, args.warmup, args.map_images = 1, 1, 1, args.map_images or 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    malloc_tuned = tune_cpu_allocator()  # as the CLI and the Trainer do
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    seed_everything(0)  # teachx's settings: deterministic algorithms (warn only), no cudnn benchmark
    amp = not args.no_amp
    old_rows = json.loads(Path(args.out).read_text())["rows"] if args.merge and Path(args.out).is_file() else []
    measured: list[dict[str, Any]] = []

    def save() -> None:  # after every cell: a run stopped by a time limit keeps what it measured
        done = {(r["backbone"], r["dataset"], r["device"]) for r in measured}
        order = {(b, d): i for i, (b, d) in enumerate((b, d) for b in MODELS for d in SHAPES.values())}
        rows = [r for r in old_rows if (r["backbone"], r["dataset"], r["device"]) not in done] + measured
        rows.sort(key=lambda r: (r["device"], order.get((r["backbone"], r["dataset"]), len(order))))
        write_json_atomic(
            args.out,
            {
                "benchmark": "paper_grid",
                "what": "median training-step time per cell and method (the Trainer's step, data loading left out), DeepSHAP map "
                "throughput, and the implied wall time per unit: steps/epoch x epochs x step time (+ maps once per cell)",
                "device": device.type,
                "device_name": _device_name(device),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "amp": amp and device.type == "cuda",
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "quick": args.quick,
                "note": args.note or None,
                "merged": bool(args.merge),
                "torch": torch.__version__,
                "malloc_tuned": malloc_tuned,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
                "rows": rows,
            },
        )

    print(
        f"{'backbone':<16}{'cell':<12}{'baseline':>10}{'IMPACTX':>10}{'lambda0':>10}{'ABN':>10}{'maps img/s':>12}"
        f"{'IMPACTX unit':>14}{'cell (all units)':>17}   ({device.type}, {torch.get_num_threads()} thr, batch {args.batch}, "
        f"AMP {'on' if amp and device.type == 'cuda' else 'off'}; step times in ms)"
    )
    for backbone in args.models.split(","):
        for shape_text in args.shapes.split(","):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*deterministic.*")
                row = measure_cell(backbone.strip(), shape_text, args, device, amp)
            measured.append(row)
            save()
            st = row["step_s"]
            print(
                f"{backbone:<16}{row['dataset']:<12}"
                + "".join(
                    f"{1e3 * st[k]:10.1f}" if k in st else f"{'-':>10}"
                    for k in ("baseline", "impactx", "impactx_lambda0", "abn")
                )
                + f"{row['maps_img_per_s']:12.1f}{duration(row['unit_s'].get('impactx', 0.0)):>14}{duration(row['cell_s']):>17}",
                flush=True,
            )
    print(f"wrote {args.out}")
    if args.write_headers:
        for path in write_headers(measured):
            print(f"updated {path}")


if __name__ == "__main__":
    main()
