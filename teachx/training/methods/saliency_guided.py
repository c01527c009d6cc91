"""``saliency_guided``: saliency-guided training (Ismail, Corrada Bravo, Feizi 2021).

Per step: the input gradient of the label's logit ranks the input features (every element of the
normalised image); the fraction ``k`` with the lowest |gradient| are replaced by values drawn
uniformly from the batch's range, giving x~, and

    L = CE(f(x), y) + lam * KL(softmax f(x) || softmax f(x~)).

In one process the saliency is the input gradient of the training forward itself (its graph is
kept), and x~ gets a forward of its own: per step one forward of x, one input-gradient pass, one
forward of x~ and the backward of both. Under DDP (one forward per step through DDP) a separate
saliency pass, which computes no parameter gradients and leaves BatchNorm statistics as they were,
comes first, and x and x~ then go through the model as one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teachx.training.methods.base import (
    MethodTask,
    METHODS,
    at_least_float,
    MethodContext,
    Option,
    TrainingMethod,
    raw_model,
)


def input_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d f_y / d x| with the model's mode as it is; buffers (BatchNorm statistics) are restored."""
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.enable_grad():
        xs = x.detach().requires_grad_(True)
        out = model(xs)
        (grad,) = torch.autograd.grad(at_least_float(out).gather(1, y[:, None]).sum(), xs)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    return grad.abs()


def lowest(saliency: torch.Tensor, n: int) -> torch.Tensor:
    """(B, D) bool, exactly ``n`` True per row: the ``n`` lowest values, ties taken in index order --
    the selection of a stable sort, found with one selection (kthvalue) instead of sorting every row
    (5x faster at 3,072 features: the sort cost a third of a LeNet-5 step)."""
    if n == 0:
        return torch.zeros_like(saliency, dtype=torch.bool)
    thresh = saliency.kthvalue(n, dim=1, keepdim=True).values
    below = saliency < thresh
    ties = saliency == thresh
    need = n - below.sum(1, keepdim=True)
    return below | (ties & (ties.cumsum(1) <= need))


def mask_lowest(x: torch.Tensor, saliency: torch.Tensor, k: float, generator=None) -> torch.Tensor:
    """x with the fraction ``k`` of its elements of lowest saliency replaced by uniform values in
    [min x, max x] of the batch (the same count for every image)."""
    flat = x.detach().flatten(1)
    n = int(round(k * flat.shape[1]))
    if n == 0:
        return x.detach().clone()
    chosen = lowest(saliency.flatten(1), n)
    lo, hi = flat.min(), flat.max()
    values = torch.rand(flat.shape, device=x.device, dtype=flat.dtype, generator=generator) * (hi - lo) + lo
    return torch.where(chosen, values, flat).view_as(x)


class SaliencyGuidedTask(MethodTask):
    def __init__(self, model: nn.Module, k: float, lam: float, label_smoothing: float = 0.0):
        self.model, self.k, self.lam, self.label_smoothing = model, float(k), float(lam), label_smoothing

    def loss(self, x, y, maps):
        if raw_model(self.model) is self.model:
            # one process: the saliency comes from the training forward itself (its graph is kept for
            # the loss), and x~ gets its own forward -- one forward pass fewer than below
            xs = x.detach().requires_grad_(True)
            logits = self.model(xs)
            (grad,) = torch.autograd.grad(at_least_float(logits).gather(1, y[:, None]).sum(), xs, retain_graph=True)
            logits_m = self.model(mask_lowest(x, grad.abs(), self.k))
        else:  # DDP: one forward per step, through DDP, of x and x~ together
            masked = mask_lowest(x, input_saliency(raw_model(self.model), x, y), self.k)
            both = self.model(torch.cat([x, masked]))
            logits, logits_m = both[: x.shape[0]], both[x.shape[0] :]
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        logp, logq = F.log_softmax(at_least_float(logits), 1), F.log_softmax(at_least_float(logits_m), 1)
        kl = (logp.exp() * (logp - logq)).sum(1).mean()  # KL(f(x) || f(x~)), per image, averaged
        return ce + self.lam * kl, logits, {"ce": ce.detach(), "kl": kl.detach()}


@METHODS.register("saliency_guided", "saliency-guided", "sgt")
class SaliencyGuided(TrainingMethod):
    name = "saliency_guided"
    loss_text = "CE + λ·KL to the masked input"
    summary = (
        "mask the lowest-saliency input features with random values; match the masked output to the unmasked one (KL)"
    )
    reference = (
        "Ismail, Corrada Bravo, Feizi 2021, Improving Deep Learning Interpretability by Saliency Guided Training"
    )
    options = {
        "k": Option(
            0.5, "fraction of input features (lowest |gradient|) replaced by random values", minimum=0.0, maximum=1.0
        ),
        "lam": Option(1.0, "weight of the KL term", minimum=0.0),
    }

    def task(self, model: nn.Module, ctx: MethodContext) -> SaliencyGuidedTask:
        return SaliencyGuidedTask(model, self.opts["k"], self.opts["lam"], self.cfg.train.label_smoothing)
