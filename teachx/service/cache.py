"""The offline/online cache of `teachx serve`: named arrays over one split, filled row by row.

One cache folder (``<root>/<key[:20]>/``) per key -- a hash of everything that changes its values
(data fingerprint, checkpoint sha256, method and metric options), like the teacher-map store:

- ``meta.json``: the key, its material, the number of rows and each field's shape and dtype;
- ``<field>.npy``: the values, ``(N, *shape)``, opened memory-mapped (memory stays flat in N);
- ``<field>.done.npy``: bool ``(N,)``, which rows of that field are computed;
- ``<field>.digests.npy``: uint8 ``(N, 16)``, the first 16 bytes of the sha256 of each computed row.

Every computed row is checked against its digest when a folder is opened: a row damaged on disk
(bit rot, a hand edit, a done flag written back before its values) is never served -- it is
marked not computed, logged, and computed again on demand.

Files are plain ``.npy`` read with ``allow_pickle=False``; nothing is ever unpickled. A folder whose
meta does not match its key, or whose files are missing or of the wrong shape, is rebuilt. When
the cache folder cannot be written (read-only disk), the arrays live in memory instead: the
service keeps working, only without persistence. Writes from the server's worker threads go
through one lock per cache; two processes filling one folder write identical values, and the
check / rebuild / open of a folder holds a file lock (``.<folder>.lock``), so one process never
deletes another's rebuild half-way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from teachx.teachers.store import ROW_DIGEST_BYTES, row_digests
from teachx.utils.hashing import hash_json
from teachx.utils.io import write_json_atomic
from teachx.utils.locking import file_lock

CACHE_VERSION = 2  # 2: per-row digests (folders of version 1 have another key and are rebuilt)


def cache_key(material: dict[str, Any]) -> str:
    return hash_json({"serve_cache": CACHE_VERSION, **material})


class ArrayCache:
    """Fields ``name -> (shape, dtype)`` over ``n`` rows; ``get``/``put``/``missing`` per field."""

    def __init__(
        self,
        root: Optional[Path],
        material: dict[str, Any],
        n: int,
        fields: dict[str, tuple[tuple[int, ...], str]],
        log: Callable[[str], None] = lambda _m: None,
    ):
        self.key = cache_key(material)
        self.material = material
        self.n = int(n)
        self.fields = {k: (tuple(int(s) for s in shape), np.dtype(dt).str) for k, (shape, dt) in fields.items()}
        self.lock = threading.Lock()
        self.path: Optional[Path] = None
        self.arrays: dict[str, np.ndarray] = {}
        self.done: dict[str, np.ndarray] = {}
        self.digests: dict[str, np.ndarray] = {}
        if root is not None:
            try:
                self._open_on_disk(Path(root) / self.key[:20], log)
                return
            except OSError as exc:
                log(f"serve cache: cannot use {root} ({exc}); keeping this cache in memory")
        self.path = None
        for name, (shape, dt) in self.fields.items():
            self.arrays[name] = np.zeros((self.n, *shape), dtype=dt)
            self.done[name] = np.zeros(self.n, dtype=bool)
            self.digests[name] = np.zeros((self.n, ROW_DIGEST_BYTES), dtype=np.uint8)

    # -- files ------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "version": CACHE_VERSION,
            "n": self.n,
            "material": self.material,
            "fields": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.fields.items()},
        }

    def _problem(self, path: Path) -> Optional[str]:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return "absent"
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return "unreadable"
        if meta.get("key") != self.key or meta.get("n") != self.n:
            return "for another key"
        for name, (shape, dt) in self.fields.items():
            try:
                a = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                d = np.load(path / f"{name}.done.npy", mmap_mode="r", allow_pickle=False)
                g = np.load(path / f"{name}.digests.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return f"missing or damaged field {name}"
            if (
                a.shape != (self.n, *shape)
                or a.dtype.str != dt
                or d.shape != (self.n,)
                or d.dtype != np.bool_
                or g.shape != (self.n, ROW_DIGEST_BYTES)
                or g.dtype != np.uint8
            ):
                return f"field {name} has the wrong shape"
        return None

    def lock_path(self, path: Path) -> Path:
        return path.parent / f".{path.name}.lock"

    def _open_on_disk(self, path: Path, log: Callable[[str], None]) -> None:
        """Check, rebuild if damaged, and open the folder, holding its file lock: two server processes
        opening one folder never delete each other's rebuild half-way (writes after that need no lock:
        both processes write identical rows, and each row is checked against its digest when opened)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(
            self.lock_path(path),
            poll=0.05,
            on_wait=lambda h: log(f"serve cache {path}: waiting for pid {h.get('pid')} to finish opening it"),
        ):
            self._open_locked(path, log)

    def _open_locked(self, path: Path, log: Callable[[str], None]) -> None:
        problem = self._problem(path)
        if problem and problem != "absent":
            log(f"serve cache {path} is {problem}; rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
            problem = "absent"
        if problem == "absent":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                for name, (shape, dt) in self.fields.items():
                    np.lib.format.open_memmap(
                        tmp / f"{name}.npy", mode="w+", dtype=np.dtype(dt), shape=(self.n, *shape)
                    ).flush()
                    np.save(tmp / f"{name}.done.npy", np.zeros(self.n, dtype=bool), allow_pickle=False)
                    np.save(
                        tmp / f"{name}.digests.npy",
                        np.zeros((self.n, ROW_DIGEST_BYTES), dtype=np.uint8),
                        allow_pickle=False,
                    )
                write_json_atomic(tmp / "meta.json", self._meta())
                try:
                    os.rename(tmp, path)  # atomic publish; another process may have won the race
                except OSError:
                    if self._problem(path) is not None:
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for name in self.fields:
            self.arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r+", allow_pickle=False)
            self.done[name] = np.load(path / f"{name}.done.npy", mmap_mode="r+", allow_pickle=False)
            self.digests[name] = np.load(path / f"{name}.digests.npy", mmap_mode="r+", allow_pickle=False)
        self.path = path
        self._drop_damaged_rows(log)

    def _drop_damaged_rows(self, log: Callable[[str], None]) -> None:
        """Computed rows that fail their digest are marked not computed (computed again on demand)."""
        for name in self.fields:
            idx = np.flatnonzero(self.done[name])
            bad = [
                idx[s : s + 4096][
                    np.any(
                        row_digests(self.arrays[name][idx[s : s + 4096]]) != self.digests[name][idx[s : s + 4096]],
                        axis=1,
                    )
                ]
                for s in range(0, idx.size, 4096)
            ]
            bad = np.concatenate(bad) if bad else idx[:0]
            if bad.size:
                log(
                    f"serve cache {self.path}: {bad.size} row(s) of {name} fail their digest (damaged on disk, e.g. row {int(bad[0])}); "
                    "they are not served and are computed again when asked for"
                )
                self.done[name][bad] = False
                self.done[name].flush()

    # -- rows -------------------------------------------------------------------------------------

    def missing(self, name: str, indices: Optional[np.ndarray] = None) -> np.ndarray:
        idx = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        return idx[~self.done[name][idx]]

    def has(self, name: str, index: int) -> bool:
        return bool(self.done[name][index])

    def coverage(self, name: str) -> int:
        return int(np.count_nonzero(self.done[name]))

    def get(self, name: str, indices) -> np.ndarray:
        return np.array(self.arrays[name][indices])  # a copy: callers never hold the memory map

    def put(self, name: str, indices, values: np.ndarray) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        with self.lock:
            rows = np.asarray(values).astype(self.arrays[name].dtype, copy=False)
            self.arrays[name][idx] = rows
            self.digests[name][idx] = row_digests(rows)
            self.done[name][idx] = True  # after the values and digests: a row marked done is complete

    def flush(self) -> None:
        with self.lock:
            for a in (*self.arrays.values(), *self.digests.values(), *self.done.values()):  # done flags last
                if isinstance(a, np.memmap):
                    a.flush()
