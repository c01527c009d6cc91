"""Teacher maps for a whole dataset split, computed once and kept on disk.

Layout of a store directory (``<maps_dir>/<key[:20]>/``):

- ``maps.npy``: float16 array (N, C, H, W) opened memory-mapped, so memory stays flat in N;
- ``done.npy``: bool (N,), which rows are final -- generation resumes from it after an interruption;
- ``digests.npy``: uint8 (N, 16), the first 16 bytes of the sha256 of every finished row's bytes;
- ``meta.json``: the full key material (dataset fingerprint, teacher options, teacher-weights hash,
  post-processing), shape and dtype, written atomically with its own digest.

Integrity: each batch is written maps rows + flush, then digest rows + flush, then done flags +
flush, so an interruption never leaves a finished row without its digest; opening a store verifies
every finished row against its digest (one sha256 pass over the rows: see ``bench/bench_integrity.py``
for the cost). A mismatch -- bit rot, a bad disk, a hand edit -- is a :class:`CorruptionError`
naming the store and the fix, never a wrong map in training. A store written before digests
existed (layout 1) is kept and sealed on its first open: digests of its finished rows are written
then, so its maps are not recomputed and are verified from then on.

The key is a hash of everything that changes the maps, so a store is reused across runs and seeds
and never used for another teacher, dataset or model. A store whose files are missing, truncated or
whose meta does not match its key is reported and rebuilt, never silently used.

Distributed generation (several processes on one node, see :mod:`teachx.utils.distributed`):
``open_store`` and ``fill_store`` are then collective calls. Rank 0 alone checks, rebuilds or creates
the files, then a barrier lets the others open them. ``fill_store`` deals the batches of missing
rows round-robin to the ranks -- rank r computes batches r, r + W, r + 2W, ... of the
single-process batching -- so every batch holds exactly the images it holds in a 1-process run
(teachers whose output depends on the batch, through seeded sampling or batch-size-dependent
kernels, give bitwise the same maps); the ranks write disjoint rows into the shared memory-mapped
files and meet at a barrier, after which the store is complete for every rank.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.errors import CorruptionError, DataError
from teachx.utils import distributed as dist_utils
from teachx.utils.hashing import hash_json
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic
from teachx.utils.locking import file_lock
from teachx.utils.runtime import tune_cpu_allocator

STORE_VERSION = 1  # part of every store's key: bumped only when the map values change
#: on-disk layout: 2 adds digests.npy and meta.json's digest (layout-1 stores are sealed, not rebuilt)
LAYOUT = 2
ROW_DIGEST_BYTES = 16
_VERIFY_CHUNK = 4096  # rows hashed per read while verifying (memory stays flat in N)


@dataclass
class MapStore:
    """An open store: ``maps[i]`` is the teacher map of dataset index ``i``."""

    path: Path
    key: str
    maps: np.ndarray  # memory-mapped (N, C, H, W) float16
    done: np.ndarray  # memory-mapped (N,) bool
    meta: dict[str, Any]
    digests: Optional[np.ndarray] = None  # memory-mapped (N, 16) uint8: sha256[:16] of each finished row

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def missing(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        return indices[~self.done[indices]]

    def mean_map(self, indices: np.ndarray, chunk: int = 4096) -> torch.Tensor:
        """float32 mean of the maps of ``indices`` (accumulated in float64, read in chunks)."""
        indices = np.sort(np.asarray(indices))
        acc = torch.zeros(self.maps.shape[1:], dtype=torch.float64)
        for s in range(0, len(indices), chunk):
            acc += self.read(indices[s : s + chunk]).double().sum(0)
        return (acc / max(1, len(indices))).float()

    def read(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 maps for ``indices`` (reads only those rows from disk)."""
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.maps[idx])).float()


def store_key(material: dict[str, Any]) -> str:
    return hash_json({"version": STORE_VERSION, **material})


def row_digests(rows: np.ndarray) -> np.ndarray:
    """(k, 16) uint8: the first 16 bytes of the sha256 of each row's raw bytes."""
    rows = np.ascontiguousarray(rows)
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    sha = hashlib.sha256
    return np.frombuffer(b"".join([sha(r).digest()[:ROW_DIGEST_BYTES] for r in flat]), np.uint8).reshape(
        len(rows), ROW_DIGEST_BYTES
    )


def store_fix(path: Path) -> str:
    return f"remove '{path}' (teachx's cache of teacher maps) and re-run the same command: its maps are computed again"


def open_store(
    maps_dir: str | Path,
    material: dict[str, Any],
    n: int,
    map_shape: tuple[int, int, int],
    log: Callable[[str], None] = print,
    distributed: Optional[bool] = None,
) -> MapStore:
    """Open (or create) the store for ``material``; a stale or damaged store is rebuilt.

    ``distributed``: None = collective when a torch.distributed group of several processes is up
    (rank 0 prepares the files, the others wait and then open them); False = this process alone.
    """
    key = store_key(material)
    path = Path(maps_dir) / key[:20]
    shape = (int(n), *map_shape)
    if _world(distributed)[1] > 1:
        dist_utils.on_main(_prepare, path, key, shape, material, log)
    else:
        _prepare(path, key, shape, material, log)
    meta = read_trusted_json(path / "meta.json", store_fix(path), "teacher-map store meta")
    maps = np.load(path / "maps.npy", mmap_mode="r+")
    done = np.load(path / "done.npy", mmap_mode="r+")
    digests = np.load(path / "digests.npy", mmap_mode="r+")
    return MapStore(path=path, key=key, maps=maps, done=done, meta=meta, digests=digests)


