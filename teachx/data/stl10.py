"""STL-10 from the official binary release (``stl10_binary/``); the unlabeled split is ignored.

Each image is 3x96x96 bytes stored channel by channel, each channel *column-major* (Matlab order);
labels are bytes 1..10. The source is the extracted folder or the ``.tar.gz`` (streamed, not extracted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teachx.data.cache import Decoded
from teachx.data.cifar import _read_tar_members
from teachx.data.download import Resource
from teachx.data.sources import DATASETS, DatasetSource
from teachx.errors import DataError

_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE
_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


def decode_stl_images(raw: bytes | np.ndarray, what: str) -> np.ndarray:
    """(N, 96, 96, 3) uint8 from the column-major 3x96x96 records."""
    flat = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if flat.size % _IMAGE_BYTES:
        raise DataError(
            f"{what} has {flat.size} bytes, not a multiple of {_IMAGE_BYTES} (3x96x96): truncated or corrupted; "
            f"download the dataset again"
        )
    # Record layout [n, channel, column(x), row(y)] -> [n, y, x, channel].
    return np.ascontiguousarray(flat.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 3, 2, 1))


def decode_stl_labels(raw: bytes, what: str, n_images: int, n_classes: int) -> np.ndarray:
    labels = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    if labels.size != n_images:
        raise DataError(f"{what} has {labels.size} labels for {n_images} images: truncated or corrupted")
    if labels.size and (labels.min() < 1 or labels.max() > n_classes):
        raise DataError(f"{what} has labels outside 1..{n_classes}: corrupted; download the dataset again")
    return labels - 1


@DATASETS.register("stl10", "stl-10")
class STL10(DatasetSource):
    name = "stl10"
    description = "STL-10: 96x96 colour images in 10 classes (5,000 train / 8,000 test; unlabeled split unused)"
    license = "STL-10, Coates, Lee & Ng, AISTATS 2011 (https://cs.stanford.edu/~acoates/stl10/); images from ImageNet"
    url = "https://cs.stanford.edu/~acoates/stl10/"
    hflip = True
    hflip_reason = "objects: a mirrored object keeps its class"
    expected_files = "stl10_binary.tar.gz or the extracted stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt)"
    resources = (
        Resource(
            "stl10_binary.tar.gz",
            ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",),
            "md5:91f7769df0f17e558f3565bffb0c7dfb",
            "2.6 GB",
        ),
    )

    def find(self, directory: Path) -> Path | None:
        if directory.is_file():
            return directory if directory.name.endswith((".tar.gz", ".tgz", ".tar")) else None
        for candidate in (directory / "stl10_binary", directory):
            if (candidate / "train_X.bin").is_file():
                return candidate
        archive = directory / "stl10_binary.tar.gz"
        return archive if archive.is_file() else None

    def source_files(self, source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        return [source / n for n in _FILES if (source / n).is_file()]

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        if source.is_dir():
            missing = [n for n in _FILES if not (source / n).is_file()]
            if missing:
                raise DataError(f"{source} lacks {', '.join(missing)}; the folder is incomplete: download STL-10 again")
            raw = {n: (source / n).read_bytes() for n in _FILES}
        else:
            raw = _read_tar_members(source, list(_FILES))
        class_names = [line.strip() for line in raw["class_names.txt"].decode("utf-8").splitlines() if line.strip()]
        if not class_names:
            raise DataError(f"{source}: class_names.txt is empty; replace it with the official file")
        arrays = []
        for part in ("train", "test"):
            images = decode_stl_images(raw.pop(f"{part}_X.bin"), f"{source}:{part}_X.bin")
            labels = decode_stl_labels(
                raw.pop(f"{part}_y.bin"), f"{source}:{part}_y.bin", len(images), len(class_names)
            )
            arrays += [images, labels]
        return Decoded(*arrays, class_names=class_names)
