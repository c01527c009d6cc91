"""``rrr``: Right for the Right Reasons (Ross, Hughes, Doshi-Velez 2017).

    L = CE(f(x), y) + lam * mean_n sum_d (A_nd * d/dx_nd sum_k log p_k(x_n))^2   (+ train.weight_decay)

A is 1 on input features the model must not use. ``mask: annotation`` takes A from the dataset's
artefact masks (shortcut datasets: ``data.shortcut`` / ``decoy-*``); ``mask: teacher`` derives it
from the teacher's map with no annotation at all: every pixel outside the ``teacher_keep``
fraction the teacher finds most relevant (by |map|) is penalised, which makes RRR an automatic
method comparable with IMPACTX. The mask is looked up per image before augmentation and cropped
and flipped with it. The input gradient is taken with respect to the normalised input (the
paper's raw-pixel gradient times the per-channel std), with ``create_graph`` so that the penalty
is trained through a second backward pass. ``target: all`` is the paper's sum over every class's
log-probability; ``label`` uses the true class only.

With BatchNorm in training mode the samples of a batch interact, so the gradient of the summed
log-probabilities is not exactly per sample; the paper's models have no BatchNorm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teachx.training.methods.base import (
    MethodTask,
    METHODS,
    at_least_float,
    IndexedTensor,
    MethodContext,
    Option,
    TrainingMethod,
)


def irrelevant_mask(maps: torch.Tensor, keep: float) -> torch.Tensor:
    """1 where |map| (summed over channels) is outside the ``keep`` fraction of most relevant
    pixels of each image, else 0; (B, 1, H, W). Ties at the threshold are kept (not penalised)."""
    rel = maps.abs().sum(1, keepdim=True).flatten(1)
    k = max(1, int(round(keep * rel.shape[1])))
    thresh = rel.topk(k, dim=1).values[:, -1:]
    return (rel < thresh).float().view(maps.shape[0], 1, *maps.shape[2:])


def input_gradient(x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, target: str = "all") -> torch.Tensor:
    """``d/dx sum_n sum_k log p_k(x_n)`` (``target: all``, the paper's) or of the true class's log-probability
    only (``label``), with ``create_graph`` so that a penalty on it trains through a second backward pass."""
    logp = F.log_softmax(at_least_float(logits), dim=1)
    score = logp.sum() if target == "all" else logp.gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=True)
    return grad


def rrr_penalty(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """RRR's penalty ``mean_n sum_d (A_nd grad_nd)^2``: the squared input gradient on the masked pixels, summed
    per image and averaged over the batch (an image with an empty mask adds 0). ``mask`` (B, 1, H, W)
    broadcasts over the channels."""
    return (mask * grad).pow(2).flatten(1).sum(1).mean()


class RRRTask(MethodTask):
    """CE plus the masked input-gradient penalty; ``maps_for`` returns the mask A of each image."""

    def __init__(self, model: nn.Module, mask_of, lam: float, target: str = "all", label_smoothing: float = 0.0):
        self.model, self.mask_of, self.lam = model, mask_of, float(lam)
        self.target, self.label_smoothing = target, label_smoothing

    def maps_for(self, indices: torch.Tensor) -> torch.Tensor:
        return self.mask_of(indices)

    def input_gradient(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return input_gradient(x, logits, y, self.target)

    def loss(self, x, y, mask):
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.lam == 0:
            return ce, logits, {"ce": ce.detach()}
        penalty = rrr_penalty(mask, self.input_gradient(x, logits, y))
        return ce + self.lam * penalty, logits, {"ce": ce.detach(), "rrr": penalty.detach()}


class _TeacherMask:
    """A = outside the teacher's most relevant pixels, from the stored training maps. The teacher's
    maps do not change during training, so each image's mask is computed once (in the first epoch)
    and kept as bytes: later epochs read it instead of reading the map and ranking its pixels."""

    def __init__(self, store, keep: float):
        self.store, self.keep = store, keep
        n, _, h, w = store.maps.shape
        self.masks = np.zeros((n, 1, h, w), dtype=np.uint8)  # untouched rows cost no memory
        self.known = np.zeros(n, dtype=bool)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.cpu().numpy()
        todo = idx[~self.known[idx]]
        if todo.size:
            self.masks[todo] = irrelevant_mask(self.store.read(todo).float(), self.keep).to(torch.uint8).numpy()
            self.known[todo] = True
        return torch.from_numpy(self.masks[idx]).float()


@METHODS.register("rrr", "right_for_the_right_reasons")
class RRR(TrainingMethod):
    name = "rrr"
    loss_text = "CE + λ·input-gradient penalty"
    summary = "penalise input gradients on features the model must not use (annotation masks, or outside the teacher's relevant region)"
    reference = "Ross, Hughes, Doshi-Velez 2017, Right for the Right Reasons"
    options = {
        "lam": Option(1000.0, "weight of the input-gradient penalty (the paper uses 1000 on Decoy-MNIST)", minimum=0.0),
        "mask": Option(
            "annotation",
            "where A comes from: annotation (the dataset's artefact masks) | teacher (pixels outside the teacher's most relevant ones)",
            choices=("annotation", "teacher"),
        ),
        "teacher_keep": Option(
            0.2,
            "mask=teacher: fraction of pixels the teacher finds most relevant that stay unpenalised",
            minimum=0.0,
            maximum=1.0,
        ),
        "target": Option(
            "all",
            "whose log-probability is differentiated: all (the paper: sum over classes) | label",
            choices=("all", "label"),
        ),
    }

    def needs_masks(self) -> bool:
        return self.opts["mask"] == "annotation"

    def needs_teacher_maps(self) -> bool:
        return self.opts["mask"] == "teacher"

    def masks_missing_message(self, dataset: str) -> str:
        return (
            f"method rrr with method.options.mask=annotation needs artefact masks, and '{dataset}' has none; use a "
            "shortcut dataset (data.shortcut=swatch, data.name=decoy-fashion-mnist) or method.options.mask=teacher"
        )

    def task(self, model: nn.Module, ctx: MethodContext) -> RRRTask:
        if self.opts["mask"] == "annotation":
            mask_of = IndexedTensor(np.asarray(ctx.plan.dataset.train.masks))
        else:
            mask_of = _TeacherMask(ctx.train_maps, self.opts["teacher_keep"])
        return RRRTask(model, mask_of, self.opts["lam"], self.opts["target"], self.cfg.train.label_smoothing)
