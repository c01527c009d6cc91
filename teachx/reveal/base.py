"""The contract every reveal method follows: find groups of samples within one class that the model treats
alike and unlike the rest -- candidate shortcuts (Clever Hans behaviour) -- without annotations.

``method.reveal(evidence)`` takes the :class:`Evidence` of one class (its dataset indices and, per sample,
the attribution map and/or a layer's pooled activations) and returns a :class:`RevealResult`: a score per
sample (higher = more suspicious), a group label per sample, a 2-D embedding to show, and the candidate
groups ranked most suspicious first (:class:`CandidateGroup`). It must be deterministic for the same
evidence and options, and say in one line when the class is too small to analyse.

A new method is one file with a ``RevealMethod`` subclass decorated ``@REVEAL_METHODS.register("name")``;
``tests/test_reveal_contract.py`` runs the shared contract tests on every registered method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from teachx.errors import DataError
from teachx.registry import Registry

#: what a method reads from the evidence
SOURCES = ("maps", "activations")


@dataclass(frozen=True)
class Evidence:
    """One class's samples as a reveal method sees them.

    ``indices``: (N,) dataset indices (what a person marks and what the results name); ``maps``: (N, H, W)
    attribution maps (any teacher's, or a model's built-in maps); ``activations``: (N, D) pooled
    activations (or relevances) of one layer. A method needs at least the one its ``source`` names.
    """

    indices: np.ndarray
    maps: Optional[np.ndarray] = None
    activations: Optional[np.ndarray] = None
    label: Optional[int] = None

    def __post_init__(self) -> None:
        n = len(self.indices)
        for name in SOURCES:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"evidence {name} has {len(value)} rows for {n} indices")

    def __len__(self) -> int:
        return len(self.indices)

    def source(self, name: str) -> np.ndarray:
        """The (N, ...) array ``name`` ('maps' or 'activations'); a clear error when it is missing."""
        value = getattr(self, name, None)
        if value is None:
            raise DataError(f"this reveal method reads {name}, and none were given")
        return np.asarray(value)


@dataclass(frozen=True)
class CandidateGroup:
    """A group of samples proposed as a possible artefact (shortcut): ``members`` are dataset indices,
    ``prototypes`` its most typical members (closest to its centre), ``score`` the ranking score (higher =
    more suspicious, see the method's docs) and ``parts`` what the score was made of."""

    group: int
    members: tuple[int, ...]
    prototypes: tuple[int, ...]
    score: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "size": self.size,
            "score": self.score,
            "parts": dict(self.parts),
            "prototypes": list(self.prototypes),
            "members": list(self.members),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CandidateGroup":
        return cls(
            group=int(d["group"]),
            members=tuple(int(i) for i in d["members"]),
            prototypes=tuple(int(i) for i in d["prototypes"]),
            score=float(d["score"]),
            parts={str(k): float(v) for k, v in (d.get("parts") or {}).items()},
        )


@dataclass(frozen=True)
class RevealResult:
    """What a reveal method found in one class.

    ``scores`` (N,): per-sample suspicion, higher = more likely part of an artefact group; ``labels`` (N,):
    the group of each sample (-1: in none); ``embedding`` (N, 2): coordinates to plot; ``groups``: the
    candidate groups, most suspicious first; ``eigenvalues``: the spectrum the number of groups was read
    from (spectral methods), and ``n_groups_eigengap`` that number.
    """

    method: str
    indices: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    embedding: np.ndarray
    groups: tuple[CandidateGroup, ...]
    eigenvalues: Optional[np.ndarray] = None
    n_groups_eigengap: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)

    def group(self, group: int) -> CandidateGroup:
        """The candidate group with id ``group``; KeyError when there is none."""
        for g in self.groups:
            if g.group == group:
                return g
        raise KeyError(group)


class RevealMethod:
    """Base class; subclasses set ``name`` and ``source`` ('maps' or 'activations') and implement ``reveal``."""

    name: str = "reveal"
    source: str = "maps"
    #: the fewest samples of a class the method can analyse
    min_samples: int = 8
    #: what the method is made to find: 'groups' (a minority of samples alike among themselves, e.g. a
    #: poisoned share of a class) or 'rare' (a few samples unlike all others)
    finds: str = "groups"

    def reveal(self, evidence: Evidence) -> RevealResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """JSON-able options that change the result (part of the saved results' key)."""
        return {}

    def check_size(self, evidence: Evidence) -> None:
        """A one-line error when the class has too few samples to analyse."""
        if len(evidence) < self.min_samples:
            what = f"class {evidence.label}" if evidence.label is not None else "the class"
            raise DataError(
                f"{what} has {len(evidence)} samples; {self.name} needs at least {self.min_samples} to find groups "
                "(choose a larger class with --class, or use more data)"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


REVEAL_METHODS: Registry[type[RevealMethod]] = Registry("reveal method")


def prototypes_of(features: np.ndarray, rows: np.ndarray, k: int = 4) -> np.ndarray:
    """The ``k`` rows of ``rows`` closest to their mean in ``features`` (the group's most typical members)."""
    x = features[rows]
    d = np.linalg.norm(x - x.mean(0, keepdims=True), axis=1)
    return rows[np.argsort(d, kind="stable")[:k]]
