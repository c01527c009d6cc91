"""Benchmark: how teacher-map generation and training grow with dataset size, and their peak memory.

For each size N (default 1k, 5k, 50k 32x32x3 images, LeNet-5, batch 128) and each stage, a fresh
subprocess runs the real teachx code path on a memory-mapped uint8 dataset (as the dataset cache
stores it) and reports its wall time and memory:
- ``maps``: DeepSHAP (background 50) maps of a LeNet-5 teacher for all N images into a MapStore;
- ``baseline``: one training epoch of LeNet-5 (Trainer, augmentation on, validation of 1,000 images);
- ``impactx``: one IMPACTX epoch with lambda=1, reading the maps from the store just written.

Memory is reported two ways, sampled every 20 ms: peak anonymous RSS (heap: what streaming must
keep flat) and peak total RSS (VmHWM, which also counts file-backed pages of the memory-mapped
images and maps; the kernel can drop those at any time, so they grow with N without being a leak).
The claim checked: anonymous memory stays flat in N (ratio of the largest to the smallest size).

    python bench/bench_scaling.py [--sizes 1000,5000,50000] [--threads 2] [--teacher deepshap]

Writes bench/results/scaling.json atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"
SIZE, CLASSES, BATCH = 32, 10, 128


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 where the kernel has no such field)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak RssAnon and VmHWM of this process, sampled in a background thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_anon, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, status_kb("RssAnon"))
            self._stop.wait(self.every)

    def __enter__(self) -> "MemorySampler":
        self.start_anon = status_kb("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, status_kb("RssAnon"))
        self.peak_total = status_kb("VmHWM")


def make_data(folder: Path, n: int):
    """A memory-mapped uint8 dataset of n train images (seeded noise + a class-dependent bright patch)."""
    import numpy as np

    from teachx.data.base import ImageDataset, Split

    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / f"train-{n}.npy", mode="w+", dtype=np.uint8, shape=(n, SIZE, SIZE, 3))
    labels = (np.arange(n) % CLASSES).astype(np.int64)
    for s in range(0, n, 5000):  # written in chunks: building the data must not be what we measure
        chunk = rng.integers(0, 200, (min(5000, n - s), SIZE, SIZE, 3), dtype=np.uint8)
        for c in range(CLASSES):
            rows = labels[s : s + chunk.shape[0]] == c
            r, q = divmod(c, 4)
            chunk[rows, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8] = 255
        images[s : s + chunk.shape[0]] = chunk
    images.flush()
    del images
    train = Split(np.load(folder / f"train-{n}.npy", mmap_mode="r"), labels)
    test = Split(np.zeros((10, SIZE, SIZE, 3), np.uint8), np.arange(10, dtype=np.int64))
    return ImageDataset(
        "synthetic",
        [str(c) for c in range(CLASSES)],
        train,
        test,
        mean=(0.4, 0.4, 0.4),
        std=(0.3, 0.3, 0.3),
        hflip=True,
    )


def run_stage(stage: str, n: int, workdir: Path, teacher_name: str) -> dict:
    """Runs inside the child process."""
    import numpy as np
    import torch

    from teachx.data.transforms import Augment, normalize
    from teachx.models import build_model
    from teachx.models.impactx import build_impactx
    from teachx.teachers import build as build_teacher
    from teachx.teachers.postprocess import postprocess
    from teachx.teachers.store import fill_store, open_store
    from teachx.config.train import TrainConfig
    from teachx.training.impactx import ImpactxTask, MapSource
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer
    from teachx.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ds = make_data(workdir, n) if stage == "maps" else _open_data(workdir, n)
    idx = np.arange(n)
    val = np.arange(min(1000, n))
    material = {"bench": "scaling", "n": n, "teacher": teacher_name}
    torch.manual_seed(0)
    teacher_model = build_model("lenet5", 3, CLASSES, (SIZE, SIZE)).eval()
    cfg = TrainConfig(epochs=1, batch_size=BATCH, progress=False)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        if stage == "maps":
            options = {}
            if teacher_name in ("deepshap", "expected_gradients"):
                g = torch.Generator().manual_seed(0)
                bg = np.asarray(ds.train.images[np.sort(torch.randperm(n, generator=g)[:50].numpy())])
                options["background"] = normalize(
                    torch.from_numpy(bg).permute(0, 3, 1, 2).contiguous(), ds.mean, ds.std
                )
            teacher = build_teacher(teacher_name, **options)
            store = open_store(workdir / "maps", material, n, (1, SIZE, SIZE), log=lambda m: None)

            def compute(rows):
                x = normalize(
                    torch.from_numpy(np.asarray(ds.train.images[rows])).permute(0, 3, 1, 2).contiguous(),
                    ds.mean,
                    ds.std,
                )
                y = torch.from_numpy(ds.train.labels[rows])
                return postprocess(teacher.attribute(teacher_model, x, y), reduce="sum", normalize="maxabs")

            fill_store(store, idx, compute, BATCH, progress=False)
        else:
            plan = DataPlan(ds, idx, val, Augment(crop_padding=4, hflip=True))
            if stage == "baseline":
                task = ClassifierTask(build_model("lenet5", 3, CLASSES, (SIZE, SIZE)))
            else:
                store = open_store(workdir / "maps", material, n, (1, SIZE, SIZE), log=lambda m: None)
                task = ImpactxTask(
                    build_impactx("lenet5", 3, CLASSES, (SIZE, SIZE), decoder="paper"),
                    MapSource(store, "teacher", idx, 0),
                    lam=1.0,
                )
            Trainer(
                task, plan, cfg, workdir / f"{stage}-{n}", seed=0, device="cpu", log=lambda m: None, distributed=False
            ).fit(resume=False)
        seconds = time.perf_counter() - t0
    return {
        "stage": stage,
        "n": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "anon_start_mb": mem.start_anon / 1024,
        "anon_peak_mb": mem.peak_anon / 1024,
        "rss_peak_mb": mem.peak_total / 1024,
    }


def _open_data(folder: Path, n: int):
    import numpy as np

    from teachx.data.base import ImageDataset, Split

    train = Split(np.load(folder / f"train-{n}.npy", mmap_mode="r"), (np.arange(n) % CLASSES).astype(np.int64))
    test = Split(np.zeros((10, SIZE, SIZE, 3), np.uint8), np.arange(10, dtype=np.int64))
    return ImageDataset(
        "synthetic",
        [str(c) for c in range(CLASSES)],
        train,
        test,
        mean=(0.4, 0.4, 0.4),
        std=(0.3, 0.3, 0.3),
        hflip=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,50000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="deepshap")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "N", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        stage, n, d = args.child
        print(json.dumps(run_stage(stage, int(n), Path(d), args.teacher)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="teachx-scaling-") as tmp:
        for n in sizes:
            for stage in ("maps", "baseline", "impactx"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--teacher",
                    args.teacher,
                    "--child",
                    stage,
                    str(n),
                    tmp,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode:
                    raise SystemExit(f"{stage} n={n} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{stage:<9} n={n:>6}: {row['seconds']:8.1f} s  {row['images_per_s']:8.0f} img/s  "
                    f"anon peak {row['anon_peak_mb']:7.1f} MB  rss peak {row['rss_peak_mb']:7.1f} MB",
                    flush=True,
                )
    summary = {}
    for stage in ("maps", "baseline", "impactx"):
        mine = [r for r in rows if r["stage"] == stage]
        small, large = mine[0], mine[-1]
        summary[stage] = {
            "time_ratio": large["seconds"] / small["seconds"],
            "size_ratio": large["n"] / small["n"],
            "anon_peak_ratio": large["anon_peak_mb"] / small["anon_peak_mb"],
            "anon_growth_mb": large["anon_peak_mb"] - small["anon_peak_mb"],
        }
    import torch

    result = {
        "benchmark": "scaling",
        "teacher": args.teacher,
        "threads": args.threads,
        "batch": BATCH,
        "sizes": sizes,
        "rows": rows,
        "summary": summary,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "command": "python bench/bench_scaling.py " + " ".join(sys.argv[1:]),
    }
    from teachx.utils.io import write_json_atomic

    write_json_atomic(RESULTS, result)
    for stage, s in summary.items():
        print(
            f"{stage}: {s['size_ratio']:.0f}x images -> {s['time_ratio']:.1f}x time, anonymous peak x{s['anon_peak_ratio']:.2f} ({s['anon_growth_mb']:+.1f} MB)"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
