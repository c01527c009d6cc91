"""The one dataset interface every format loader returns.

Images are decoded once into uint8 arrays (N, H, W, C) -- possibly memory-mapped cache files --
so that no epoch re-decodes them. Normalisation and augmentation happen on batches of tensors
(see ``teachx.data.transforms``), which lets IMPACTX apply the *same* crop/flip to a teacher map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class Split:
    """One split: uint8 images (N, H, W, C) and int64 labels (N,).

    ``masks`` (uint8 (N, H, W), 1 on an artefact, 0 elsewhere) says where a shortcut benchmark
    (``teachx.data.shortcuts``) put its artefact in each image: the region a model should *not*
    use, for wrong-reason scores and right-for-the-right-reasons penalties. None: no artefact known.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.images):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")
        if self.masks is not None and (self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]):
            raise ValueError(
                f"Split masks must be uint8 {tuple(self.images.shape[:3])} (one per image, 1 on the artefact), "
                f"got {self.masks.dtype} {tuple(self.masks.shape)}"
            )


@dataclass
class ImageDataset:
    """A dataset with its metadata. ``mean``/``std`` are per channel, in [0, 1] pixel units."""

    name: str
    class_names: list[str]
    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""  # where the files came from (path or URL), for reports
    license: str = ""  # attribution, when the data carries one
    extra: dict = field(default_factory=dict)
    hflip: bool = False  # does a horizontal flip keep the label? (yes for objects, no for digits)
    # R2R artefact benchmarks: which images carry the artefact, where, and the other test splits. For
    # evaluation only, read through ``teachx.data.artefacts.ground_truth(ds)`` and never by a method that
    # must find the artefact without annotations (see that module's docstring).
    _ground_truth: Optional[Any] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Kept in sync with ``extra["hflip"]`` for code that reads metadata generically; a value
        # given only in ``extra`` (older call sites) wins over the default.
        if "hflip" in self.extra:
            self.hflip = bool(self.extra["hflip"])
        else:
            self.extra["hflip"] = self.hflip

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[1]), int(self.train.images.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        """Whether both splits say where their artefact is (shortcut benchmarks)."""
        return self.train.masks is not None and self.test.masks is not None
