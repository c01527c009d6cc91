"""``outliers``: how unusual each sample's attribution map (or latent vector) is within its class, by the Local
Outlier Factor (Breunig et al. 2000; scikit-learn's ``LocalOutlierFactor``): the density around a sample
compared with the density around its neighbours. It suits rare artefacts (a few images); a large artefact
group is dense among itself, so its members look normal here and are better found by ``spray``. (An
Isolation Forest ranked a planted rare group lower on downsampled maps: its axis-aligned splits isolate
poorly in 64 dimensions of noise.)

Scores are the outlier factors (higher = more unusual; about 1 for an inlier). The candidate groups: the
samples whose factor is far above the class's own (modified z-score, median and MAD, above 3.5: Iglewicz and
Hoaglin's rule) as group 0, the rest as group 1; ranked by mean score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teachx.errors import ConfigError
from teachx.reveal.base import REVEAL_METHODS, CandidateGroup, Evidence, RevealMethod, RevealResult, prototypes_of
from teachx.reveal.spectral import _sklearn, normalise_rows
from teachx.reveal.spray import downsample_maps

#: a modified z-score above this flags a sample (Iglewicz and Hoaglin 1993)
Z_FLAG = 3.5


def modified_z(scores: np.ndarray) -> np.ndarray:
    """0.6745 (x - median) / MAD; 0 everywhere when the MAD is 0."""
    med = np.median(scores)
    mad = np.median(np.abs(scores - med))
    return np.zeros_like(scores) if mad == 0 else 0.6745 * (scores - med) / mad


@REVEAL_METHODS.register("outliers")
class Outliers(RevealMethod):
    """Local-Outlier-Factor scores within a class. ``source``: 'maps' (downsampled to ``size``) or
    'activations'; ``n_neighbors``: the neighbourhood the densities are compared in."""

    name = "outliers"
    finds = "rare"

    def __init__(self, source: str = "maps", size: int = 8, n_neighbors: int = 10):
        if source not in ("maps", "activations"):
            raise ConfigError(f"outliers: unknown source '{source}'; valid: maps, activations")
        if int(n_neighbors) < 2:
            raise ConfigError("n_neighbors must be at least 2")
        self.source, self.size, self.n_neighbors = source, int(size), int(n_neighbors)
        self.min_samples = max(8, self.n_neighbors + 2)

    def options(self) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "n_neighbors": self.n_neighbors}

    def reveal(self, evidence: Evidence) -> RevealResult:
        self.check_size(evidence)
        _sklearn()
        from sklearn.decomposition import PCA
        from sklearn.neighbors import LocalOutlierFactor

        raw = evidence.source(self.source)
        x = normalise_rows(downsample_maps(raw, self.size) if self.source == "maps" else raw)
        lof = LocalOutlierFactor(n_neighbors=min(self.n_neighbors, len(x) - 1)).fit(x)
        scores = -lof.negative_outlier_factor_
        labels = np.where(modified_z(scores) > Z_FLAG, 0, 1).astype(np.int64)
        indices = np.asarray(evidence.indices)
        groups = []
        for g in (0, 1):
            rows = np.flatnonzero(labels == g)
            if not len(rows):
                continue
            typical = rows[np.argsort(-scores[rows], kind="stable")[:4]] if g == 0 else prototypes_of(x, rows)
            groups.append(
                CandidateGroup(
                    group=g,
                    members=tuple(int(i) for i in indices[rows]),
                    prototypes=tuple(int(i) for i in indices[typical]),
                    score=float(scores[rows].mean()),
                    parts={"share": len(rows) / len(x)},
                )
            )
        groups.sort(key=lambda g: (-g.score, g.group))
        view = PCA(min(2, x.shape[1]), random_state=0).fit_transform(x)
        if view.shape[1] < 2:
            view = np.column_stack([view, np.zeros((len(x), 2 - view.shape[1]))])
        return RevealResult(
            method=self.name,
            indices=indices,
            scores=scores.astype(np.float64),
            labels=labels,
            embedding=np.asarray(view, dtype=np.float64),
            groups=tuple(groups),
            options=self.options(),
        )
