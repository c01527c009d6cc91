"""See and clean teachx's cache: decoded-dataset caches and teacher-map stores.

Where things are (one root, ``$TEACHX_CACHE`` or ``~/.cache/teachx/cache``):

- ``<root>/<dataset>-<key>/``: a decoded dataset (``teachx.data.cache``): ``*.npy`` arrays and a
  ``meta.json`` with ``cache_format`` and ``shapes``;
- ``<root>/maps/<key>/``: a teacher-map store (``teachx.teachers.store``): ``maps.npy``,
  ``done.npy`` and a ``meta.json`` with the store's key and ``material`` (dataset, teacher, model
  hash); ``<root>/maps/<key>.lock`` is held while a process fills it.

An entry is recognised only by its ``meta.json`` (the formats above); anything else in the cache
folder -- files, folders of other programs, entries teachx did not finish writing -- is never
listed as an entry and never deleted. Downloaded datasets (``$TEACHX_DATA`` or
``~/.cache/teachx/data``) are inputs, not cache, and are not touched here.

Deleting is careful: a map store is deleted while holding its lock (a store another process holds
is skipped), ``meta.json`` goes first (a half-deleted entry is then simply rebuilt by teachx), and
only the files teachx writes there (``*.npy``, ``meta.json``, temporary files of interrupted writes)
are removed -- a folder that also holds other files is kept with them.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from teachx.errors import ConfigError
from teachx.utils.locking import Busy, file_lock, held_by

_DATA_FILES = (
    "train_images.npy",
    "train_labels.npy",
    "test_images.npy",
    "test_labels.npy",
    "train_masks.npy",
    "test_masks.npy",
    "train_poisoned.npy",
    "test_poisoned.npy",
    "test_attacked_images.npy",
    "test_attacked_masks.npy",
    "test_ch_images.npy",
    "test_ch_masks.npy",
)  # masks: shortcut benchmarks only; the rest: R2R artefact benchmarks (teachx.data.cache.MORE_ARRAYS)
_TMP = re.compile(r"^\..+\.tmp$")  # teachx.utils.io.atomic_path leftovers of an interrupted write


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The one cache root: ``cache_dir``, else ``$TEACHX_CACHE``, else ``~/.cache/teachx/cache``. Decoded
    datasets live there, teacher-map stores under ``maps/``, the service's arrays under ``serve/``;
    `teachx cache list|clean` shows and cleans it."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TEACHX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "teachx" / "cache"


@dataclass
class CacheEntry:
    kind: str  # "data" or "maps"
    path: Path
    key: str  # the folder name: what `teachx cache clean KEY` takes
    description: str  # what it is for
    size: int  # bytes on disk
    created: float  # unix time
    last_used: float  # unix time: latest access or modification of its files
    files: list[str]  # the files teachx wrote (deleted by clean)
    lock: Optional[Path] = None  # the lock a process holds while filling it
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def holder(self) -> Optional[dict]:
        """The live process holding the entry's lock, if any."""
        return held_by(self.lock) if self.lock is not None else None


def _read_meta(path: Path) -> Optional[dict]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_data_meta(meta: dict) -> bool:
    return (
        isinstance(meta.get("cache_format"), int)
        and isinstance(meta.get("key"), str)
        and isinstance(meta.get("shapes"), dict)
        and set(meta["shapes"]) <= {f[:-4] for f in _DATA_FILES}
    )


def _is_map_meta(meta: dict) -> bool:
    return (
        isinstance(meta.get("key"), str)
        and isinstance(meta.get("material"), dict)
        and isinstance(meta.get("shape"), list)
        and "dtype" in meta
    )


def _usage(path: Path, names: Iterable[str], read_by_use: tuple[str, ...]) -> tuple[int, float, float]:
    """(bytes on disk, oldest mtime, last use) of the named files in ``path``.

    Last use is the latest modification of any of them, or access of the ``read_by_use`` arrays
    (memory-mapped by every run that uses the entry; the file system's access time, which
    ``relatime`` mounts update about once a day). Small files such as ``meta.json`` are read by
    this very listing, so their access times say nothing.
    """
    size, oldest, latest = 0, float("inf"), 0.0
    for name in names:
        try:
            st = (path / name).stat()
        except OSError:
            continue
        size += getattr(st, "st_blocks", 0) * 512 or st.st_size  # sparse maps.npy: what it really uses
        oldest = min(oldest, st.st_mtime)
        latest = max(latest, st.st_mtime, st.st_atime if name in read_by_use else 0.0)
    return size, (oldest if oldest != float("inf") else 0.0), latest


