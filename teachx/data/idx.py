"""MNIST, Fashion-MNIST and the bundled Fashion-MNIST subset, all in the idx format (raw or .gz).

idx: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from teachx.data.cache import Decoded
from teachx.data.download import Resource
from teachx.data.sources import DATASETS, DatasetSource
from teachx.errors import DataError
from teachx.utils.io import write_bytes_atomic

_UBYTE = 0x08
_PARTS = ("train-images", "train-labels", "t10k-images", "t10k-labels")


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """Decode idx bytes into a uint8 array; any inconsistency is a DataError naming the file."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what} is not an idx file (bad magic number); replace it with the official file")
    if data[2] != _UBYTE:
        raise DataError(f"{what} has idx type code 0x{data[2]:02x}; only unsigned-byte (0x08) data is supported")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{what} is truncated (incomplete header); download it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(
            f"{what} holds {len(data) - header} data bytes but its header promises {expected} for shape {shape}: "
            f"truncated or corrupted; download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file, gzip-compressed or not (decided by the gzip magic, not the name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is truncated or corrupted ({type(err).__name__}: {err}); download it again") from err
    return parse_idx(raw, str(path))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as idx (gzip when the name ends in .gz); deterministic bytes (gzip mtime 0)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    if compress:
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    write_bytes_atomic(path, payload)


def _find_part(directory: Path, part: str) -> Path | None:
    idx = "idx3" if part.endswith("images") else "idx1"
    for name in (f"{part}-{idx}-ubyte", f"{part}.{idx}-ubyte"):
        for suffix in ("", ".gz"):
            path = directory / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in ``directory`` (raw or .gz), or None when any is missing."""
    found = {part: _find_part(directory, part) for part in _PARTS}
    if any(p is None for p in found.values()):
        return None
    return found  # type: ignore[return-value]


def decode_idx_dataset(files: dict[str, Path], class_names: list[str]) -> Decoded:
    arrays = []
    for split in ("train", "t10k"):
        images = read_idx(files[f"{split}-images"])
        labels = read_idx(files[f"{split}-labels"])
        if images.ndim != 3:
            raise DataError(f"{files[f'{split}-images']} has shape {images.shape}, expected (N, H, W) images")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{files[f'{split}-labels']} has {labels.size} labels for {images.shape[0]} images; "
                f"the files do not belong together"
            )
        if labels.size and labels.max() >= len(class_names):
            raise DataError(f"{files[f'{split}-labels']} has labels >= {len(class_names)}: corrupted")
        arrays += [np.ascontiguousarray(images[..., None]), labels.astype(np.int64)]
    return Decoded(*arrays, class_names=list(class_names))


class _IdxSource(DatasetSource):
    class_names: tuple[str, ...] = ()
    subfolder: str = ""  # torchvision's layout: <root>/<subfolder>/raw
    expected_files = (
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"
    )

    def find(self, directory: Path) -> Path | None:
        if not directory.is_dir():
            return None
        for candidate in (directory, directory / "raw", directory / self.subfolder / "raw"):
            if candidate.is_dir() and find_idx_files(candidate) is not None:
                return candidate
        return None

    def source_files(self, source: Path) -> list[Path]:
        files = find_idx_files(source)
        return [files[p] for p in _PARTS] if files else []

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        files = find_idx_files(source)
        if files is None:
            raise DataError(f"{source} lacks some of: {self.expected_files}")
        return decode_idx_dataset(files, list(self.class_names))


def _mirrored(bases: tuple[str, ...], checksums: dict[str, str], sizes: dict[str, str]) -> tuple[Resource, ...]:
    out = []
    for part in _PARTS:
        filename = f"{part}-{'idx3' if part.endswith('images') else 'idx1'}-ubyte.gz"
        out.append(Resource(filename, tuple(b + filename for b in bases), f"md5:{checksums[part]}", sizes[part]))
    return tuple(out)


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_LICENSE = "Fashion-MNIST, Xiao, Rasul & Vollgraf 2017, Zalando Research, MIT licence (https://github.com/zalandoresearch/fashion-mnist)"


@DATASETS.register("mnist")
class MNIST(_IdxSource):
    name = "mnist"
    description = "MNIST handwritten digits: 28x28 greyscale, 10 classes (60,000 train / 10,000 test)"
    license = "MNIST, LeCun, Cortes & Burges (http://yann.lecun.com/exdb/mnist/), CC BY-SA 3.0"
    url = "http://yann.lecun.com/exdb/mnist/"
    hflip = False
    hflip_reason = "digits: a mirrored digit is not the same digit"
    class_names = tuple(str(i) for i in range(10))
    subfolder = "MNIST"
    resources = _mirrored(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        {"train-images": "9.9 MB", "train-labels": "29 kB", "t10k-images": "1.6 MB", "t10k-labels": "5 kB"},
    )


@DATASETS.register("fashion-mnist", "fashion_mnist", "fashionmnist")
class FashionMNIST(_IdxSource):
    name = "fashion-mnist"
    description = "Fashion-MNIST (Zalando): 28x28 greyscale clothing, 10 classes (60,000 train / 10,000 test)"
    license = FASHION_MNIST_LICENSE
    url = "https://github.com/zalandoresearch/fashion-mnist"
    hflip = True
    hflip_reason = "clothing: a mirrored garment keeps its class"
    class_names = FASHION_MNIST_CLASSES
    subfolder = "FashionMNIST"
    system_dirs = ("/usr/share/datasets/fashion-mnist",)  # Debian/Ubuntu package dataset-fashion-mnist
    resources = _mirrored(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        {"train-images": "26 MB", "train-labels": "29 kB", "t10k-images": "4.4 MB", "t10k-labels": "5 kB"},
    )


BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


@DATASETS.register("bundled", "fashion-mnist-mini")
class Bundled(_IdxSource):
    """A class-balanced, seeded subset of real Fashion-MNIST shipped inside the package (works offline)."""

    name = "bundled"
    description = "Bundled Fashion-MNIST subset: 4,000 train / 1,000 test, 28x28x1, class-balanced (ships with teachx)"
    license = FASHION_MNIST_LICENSE
    url = "https://github.com/zalandoresearch/fashion-mnist"
    hflip = True
    hflip_reason = "clothing: a mirrored garment keeps its class"
    class_names = FASHION_MNIST_CLASSES
    expected_files = "the bundled idx files (reinstall teachx, or run scripts/make_bundled_dataset.py)"
    use_cache = False  # 5,000 tiny images decode in milliseconds; no need to write to the user's cache

    def search_dirs(self, root: str | Path | None, arg: str | None = None) -> list[Path]:
        return [Path(root).expanduser()] if root is not None else [BUNDLED_DIR]

    def missing_message(self, root: str | Path | None, arg: str | None = None) -> str:
        return (
            f"the bundled dataset is missing from {self.search_dirs(root)[0]}: reinstall teachx "
            f"(or regenerate it with scripts/make_bundled_dataset.py)"
        )
