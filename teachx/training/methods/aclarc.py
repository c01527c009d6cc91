"""``aclarc``: Augmentive ClArC (Anders et al. 2022, "Finding and removing Clever Hans").

Fine-tunes the model a concept was computed on (see :mod:`teachx.training.methods.concept_method`) with
cross-entropy while an A-ClArC hook shifts the concept layer's activations of every training image to the
artefact's mean along the CAV, ``a <- a + (z_artefact - v . pool(a)) v`` (as the reference code does, on
every image: for an image that already carries the artefact the shift is about zero). Every image then
looks as if it carried the artefact, so the artefact stops telling the classes apart and the dense layers
learn to do without it. The hook is on only while the training loss is computed: validation, the saved
checkpoints and the evaluated model are the plain backbone.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from teachx.training.clarc import ClarcHook
from teachx.training.concepts import Concept
from teachx.training.methods.base import METHODS, MethodContext
from teachx.training.methods.concept_method import CONCEPT_OPTIONS, ConceptMethod, ConceptTask


class AClarcTask(ConceptTask):
    """CE of the model with the A-ClArC shift at ``module``'s output."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        concept: Concept,
        frozen_norms: list[nn.Module] | None = None,
        label_smoothing: float = 0.0,
    ):
        self.model, self.module, self.concept = model, module, concept
        self.frozen_norms = list(frozen_norms or [])
        self.label_smoothing = label_smoothing

    def loss(self, x, y, maps):
        self.hold_frozen()
        with ClarcHook(self.module, self.concept, "augment"):
            logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return ce, logits, {"ce": ce.detach()}


@METHODS.register("aclarc", "a_clarc", "a-clarc")
class AClarc(ConceptMethod):
    name = "aclarc"
    loss_text = "CE with the artefact added along the CAV"
    summary = "fine-tune the baseline while every image's activations are shifted to the artefact's (a concept file)"
    reference = "Anders et al. 2022, Finding and removing Clever Hans: Using explanation methods to debug and improve deep models"
    options = dict(CONCEPT_OPTIONS)

    def task(self, model: nn.Module, ctx: MethodContext) -> AClarcTask:
        module, norms = self.prepare(model)
        return AClarcTask(model, module, self.concept(), norms, self.cfg.train.label_smoothing)
