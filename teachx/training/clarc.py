"""Class Artefact Compensation (ClArC): correcting a model along a concept's direction at one layer.

All of them act on the activations ``a`` of the concept's layer (:class:`teachx.training.concepts.Concept`)
with its unit CAV ``v``:

- **P-ClArC** (projective; Anders et al. 2022) removes the artefact after training:
  ``a <- a + (z_clean - s(a)) v``, where ``s(a) = v . pool(a)`` is the CAV score and ``z_clean`` the mean
  score of artefact-free samples. Every sample's score becomes ``z_clean``; what is orthogonal to ``v``
  is left exactly as it was.
- **A-ClArC** (augmentive) adds the artefact during fine-tuning: ``a <- a + (z_artefact - s(a)) v``, so
  that every sample looks as if it carried the artefact and the model learns not to rely on it.
- **R-ClArC** (reactive; Bareeva et al. 2024) applies P-ClArC only to the samples whose score says the
  artefact is present -- ``s(a) > threshold`` (the concept's, by default halfway between ``z_clean`` and
  ``z_artefact``) -- and leaves every other sample untouched, so that features of clean samples are not
  shifted.
- **RR-ClArC** (Pahde et al. 2023) trains instead: ``CE + lam * mean_n (v . g_n)^2``, with ``g_n`` the
  gradient of an output (the *criterion*) with respect to the layer's activations of sample n.

Conv layers (N, C, H, W): the CAV is over channels and was fitted on activations pooled over the
positions (max pooling, as in the reference code; ``Concept.pooling``). Following the reference
(frederikpahde/rrclarc), the score is taken on the pooled activations and the one shift ``(z - s(a)) v``
is added at *every* position: since adding a constant to a channel shifts its maximum (and its mean) by
that constant, the pooled score becomes exactly ``z``. RR-ClArC averages the gradient over the positions
before the dot product (the reference's ``l2_mean``). Linear layers (N, C) are used as they are.

The hooks are ordinary forward hooks, removable (``remove()`` or a ``with`` block) and composable: several
on one model apply in the order they were added.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.training.concepts import Concept

MODES = ("project", "augment", "reactive")
#: what RR-ClArC differentiates (the reference's names): every logit with a random sign per sample and class
#: (its published choice), the sum of all logits, the largest logit, the label's logit, the mean log-probability
CRITERIA = ("all_logits_random", "all_logits", "max_logit", "target_logit", "logprobs")


def pooled(a: torch.Tensor, pooling: str = "max") -> torch.Tensor:
    """(N, C): a conv layer's activations pooled over the positions; a linear layer's as they are.

    Reduced over the position dimensions directly (no flattened copy, whatever the memory layout)."""
    if a.dim() == 2:
        return a
    dims = tuple(range(2, a.dim()))
    return a.amax(dims) if pooling == "max" else a.mean(dims)


def cav_scores(a: torch.Tensor, cav: torch.Tensor, pooling: str = "max") -> torch.Tensor:
    """(N,): ``v . pool(a)``, the CAV score of each sample."""
    return pooled(a, pooling) @ cav


def shift_matrix(cav: torch.Tensor, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b), (C, C) and (C,): ``pool(a) @ W + b`` is the shift ``(z - s(a)) v`` of every sample (for a unit CAV
    ``v``: ``(z - pool(a) . v) v = z v - pool(a) v v^T``), the score and the outer product in ONE matrix product.

    Made once per hook: the corrections run after a layer at every forward pass, where each further kernel
    (a dot product, a subtraction, an outer product) costs more than its arithmetic."""
    v = cav.reshape(-1)
    return -torch.outer(v, v), z * v


