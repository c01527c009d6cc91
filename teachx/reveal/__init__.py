"""Reveal: find a model's shortcuts without annotations (the first half of Reveal-to-Revise, Pahde et al. 2023).

``build(name, **options)`` returns a reveal method (``REVEAL_METHODS.names()`` lists them; one module each,
behind the contract in :mod:`teachx.reveal.base`); :mod:`teachx.reveal.features` reads a layer's activations;
:mod:`teachx.reveal.cav` fits a concept direction for a group and retrieves the samples that carry it;
:mod:`teachx.reveal.localise` turns it into per-image artefact heatmaps and masks;
:mod:`teachx.reveal.specificity` ranks a class's groups by how specific their concept is against the other classes.
"""

from __future__ import annotations

from typing import Any

from teachx.errors import ConfigError

#: bumped whenever a reveal method, the CAV, localisation or the ground-truth scoring changes what they compute:
#: a study's saved reveal of a unit (``reveal-<key>.json``) is keyed by it, so it is made again
ALGORITHM_VERSION = 3

from teachx.reveal.base import REVEAL_METHODS, CandidateGroup, Evidence, RevealMethod, RevealResult  # noqa: E402

# each import registers its method in REVEAL_METHODS
from teachx.reveal import spray as _spray  # noqa: F401,E402
from teachx.reveal import spray_latent as _spray_latent  # noqa: F401,E402
from teachx.reveal import outliers as _outliers  # noqa: F401,E402


def build(name: str, **options: Any) -> RevealMethod:
    """Build the reveal method ``name`` with ``options``; bad names or options raise a one-line ConfigError."""
    cls = REVEAL_METHODS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for reveal method '{name}': {exc}") from None


__all__ = ["ALGORITHM_VERSION", "REVEAL_METHODS", "RevealMethod", "Evidence", "RevealResult", "CandidateGroup", "build"]
