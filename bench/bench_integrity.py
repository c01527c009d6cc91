"""Benchmark: what verifying content digests costs on load, relative to the plain load.

Three artefacts teachx writes and later trusts (see tests/test_integrity.py for what is detected):

- a MobileNet checkpoint (``build_model('mobilenet', 3, 10, (32, 32))`` with its Adam state, saved as
  the trainer saves ``last.safetensors``): ``load_checkpoint`` (safetensors load + sha256 of the
  metadata and every tensor) vs the plain ``safetensors.torch.load_file``;
- a 45,000-image teacher-map store (1 x 32 x 32 float16 maps, 92 MB): ``open_store`` (verifies every
  finished row against its digest) vs opening the memory-mapped files and reading every row once
  (what one training epoch reads anyway); plus the digest cost while filling it;
- a CIFAR-10-sized decoded-data cache entry (50,000 x 32 x 32 x 3 uint8 train images, 150 MB):
  the first load in a process (sha256 of every .npy file) and a later one (remembered per file
  version) vs the plain memory-mapped ``np.load``.

Files are in the page cache (written just before; warm reads), one thread, median of ``--repeats``.

    python bench/bench_integrity.py [--repeats 5]

Writes bench/results/integrity.json atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "integrity.json"
N_MAPS, MAP_SHAPE = 45_000, (1, 32, 32)


def timed(call, repeats: int) -> float:
    """Median wall seconds of ``call()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_case(tmp: Path, repeats: int) -> dict:
    from safetensors.torch import load_file

    from teachx.models import build_model
    from teachx.training.checkpoint import checkpoint_digest, load_checkpoint, optimizer_to_flat, save_checkpoint

    torch.manual_seed(0)
    model = build_model("mobilenet", 3, 10, (32, 32))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # Adam's moments exist, as in a trainer's last.safetensors
    otensors, ometa = optimizer_to_flat(opt)
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"optim.{k}": v for k, v in otensors.items()},
    }
    meta = {
        "kind": "classifier",
        "epoch": 0,
        "history": [],
        "optimizer": ometa,
        "model_spec": getattr(model, "spec", None),
    }
    path = tmp / "mobilenet.safetensors"
    save_checkpoint(path, tensors, meta)
    plain = timed(lambda: load_file(str(path)), repeats)
    verified = timed(lambda: load_checkpoint(path), repeats)
    loaded = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta_text = f.metadata()["teachx"]
    digest_only = timed(lambda: checkpoint_digest(meta_text, loaded), repeats)
    return {
        "file_mb": path.stat().st_size / 2**20,
        "tensors": len(tensors),
        "plain_load_s": plain,
        "load_checkpoint_s": verified,
        "digest_s": digest_only,
        "overhead_s": verified - plain,
        "overhead_ratio": verified / plain,
    }


def store_case(tmp: Path, repeats: int) -> dict:
    from teachx.teachers import store as store_mod

    rng = np.random.default_rng(0)
    material = {"bench": "integrity"}
    store = store_mod.open_store(tmp / "maps", material, N_MAPS, MAP_SHAPE, log=lambda m: None, distributed=False)
    batch = 1000
    t0 = time.perf_counter()
    store_mod.fill_store(
        store,
        np.arange(N_MAPS),
        lambda idx: torch.from_numpy(rng.standard_normal((len(idx), *MAP_SHAPE), dtype=np.float32)),
        batch,
        progress=False,
        distributed=False,
    )
    fill_s = time.perf_counter() - t0
    rows = np.asarray(store.maps[:batch])
    write_digest_s = timed(lambda: store_mod.row_digests(rows), repeats) * (N_MAPS / batch)
    path = store.path
    del store

    def plain():
        maps = np.load(path / "maps.npy", mmap_mode="r")
        done = np.load(path / "done.npy", mmap_mode="r")
        idx = np.flatnonzero(done)
        for s in range(0, idx.size, 4096):  # every row read once, as one epoch reads them
            np.ascontiguousarray(maps[idx[s : s + 4096]])

    def mmap_only():
        np.load(path / "maps.npy", mmap_mode="r")
        np.load(path / "done.npy", mmap_mode="r")

    plain_s = timed(plain, repeats)
    mmap_s = timed(mmap_only, repeats)
    open_s = timed(
        lambda: store_mod.open_store(tmp / "maps", material, N_MAPS, MAP_SHAPE, log=lambda m: None, distributed=False),
        repeats,
    )
    verify_s = timed(lambda: store_mod._verify(path), repeats)
    return {
        "rows": N_MAPS,
        "map_shape": list(MAP_SHAPE),
        "maps_mb": (path / "maps.npy").stat().st_size / 2**20,
        "plain_read_all_rows_s": plain_s,
        "plain_mmap_open_s": mmap_s,
        "open_store_s": open_s,
        "verify_s": verify_s,
        "overhead_vs_reading_rows": open_s / plain_s,
        "fill_s_random_maps": fill_s,
        "row_digests_while_filling_s": write_digest_s,
    }


