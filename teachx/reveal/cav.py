"""Concept activation vectors (CAVs): a direction in a layer's (pooled) activation space along which a
group of samples -- a discovered group or samples a person marks -- differs from the rest of its class.

- ``pattern`` (default): the signal ("pattern") direction of Haufe et al. (2014): the covariance of the
  activations with the concept label, cov(x, y) / var(y), normalised. It points where the concept *changes*
  the activations. RR-ClArC (Dreyer et al. 2023) recommends it: the weight vector of a classifier also
  cancels noise shared with other features and can point far from the concept itself.
- ``svm``: the weight vector of a linear SVM (scikit-learn ``LinearSVC``, classes balanced), normalised.
- ``logistic``: the weight vector of a logistic regression (classes balanced), normalised.

Every CAV points towards the concept (concept samples score higher on average). ``cav_scores`` projects
activations on it; ``auroc`` says how well the scores retrieve the concept when the truth is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from teachx.errors import ConfigError, DataError

CAV_KINDS = ("pattern", "svm", "logistic")


@dataclass(frozen=True)
class Cav:
    """A unit concept direction at ``layer`` and the mean score of the concept samples and of the rest."""

    direction: np.ndarray
    kind: str
    layer: str
    concept_mean: float
    rest_mean: float

    def scores(self, activations: np.ndarray) -> np.ndarray:
        return cav_scores(activations, self.direction)

    @property
    def threshold(self) -> float:
        """The retrieval threshold: halfway between the concept samples' and the rest's mean score."""
        return (self.concept_mean + self.rest_mean) / 2

    def retrieve(
        self, scores: np.ndarray, indices: np.ndarray, members: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(retrieved, to localise): the ``indices`` whose ``scores`` reach :attr:`threshold`, best first, and the
        images to localise: the concept's ``members`` first, then the retrieved ones, at most ``limit``."""
        order = np.argsort(-scores, kind="stable")
        retrieved = np.asarray(indices)[order][scores[order] >= self.threshold]
        chosen = list(dict.fromkeys([*np.asarray(members).tolist(), *retrieved.tolist()]))[:limit]
        return retrieved, np.asarray(chosen, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layer": self.layer,
            "concept_mean": self.concept_mean,
            "rest_mean": self.rest_mean,
            "dim": int(self.direction.size),
        }


def _labels(activations: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(activations, dtype=np.float64)
    y = np.asarray(concept).astype(bool)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"activations must be (N, D) with N = {len(y)} labels, got shape {x.shape}")
    n_in = int(y.sum())
    if n_in < 2 or len(y) - n_in < 2:
        raise DataError(
            f"a CAV needs at least 2 concept samples and 2 others; got {n_in} and {len(y) - n_in} "
            "(mark more samples, or choose a larger group)"
        )
    return x, y


def _unit(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64).ravel()
    norm = np.linalg.norm(w)
    return w / norm if norm > 0 else w


def pattern_cav(activations: np.ndarray, concept: np.ndarray) -> np.ndarray:
    """cov(x, y) / var(y) over samples, normalised to unit length (Haufe et al. 2014)."""
    x, y = _labels(activations, concept)
    yf = y.astype(np.float64)
    yc = yf - yf.mean()
    cov = (x - x.mean(0)).T @ yc / (len(y) - 1)
    return _unit(cov / (yc @ yc / (len(y) - 1)))


def classifier_cav(activations: np.ndarray, concept: np.ndarray, kind: str = "svm", seed: int = 0) -> np.ndarray:
    """The normalised weight vector of a linear classifier (``svm`` or ``logistic``), classes balanced."""
    from teachx.reveal.spectral import _sklearn

    _sklearn()
    x, y = _labels(activations, concept)
    if kind == "svm":
        from sklearn.svm import LinearSVC

        clf = LinearSVC(class_weight="balanced", random_state=seed, max_iter=20000)
    elif kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(class_weight="balanced", max_iter=5000)
    else:
        raise ConfigError(f"unknown CAV kind '{kind}'; valid: {', '.join(CAV_KINDS)}")
    clf.fit(x, y)
    return _unit(clf.coef_[0])


