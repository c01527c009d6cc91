"""Shortcut ("decoy") benchmarks: a class-coded artefact added to any dataset, with its mask.

A shortcut benchmark asks whether a model is right for the right reasons (Ross, Hughes &
Doshi-Velez 2017): the training images carry an artefact that gives the label away, the test
images carry the same artefact de-correlated from the label. A model that learnt the artefact
instead of the object is near-perfect in training and poor on test; one whose explanations are
kept off the artefact (e.g. input-gradient penalties on the mask) is not fooled.

Each image gets its artefact in a corner drawn per image, and ``Split.masks`` marks it (1 on the
artefact), so wrong-reason scores (``teachx.evaluation.shortcut``) and mask penalties know where
it is. ``train`` chooses what the training split gets:

- ``confounded``: the artefact encodes the label (the benchmark);
- ``clean``: training images untouched, masks all zero (the clean-data ceiling);
- ``random``: a random artefact in training too (the artefact is noise, not a shortcut).

The test split always carries the random (de-correlated) artefact and is the same for every
``train`` mode with the same seed (its draws come from their own stream), so the three modes are
compared on identical test images. Results are built vectorised and stored in the decoded-array
cache (``teachx.data.cache``) like any decoded dataset, so a second load memory-maps them.

``decoy-fashion-mnist`` and ``decoy-mnist`` are the swatch benchmark as named datasets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from teachx.data.base import ImageDataset, Split
from teachx.data.cache import Decoded, cached_decode
from teachx.data.idx import MNIST, FashionMNIST
from teachx.data.sources import DATASETS, DatasetSource
from teachx.errors import ConfigError, DataError
from teachx.registry import Registry

#: What the training split gets (the test split always gets the random artefact).
TRAIN_MODES = ("confounded", "clean", "random")
#: Bumped when the recipe changes, so old cache entries are not reused.
BUILDER_VERSION = 1
_CHUNK = 8192  # images painted per step (bounds memory on memory-mapped sources)


class Shortcut:
    """One artefact kind: the value (one uint8 per channel) that each class code paints.

    Subclasses set ``name`` and ``min_channels`` and implement ``values``; placement (a
    ``size`` x ``size`` square in a corner drawn per image) is shared.
    """

    name: ClassVar[str] = ""
    min_channels: ClassVar[int] = 1

    def __init__(self, num_classes: int, channels: int):
        self.num_classes, self.channels = int(num_classes), int(channels)

    def values(self) -> np.ndarray:
        """(num_classes, channels) uint8: the artefact's pixel value for each class code."""
        raise NotImplementedError


SHORTCUTS: Registry[type[Shortcut]] = Registry("shortcut")


def swatch_shades(num_classes: int) -> np.ndarray:
    """Grey levels per class: Decoy-MNIST's 255 - 25*y, with a smaller even step for more than 11 classes.

    The step is 25 (the paper's) while the shades fit in [5, 255]; beyond 11 classes it shrinks to
    250 / (K - 1), so the shades stay evenly spaced over [5, 255] and distinct (up to 251 classes).
    """
    if num_classes > 251:
        raise ConfigError(
            f"shortcut 'swatch' has 251 distinct grey shades, not enough for {num_classes} classes; use kind 'patch'"
        )
    step = 25.0 if num_classes <= 11 else 250.0 / (num_classes - 1)
    return np.array([255 - round(k * step) for k in range(num_classes)], dtype=np.uint8)


@SHORTCUTS.register("swatch", "decoy")
class Swatch(Shortcut):
    """Decoy-MNIST (Ross, Hughes & Doshi-Velez 2017, "Right for the Right Reasons"): a grey square in a
    random corner whose shade is 255 - 25*y (10 classes; see ``swatch_shades`` for others), grey on
    every channel of colour images."""

    name = "swatch"

    def values(self) -> np.ndarray:
        return np.repeat(swatch_shades(self.num_classes)[:, None], self.channels, axis=1)