def cache_case(tmp: Path, repeats: int) -> dict:
    from teachx.data import cache as cache_mod

    rng = np.random.default_rng(0)
    arrays = dict(
        train_images=rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
        train_labels=np.arange(50_000) % 10,
        test_images=rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
        test_labels=np.arange(10_000) % 10,
    )

    def decode():
        return cache_mod.Decoded(**arrays, class_names=[str(c) for c in range(10)])

    first = cache_mod.cached_decode("bench", {"v": 1}, decode, tmp / "cache")
    entry = Path(first.cache_path)
    del first

    def fresh_process_load():
        cache_mod._VERIFIED.clear()  # as in a new process: every file is hashed
        cache_mod.cached_decode("bench", {"v": 1}, decode, tmp / "cache")

    def plain():
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            np.load(entry / f"{name}.npy", mmap_mode="r")

    def plain_read_all():
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            np.asarray(np.load(entry / f"{name}.npy", mmap_mode="r")).sum(dtype=np.uint64)

    first_s = timed(fresh_process_load, repeats)
    again_s = timed(lambda: cache_mod.cached_decode("bench", {"v": 1}, decode, tmp / "cache"), repeats)
    plain_s = timed(plain, repeats)
    read_s = timed(plain_read_all, repeats)
    return {
        "entry_mb": sum(p.stat().st_size for p in entry.glob("*.npy")) / 2**20,
        "first_load_in_process_s": first_s,
        "later_load_in_process_s": again_s,
        "plain_mmap_load_s": plain_s,
        "plain_read_every_byte_s": read_s,
    }


def sha256_mb_s() -> float:
    data = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8)
    seconds = timed(lambda: hashlib.sha256(data).digest(), 3)
    return 64 / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="teachx-integrity-") as d:
        tmp = Path(d)
        ck = checkpoint_case(tmp, args.repeats)
        print(
            f"checkpoint mobilenet ({ck['file_mb']:.1f} MB, {ck['tensors']} tensors): plain load {ck['plain_load_s'] * 1e3:.1f} ms, "
            f"load_checkpoint {ck['load_checkpoint_s'] * 1e3:.1f} ms (digest {ck['digest_s'] * 1e3:.1f} ms): x{ck['overhead_ratio']:.2f}",
            flush=True,
        )
        st = store_case(tmp, args.repeats)
        print(
            f"map store {st['rows']} x {st['map_shape']} ({st['maps_mb']:.0f} MB): reading every row {st['plain_read_all_rows_s'] * 1e3:.0f} ms, "
            f"open_store with verification {st['open_store_s'] * 1e3:.0f} ms (x{st['overhead_vs_reading_rows']:.2f}); "
            f"row digests while filling {st['row_digests_while_filling_s'] * 1e3:.0f} ms in total",
            flush=True,
        )
        ca = cache_case(tmp, args.repeats)
        print(
            f"data cache ({ca['entry_mb']:.0f} MB): first load in a process {ca['first_load_in_process_s'] * 1e3:.0f} ms, "
            f"later {ca['later_load_in_process_s'] * 1e3:.1f} ms, plain mmap {ca['plain_mmap_load_s'] * 1e3:.1f} ms, "
            f"reading every byte {ca['plain_read_every_byte_s'] * 1e3:.0f} ms",
            flush=True,
        )
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result = {
        "benchmark": "integrity",
        "threads": 1,
        "repeats": args.repeats,
        "page_cache": "warm (files written just before)",
        "checkpoint": ck,
        "map_store": st,
        "data_cache": ca,
        "sha256_mb_per_s": sha256_mb_s(),
        "sha_extensions": " sha_ni " in cpuinfo or " sha2 " in cpuinfo,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "command": "python bench/bench_integrity.py " + " ".join(sys.argv[1:]),
    }
    from teachx.utils.io import write_json_atomic

    write_json_atomic(RESULTS, result)
    print(f"sha256 {result['sha256_mb_per_s']:.0f} MB/s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
