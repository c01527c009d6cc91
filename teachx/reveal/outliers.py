"""``outliers``: how unusual each sample's attribution map (or latent vector) is within its class, by an
Isolation Forest (Liu et al. 2008; scikit-learn's ``IsolationForest``): a sample that random axis-aligned
splits isolate in few steps is unlike the rest. It suits rare artefacts (a small poisoned fraction); a
large artefact group is dense among itself and is better found by ``spray``.

Scores are ``-score_samples`` (higher = more unusual). The candidate groups: the samples the forest flags
(its own threshold, ``contamination="auto"``) as group 0, the rest as group 1; ranked by mean score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teachx.errors import ConfigError
from teachx.reveal.base import REVEAL_METHODS, CandidateGroup, Evidence, RevealMethod, RevealResult, prototypes_of
from teachx.reveal.spectral import _sklearn, normalise_rows
from teachx.reveal.spray import downsample_maps


@REVEAL_METHODS.register("outliers")
class Outliers(RevealMethod):
    """Isolation-Forest outlier scores within a class. ``source``: 'maps' (downsampled to ``size``) or
    'activations'; ``n_estimators`` trees; ``seed`` for the forest."""

    name = "outliers"

    def __init__(self, source: str = "maps", size: int = 8, n_estimators: int = 200, seed: int = 0):
        if source not in ("maps", "activations"):
            raise ConfigError(f"outliers: unknown source '{source}'; valid: maps, activations")
        self.source, self.size, self.n_estimators, self.seed = source, int(size), int(n_estimators), int(seed)

    def options(self) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "n_estimators": self.n_estimators, "seed": self.seed}

    def reveal(self, evidence: Evidence) -> RevealResult:
        self.check_size(evidence)
        _sklearn()
        from sklearn.decomposition import PCA
        from sklearn.ensemble import IsolationForest

        raw = evidence.source(self.source)
        x = normalise_rows(downsample_maps(raw, self.size) if self.source == "maps" else raw)
        forest = IsolationForest(n_estimators=self.n_estimators, contamination="auto", random_state=self.seed).fit(x)
        scores = -forest.score_samples(x)
        flagged = forest.predict(x) == -1
        labels = np.where(flagged, 0, 1).astype(np.int64)
        indices = np.asarray(evidence.indices)
        groups = []
        for g in (0, 1):
            rows = np.flatnonzero(labels == g)
            if len(rows):
                groups.append(
                    CandidateGroup(
                        group=g,
                        members=tuple(int(i) for i in indices[rows]),
                        prototypes=tuple(int(i) for i in indices[rows[np.argsort(-scores[rows], kind="stable")[:4]]])
                        if g == 0
                        else tuple(int(i) for i in indices[prototypes_of(x, rows)]),
                        score=float(scores[rows].mean()),
                        parts={"share": len(rows) / len(x)},
                    )
                )
        groups.sort(key=lambda g: (-g.score, g.group))
        k = min(2, x.shape[1], len(x))
        view = PCA(k, random_state=self.seed).fit_transform(x) if k else np.zeros((len(x), 0))
        view = np.column_stack([view, np.zeros((len(x), 2 - view.shape[1]))]) if view.shape[1] < 2 else view
        return RevealResult(
            method=self.name,
            indices=indices,
            scores=scores.astype(np.float64),
            labels=labels,
            embedding=np.asarray(view, dtype=np.float64),
            groups=tuple(groups),
            options=self.options(),
        )
