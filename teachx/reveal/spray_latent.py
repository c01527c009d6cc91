"""``spray_latent``: the SpRAy pipeline on one layer's pooled activations (or relevances) instead of input
maps -- a shortcut the model encodes in a few channels shows up there even when its input maps are diffuse
(Reveal-to-Revise clusters latent relevances for this reason). Vectors are scaled to unit norm, so groups
differ by which channels respond, not by how strongly the image responds overall."""

from __future__ import annotations

import numpy as np

from teachx.reveal.base import REVEAL_METHODS, Evidence
from teachx.reveal.spectral import normalise_rows
from teachx.reveal.spray import SpectralMethod


@REVEAL_METHODS.register("spray_latent")
class SprayLatent(SpectralMethod):
    """SpRAy on (N, D) pooled activations of a layer (``teachx.reveal.features.pooled_activations``)."""

    name = "spray_latent"
    source = "activations"

    def features(self, evidence: Evidence) -> np.ndarray:
        return normalise_rows(evidence.source("activations"))
