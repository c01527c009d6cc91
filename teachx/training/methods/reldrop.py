"""``reldrop``: relevance-driven input dropout (Gururaj et al. 2025).

Data augmentation that hides what the model relies on most: with R~ the image's LRP relevance for
its label, kept positive and divided by its maximum (so in [0, 1]), and u uniform noise, a pixel
is set to the dataset mean (0 after normalisation) where

    alpha * u + (1 - alpha) * R~ >= 1 - beta,

each image with probability ``p``. ``relevance: self`` is the paper's: relevance of the model
being trained, by teachx's LRP (``teacher.options`` of an lrp teacher choose the composite), in
eval mode, every step; ``relevance: teacher`` reads the teacher's stored maps instead (cropped and
flipped with the image: no extra pass, the cheap variant).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from teachx.teachers import build as build_teacher
from teachx.training.methods.base import METHODS, MethodContext, MethodTask, Option, TrainingMethod, raw_model


def normalised_relevance(r: torch.Tensor) -> torch.Tensor:
    """Positive relevance summed over channels and divided by its per-image maximum: (B, 1, H, W) in [0, 1]."""
    pos = r.float().sum(1, keepdim=True).clamp_min(0)
    return pos / pos.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def drop_mask(rel: torch.Tensor, alpha: float, beta: float, p: float, generator=None) -> torch.Tensor:
    """1 where a pixel is dropped: alpha * u + (1 - alpha) * rel >= 1 - beta, in images chosen with probability p."""
    u = torch.rand(rel.shape, device=rel.device, generator=generator)
    drop = (alpha * u + (1 - alpha) * rel) >= (1 - beta)
    chosen = torch.rand(rel.shape[0], device=rel.device, generator=generator) < p
    return (drop & chosen.view(-1, 1, 1, 1)).float()


class RelDropTask(MethodTask):
    def __init__(
        self,
        model: nn.Module,
        alpha: float,
        beta: float,
        p: float,
        relevance_of=None,
        store=None,
        label_smoothing: float = 0.0,
    ):
        self.model, self.alpha, self.beta, self.p = model, float(alpha), float(beta), float(p)
        self.relevance_of, self.store, self.label_smoothing = relevance_of, store, label_smoothing

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        return self.store.read(indices) if self.store is not None else None

    def loss(self, x, y, maps):
        rel = maps if maps is not None else self.relevance_of(raw_model(self.model), x, y)
        drop = drop_mask(normalised_relevance(rel), self.alpha, self.beta, self.p)
        x_dropped = x * (1 - drop)  # the dataset mean is 0 in normalised space
        logits = self.model(x_dropped)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return ce, logits, {"ce": ce.detach(), "dropped": drop.mean().detach()}


class _SelfRelevance:
    """LRP of the model being trained, for the label class, in eval mode (mode and buffers restored)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                return self.teacher.attribute(model, x.detach(), y).detach()
        finally:
            model.train(was_training)


@METHODS.register("reldrop", "relevance_dropout")
class RelDrop(TrainingMethod):
    name = "reldrop"
    loss_text = "CE on relevance-dropped inputs"
    summary = "drop the most LRP-relevant input pixels (with noise) as data augmentation"
    reference = "Gururaj et al. 2025, Relevance-driven Input Dropout"
    options = {
        "alpha": Option(0.5, "mix of noise (1) and relevance (0) in the drop score", minimum=0.0, maximum=1.0),
        "beta": Option(0.2, "drop threshold: pixels scoring >= 1 - beta are dropped", minimum=0.0, maximum=1.0),
        "p": Option(1.0, "probability that an image is augmented", minimum=0.0, maximum=1.0),
        "relevance": Option(
            "self",
            "self (LRP of the model being trained, every step; the paper) | teacher (the teacher's stored maps)",
            choices=("self", "teacher"),
        ),
    }

    def needs_teacher_maps(self) -> bool:
        return self.opts["relevance"] == "teacher"

    def task(self, model: nn.Module, ctx: MethodContext) -> RelDropTask:
        opts = self.opts
        if opts["relevance"] == "teacher":
            return RelDropTask(
                model,
                opts["alpha"],
                opts["beta"],
                opts["p"],
                store=ctx.train_maps,
                label_smoothing=self.cfg.train.label_smoothing,
            )

        options = dict(self.cfg.teacher.options) if self.cfg.teacher.method == "lrp" else {}
        return RelDropTask(
            model,
            opts["alpha"],
            opts["beta"],
            opts["p"],
            relevance_of=_SelfRelevance(build_teacher("lrp", **options)),
            label_smoothing=self.cfg.train.label_smoothing,
        )
