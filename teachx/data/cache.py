"""Decode once, then memory-map: the decoded-array cache.

Every format decodes its source files into uint8 arrays exactly once; the arrays are saved as
``.npy`` files under the cache dir and later loads map them with ``mmap_mode="r"``, so a second
load is near-instant and memory stays flat however large the dataset is.

An entry is keyed by a fingerprint of the source (resolved path, size, mtime, plus a content hash
for small files) and of the decode options, so replacing the files or changing an option decodes
again. Each array is written atomically and ``meta.json`` is written last: an entry without
``meta.json`` is incomplete and is simply rebuilt.

Integrity: ``meta.json`` carries the sha256 of every ``.npy`` file and a digest of its own; a load
verifies them (once per process per file version: the result is remembered for the file's inode,
size and mtime). A mismatch -- bit rot, a bad disk, a hand edit -- is never used: the entry is a
derived copy whose source is still there, so it is decoded again, with a warning naming the entry.
Entries written before digests existed are decoded again once, for the same reason.

Optional arrays (the artefact masks of shortcut benchmarks, ``train_masks`` / ``test_masks``, and the
evaluation arrays of R2R artefact benchmarks in ``Decoded.more``, see ``MORE_ARRAYS``) are stored and
verified like the others when a decoder returns them; entries without them load as before.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from teachx.errors import CorruptionError
from teachx.utils.cache_admin import cache_root
from teachx.utils.hashing import hash_json, sha256_file
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic

CACHE_FORMAT = 1
#: Files up to this size are content-hashed in the fingerprint (cheap, and catches same-size edits).
SMALL_FILE_BYTES = 8 << 20
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
#: Arrays an entry may hold or not (entries written before they existed simply lack them).
_OPTIONAL_ARRAYS = ("train_masks", "test_masks")
#: Further arrays a builder may add (``Decoded.more``): the R2R artefact benchmarks' other test splits and
#: which images carry the artefact (``teachx.data.artefacts``). A fixed list, so that `teachx cache` knows
#: every file of a data entry.
MORE_ARRAYS = (
    "train_poisoned",
    "test_poisoned",
    "test_attacked_images",
    "test_attacked_masks",
    "test_ch_images",
    "test_ch_masks",
)


@dataclass
class Decoded:
    """What a format decoder returns: arrays plus JSON-able metadata."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    extra: dict = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    cache_path: str = ""  # the entry it was loaded from ('' when not cached)
    train_masks: Optional[np.ndarray] = None  # uint8 (N, H, W), 1 on an artefact (shortcut benchmarks)
    test_masks: Optional[np.ndarray] = None
    more: dict[str, np.ndarray] = field(default_factory=dict)  # named by MORE_ARRAYS (artefact benchmarks)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store: the four of every entry, plus the masks and ``more`` where there are some."""
        out = {name: getattr(self, name) for name in _ARRAYS}
        out.update({name: getattr(self, name) for name in _OPTIONAL_ARRAYS if getattr(self, name) is not None})
        unknown = sorted(set(self.more) - set(MORE_ARRAYS))
        if unknown:
            raise AssertionError(f"decoder bug: arrays {unknown} are not in teachx.data.cache.MORE_ARRAYS")
        out.update(self.more)
        return out


def file_fingerprint(path: str | Path) -> dict:
    """Identity of one file: resolved path, size, mtime and (small files only) sha256."""
    path = Path(path).resolve()
    st = path.stat()
    entry = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= SMALL_FILE_BYTES:
        entry["sha256"] = sha256_file(path)
    return entry


def files_fingerprint(paths: Iterable[str | Path]) -> list[dict]:
    return [file_fingerprint(p) for p in paths]