def shifted(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pooling: str = "max",
    cav: Optional[torch.Tensor] = None,
    threshold: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """``a + (z - s(a)) v`` at every position of each sample, with the (W, b) of :func:`shift_matrix`; given the
    ``cav`` and a ``threshold``, only for the samples with ``s(a) > threshold`` (the others are left as they are)."""
    p = pooled(a, pooling)
    shift = torch.addmm(bias, p, weight)
    if threshold is not None:
        shift = shift * (p @ cav > threshold).unsqueeze(1)
    return a + shift.view(*shift.shape, *(1,) * (a.dim() - 2))


def project(a: torch.Tensor, cav: torch.Tensor, z_clean: float, pooling: str = "max") -> torch.Tensor:
    """P-ClArC: ``a + (z_clean - s(a)) v``."""
    return shifted(a, *shift_matrix(cav, z_clean), pooling)


def augment(a: torch.Tensor, cav: torch.Tensor, z_artefact: float, pooling: str = "max") -> torch.Tensor:
    """A-ClArC: ``a + (z_artefact - s(a)) v``."""
    return shifted(a, *shift_matrix(cav, z_artefact), pooling)


def reactive(
    a: torch.Tensor, cav: torch.Tensor, z_clean: float, threshold: float, pooling: str = "max"
) -> torch.Tensor:
    """R-ClArC: P-ClArC for the samples with ``s(a) - threshold > 0``, the activations unchanged for the rest."""
    return shifted(a, *shift_matrix(cav, z_clean), pooling, cav, threshold)


class ClarcHook:
    """A forward hook on ``module`` that applies one ClArC transform (``mode``: project, augment, reactive)
    with ``concept``'s CAV and statistics; ``remove()`` (or leaving its ``with`` block) takes it off.

    Build it with :func:`attach`, which checks that the concept belongs to the model; this class checks
    only, on every forward, that the layer's width is the CAV's. What every forward would otherwise redo --
    the concept's statistics, the CAV in the activations' dtype and device, the matrix of
    :func:`shift_matrix` -- is computed once (per dtype and device).
    """

    def __init__(self, module: nn.Module, concept: Concept, mode: str, threshold: Optional[float] = None):
        if mode not in MODES:
            raise ConfigError(f"ClArC mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.concept, self.mode = concept, mode
        self.threshold = concept.score_threshold if threshold is None else float(threshold)
        self.target = concept.z_artefact if mode == "augment" else concept.z_clean
        self.pooling = concept.pooling
        self._consts: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}
        self._handle = module.register_forward_hook(self._hook)

    def cav(self, like: torch.Tensor) -> torch.Tensor:
        return self.constants(like)[0]

    def constants(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(CAV, W, b, threshold) in ``like``'s dtype and device; the threshold None unless reactive."""
        key = (like.dtype, like.device)
        consts = self._consts.get(key)
        if consts is None:
            weight, bias = shift_matrix(torch.as_tensor(self.concept.cav, device=like.device), self.target)
            threshold = torch.tensor(self.threshold, dtype=like.dtype, device=like.device)
            consts = (
                self.concept.cav_tensor(like),
                weight.to(like.dtype),
                bias.to(like.dtype),
                threshold if self.mode == "reactive" else None,
            )
            self._consts[key] = consts
        return consts

    def transform(self, a: torch.Tensor) -> torch.Tensor:
        """The correction of the layer's activations ``a`` (what the hook returns, without the width check)."""
        cav, weight, bias, threshold = self.constants(a)
        return shifted(a, weight, bias, self.pooling, cav, threshold)

    def _hook(self, module: nn.Module, inputs, out):
        check_width(out, self.concept)
        return self.transform(out)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "ClarcHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_width(out: object, concept: Concept) -> None:
    """One line when the layer's output is no (N, C, ...) tensor with the CAV's C."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ConfigError(
            f"layer '{concept.layer}' gives no (batch, channels, ...) tensor; compute the concept at a conv or linear layer"
        )
    if out.shape[1] != concept.width:
        raise ConfigError(
            f"concept '{concept.name}' has a CAV of {concept.width} values but layer '{concept.layer}' has "
            f"{out.shape[1]} channels; compute the concept at this layer of this model"
        )


def attach(
    model: nn.Module,
    concept: Concept,
    mode: str = "project",
    threshold: Optional[float] = None,
    example: Optional[torch.Tensor] = None,
) -> ClarcHook:
    """Apply ``concept``'s correction to ``model`` (P-ClArC by default) until the hook is removed.

    Refused in one line: a concept computed on other weights (digest), a layer the model lacks (the valid
    names are listed) and, given an ``example`` input, a layer whose width differs from the CAV's.
    """
    module = concept.check_model(model, example)
    return ClarcHook(module, concept, mode, threshold)


class Capture:
    """Keeps the output of ``module`` in the graph while active (``with Capture(module) as c: ...; c.out``).

    ``need_grad``: an output that does not require a gradient (everything before the layer is frozen and
    the input needs none) is made a leaf that does, so that gradients with respect to it exist -- cheaper
    than asking for the input's gradient, and the same values.
    """

    def __init__(self, module: nn.Module, need_grad: bool = False):
        self.module, self.need_grad = module, need_grad
        self.out: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, out):
        if self.need_grad and torch.is_grad_enabled() and not out.requires_grad:
            out = out.detach().requires_grad_(True)
            self.out = out
            return out
        self.out = out

    def __enter__(self) -> "Capture":
        self.out = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def criterion_output(logits: torch.Tensor, y: torch.Tensor, criterion: str) -> torch.Tensor:
    """(N,): the output RR-ClArC differentiates, per sample. ``all_logits_random`` draws a sign per sample
    and class from torch's global generator (the training loop seeds it per epoch)."""
    if criterion == "all_logits_random":
        return (logits * torch.sign(0.5 - torch.rand_like(logits))).sum(1)
    if criterion == "all_logits":
        return logits.sum(1)
    if criterion == "max_logit":
        return logits.max(1).values
    if criterion == "target_logit":
        return logits.gather(1, y[:, None])[:, 0]
    if criterion == "logprobs":
        return (F.softmax(logits, 1) + 1e-5).log().mean(1)
    raise ConfigError(f"RR-ClArC criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def gradient_along(grad: torch.Tensor, cav: torch.Tensor) -> torch.Tensor:
    """(N,): ``v . g_n`` with a conv layer's gradient averaged over the positions first."""
    g = grad if grad.dim() == 2 else grad.flatten(2).mean(2)
    return g @ cav


def rr_penalty(grad: torch.Tensor, cav: torch.Tensor) -> torch.Tensor:
    """RR-ClArC's penalty ``mean_n (v . g_n)^2`` (the reference's ``l2_mean``)."""
    return gradient_along(grad, cav).pow(2).mean()


def cav_sensitivity(model: nn.Module, module: nn.Module, cav: torch.Tensor, x: torch.Tensor) -> float:
    """How much the outputs move along the CAV: the mean over samples and classes of
    ``|v . d logit_k / d a|`` (positions averaged), in the model's current mode. RR-ClArC drives it down."""
    total, classes = 0.0, 0
    with torch.enable_grad(), Capture(module, need_grad=True) as cap:
        logits = model(x)
        for k in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, k].sum(), cap.out, retain_graph=True)
            total += float(gradient_along(g, cav.to(g)).abs().mean())
            classes += 1
    return total / classes