def _own_files(path: Path) -> list[str]:
    """The files of an entry teachx writes: its ``.npy`` arrays (whatever the format version adds),
    ``meta.json`` and leftovers of interrupted atomic writes; anything else in the folder is not ours."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.is_symlink())
    return [n for n in names if n.endswith(".npy") or n == "meta.json" or _TMP.match(n)]


def _short(value: Any, n: int = 12) -> str:
    return str(value)[:n] if value else "?"


def _data_entry(path: Path, meta: dict) -> CacheEntry:
    shapes = meta.get("shapes", {})
    dataset = path.name[: -(len(path.name.rsplit("-", 1)[-1]) + 1)] if "-" in path.name else path.name
    train, test = shapes.get("train_images", [0]), shapes.get("test_images", [0])
    hwc = "x".join(str(s) for s in train[1:]) if len(train) == 4 else "?"
    desc = f"decoded dataset {dataset}: {train[0]} train + {test[0]} test images {hwc}"
    files = _own_files(path)
    size, oldest, latest = _usage(path, files, ("train_images.npy", "test_images.npy"))
    created = (path / "meta.json").stat().st_mtime
    return CacheEntry("data", path, path.name, desc, size, min(created, oldest or created), latest, files, None, meta)


def _map_entry(path: Path, meta: dict) -> CacheEntry:
    m = meta.get("material", {})
    shape = meta.get("shape", [])
    done = _done_fraction(path)
    opts = {k: v for k, v in (m.get("teacher_options") or {}).items() if not str(k).endswith("sha256")}
    opts_text = ", ".join(f"{k}={v}" for k, v in opts.items())
    desc = (
        f"{m.get('teacher', '?')} maps{f' ({opts_text})' if opts_text else ''} of {m.get('dataset', '?')} "
        f"{m.get('split', '?')} ({shape[0] if shape else '?'} images, data {_short(m.get('data_hash'))}), "
        f"teacher model {_short(m.get('model_hash'))}"
        + (
            f", {m.get('derived') or 'derived'} from store {_short(m['derived_from'], 20)}"
            if m.get("derived_from")
            else ""
        )
        + ("" if done is None or done >= 1 else f", {done:.0%} filled")
    )
    files = _own_files(path)
    size, _, latest = _usage(path, files, ("maps.npy",))
    created = float(meta.get("created") or (path / "meta.json").stat().st_mtime)
    return CacheEntry(
        "maps", path, path.name, desc, size, created, latest, files, path.parent / f"{path.name}.lock", meta
    )


def _done_fraction(path: Path) -> Optional[float]:
    try:
        import numpy as np

        done = np.load(path / "done.npy", mmap_mode="r")
        return float(done.mean()) if done.size else 1.0
    except (OSError, ValueError):
        return None


def scan(root: str | Path | None = None) -> list[CacheEntry]:
    """Every teachx entry in ``root`` (default :func:`cache_root`) and its ``maps/`` folder, oldest use first."""
    root = Path(root) if root is not None else cache_root()
    entries: list[CacheEntry] = []
    folders = [root, root / "maps"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_dir() or path.is_symlink():
                continue
            meta = _read_meta(path)
            if meta is None:
                continue
            try:
                if _is_map_meta(meta) and (path / "maps.npy").exists():
                    entries.append(_map_entry(path, meta))
                elif _is_data_meta(meta):
                    entries.append(_data_entry(path, meta))
            except OSError:
                continue  # deleted while we looked
    return sorted(entries, key=lambda e: e.last_used)


def foreign(root: str | Path | None = None) -> list[Path]:
    """What else is in the cache folders: not teachx entries, never touched (locks and temp files aside)."""
    root = Path(root) if root is not None else cache_root()
    known = {e.path for e in scan(root)}
    out = []
    for folder in (root, root / "maps"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path in known or path == root / "maps" or path.name.endswith(".lock") or _TMP.match(path.name):
                continue
            out.append(path)
    return out


def select(
    entries: list[CacheEntry],
    keys: Iterable[str] = (),
    kinds: Iterable[str] = (),
    older_than_days: Optional[float] = None,
    everything: bool = False,
) -> list[CacheEntry]:
    """The entries to clean. ``keys``: entry keys or unique prefixes (each must match); ``kinds``:
    "data" / "maps"; ``older_than_days``: not used for that long. Filters combine (AND); with no
    key, kind or age, ``everything`` must be true."""
    keys, kinds = list(keys), set(kinds)
    if not (keys or kinds or older_than_days is not None or everything):
        raise ConfigError(
            "say what to clean: KEY (see `teachx cache list`), --maps, --data, --older-than DAYS or --all"
        )
    chosen = list(entries)
    if keys:
        picked: list[CacheEntry] = []
        for k in keys:
            hits = [e for e in entries if e.key == k] or [e for e in entries if e.key.startswith(k)]
            if not hits:
                raise ConfigError(f"no cache entry '{k}'; see `teachx cache list` for the keys")
            if len(hits) > 1:
                raise ConfigError(
                    f"cache key '{k}' is ambiguous ({', '.join(e.key for e in hits[:4])}); give more of it"
                )
            picked += [h for h in hits if h not in picked]
        chosen = picked
    if kinds:
        chosen = [e for e in chosen if e.kind in kinds]
    if older_than_days is not None:
        limit = time.time() - float(older_than_days) * 86400
        chosen = [e for e in chosen if e.last_used < limit]
    return chosen


@dataclass
class Outcome:
    entry: CacheEntry
    deleted: bool
    note: str = ""  # why it was skipped, or what was left behind
    failed: bool = False  # the file system refused (read-only, no permission): ``note`` names the file and the fix


def _delete(entry: CacheEntry) -> Outcome:
    """Delete the entry's own files (meta.json first), then its folder if nothing else is in it."""
    if _read_meta(entry.path) != entry.meta:
        return Outcome(entry, False, "changed since it was listed; left alone")
    os.unlink(entry.path / "meta.json")  # from here on teachx treats it as incomplete and rebuilds it
    for name in entry.files:
        try:
            os.unlink(entry.path / name)
        except FileNotFoundError:
            pass
    left = [p.name for p in entry.path.iterdir()] if entry.path.exists() else []
    if left:
        return Outcome(
            entry,
            True,
            f"kept the folder: it also holds {len(left)} file(s) teachx did not write ({', '.join(left[:3])})",
        )
    try:
        entry.path.rmdir()
    except OSError:
        pass
    return Outcome(entry, True)