def read_store(path: str | Path) -> MapStore:
    """An existing store, read only, for looking at maps a run made (scripts, viewers): its meta and
    every finished row verified; a damaged store is a CorruptionError with the fix, an incomplete
    one (no meta.json yet) a DataError."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise DataError(
            f"'{path}' is not a finished teacher-map store (no meta.json); pass a directory under TEACHX_CACHE/maps/"
        )
    meta = read_trusted_json(path / "meta.json", store_fix(path), "teacher-map store meta")
    problem = _check(path, str(meta.get("key", "")), tuple(meta.get("shape", ())))
    if problem:
        raise CorruptionError.of(path, problem, store_fix(path), "teacher-map store")
    _verify(path)
    return MapStore(
        path=path,
        key=meta["key"],
        maps=np.load(path / "maps.npy", mmap_mode="r"),
        done=np.load(path / "done.npy", mmap_mode="r"),
        meta=meta,
        digests=np.load(path / "digests.npy", mmap_mode="r") if (path / "digests.npy").exists() else None,
    )


def _world(distributed: Optional[bool]) -> tuple[int, int]:
    if distributed is False:
        return 0, 1
    return dist_utils.rank(), dist_utils.world_size()


def _prepare(
    path: Path, key: str, shape: tuple[int, ...], material: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Make ``path`` hold a usable store for ``key`` (check, rebuild or create its files)."""
    problem = _check(path, key, shape)
    if problem == "absent":
        pass
    elif problem:
        log(f"teacher-map store {path} is {problem}; rebuilding it")
        shutil.rmtree(path, ignore_errors=True)
    if not (path / "meta.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        for name, dtype, shp in (
            ("maps.npy", np.float16, shape),
            ("done.npy", np.bool_, (shape[0],)),
            ("digests.npy", np.uint8, (shape[0], ROW_DIGEST_BYTES)),
        ):
            _new_array(path / name, dtype, shp)
        meta = {
            "key": key,
            "shape": list(shape),
            "dtype": "float16",
            "layout": LAYOUT,
            "created": time.time(),
            "material": material,
        }
        write_json_atomic(path / "meta.json", meta, digest=True)  # last: a store without meta.json is incomplete
        return
    meta = read_trusted_json(path / "meta.json", store_fix(path), "teacher-map store meta")
    if meta.get("layout", 1) < LAYOUT:
        _seal_legacy(path, meta, shape, log)
    _verify(path)


def _new_array(path: Path, dtype, shape: tuple[int, ...]) -> None:
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
        _allocate(tmp)


