"""Datasets: one interface (``load_dataset``) over every supported format.

>>> ds = load_dataset("bundled")                  # ships with teachx, works offline
>>> ds = load_dataset("cifar10", download=True)   # official files, checksum-verified
>>> ds = load_dataset("imagefolder:/data/pets.zip", size=64)
>>> ds = apply_shortcut(load_dataset("cifar10"), "patch")   # a shortcut benchmark, masks in ds.train.masks
>>> ds = apply_artefact(load_dataset("cifar10"), "bandaid", classes=[0], p=0.1)   # an R2R artefact benchmark

Each load returns an :class:`ImageDataset` whose splits hold uint8 (N, H, W, C) images (memory-mapped
from the decoded-array cache after the first load) and int64 labels, plus class names and the
per-channel mean/std of the training split. Batches, augmentation and splits live in
``teachx.data.transforms`` and ``teachx.data.loading``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teachx.data.base import ImageDataset, Split
from teachx.data.sources import DATASETS, DatasetSource, default_data_root, get_source

# Format modules register themselves in DATASETS on import.
from teachx.data import cifar as _cifar  # noqa: F401,E402
from teachx.data import idx as _idx  # noqa: F401,E402
from teachx.data import imagefolder as _imagefolder  # noqa: F401,E402
from teachx.data import stl10 as _stl10  # noqa: F401,E402
from teachx.data.loading import BatchIterator, train_val_split  # noqa: E402
from teachx.data.shortcuts import SHORTCUTS, apply_shortcut  # noqa: E402 (registers the decoy-* datasets)
from teachx.data.artefacts import ARTEFACTS, apply_artefact  # noqa: E402
from teachx.data.transforms import Augment, denormalize, normalize  # noqa: E402
from teachx.data import options as _options  # noqa: F401,E402 (adds the data.* config checks)

__all__ = [
    "ARTEFACTS",
    "DATASETS",
    "Augment",
    "BatchIterator",
    "DatasetSource",
    "ImageDataset",
    "SHORTCUTS",
    "Split",
    "apply_artefact",
    "apply_shortcut",
    "dataset_status",
    "default_data_root",
    "denormalize",
    "get_source",
    "load_dataset",
    "normalize",
    "train_val_split",
]


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> ImageDataset:
    """Load dataset ``name`` (see ``DATASETS.names()``; ``imagefolder:PATH`` for your own images).

    ``root`` is the folder holding the dataset's files (default ``$TEACHX_DATA/<name>`` or
    ``~/.cache/teachx/data/<name>``); ``download=True`` fetches missing official files and verifies
    their checksums; decoded arrays are cached under ``cache_dir`` (default ``$TEACHX_CACHE`` or
    ``~/.cache/teachx/cache``). ``options`` are format specific (imagefolder: ``size``,
    ``channels``, ``test_fraction``, ``seed``, ``workers``); unknown ones raise a ConfigError.
    """
    source, arg = get_source(name)
    return source.load(arg, root=root, download=download, cache_dir=cache_dir, progress=progress, **options)


def dataset_status() -> list[dict]:
    """One row per registered dataset: name, aliases, description, locations, present, license, url..."""
    rows = []
    for key in DATASETS.names():
        row = DATASETS.get(key)().status()
        row["aliases"] = DATASETS.aliases(key)
        rows.append(row)
    return rows