def cav_scores(activations: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Each sample's projection on the concept direction (higher = more of the concept)."""
    return np.asarray(activations, dtype=np.float64) @ np.asarray(direction, dtype=np.float64)


def fit_cav(activations: np.ndarray, concept: np.ndarray, kind: str = "pattern", layer: str = "") -> Cav:
    """The CAV of ``kind`` for the boolean ``concept`` rows of ``activations`` against the others."""
    if kind not in CAV_KINDS:
        raise ConfigError(f"unknown CAV kind '{kind}'; valid: {', '.join(CAV_KINDS)}")
    w = pattern_cav(activations, concept) if kind == "pattern" else classifier_cav(activations, concept, kind)
    y = np.asarray(concept).astype(bool)
    s = cav_scores(activations, w)
    if s[y].mean() < s[~y].mean():  # always towards the concept
        w, s = -w, -s
    return Cav(w, kind, layer, float(s[y].mean()), float(s[~y].mean()))


def fit_concept_cav(
    class_x: np.ndarray, concept: np.ndarray, other_x: np.ndarray, kind: str = "logistic", layer: str = ""
) -> Cav:
    """The CAV of the boolean ``concept`` rows of ``class_x`` (its class's images) against every other image:
    the rest of its class and the other classes' images ``other_x``, as Reveal-to-Revise fits an artefact's CAV
    against the rest of the dataset. Why not against the rest of the class alone: such a direction need not
    tell the concept from the other classes' images, which it also scores when it retrieves; with them among
    the negatives it leaves out what the concept shares with them (on the Fashion-MNIST band-aid, retrieval
    AUROC over all training images 0.936 against 0.946, within the class as good). Reads which class each image
    is in: no annotation."""
    x = np.asarray(class_x, dtype=np.float64)
    others = np.asarray(other_x, dtype=np.float64).reshape(-1, x.shape[1])
    return fit_cav(np.r_[x, others], np.r_[np.asarray(concept).astype(bool), np.zeros(len(others), bool)], kind, layer)


#: at most this many images of the other classes stand for them when a concept is grown (evenly spaced)
OTHERS = 4000


def otsu_threshold(scores: np.ndarray) -> float:
    """The cut of ``scores`` in two that maximises the between-part variance (Otsu 1979): halfway between the
    last score of the low part and the first of the high part."""
    v = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if len(v) < 2:
        raise ValueError("a split needs at least 2 scores")
    k = np.arange(1, len(v))
    low = np.cumsum(v)[:-1]
    w = k / len(v)
    between = w * (1 - w) * (low / k - (v.sum() - low) / (len(v) - k)) ** 2
    j = int(np.argmax(between))
    return float((v[j] + v[j + 1]) / 2)


def grow_concept(class_x: np.ndarray, seed: np.ndarray, other_x: np.ndarray, rounds: int = 5) -> np.ndarray:
    """The class's images that carry the concept of ``seed``, grown from that seed by self-training: a logistic
    CAV of the set against the images of the *other* classes (``other_x``; at most :data:`OTHERS` of them, evenly
    spaced) scores the class's images (``class_x``), and the high part of an Otsu split of those scores is the
    next set; ``rounds`` times at most, stopping when the set stays the same or would leave fewer than 2 on a
    side. Returns the set as a boolean mask over the rows of ``class_x``.

    Why against the other classes: a clustering group is often a pure but partial piece of an artefact (the
    timestamp in one corner). Fitted against the rest of its own class, its CAV learns what the piece has and
    the other pieces lack (the corner), since those are among its negatives; the other classes lack the
    artefact altogether (a shortcut sits in one class), so against them the CAV learns the artefact, and the
    class's images that carry it score high. Reads features and which class each image is in: no annotation."""
    x = np.asarray(class_x, dtype=np.float64)
    y = np.asarray(seed).astype(bool)
    others = np.asarray(other_x, dtype=np.float64)
    others = others[:: max(1, len(others) // OTHERS)]
    if len(others) < 2:
        return y
    for _ in range(int(rounds)):
        cav = fit_cav(np.r_[x[y], others], np.r_[np.ones(int(y.sum()), bool), np.zeros(len(others), bool)], "logistic")
        s = cav.scores(x)
        grown = s >= otsu_threshold(s)
        if np.array_equal(grown, y) or not 2 <= grown.sum() <= len(grown) - 2:
            break
        y = grown
    return y


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``truth`` (the Mann-Whitney U statistic over
    average ranks, ties counted half); NaN when one side is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
