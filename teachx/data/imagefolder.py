"""``imagefolder:PATH``: class-per-folder images from a folder or a ``.zip``.

Why one file of over 500 lines: one format with the many cases of people's own data (layouts,
zips, sizes, bit depths, the errors that name every bad file), which belong together.


Layouts (an enclosing single top folder, e.g. ``mydata/...`` inside a zip, is skipped):

* ``train/<class>/<image>`` and ``test/<class>/<image>`` (``val``/``valid``/``validation`` stand in
  for a missing ``test``): the splits are used as given;
* ``<class>/<image>``: a stratified, seeded test split is carved (``test_fraction``, ``seed``) and a
  warning says so.

Classes are the sorted train folder names. All images must share one size and channel count,
because they are decoded into one array; otherwise a DataError names every offending file (the
count and the first ten), so a dataset is fixed in one pass.
Options (``load_dataset("imagefolder:PATH", size=32, channels=3)``; on the command line
``data.image_size=32`` / ``data.channels=3``): ``size`` (int or (H, W)) resizes every image
(bilinear, antialiased, aspect ratio not kept) and ``channels`` (1, 3 or 4) converts every image
(L / RGB / RGBA) -- both are applied to *all* images, so a clean dataset is not altered by default.
``workers`` sets the decoding processes (default: one per CPU core, at most 8).

Nothing is dropped without a word: empty class folders, non-image files in class folders, images
outside the layout and zip entries with ``..`` in their names are ignored with one warning per kind
(count and examples), kept in ``extra["notices"]`` for the run log. Hidden files and ``__MACOSX``
are skipped silently. 16-bit images are scaled to 8 bits (PIL alone would clip them at 255), with a
notice. Images are never flipped by default (``hflip = False``): whether a mirrored image keeps its
class is the user's call (``data.hflip=true``).

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
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
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
            raise _BadImage(
                f"{self.path}: bad local header for '{m.name}': the zip is corrupted; re-create it",
                "zip",
                "bad local header",
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = m.offset + 30 + name_len + extra_len
        data = mm[start : start + m.compressed_size]
        if len(data) != m.compressed_size:
            raise _BadImage(
                f"{self.path} is truncated ('{m.name}' is cut off); re-create or re-download it", "zip", "cut off"
            )
        if m.method == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as err:
                raise _BadImage(
                    f"{self.path}: '{m.name}' is corrupted ({err}); re-create the zip", "zip", f"corrupted: {err}"
                ) from err
        elif m.method != zipfile.ZIP_STORED:
            raise _BadImage(
                f"{self.path}: '{m.name}' uses zip compression method {m.method}; re-create the zip with "
                f"'stored' or 'deflate' (e.g. `zip -r`)",
                "zip",
                f"compression method {m.method}",
            )
        if zlib.crc32(data) != m.crc:
            raise _BadImage(
                f"{self.path}: CRC mismatch for '{m.name}': the zip is corrupted; re-create it", "zip", "CRC mismatch"
            )
        return data

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._file.close()  # type: ignore[union-attr]
            self._map = self._file = None


_FORMAT_HINTS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class _BadImage(DataError):
    """One image that cannot be used. ``kind`` picks the fix (unreadable, zip, size, channels, depth);
    ``detail`` is the short reason shown when several images are reported in one message."""

    def __init__(self, message: str, kind: str, detail: str, shape: tuple[int, int, int] | None = None):
        super().__init__(message)
        self.kind = kind
        self.detail = detail
        self.shape = shape  # (H, W, C) of an image that decodes but does not match


def _eight_bit(image, label: str, notes: dict[str, int] | None):
    """16-bit images scaled to 8 bits (PIL's own conversion clips them at 255); 32-bit int/float
    images kept only when their values already fit 0..255."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG"):  # a PNG in mode I is 16-bit
        values = np.asarray(image).astype(np.uint32)
        if notes is not None:
            notes["16-bit"] = notes.get("16-bit", 0) + 1
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise _BadImage(
                f"image '{label}' holds {'float' if image.mode == 'F' else '32-bit'} values from {values.min():g} to "
                f"{values.max():g}, outside 0..255; save it as an 8- or 16-bit image",
                "depth",
                f"{image.mode} values {values.min():g}..{values.max():g}",
            )
        return Image.fromarray(np.rint(values).astype(np.uint8), "L")
    return image


