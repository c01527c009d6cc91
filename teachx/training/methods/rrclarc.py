"""``rrclarc``: Right Reason ClArC (Pahde et al. 2023, "From Hope to Safety").

Fine-tunes the model a concept was computed on (see :mod:`teachx.training.methods.concept_method`) with

    L = CE(f(x), y) + lam * mean_n (v . g_n)^2,    g_n = d c(f(x_n)) / d a_n

where a is the concept layer's activations (a conv layer's gradient averaged over the positions, the
reference's ``l2_mean``), v the unit CAV and c the *criterion*: by default ``all_logits_random``, every
logit with a random sign per sample and class, the reference's published choice (its expectation
penalises each class's gradient along v, with no class singled out). The penalty's gradient is trained
through a second backward pass (``create_graph``). The trained model is the plain backbone: no hook
stays on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teachx.training.clarc import CRITERIA, Capture, criterion_output, rr_penalty
from teachx.training.concepts import Concept
from teachx.training.methods.base import METHODS, MethodContext, Option, at_least_float
from teachx.training.methods.concept_method import CONCEPT_OPTIONS, ConceptMethod, ConceptTask


class RRClarcTask(ConceptTask):
    """CE plus RR-ClArC's penalty on the gradient along the CAV at ``module``'s output."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        concept: Concept,
        lam: float,
        criterion: str = "all_logits_random",
        frozen_norms: list[nn.Module] | None = None,
        label_smoothing: float = 0.0,
    ):
        self.model, self.module, self.concept = model, module, concept
        self.lam, self.criterion, self.label_smoothing = float(lam), criterion, label_smoothing
        self.frozen_norms = list(frozen_norms or [])
        self.cav = torch.as_tensor(concept.cav, dtype=torch.float32)

    def loss(self, x, y, maps):
        self.hold_frozen()
        with Capture(self.module, need_grad=True) as cap:
            logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.lam == 0:
            return ce, logits, {"ce": ce.detach()}
        out = criterion_output(at_least_float(logits), y, self.criterion)
        (grad,) = torch.autograd.grad(out.sum(), cap.out, create_graph=True)
        penalty = rr_penalty(at_least_float(grad), self.cav.to(grad.device))
        return ce + self.lam * penalty, logits, {"ce": ce.detach(), "rrclarc": penalty.detach()}


@METHODS.register("rrclarc", "rr_clarc", "rr-clarc")
class RRClarc(ConceptMethod):
    name = "rrclarc"
    loss_text = "CE + λ·gradient along the CAV"
    summary = "fine-tune the baseline so that its outputs stop changing along an artefact's CAV (a concept file)"
    reference = "Pahde et al. 2023, From Hope to Safety: Unlearning Biases of Deep Models via Gradient Penalization in Latent Space"
    options = {
        **CONCEPT_OPTIONS,
        "lam": Option(10.0, "weight of the penalty (the reference uses 10 on ISIC up to 1e6 and more)", minimum=0.0),
        "criterion": Option(
            "all_logits_random",
            "the output whose gradient is penalised: all_logits_random (every logit, random signs) | all_logits | max_logit | target_logit | logprobs",
            choices=CRITERIA,
        ),
    }

    def task(self, model: nn.Module, ctx: MethodContext) -> RRClarcTask:
        module, norms = self.prepare(model)
        return RRClarcTask(
            model,
            module,
            self.concept(),
            self.opts["lam"],
            self.opts["criterion"],
            norms,
            self.cfg.train.label_smoothing,
        )