def tree_fingerprint(root: str | Path, relative_files: Iterable[str]) -> dict:
    """Identity of a folder of many files: sizes and mtimes of every listed file (no content hash)."""
    root = Path(root).resolve()
    rows = []
    for rel in relative_files:
        st = (root / rel).stat()
        rows.append([rel, st.st_size, st.st_mtime_ns])
    return {"root": str(root), "files": hash_json(rows), "count": len(rows)}


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] units, from 256-bin histograms.

    Histograms make the statistics exact and chunking keeps memory flat on memory-mapped arrays.
    """
    n, _, _, c = images.shape
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.ascontiguousarray(images[start : start + chunk])
        for ch in range(c):
            counts[ch] += np.bincount(block[..., ch].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1).astype(np.float64)
    total[total == 0] = 1.0
    mean = (counts * values).sum(axis=1) / total
    var = (counts * values**2).sum(axis=1) / total - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def finish(decoded: Decoded) -> Decoded:
    """Validate dtypes/shapes and fill in normalisation statistics."""
    for split in ("train", "test"):
        images = getattr(decoded, f"{split}_images")
        labels = getattr(decoded, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise AssertionError(f"decoder bug: {split} images are {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise AssertionError(f"decoder bug: {split} has {images.shape[0]} images, labels {labels.shape}")
        setattr(decoded, f"{split}_labels", labels.astype(np.int64, copy=False))
        masks = getattr(decoded, f"{split}_masks")
        if masks is not None and (masks.dtype != np.uint8 or masks.shape != images.shape[:3]):
            raise AssertionError(
                f"decoder bug: {split} masks are {masks.dtype} {masks.shape} for images {images.shape}"
            )
    if not decoded.mean:
        decoded.mean, decoded.std = channel_stats(decoded.train_images)
    return decoded


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]


def cached_decode(
    name: str,
    key_material: dict,
    decode: Callable[[], Decoded],
    cache_dir: str | Path | None = None,
) -> Decoded:
    """Return the cached arrays for ``key_material`` (memory-mapped), decoding and saving on a miss."""
    key = hash_json({"cache_format": CACHE_FORMAT, "dataset": name, **key_material})
    entry = cache_root(cache_dir) / f"{_safe(name)}-{key[:20]}"
    hit = _load_entry(entry, key)
    if hit is not None:
        return hit
    decoded = finish(decode())
    try:
        _save_entry(entry, key, decoded)
    except OSError as err:
        warnings.warn(
            f"could not write the dataset cache at {entry} ({err}); the next load decodes again "
            f"(set $TEACHX_CACHE or cache_dir= to a writable folder)",
            stacklevel=3,
        )
        return decoded
    loaded = _load_entry(entry, key)
    return loaded if loaded is not None else decoded


def _save_entry(entry: Path, key: str, decoded: Decoded) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    shapes, digests = {}, {}
    for array_name, array in decoded.arrays().items():
        with atomic_path(entry / f"{array_name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            digests[array_name] = sha256_file(tmp)
        shapes[array_name] = list(array.shape)
        _remember(entry / f"{array_name}.npy", digests[array_name])
    meta = {
        "cache_format": CACHE_FORMAT,
        "key": key,
        "class_names": list(decoded.class_names),
        "mean": list(decoded.mean),
        "std": list(decoded.std),
        "extra": decoded.extra,
        "shapes": shapes,
        "sha256": digests,
    }
    write_json_atomic(entry / "meta.json", meta, digest=True)


#: files verified by this process: path -> (inode, size, mtime_ns, sha256); a rewritten file has a new stat
_VERIFIED: dict[str, tuple[int, int, int, str]] = {}


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path, digest: str) -> None:
    _VERIFIED[str(path)] = (*_stat_key(path), digest)


def _verified(path: Path, digest: str) -> bool:
    """Whether ``path``'s bytes have sha256 ``digest`` (hashed once per process per file version)."""
    if _VERIFIED.get(str(path)) == (*_stat_key(path), digest):
        return True
    if sha256_file(path) != digest:
        return False
    _remember(path, digest)
    return True


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        array = np.load(path, allow_pickle=False)  # an empty array cannot be memory-mapped
        if array.size:
            raise
        return array


def _load_entry(entry: Path, key: str) -> Decoded | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = read_trusted_json(meta_path, "it is decoded again")
        if meta.get("key") != key or meta.get("cache_format") != CACHE_FORMAT:
            return None
        if not isinstance(meta.get("sha256"), dict):
            return None  # written before digests existed: decoded again once (the source is there)
        arrays: dict[str, np.ndarray] = {}
        more: dict[str, np.ndarray] = {}
        present = tuple(n for n in _OPTIONAL_ARRAYS + MORE_ARRAYS if n in meta["sha256"])
        for array_name in _ARRAYS + present:
            path = entry / f"{array_name}.npy"
            if not _verified(path, meta["sha256"][array_name]):
                return _damaged(entry, f"{path.name} does not match its digest")
            array = _load_npy(path)
            if list(array.shape) != meta["shapes"][array_name]:
                return _damaged(entry, f"{path.name} has shape {list(array.shape)}, not {meta['shapes'][array_name]}")
            (more if array_name in MORE_ARRAYS else arrays)[array_name] = array
    except CorruptionError as err:
        return _damaged(entry, err.problem)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _damaged(entry, f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}")
    return Decoded(
        **arrays,
        class_names=list(meta["class_names"]),
        extra=dict(meta.get("extra", {})),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        cache_path=str(entry),
        more=more,
    )


def _damaged(entry: Path, problem: str) -> None:
    """A damaged entry is never used: warn, and let the caller decode the source again."""
    warnings.warn(f"dataset cache entry '{entry}' is corrupted ({problem}); decoding the source again", stacklevel=4)
    return None