def patch_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 fixed, well-separated colours: the 8 corners of the RGB cube, then orange and
    violet, then the other points of the {0, 128, 255}^3 grid; a finer grid beyond 27 classes."""
    levels = 3
    while levels**3 < num_classes:
        levels += 1
    grid = [
        tuple(int(round(255 * i / (levels - 1))) for i in (r, g, b))
        for r in range(levels)
        for g in range(levels)
        for b in range(levels)
    ]
    first = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (0, 255, 255),
        (255, 0, 255),
        (255, 255, 255),
        (0, 0, 0),
        (255, 128, 0),
        (128, 0, 255),
    ]
    ordered = [c for c in first if c in grid] + [c for c in grid if c not in first]
    return np.array(ordered[:num_classes], dtype=np.uint8)


@SHORTCUTS.register("patch", "colour_patch", "color_patch")
class Patch(Shortcut):
    """A square in a random corner whose colour encodes the class (a fixed palette, ``patch_palette``):
    the colour-image analogue of Decoy-MNIST's swatch, for CIFAR-10 and other RGB data (cf. the
    coloured-patch confounders of Rieger et al. 2020, "Interpretations are useful")."""

    name = "patch"
    min_channels = 3

    def values(self) -> np.ndarray:
        out = np.full((self.num_classes, self.channels), 255, dtype=np.uint8)  # extra channels (alpha): opaque
        out[:, :3] = patch_palette(self.num_classes)
        return out


# ----------------------------------------------------------------------------- building


def _check(ds: ImageDataset, kind: str, train: str, size: int, seed: int) -> str:
    kind = SHORTCUTS.canonical(kind)
    if train not in TRAIN_MODES:
        raise ConfigError(f"shortcut train mode must be one of {', '.join(TRAIN_MODES)}, got {train!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"shortcut size must be an integer >= 1 (pixels), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"shortcut seed must be an integer >= 0, got {seed!r}")
    h, w = ds.image_size
    if size > min(h, w):
        raise ConfigError(
            f"shortcut size {size} does not fit into the {h}x{w} images of '{ds.name}'; use a size <= {min(h, w)}"
        )
    cls = SHORTCUTS.get(kind)
    if ds.channels < cls.min_channels:
        raise ConfigError(
            f"shortcut '{kind}' colours a patch by class and needs colour images, but '{ds.name}' has "
            f"{ds.channels} channel(s); use data.shortcut=swatch (kind='swatch'), the grey Decoy-MNIST square"
        )
    if "shortcut" in ds.extra:
        raise ConfigError(f"'{ds.name}' already carries a shortcut artefact; add one to the original dataset instead")
    return kind


def _content_hash(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(f"{array.dtype.str}{tuple(array.shape)}".encode())
        for start in range(0, len(array), _CHUNK):
            h.update(np.ascontiguousarray(array[start : start + _CHUNK]).data)
    return h.hexdigest()


def source_identity(ds: ImageDataset) -> dict[str, Any]:
    """What identifies ``ds``'s arrays, for the cache key: the key and digests of the cache entry they
    are mapped from (free), else a sha256 of their bytes (in-memory data)."""
    arrays = [ds.train.images, ds.train.labels, ds.test.images, ds.test.labels]
    entry = ds.extra.get("cache_path")
    if entry and all(isinstance(a, np.memmap) and a.filename for a in arrays):
        entry_dir = Path(entry).resolve()
        if all(Path(a.filename).resolve().parent == entry_dir for a in arrays):
            try:
                meta = json.loads((entry_dir / "meta.json").read_text())
                return {"cache_key": meta["key"], "sha256": meta["sha256"]}
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return {"content_sha256": _content_hash(arrays), "classes": len(ds.class_names)}


def _draw(
    rng: np.random.Generator, n: int, num_classes: int, labels: Optional[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Corner (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) and class code per image:
    the label when given (confounded), else uniform over the classes, independent of the label."""
    corners = rng.integers(0, 4, size=n)
    codes = np.asarray(labels, dtype=np.int64) if labels is not None else rng.integers(0, num_classes, size=n)
    return corners, codes


