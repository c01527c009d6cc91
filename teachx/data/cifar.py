"""CIFAR-10 and CIFAR-100 from the official python-pickle batches.

The batches are Python pickles, and unpickling can run arbitrary code. They are read with a
restricted unpickler that resolves only the few numpy globals an array needs (plus a latin-1-only
``_codecs.encode`` that protocol-2 pickles use for bytes); anything else is refused with a
DataError. The source is the extracted folder (``cifar-10-batches-py/``) or the ``.tar.gz``, read
member by member without extracting it.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from teachx.data.cache import Decoded
from teachx.data.download import Resource
from teachx.data.sources import DATASETS, DatasetSource
from teachx.errors import DataError

_CIFAR_LICENSE = "CIFAR-10/100, Krizhevsky 2009 (https://www.cs.toronto.edu/~kriz/cifar.html); cite the tech report"


def _reconstruct_function() -> Any:
    return np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]


def _scalar_function() -> Any:
    return np.uint8(0).__reduce__()[0]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """The only use of ``_codecs.encode`` in a protocol-2 pickle: bytes stored as latin-1 text."""
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct_function()
    _ALLOWED[(_module, "scalar")] = _scalar_function()
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
_ALLOWED[("_codecs", "encode")] = _latin1_encode


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, dicts, lists and strings -- and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def safe_unpickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` (python 2 pickles: ``encoding='bytes'``) with the restricted unpickler."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        if "is not allowed" in str(err) or "refusing" in str(err):
            raise DataError(
                f"{what} is not a plain CIFAR batch ({err}); refusing to unpickle it: replace it with the official file"
            ) from err
        raise DataError(f"{what} is corrupted ({err}); delete it and download the dataset again") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise DataError(
            f"{what} is truncated or corrupted ({type(err).__name__}: {err}); delete it and download the dataset again"
        ) from err


def _text_keys(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{what} does not hold a CIFAR dictionary; replace it with the official file")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _names(values: Any, what: str) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{what} has no list of label names; replace it with the official file")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def parse_batch(data: bytes, what: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) from one pickled batch."""
    batch = _text_keys(safe_unpickle(data, what), what)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{what} has no '{'data' if 'data' not in batch else label_key}' entry; is it a CIFAR batch?")
    pixels = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise DataError(f"{what}: 'data' is {pixels.dtype} {pixels.shape}, expected uint8 (N, 3072)")
    if labels.shape != (pixels.shape[0],):
        raise DataError(f"{what}: {pixels.shape[0]} images but {labels.size} labels; the file is corrupted")
    # Rows are R(1024) G(1024) B(1024), each plane row-major 32x32.
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _Members:
    """Read named files from the extracted folder or straight out of the .tar.gz."""

    def __init__(self, source: Path, folder: str):
        self.source = source
        self.folder = folder

    def read_all(self, names: list[str]) -> dict[str, bytes]:
        if self.source.is_dir():
            out = {}
            for name in names:
                path = self.source / name
                if not path.is_file():
                    raise DataError(f"{path} is missing; the dataset folder is incomplete: download it again")
                out[name] = path.read_bytes()
            return out
        return _read_tar_members(self.source, names)


def _read_tar_members(archive: Path, names: list[str]) -> dict[str, bytes]:
    """Read the members whose base names are ``names`` from a tar archive, without extracting."""
    wanted = set(names)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in out:
                    f = tar.extractfile(member)
                    assert f is not None
                    out[base] = f.read()
                    if len(out) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{archive} is truncated or corrupted ({type(err).__name__}: {err}); delete it and download it again"
        ) from err
    missing = sorted(wanted - set(out))
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; it is not the official archive: download it again")
    return out


class _CifarBase(DatasetSource):
    folder: str = ""
    archive: str = ""
    train_members: tuple[str, ...] = ()
    test_members: tuple[str, ...] = ()
    meta_member: str = ""
    label_key: str = ""
    names_key: str = ""
    license = _CIFAR_LICENSE
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"
    hflip = True
    hflip_reason = "objects: a mirrored object keeps its class"

    @property
    def expected_files(self) -> str:  # type: ignore[override]
        return f"{self.archive} or the extracted {self.folder}/"

    def find(self, directory: Path) -> Path | None:
        if directory.is_file():
            return directory if directory.name.endswith((".tar.gz", ".tgz", ".tar")) else None
        for candidate in (directory / self.folder, directory):
            if (candidate / self.train_members[0]).is_file():
                return candidate
        if (directory / self.archive).is_file():
            return directory / self.archive
        return None

    def source_files(self, source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        names = (*self.train_members, *self.test_members, self.meta_member)
        return [source / n for n in names if (source / n).is_file()]

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        names = [*self.train_members, *self.test_members, self.meta_member]
        raw = _Members(source, self.folder).read_all(names)
        split = {}
        for part, members in (("train", self.train_members), ("test", self.test_members)):
            batches = [parse_batch(raw.pop(m), f"{source}:{m}", self.label_key) for m in members]
            split[part] = (
                np.concatenate([b[0] for b in batches]),
                np.concatenate([b[1] for b in batches]),
            )
        meta = _text_keys(safe_unpickle(raw[self.meta_member], f"{source}:{self.meta_member}"), self.meta_member)
        if self.names_key not in meta:
            raise DataError(f"{source}:{self.meta_member} has no '{self.names_key}'; replace it with the official file")
        class_names = _names(meta[self.names_key], self.meta_member)
        for part in ("train", "test"):
            labels = split[part][1]
            if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise DataError(f"{source}: {part} labels outside 0..{len(class_names) - 1}; the files are corrupted")
        extra: dict[str, Any] = {}
        if "coarse_label_names" in meta:
            extra["coarse_class_names"] = _names(meta["coarse_label_names"], self.meta_member)
        return Decoded(*split["train"], *split["test"], class_names=class_names, extra=extra)


@DATASETS.register("cifar10", "cifar-10")
class Cifar10(_CifarBase):
    name = "cifar10"
    description = "CIFAR-10: 60,000 32x32 colour images in 10 classes (50,000 train / 10,000 test)"
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    train_members = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_members = ("test_batch",)
    meta_member = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    resources = (
        Resource(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            "md5:c58f30108f718f92721af3b95e74349a",
            "163 MB",
        ),
    )


@DATASETS.register("cifar100", "cifar-100")
class Cifar100(_CifarBase):
    name = "cifar100"
    description = "CIFAR-100: 60,000 32x32 colour images in 100 fine classes (50,000 train / 10,000 test)"
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    train_members = ("train",)
    test_members = ("test",)
    meta_member = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    resources = (
        Resource(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            "md5:eb9058c3a382ffc7106e4002c42a8d85",
            "161 MB",
        ),
    )