def clean(entries: list[CacheEntry], dry_run: bool = True) -> list[Outcome]:
    """Delete ``entries`` (``dry_run``: only say which would go). Entries in use are skipped."""
    out = []
    for e in entries:
        try:
            out.append(_clean_one(e, dry_run))
        except OSError as exc:  # a read-only or foreign-owned cache folder: say which file, go on with the rest
            where = exc.filename or e.path
            out.append(
                Outcome(
                    e,
                    False,
                    f"cannot delete '{where}' ({exc.strerror or type(exc).__name__}); check that "
                    f"you may write to {e.path.parent}, or pass another cache folder with --dir",
                    failed=True,
                )
            )
    return out


def _clean_one(e: CacheEntry, dry_run: bool) -> Outcome:
    """:func:`clean` for one entry."""
    holder = e.holder()
    if holder is not None:
        return Outcome(e, False, f"in use by pid {holder.get('pid')} on {holder.get('host')}")
    if dry_run:
        return Outcome(e, False, "would delete")
    if e.lock is None:
        return _delete(e)
    try:
        with file_lock(e.lock, wait=False):  # no process can start filling it while it goes
            return _delete(e)
    except Busy as busy:
        return Outcome(e, False, f"in use by pid {busy.holder.get('pid')} on {busy.holder.get('host')}")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def age(t: float, now: Optional[float] = None) -> str:
    """'3 min ago', '5 h ago', '12 days ago'."""
    s = max(0.0, (now or time.time()) - t)
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


def legacy_maps_dir() -> Optional[Path]:
    """Where teacher maps went before the cache had one root (``~/.cache/teachx/maps``), if it exists
    and $TEACHX_CACHE is unset; `teachx cache list --dir` it to see or clean it."""
    if os.environ.get("TEACHX_CACHE"):
        return None
    old = Path.home() / ".cache" / "teachx" / "maps"
    return old if old.is_dir() and any(old.iterdir()) else None


__all__ = [
    "CacheEntry",
    "Outcome",
    "cache_root",
    "scan",
    "foreign",
    "select",
    "clean",
    "human_size",
    "age",
    "legacy_maps_dir",
]