def _allocate(path: Path) -> None:
    """Reserve the file's blocks now. The arrays are written through memory maps, and a page of a
    sparse file that the disk has no room for ends the process with SIGBUS, no message; this
    makes a full disk an ``OSError`` (one line naming the file) before any map is computed."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it: as before
            raise
    finally:
        os.close(fd)


def _seal_legacy(path: Path, meta: dict[str, Any], shape: tuple[int, ...], log: Callable[[str], None]) -> None:
    """A store written before row digests existed: digest its finished rows now (no recomputation)."""
    done = np.load(path / "done.npy", mmap_mode="r")
    maps = np.load(path / "maps.npy", mmap_mode="r")
    idx = np.flatnonzero(done)
    log(f"teacher-map store {path} predates row digests: sealing its {idx.size} finished rows (verified from now on)")
    with atomic_path(path / "digests.npy") as tmp:
        digests = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(shape[0], ROW_DIGEST_BYTES))
        for s in range(0, idx.size, _VERIFY_CHUNK):
            rows = idx[s : s + _VERIFY_CHUNK]
            digests[rows] = row_digests(maps[rows])
        digests.flush()
        del digests
    del maps, done
    write_json_atomic(path / "meta.json", {**meta, "layout": LAYOUT}, digest=True)


def _verify(path: Path) -> None:
    """Every finished row against its digest; a mismatch is a CorruptionError naming the store and the fix."""
    done = np.load(path / "done.npy", mmap_mode="r")
    maps = np.load(path / "maps.npy", mmap_mode="r")
    digests = np.load(path / "digests.npy", mmap_mode="r")
    idx = np.flatnonzero(done)
    bad: list[int] = []
    for s in range(0, idx.size, _VERIFY_CHUNK):
        rows = idx[s : s + _VERIFY_CHUNK]
        contiguous = rows[-1] - rows[0] + 1 == rows.size  # the usual case: read a slice, no gather copy
        block = maps[rows[0] : rows[-1] + 1] if contiguous else maps[rows]
        wrong = np.any(row_digests(block) != digests[rows], axis=1)
        bad.extend(rows[wrong].tolist())
    if bad:
        raise CorruptionError.of(
            path,
            f"{len(bad)} of its {idx.size} finished rows fail their digest, e.g. row {bad[0]}",
            store_fix(path),
            "teacher-map store",
        )


def _check(path: Path, key: str, shape: tuple[int, ...]) -> str:
    """'' when usable, 'absent', or what is wrong with it (a damaged meta.json raises CorruptionError)."""
    if not path.exists():
        return "absent"
    if not (path / "meta.json").exists():
        return "missing its meta.json (interrupted while being created)"
    meta = read_trusted_json(path / "meta.json", store_fix(path), "teacher-map store meta")
    if meta.get("key") != key:
        return "stale (its key does not match the teacher, data or options)"
    if tuple(meta.get("shape", ())) != shape:
        return f"for shape {tuple(meta.get('shape', ()))}, not {shape}"
    arrays = [("maps.npy", shape), ("done.npy", shape[:1])]
    if meta.get("layout", 1) >= LAYOUT:
        arrays.append(("digests.npy", (shape[0], ROW_DIGEST_BYTES)))
    for name, expect in arrays:
        try:
            arr = np.load(path / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"damaged ({name}: {str(exc).splitlines()[0][:80]})"
        if tuple(arr.shape) != tuple(expect):
            return f"damaged ({name} has shape {arr.shape})"
    return ""


def fill_store(
    store: MapStore,
    indices: np.ndarray,
    compute: Callable[[np.ndarray], torch.Tensor],
    batch_size: int,
    progress: bool = True,
    desc: str = "teacher maps",
    distributed: Optional[bool] = None,
) -> int:
    """Compute maps for the not-yet-done ``indices`` in batches; returns how many were computed
    (by all ranks together).

    Rows are flushed before they are marked done, so an interruption loses at most one batch.
    ``distributed``: None = collective when a torch.distributed group of several processes is up
    (batches dealt round-robin to the ranks, see the module docstring); False = this process alone.
    """
    tune_cpu_allocator()  # several-fold faster teachers on CPU, no effect on values (teachx.utils.runtime)
    rank, world = _world(distributed)
    todo = np.sort(store.missing(np.unique(np.asarray(indices))))
    if world > 1:
        todo = dist_utils.broadcast_object(todo)  # one view of what is missing, taken before anyone writes
    if todo.size == 0:
        return 0
    starts = list(range(0, todo.size, batch_size))[rank::world]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        share = sum(min(batch_size, todo.size - s) for s in starts)
        bar = tqdm(
            total=int(share),
            desc=desc if world == 1 else f"{desc} [rank 0 of {world}]",
            dynamic_ncols=True,
            mininterval=0.5,
        )
    for start in starts:
        chunk = todo[start : start + batch_size]
        maps = compute(chunk).detach().to("cpu", torch.float32)
        if maps.shape[1:] != store.maps.shape[1:]:
            raise ValueError(
                f"teacher produced maps of shape {tuple(maps.shape[1:])}, store expects {store.maps.shape[1:]}"
            )
        rows = maps.numpy().astype(np.float16)
        store.maps[chunk] = rows
        store.maps.flush()
        store.digests[chunk] = row_digests(rows)  # before the done flags: no finished row without its digest
        store.digests.flush()
        store.done[chunk] = True
        store.done.flush()
        if bar is not None:
            bar.update(int(chunk.size))
    if bar is not None:
        bar.close()
    if world > 1:
        dist_utils.barrier()  # every rank's rows are on disk: the store is complete for everyone
    return int(todo.size)


def derived_store(
    source: MapStore,
    material: dict[str, Any],
    compute: Callable[[np.ndarray], torch.Tensor],
    batch_size: int = 256,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> MapStore:
    """A store of maps made from ``source``'s (``compute(indices)``, e.g. ``source``'s maps with a region zeroed),
    next to it under a key of its own (``source``'s key and ``material``), for the rows ``source`` has finished.
    ``source`` is never written; the new store is made, resumed, digested and verified like every store (and
    rebuilt, never used, when damaged), and a lock keeps two processes from filling it at once. Its material
    is ``source``'s (so `teachx cache list` says what the maps are of) with ``derived_from`` and ``material``
    (a ``derived`` entry says how, in words)."""
    full = {**dict(source.meta.get("material") or {}), "derived_from": source.key, **material}
    maps_dir = source.path.parent
    rows = np.flatnonzero(np.asarray(source.done))

    def open_and_fill() -> MapStore:
        store = open_store(maps_dir, full, source.maps.shape[0], tuple(source.maps.shape[1:]), log=log)
        made = fill_store(store, rows, compute, batch_size, progress=progress, desc="derived maps")
        if made:
            log(f"[maps] {made} maps derived from {source.path.name} -> {store.path}")
        return store

    if dist_utils.world_size() > 1:  # the ranks fill one store together (open_store/fill_store coordinate them)
        return open_and_fill()
    with file_lock(maps_dir / f"{store_key(full)[:20]}.lock"):
        return open_and_fill()