def _decode_one(
    reader: _ByteReader, item: Any, label: str, target: _Target | None, notes: dict[str, int] | None = None
) -> np.ndarray:
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
        image = _eight_bit(image, label, notes)
        native = native_channels(image.mode)
        if target is None:
            return _to_array(image, native)
        if target.convert:
            channels = target.channels
        elif native != target.channels:
            raise _mismatch(label, image.size, native, target)
        else:
            channels = native
        if (image.height, image.width) != (target.height, target.width):
            if not target.resize:
                raise _mismatch(label, image.size, native, target)
            if image.mode in ("P", "1", "PA"):
                image = image.convert(_MODE_FOR_CHANNELS.get(channels, "RGB"))
            image = image.resize((target.width, target.height), getattr(Image, "Resampling", Image).BILINEAR)
        return _to_array(image, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names a memory address, not the file
        why = "not a recognised image format" if isinstance(err, UnidentifiedImageError) else str(err)
        raise _BadImage(
            f"cannot decode image '{label}' ({why}); delete or replace the file", "unreadable", why
        ) from err


def _size_fix(h: int, w: int) -> str:
    return f"set data.image_size={h},{w} (size=({h}, {w}) in load_dataset) to resize every image"


def _channels_fix(c: int) -> str:
    return f"set data.channels={c} (channels={c} in load_dataset) to convert every image"


def _mismatch(label: str, size: tuple[int, int], channels: int, target: _Target) -> _BadImage:
    kinds = []
    if (size[1], size[0]) != (target.height, target.width) and not target.resize:
        kinds.append("size")
    if channels != target.channels and not target.convert:
        kinds.append("channels")
    fixes = " and ".join(
        _size_fix(target.height, target.width) if k == "size" else _channels_fix(target.channels) for k in kinds
    )
    message = (
        f"image '{label}' is {size[1]}x{size[0]} (HxW) with {channels} channel(s) but '{target.first}' is "
        f"{target.height}x{target.width} with {target.channels}; all images must match: {fixes}"
    )
    return _BadImage(
        message, "+".join(kinds), f"{size[1]}x{size[0]} with {channels} channel(s)", (size[1], size[0], channels)
    )


#: How many offending files one error message names.
SHOW_BAD = 10


def _bad_images_message(problems: list[tuple], total: int, target: _Target) -> str:
    """One line for every bad image found: (listing position, kind, full message, label, detail, shape) each.

    The size and channel count a fix suggests are the most common ones, not those of the first image
    (which may be the odd one out).
    """
    problems = sorted(problems)
    if len(problems) == 1:
        return problems[0][2]
    kinds: dict[str, int] = {}
    for _, kind, *_ in problems:
        for k in kind.split("+"):
            kinds[k] = kinds.get(k, 0) + 1
    shapes = [p[5] for p in problems if p[5] is not None]
    matching = total - len(problems)  # the images that decoded and matched the first one
    sizes = Counter({(target.height, target.width): matching}) + Counter(s[:2] for s in shapes)
    channel_counts = Counter({target.channels: matching}) + Counter(s[2] for s in shapes)
    (h, w), c = sizes.most_common(1)[0][0], channel_counts.most_common(1)[0][0]
    what = {
        "unreadable": "unreadable",
        "zip": "damaged in the zip",
        "size": "of another size",
        "channels": "with another channel count",
        "depth": "with values outside 0..255",
    }
    fixes = {
        "unreadable": "delete or replace the unreadable files",
        "zip": "re-create the zip",
        "depth": "save those as 8- or 16-bit images",
        "size": _size_fix(h, w),
        "channels": _channels_fix(c),
    }
    shown = "; ".join(f"'{p[3]}' ({p[4]})" for p in problems[:SHOW_BAD])
    more = f"; and {len(problems) - SHOW_BAD} more" if len(problems) > SHOW_BAD else ""
    reference = (
        f" (all must match the first image '{target.first}': {target.height}x{target.width} with {target.channels} channel(s))"
        if "size" in kinds or "channels" in kinds
        else ""
    )
    return (
        f"{len(problems)} of {total} images cannot be used ({', '.join(f'{n} {what[k]}' for k, n in kinds.items())})"
        f"{reference}: {shown}{more}; fix: {'; '.join(fixes[k] for k in kinds)}"
    )


def _decode_chunk(reader: _ByteReader, items: Sequence[Any], labels: Sequence[str], target: _Target):
    """Decode a chunk, going on past bad images: (array, problems, notes).

    ``problems`` holds (position_in_chunk, kind, message, label, detail, shape) for every image that cannot
    be used; ``notes`` counts silent-looking conversions (16-bit images scaled to 8 bits).
    """
    out = np.empty((len(items), target.height, target.width, target.channels), dtype=np.uint8)
    problems: list[tuple] = []
    notes: dict[str, int] = {}
    try:
        for k, (item, label) in enumerate(zip(items, labels)):
            try:
                out[k] = _decode_one(reader, item, label, target, notes)
            except _BadImage as err:
                problems.append((k, err.kind, str(err), label, err.detail, err.shape))
            except DataError as err:
                problems.append((k, "zip", str(err), label, str(err), None))
    finally:
        reader.close()
    return out, problems, notes


def decode_images(
    reader: _ByteReader,
    items: Sequence[Any],
    labels: Sequence[str],
    target: _Target,
    workers: int,
    progress: bool,
    notes: dict[str, int] | None = None,
) -> np.ndarray:
    """Decode every item into one (N, H, W, C) array, in parallel when it pays off.

    Every image is tried: when some cannot be used, one DataError names how many and the first
    ``SHOW_BAD`` of them in listing order, so a dataset is fixed in one pass. ``notes`` (when
    given) receives the counts of conversions worth telling the user about.
    """
    n = len(items)
    out = np.empty((n, target.height, target.width, target.channels), dtype=np.uint8)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc="decoding images", disable=not progress, leave=False)
    problems: list[tuple] = []
    counts: dict[str, int] = {}

    def collect(start: int, stop: int, result) -> None:
        array, chunk_problems, chunk_notes = result
        out[start:stop] = array
        problems.extend((start + k, *rest) for k, *rest in chunk_problems)
        for key, value in chunk_notes.items():
            counts[key] = counts.get(key, 0) + value
        bar.update(stop - start)

    context = _fork_context()
    if workers <= 1 or n < PARALLEL_MIN_IMAGES or context is None:
        chunk = 2048
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            collect(start, stop, _decode_chunk(reader, items[start:stop], labels[start:stop], target))
    else:
        chunk = max(256, min(4096, n // (workers * 8) + 1))
        bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_worker_init, initargs=_worker_args()
        ) as pool:
            futures = {pool.submit(_decode_chunk, reader, items[s:e], labels[s:e], target): (s, e) for s, e in bounds}
            for future in as_completed(futures):
                s, e = futures[future]
                collect(s, e, future.result())
    bar.close()
    if problems:
        raise DataError(_bad_images_message(problems, n, target))
    if notes is not None:
        for key, value in counts.items():
            notes[key] = notes.get(key, 0) + value
    return out


def _worker_args() -> tuple[int, bool]:
    import threading

    return os.getpid(), threading.current_thread() is threading.main_thread()


def _worker_init(parent: int, from_main_thread: bool) -> None:
    """Decoding workers end with their parent, even when it is killed (``kill -9``) and cannot shut
    the pool down: on Linux the kernel sends them SIGKILL when the parent dies (PR_SET_PDEATHSIG --
    only for a pool made by the main thread, since the signal follows the thread that forked), and
    a watchdog thread exits as soon as the parent is gone (every platform)."""
    import threading

    if from_main_thread and os.uname().sysname == "Linux":
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="teachx-parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


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
    dirs: list[tuple[str, ...]] = field(default_factory=list)  # every (non-hidden) folder, as path components
    others: list[tuple[str, ...]] = field(default_factory=list)  # non-hidden files that are not images
    unsafe: list[str] = field(default_factory=list)  # zip entries with '..' in their names (never read)


def _hidden(parts: Sequence[str]) -> bool:
    """Hidden files and folders and macOS resource forks: expected junk, skipped without a word."""
    return any(p.startswith((".", "__MACOSX")) for p in parts)


def _list_source(path: Path) -> _Listing:
    if path.is_dir():
        rel_paths, dirs, others = [], [], []
        seen: set[tuple[int, int]] = set()
        # Symlinked class folders are followed (like torchvision's ImageFolder); a link cycle is walked once.
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
            rel_dir = os.path.relpath(dirpath, path).replace(os.sep, "/")
            if rel_dir != ".":
                dirs.append(_parts(rel_dir))
            for f in filenames:
                if f.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
                (rel_paths if f.lower().endswith(IMAGE_SUFFIXES) else others).append(rel)
        rel_paths.sort()
        return _Listing(
            _ByteReader(str(path), False),
            rel_paths,
            [_parts(p) for p in rel_paths],
            sorted(dirs),
            sorted(_parts(p) for p in others),
        )
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip ({err}); re-create or re-download it") from err
    members, dirs, others, unsafe = [], set(), [], []
    for info in infos:
        parts = _parts(info.filename)
        if not parts:
            continue
        if ".." in parts:
            unsafe.append(info.filename)
            continue
        if _hidden(parts):
            continue
        if info.is_dir():
            dirs.add(parts)
            continue
        dirs.update(parts[:k] for k in range(1, len(parts)))
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            others.append(parts)
            continue
        if info.flag_bits & 0x1:
            raise DataError(f"{path}: '{info.filename}' is encrypted; use an unencrypted zip")
        members.append(_ZipMember(info.filename, info.header_offset, info.compress_size, info.compress_type, info.CRC))
    members.sort(key=lambda m: m.name)
    return _Listing(
        _ByteReader(str(path), True),
        members,
        [_parts(m.name) for m in members],
        sorted(dirs),
        sorted(others),
        sorted(unsafe),
    )


def parse_size(value: Any, what: str = "size") -> list[int]:
    """[H, W] from 32, (32, 48), "32", "32x48" or "32,48" (the last ones from a config or the CLI)."""
    size = value
    if isinstance(size, str):
        size = size.lower().replace("x", ",").split(",")
        size = size * 2 if len(size) == 1 else size
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        size = [int(v) for v in size]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an int or (height, width), e.g. 32 or 32,48; got {value!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"{what} must be an int or (height, width) of positive ints, e.g. 32 or 32,48; got {value!r}")
    return size


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
    description = (
        "class-per-folder images from a folder or .zip: imagefolder:PATH (train/<class>/*, test/<class>/* or <class>/*)"
    )
    license = "as given by the images' owner"
    url = ""
    hflip = False
    hflip_reason = "not known to be flip-invariant; set data.hflip=true if a mirrored image keeps its class"
    expected_files = "train/<class>/<image> and test/<class>/<image> (or <class>/<image>)"
    options = {"size": None, "channels": None, "test_fraction": 0.2, "seed": 0, "workers": None}
    decoder_version = 2  # 2: every bad image reported, notices of ignored entries, 16-bit images scaled

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
        # folders and other files too: adding or removing an empty class folder changes what is said about it
        others = ["/".join(p) for p in (*listing.dirs, *listing.others)]
        return tree_fingerprint(source, [*listing.items, *others])

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        if opts["size"] is not None:
            opts["size"] = parse_size(opts["size"])
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
        # Said on every load, cache hits included: a carved test split, entries ignored, conversions.
        for notice in dataset.extra.get("notices", []):
            warnings.warn(notice, stacklevel=2)
        return dataset

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        listing = _list_source(source)
        if not listing.items:
            found = (
                f" (only other files, e.g. {_examples(['/'.join(p) for p in listing.others], 3)})"
                if listing.others
                else ""
            )
            raise DataError(f"{source} contains no images ({', '.join(IMAGE_SUFFIXES)}){found}; check the path")
        depth = _strip_wrapper(listing.parts)
        wrapper = listing.parts[0][:depth]
        parts = [p[depth:] for p in listing.parts]
        tops = {p[0].lower() for p in parts if len(p) == 3}
        test_name = next((t for t in TEST_NAMES if t in tops), None)
        rows: list[tuple[str, str, int]] = []  # (split, class, listing position)
        outside: list[str] = []  # images that fit no split/class folder
        if "train" in tops and test_name is not None:
            layout = f"train/ and {test_name}/ folders"
            for k, p in enumerate(parts):
                if len(p) == 3 and p[0].lower() in ("train", test_name):
                    rows.append(("train" if p[0].lower() == "train" else "test", p[1], k))
                else:
                    outside.append("/".join(p))
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
            raise DataError(
                f"{source}: test classes {', '.join(unknown)} have no train folder; add them or remove them"
            )
        class_index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([class_index[c] for _, c, _ in rows], dtype=np.int64)
        positions = [k for _, _, k in rows]
        if source.is_dir():
            names = [f"{source}/{listing.items[k]}" for k in positions]
        else:
            names = [f"{source}:{listing.items[k].name}" for k in positions]
        items = [listing.items[k] for k in positions]

        target = self._target(listing.reader, items, names, options)
        workers = self._workers if getattr(self, "_workers", None) else min(os.cpu_count() or 1, 8)
        converted: dict[str, int] = {}
        images = decode_images(listing.reader, items, names, target, int(workers), progress, converted)

        extra: dict[str, Any] = {"files": len(items)}
        notices = _ignored_notices(source, listing, wrapper, rows, outside, test_name)
        if converted.get("16-bit"):
            notices.append(
                f"{source}: scaled {_count(converted['16-bit'], 'image')} with 16-bit values to 8 bits (value * 255 / 65535)"
            )
        if layout is not None:
            is_train = np.array([s == "train" for s, _, _ in rows])
            train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
            extra["test_split"] = f"from {layout}"
        else:
            train_idx, test_idx = train_val_split(len(rows), options["test_fraction"], options["seed"], labels)
            extra["test_split"] = (
                f"carved a stratified {options['test_fraction']:.0%} test split (seed {options['seed']}); "
                f"set data.test_fraction=F / data.test_seed=S (test_fraction= / seed= in load_dataset) to change it, "
                f"or add train/ and test/ folders"
            )
            notices.insert(0, f"{source}: no train/test folders, so {extra['test_split']}")
        if options["size"] is not None or options["channels"] is not None:
            extra["converted"] = {"size": options["size"], "channels": options["channels"]}
        extra["notices"] = notices
        return Decoded(
            images[train_idx],
            labels[train_idx],
            images[test_idx],
            labels[test_idx],
            class_names=class_names,
            extra=extra,
        )

    @staticmethod
    def _target(reader: _ByteReader, items: Sequence[Any], labels: Sequence[str], options: dict[str, Any]) -> _Target:
        """Size and channels every image must have: the options, else those of the first readable image."""
        first, first_label = None, labels[0]
        try:
            for item, label in zip(items, labels):
                try:
                    first, first_label = _decode_one(reader, item, label, None), label
                    break
                except DataError:
                    continue  # reported with every other bad image by decode_images
        finally:
            reader.close()
        if first is None:  # nothing readable: the size does not matter, every image is reported
            return _Target(1, 1, 1, True, True, labels[0])
        height, width = options["size"] if options["size"] is not None else first.shape[:2]
        channels = options["channels"] if options["channels"] is not None else first.shape[2]
        return _Target(
            int(height),
            int(width),
            int(channels),
            options["size"] is not None,
            options["channels"] is not None,
            first_label,
        )


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _examples(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _ignored_notices(
    source: Path,
    listing: _Listing,
    wrapper: tuple[str, ...],
    rows: list[tuple[str, str, int]],
    outside: list[str],
    test_name: str | None,
) -> list[str]:
    """One line per kind of entry the layout leaves out, with its count and a few examples."""
    depth = len(wrapper)
    split_of = {"train": "train", test_name: "test"} if test_name else {}
    used = {(s, c) for s, c, _ in rows}

    def in_class_folder(p: tuple[str, ...], n: int) -> tuple[str, str] | None:
        """(split, class) when ``p`` (wrapper stripped) has ``n`` components and sits in a split/class folder."""
        if len(p) != n:
            return None
        if split_of:
            return (split_of[p[0].lower()], p[1]) if p[0].lower() in split_of else None
        return ("all", p[0])

    def strip(p: tuple[str, ...]) -> tuple[str, ...] | None:
        return p[depth:] if p[:depth] == wrapper and len(p) > depth else None

    empty, not_images = [], []
    for d in listing.dirs:
        p = strip(d)
        key = in_class_folder(p, 2 if split_of else 1) if p else None
        if key is not None and key not in used:
            empty.append("/".join(p))
    for f in listing.others:
        p = strip(f)
        if p and in_class_folder(p[:-1], 2 if split_of else 1) is not None:
            not_images.append("/".join(p))
    notices = []
    if empty:
        notices.append(
            f"{source}: ignored {_count(len(empty), 'empty class folder')} (no images, so not a class): {_examples(empty)}"
        )
    if not_images:
        notices.append(
            f"{source}: ignored {_count(len(not_images), 'file')} in class folders that are not images (read: "
            f"{', '.join(IMAGE_SUFFIXES)}): {_examples(not_images)}"
        )
    if outside:
        notices.append(
            f"{source}: ignored {_count(len(outside), 'image')} outside the layout train|{test_name}/<class>/<image>: {_examples(outside)}"
        )
    if listing.unsafe:
        notices.append(
            f"{source}: ignored {_count(len(listing.unsafe), 'entry', 'entries')} with '..' in the name: {_examples(listing.unsafe)}"
        )
    return notices