def _paint(
    images: np.ndarray, corners: np.ndarray, codes: np.ndarray, values: np.ndarray, size: int, bar: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A painted copy of ``images`` and the masks, chunk by chunk (the source is never written)."""
    n, h, w, _ = images.shape
    out = np.empty(images.shape, dtype=np.uint8)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    top = np.where(corners >= 2, h - size, 0)
    left = np.where(corners % 2 == 1, w - size, 0)
    offsets = np.arange(size)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        out[start:stop] = images[start:stop]
        index = np.arange(start, stop)[:, None, None]
        rows = (top[start:stop, None] + offsets)[:, :, None]
        cols = (left[start:stop, None] + offsets)[:, None, :]
        out[index, rows, cols] = values[codes[start:stop]][:, None, None, :]
        masks[index, rows, cols] = 1
        bar.update(stop - start)
    return out, masks


def apply_shortcut(
    ds: ImageDataset,
    kind: str,
    *,
    train: str = "confounded",
    size: int = 4,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> ImageDataset:
    """``ds`` with a shortcut artefact (``SHORTCUTS``: swatch, patch) in every image and its masks.

    ``train``: confounded (the artefact encodes the label) | clean (training images untouched,
    masks zero) | random (de-correlated artefact in training too); the test split always gets the
    de-correlated artefact, the same for every ``train`` with the same ``seed``. ``size``: side of
    the square in pixels. Deterministic in ``seed``; ``ds``'s arrays are only read. Normalisation
    statistics are recomputed from the new training images. Cached under ``cache_dir`` (default
    ``$TEACHX_CACHE``), keyed by ``ds``'s identity and these options.
    """
    kind = _check(ds, kind, train, size, seed)
    size, seed = int(size), int(seed)
    shortcut = SHORTCUTS.get(kind)(ds.num_classes, ds.channels)
    name = f"{ds.name}+{kind}" + {"confounded": "", "clean": "(clean train)", "random": "(random train)"}[train]
    options = {"kind": kind, "train": train, "size": size, "seed": seed}

    def build() -> Decoded:
        from tqdm.auto import tqdm

        values = shortcut.values()
        k = ds.num_classes
        n_train, n_test = len(ds.train), len(ds.test)
        desc = f"adding a {kind} to {ds.name}"
        with tqdm(total=n_train + n_test, unit="img", desc=desc, disable=not progress, leave=False) as bar:
            train_rng, test_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
            if train == "clean":
                train_images = ds.train.images  # stored as is (np.save only reads it)
                train_masks = np.zeros(ds.train.images.shape[:3], dtype=np.uint8)
                bar.update(n_train)
            else:
                labels = np.asarray(ds.train.labels) if train == "confounded" else None
                corners, codes = _draw(train_rng, n_train, k, labels)
                train_images, train_masks = _paint(ds.train.images, corners, codes, values, size, bar)
            corners, codes = _draw(test_rng, n_test, k, None)
            test_images, test_masks = _paint(ds.test.images, corners, codes, values, size, bar)
        extra = {key: v for key, v in ds.extra.items() if key not in ("cache_path", "hflip")}
        extra["shortcut"] = dict(options)
        extra["notices"] = list(extra.get("notices", [])) + [
            f"{kind} artefact ({size}x{size} px, random corner): training images {_TRAIN_TEXT[train]}; "
            f"test images: class-independent (seed {seed})"
        ]
        return Decoded(
            train_images,
            np.asarray(ds.train.labels),
            test_images,
            np.asarray(ds.test.labels),
            class_names=list(ds.class_names),
            extra=extra,
            train_masks=train_masks,
            test_masks=test_masks,
        )

    key = {"builder": f"{__name__}:{BUILDER_VERSION}", "source": source_identity(ds), "options": options}
    decoded = cached_decode(name, key, build, cache_dir)
    extra = dict(decoded.extra)
    if decoded.cache_path:
        extra["cache_path"] = decoded.cache_path
    extra["hflip"] = False  # a flip moves the artefact to another corner
    return ImageDataset(
        name=name,
        class_names=list(decoded.class_names),
        train=Split(decoded.train_images, decoded.train_labels, decoded.train_masks),
        test=Split(decoded.test_images, decoded.test_labels, decoded.test_masks),
        mean=tuple(decoded.mean),
        std=tuple(decoded.std),
        source=ds.source,
        license=ds.license,
        extra=extra,
        hflip=False,
    )


_TRAIN_TEXT = {"confounded": "class-coded", "clean": "untouched", "random": "class-independent"}


# ----------------------------------------------------------------------------- named benchmarks


class DecoySource(DatasetSource):
    """A named shortcut benchmark: the ``base`` dataset, loaded as usual, then ``apply_shortcut``."""

    base: ClassVar[str] = ""
    kind: ClassVar[str] = "swatch"
    hflip = False
    hflip_reason = "a decoy's corner position is part of the benchmark"

    def _base(self) -> DatasetSource:
        return DATASETS.get(self.base)()

    def find(self, directory: Path) -> Path | None:
        return self._base().find(directory)

    def source_files(self, source: Path) -> list[Path]:
        return self._base().source_files(source)

    def search_dirs(self, root: str | Path | None, arg: str | None = None) -> list[Path]:
        return self._base().search_dirs(root)

    def missing_message(self, root: str | Path | None, arg: str | None = None) -> str:
        return f"'{self.name}' is made from {self.base} on load; " + self._base().missing_message(root)

    def load(
        self,
        arg: str | None = None,
        root: str | Path | None = None,
        download: bool = False,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        **options: Any,
    ) -> ImageDataset:
        self.check_options(options)
        base = self._base()
        if base.locate(root) is None and not (download and base.resources):
            raise DataError(self.missing_message(root))
        ds = base.load(None, root=root, download=download, cache_dir=cache_dir, progress=progress)
        out = apply_shortcut(ds, self.kind, train="confounded", size=4, seed=0, progress=progress, cache_dir=cache_dir)
        out.name = self.name
        return out


@DATASETS.register("decoy-fashion-mnist", "decoy_fashion_mnist", "decoyfashionmnist")
class DecoyFashionMNIST(DecoySource):
    name = "decoy-fashion-mnist"
    description = (
        "Decoy-Fashion-MNIST: Fashion-MNIST with Decoy-MNIST's 4x4 grey corner swatch, shade coding the "
        "class in train and random in test (a shortcut benchmark; uses the fashion-mnist files)"
    )
    base = "fashion-mnist"
    license, url, resources = FashionMNIST.license, FashionMNIST.url, FashionMNIST.resources
    system_dirs, expected_files = FashionMNIST.system_dirs, FashionMNIST.expected_files


@DATASETS.register("decoy-mnist", "decoy_mnist", "decoymnist")
class DecoyMNIST(DecoySource):
    name = "decoy-mnist"
    description = (
        "Decoy-MNIST (Ross et al. 2017): MNIST with a 4x4 grey corner swatch, shade 255 - 25*y in train "
        "and random in test (a shortcut benchmark; uses the mnist files)"
    )
    base = "mnist"
    license, url, resources = MNIST.license, MNIST.url, MNIST.resources
    system_dirs, expected_files = MNIST.system_dirs, MNIST.expected_files
