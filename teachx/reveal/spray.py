"""``spray``: Spectral Relevance Analysis (Lapuschkin et al., Nat. Commun. 2019) of one class's attribution
maps -- maps downsampled to ``size`` x ``size`` (block means; small shifts of the same evidence then match)
and scaled to unit norm, then the spectral pipeline of :mod:`teachx.reveal.spectral`."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from teachx.errors import ConfigError
from teachx.reveal.base import REVEAL_METHODS, Evidence, RevealMethod, RevealResult
from teachx.reveal.spectral import normalise_rows, spectral_reveal

EMBEDDINGS = ("spectral", "tsne")


def downsample_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) maps -> (N, size*size) block means (channels summed first)."""
    t = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    if t.dim() == 4:
        t = t.sum(1)
    if t.dim() != 3:
        raise ValueError(f"maps must be (N, H, W) or (N, C, H, W), got shape {tuple(t.shape)}")
    size = min(size, t.shape[-2], t.shape[-1])
    small = torch.nn.functional.adaptive_avg_pool2d(t[:, None], size)[:, 0]
    return small.reshape(len(t), -1).double().numpy()


class SpectralMethod(RevealMethod):
    """The options both SpRAy methods share."""

    def __init__(
        self,
        n_neighbors: int = 10,
        max_groups: int = 8,
        n_groups: Optional[int] = None,
        embedding: str = "spectral",
        seed: int = 0,
    ):
        if embedding not in EMBEDDINGS:
            raise ConfigError(f"unknown embedding '{embedding}'; valid: {', '.join(EMBEDDINGS)}")
        if int(n_neighbors) < 2 or int(max_groups) < 2 or (n_groups is not None and int(n_groups) < 2):
            raise ConfigError("n_neighbors, max_groups and n_groups must be at least 2")
        self.n_neighbors, self.max_groups = int(n_neighbors), int(max_groups)
        self.n_groups = None if n_groups is None else int(n_groups)
        self.embedding, self.seed = embedding, int(seed)
        self.min_samples = max(8, self.n_neighbors + 2)

    def options(self) -> dict[str, Any]:
        return {
            "n_neighbors": self.n_neighbors,
            "max_groups": self.max_groups,
            "n_groups": self.n_groups,
            "embedding": self.embedding,
            "seed": self.seed,
        }

    def features(self, evidence: Evidence) -> np.ndarray:
        raise NotImplementedError

    def reveal(self, evidence: Evidence) -> RevealResult:
        self.check_size(evidence)
        return spectral_reveal(
            self.name,
            self.features(evidence),
            np.asarray(evidence.indices),
            n_neighbors=self.n_neighbors,
            max_groups=self.max_groups,
            n_groups=self.n_groups,
            embedding=self.embedding,
            seed=self.seed,
            options=self.options(),
        )


@REVEAL_METHODS.register("spray")
class Spray(SpectralMethod):
    """SpRAy on attribution maps. ``size``: the side the maps are downsampled to (SpRAy uses coarse maps: a
    shortcut is a place, and exact pixels differ from image to image)."""

    name = "spray"
    source = "maps"

    def __init__(self, size: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        if int(size) < 1:
            raise ConfigError("size must be at least 1")
        self.size = int(size)

    def options(self) -> dict[str, Any]:
        return {"size": self.size, **super().options()}

    def features(self, evidence: Evidence) -> np.ndarray:
        return normalise_rows(downsample_maps(evidence.source("maps"), self.size))
