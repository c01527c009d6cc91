"""``imagefolder:PATH``: class-per-folder images from a folder or a ``.zip``.

Layouts (an enclosing single top folder, e.g. ``mydata/...`` inside a zip, is skipped):

* ``train/<class>/<image>`` and ``test/<class>/<image>`` (``val``/``valid``/``validation`` stand in
  for a missing ``test``): the splits are used as given;
* ``<class>/<image>``: a stratified, seeded test split is carved (``test_fraction``, ``seed``) and a
  warning says so.

Classes are the sorted train folder names. All images must share one size and channel count,
because they are decoded into one array; otherwise a DataError names the first offending file.
Options (``load_dataset("imagefolder:PATH", size=32, channels=3)``): ``size`` (int or (H, W))
resizes every image (bilinear, antialiased) and ``channels`` (1, 3 or 4) converts every image
(L / RGB / RGBA) -- both are applied to *all* images, so a clean dataset is not altered by default.
``workers`` sets the decoding processes (default: one per CPU core, at most 8).

Decoding runs in a pool of forked processes; zip members are read by offset from each worker's own
file handle (no per-worker parse of the central directory), with their CRC checked.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from teachx.data.cache import Decoded, tree_fingerprint, file_fingerprint
from teachx.data.loading import train_val_split
from teachx.data.sources import DATASETS, DatasetSource
from teachx.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
TEST_NAMES = ("test", "val", "valid", "validation")
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
#: Below this many images the pool's start-up costs more than it saves.
PARALLEL_MIN_IMAGES = 4096


def native_channels(mode: str) -> int:
    """Channels an image of PIL ``mode`` decodes to (palette images count as RGB)."""
    if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        return 1
    if mode in ("LA", "La"):
        return 2
    if mode in ("RGBA", "RGBa", "PA"):
        return 4
    return 3


def _to_array(image, channels: int) -> np.ndarray:
    """uint8 (H, W, C) from a PIL image, converted to ``channels`` (1: L, 2: LA, 3: RGB, 4: RGBA)."""
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    if image.mode != mode:
        image = image.convert(mode)
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width, channels)


@dataclass(frozen=True)
class _Target:
    """What every decoded image must become (or already be)."""

    height: int
    width: int
    channels: int
    resize: bool  # size= given: resize instead of refusing other sizes
    convert: bool  # channels= given: convert instead of refusing other channel counts
    first: str  # the image the size/channels were taken from, for error messages


# ---------------------------------------------------------------------------------------------
# Reading bytes: a folder, or a zip read by member offset.
@dataclass(frozen=True)
class _ZipMember:
    name: str
    offset: int
    compressed_size: int
    method: int
    crc: int


class _ByteReader:
    """Opens its own file handle lazily, so it can be sent to forked workers safely."""

    def __init__(self, path: str, is_zip: bool):
        self.path = path
        self.is_zip = is_zip
        self._file = None
        self._map = None

    def read(self, item: Any) -> bytes:
        if not self.is_zip:
            with open(os.path.join(self.path, item), "rb") as f:
                return f.read()
        if self._map is None:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        m: _ZipMember = item
        mm = self._map
        header = mm[m.offset : m.offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise DataError(f"{self.path}: bad local header for '{m.name}': the zip is corrupted; re-create it")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = m.offset + 30 + name_len + extra_len
        data = mm[start : start + m.compressed_size]
        if len(data) != m.compressed_size:
            raise DataError(f"{self.path} is truncated ('{m.name}' is cut off); re-create or re-download it")
        if m.method == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as err:
                raise DataError(f"{self.path}: '{m.name}' is corrupted ({err}); re-create the zip") from err
        elif m.method != zipfile.ZIP_STORED:
            raise DataError(
                f"{self.path}: '{m.name}' uses zip compression method {m.method}; re-create the zip with "
                f"'stored' or 'deflate' (e.g. `zip -r`)"
            )
        if zlib.crc32(data) != m.crc:
            raise DataError(f"{self.path}: CRC mismatch for '{m.name}': the zip is corrupted; re-create it")
        return data

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._file.close()  # type: ignore[union-attr]
            self._map = self._file = None


_FORMAT_HINTS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}


def _decode_one(reader: _ByteReader, item: Any, label: str, target: _Target | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    data = reader.read(item)
    # A format hint skips PIL's sniffing of every plugin; a wrong extension falls back to sniffing.
    hint = _FORMAT_HINTS.get(os.path.splitext(label)[1].lower())
    try:
        try:
            image = Image.open(io.BytesIO(data), formats=hint)
        except UnidentifiedImageError:
            if hint is None:
                raise
            image = Image.open(io.BytesIO(data))
        native = native_channels(image.mode)
        if target is None:
            return _to_array(image, native)
        if target.convert:
            channels = target.channels
        elif native != target.channels:
            raise DataError(_mismatch(label, image.size, native, target))
        else:
            channels = native
        if (image.height, image.width) != (target.height, target.width):
            if not target.resize:
                raise DataError(_mismatch(label, image.size, native, target))
            if image.mode in ("P", "1", "PA"):
                image = image.convert(_MODE_FOR_CHANNELS.get(channels, "RGB"))
            image = image.resize((target.width, target.height), getattr(Image, "Resampling", Image).BILINEAR)
        return _to_array(image, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode image '{label}' ({err}); delete or replace the file") from err


def _mismatch(label: str, size: tuple[int, int], channels: int, target: _Target) -> str:
    return (
        f"image '{label}' is {size[1]}x{size[0]} (HxW) with {channels} channel(s) but '{target.first}' is "
        f"{target.height}x{target.width} with {target.channels}; all images must match: pass size=(H, W) "
        f"and/or channels=C to load_dataset to resize/convert every image on load"
    )


def _decode_chunk(reader: _ByteReader, items: Sequence[Any], labels: Sequence[str], target: _Target):
    """Decode a chunk; returns (array, None) or (None, (position_in_chunk, message))."""
    out = np.empty((len(items), target.height, target.width, target.channels), dtype=np.uint8)
    try:
        for k, (item, label) in enumerate(zip(items, labels)):
            try:
                out[k] = _decode_one(reader, item, label, target)
            except DataError as err:
                return None, (k, str(err))
    finally:
        reader.close()
    return out, None


def decode_images(
    reader: _ByteReader, items: Sequence[Any], labels: Sequence[str], target: _Target, workers: int, progress: bool
) -> np.ndarray:
    """Decode every item into one (N, H, W, C) array, in parallel when it pays off.

    On failure the error of the *first* offending file (in listing order) is raised.
    """
    n = len(items)
    out = np.empty((n, target.height, target.width, target.channels), dtype=np.uint8)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc="decoding images", disable=not progress, leave=False)
    errors: list[tuple[int, str]] = []
    context = _fork_context()
    if workers <= 1 or n < PARALLEL_MIN_IMAGES or context is None:
        chunk = 2048
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            array, error = _decode_chunk(reader, items[start:stop], labels[start:stop], target)
            if error is not None:
                raise DataError(error[1])
            out[start:stop] = array
            bar.update(stop - start)
    else:
        chunk = max(256, min(4096, n // (workers * 8) + 1))
        bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {
                pool.submit(_decode_chunk, reader, items[s:e], labels[s:e], target): (s, e) for s, e in bounds
            }
            for future in as_completed(futures):
                s, e = futures[future]
                array, error = future.result()
                if error is not None:
                    errors.append((s + error[0], error[1]))
                    continue
                out[s:e] = array
                bar.update(e - s)
        if errors:
            raise DataError(min(errors)[1])
    bar.close()
    return out


def _fork_context():
    import multiprocessing as mp

    try:
        return mp.get_context("fork")
    except ValueError:  # platforms without fork: decode serially rather than re-import in spawned workers
        return None


# ---------------------------------------------------------------------------------------------
@dataclass
class _Listing:
    reader: _ByteReader
    items: list[Any]  # relative path (folder) or _ZipMember (zip)
    parts: list[tuple[str, ...]]  # path components relative to the dataset root


def _list_source(path: Path) -> _Listing:
    if path.is_dir():
        rel_paths = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                    rel_paths.append(os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/"))
        rel_paths.sort()
        return _Listing(_ByteReader(str(path), False), rel_paths, [_parts(p) for p in rel_paths])
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip ({err}); re-create or re-download it") from err
    members = []
    for info in infos:
        parts = _parts(info.filename)
        if info.is_dir() or not parts or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        if info.flag_bits & 0x1:
            raise DataError(f"{path}: '{info.filename}' is encrypted; use an unencrypted zip")
        members.append(_ZipMember(info.filename, info.header_offset, info.compress_size, info.compress_type, info.CRC))
    members.sort(key=lambda m: m.name)
    return _Listing(_ByteReader(str(path), True), members, [_parts(m.name) for m in members])


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p and p != ".")


def _strip_wrapper(parts: list[tuple[str, ...]]) -> int:
    """How many leading folders all files share (e.g. a zip's single top folder), split names excluded."""
    depth = 0
    while parts and all(len(p) > depth + 2 for p in parts):
        head = {p[depth] for p in parts}
        if len(head) != 1 or next(iter(head)).lower() in ("train", *TEST_NAMES):
            break
        depth += 1
    return depth


@DATASETS.register("imagefolder", "folder")
class ImageFolder(DatasetSource):
    name = "imagefolder"
    description = "class-per-folder images from a folder or .zip: imagefolder:PATH (train/<class>/*, test/<class>/* or <class>/*)"
    license = "as given by the images' owner"
    url = ""
    hflip = True
    expected_files = "train/<class>/<image> and test/<class>/<image> (or <class>/<image>)"
    options = {"size": None, "channels": None, "test_fraction": 0.2, "seed": 0, "workers": None}
    decoder_version = 1

    def search_dirs(self, root: str | Path | None, arg: str | None = None) -> list[Path]:
        if not arg:
            raise ConfigError("imagefolder needs a path: use 'imagefolder:PATH' (a folder or a .zip)")
        path = Path(arg).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root).expanduser() / path
        return [path]

    def find(self, directory: Path) -> Path | None:
        if directory.is_dir() or (directory.is_file() and zipfile.is_zipfile(directory)):
            return directory
        if directory.is_file():
            raise DataError(f"{directory} is neither a folder nor a zip file; point imagefolder: at one of those")
        return None

    def missing_message(self, root: str | Path | None, arg: str | None = None) -> str:
        return f"imagefolder path {self.search_dirs(root, arg)[0]} does not exist; pass an existing folder or .zip"

    def display_name(self, arg: str | None) -> str:
        return f"imagefolder:{arg}"

    def status(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "locations": ["PATH given as imagefolder:PATH"],
            "expected_files": self.expected_files,
            "present": True,  # nothing to fetch: usable with any folder or zip
            "downloadable": False,
            "license": self.license,
            "url": self.url,
        }

    def fingerprint(self, source: Path) -> Any:
        if source.is_file():
            return file_fingerprint(source)
        listing = _list_source(source)
        return tree_fingerprint(source, listing.items)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        size = opts["size"]
        if size is not None:
            if isinstance(size, str):  # from a CLI/config: "32", "32x48" or "32,48"
                size = size.lower().replace("x", ",").split(",")
                size = size * 2 if len(size) == 1 else size
            elif isinstance(size, (int, np.integer)):
                size = (size, size)
            try:
                size = [int(v) for v in size]
            except (TypeError, ValueError):
                raise ConfigError(f"size must be an int or (height, width), got {opts['size']!r}") from None
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"size must be an int or (height, width) of positive ints, got {opts['size']!r}")
            opts["size"] = size
        if opts["channels"] is not None:
            opts["channels"] = int(opts["channels"])
            if opts["channels"] not in _MODE_FOR_CHANNELS:
                raise ConfigError(f"channels must be 1, 3 or 4, got {opts['channels']}")
        if not 0.0 < float(opts["test_fraction"]) < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {opts['test_fraction']}")
        opts["test_fraction"] = float(opts["test_fraction"])
        opts["seed"] = int(opts["seed"])
        return opts

    def load(self, arg: str | None = None, root=None, download=False, cache_dir=None, progress=True, **options):
        workers = options.pop("workers", None)
        self._workers = workers  # not part of the cache key: it does not change the result
        dataset = super().load(arg, root, download, cache_dir, progress, **options)
        if dataset.extra.get("test_split", "").startswith("carved"):
            warnings.warn(f"{dataset.source}: no train/test folders, so {dataset.extra['test_split']}", stacklevel=2)
        return dataset

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        listing = _list_source(source)
        if not listing.items:
            raise DataError(f"{source} contains no images ({', '.join(IMAGE_SUFFIXES)}); check the path")
        depth = _strip_wrapper(listing.parts)
        parts = [p[depth:] for p in listing.parts]
        tops = {p[0].lower() for p in parts if len(p) == 3}
        test_name = next((t for t in TEST_NAMES if t in tops), None)
        rows: list[tuple[str, str, int]] = []  # (split, class, listing position)
        if "train" in tops and test_name is not None:
            layout = f"train/ and {test_name}/ folders"
            for k, p in enumerate(parts):
                if len(p) == 3 and p[0].lower() in ("train", test_name):
                    rows.append(("train" if p[0].lower() == "train" else "test", p[1], k))
        else:
            if "train" in tops or test_name is not None:
                raise DataError(
                    f"{source} has a '{'train' if 'train' in tops else test_name}' folder but no "
                    f"'{'test' if 'train' in tops else 'train'}' folder; add it, or use the <class>/<image> layout"
                )
            bad = next((listing.parts[k] for k, p in enumerate(parts) if len(p) != 2), None)
            if bad is not None:
                raise DataError(
                    f"{source}: '{'/'.join(bad)}' does not fit the layout <class>/<image> or "
                    f"train|test/<class>/<image>; move the images into class folders"
                )
            layout = None
            rows = [("all", p[0], k) for k, p in enumerate(parts)]
        class_names = sorted({c for s, c, _ in rows if s in ("train", "all")})
        unknown = sorted({c for s, c, _ in rows if s == "test"} - set(class_names))
        if unknown:
            raise DataError(f"{source}: test classes {', '.join(unknown)} have no train folder; add them or remove them")
        class_index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([class_index[c] for _, c, _ in rows], dtype=np.int64)
        positions = [k for _, _, k in rows]
        if source.is_dir():
            names = [f"{source}/{listing.items[k]}" for k in positions]
        else:
            names = [f"{source}:{listing.items[k].name}" for k in positions]
        items = [listing.items[k] for k in positions]

        first_label = names[0]
        target = self._target(listing.reader, items[0], first_label, options)
        workers = self._workers if getattr(self, "_workers", None) else min(os.cpu_count() or 1, 8)
        images = decode_images(listing.reader, items, names, target, int(workers), progress)

        extra: dict[str, Any] = {"files": len(items)}
        if layout is not None:
            is_train = np.array([s == "train" for s, _, _ in rows])
            train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
            extra["test_split"] = f"from {layout}"
        else:
            train_idx, test_idx = train_val_split(len(rows), options["test_fraction"], options["seed"], labels)
            extra["test_split"] = (
                f"carved a stratified {options['test_fraction']:.0%} test split (seed {options['seed']}); "
                f"pass test_fraction=/seed= to change it, or add train/ and test/ folders"
            )
        if options["size"] is not None or options["channels"] is not None:
            extra["converted"] = {"size": options["size"], "channels": options["channels"]}
        return Decoded(
            images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], class_names=class_names, extra=extra
        )

    @staticmethod
    def _target(reader: _ByteReader, item: Any, label: str, options: dict[str, Any]) -> _Target:
        first = _decode_one(reader, item, label, None)
        reader.close()
        height, width = options["size"] if options["size"] is not None else first.shape[:2]
        channels = options["channels"] if options["channels"] is not None else first.shape[2]
        return _Target(int(height), int(width), int(channels), options["size"] is not None, options["channels"] is not None, label)
