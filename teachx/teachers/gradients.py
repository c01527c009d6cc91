"""Gradient-family teachers: Saliency, Gradient x Input and Integrated Gradients.

All three read input gradients of the target logit, computed with ``torch.autograd.grad``
with respect to a detached copy of the inputs only, so parameter ``.grad`` fields are never
touched, no hooks are installed and the model's mode is left as the caller set it (explain an
``eval()`` model: dropout/batch-norm in train mode make maps stochastic and batch-dependent).

The small helpers here (``as_target``, ``target_logits``, ``input_gradients``) are shared by
the other teachers in this package so every method validates targets the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError, DataError
from teachx.teachers.base import TEACHERS, Teacher

TargetLike = Union[torch.Tensor, int, Sequence[int]]
"""Class indices (B,), or one int used for every image."""


# ----------------------------------------------------------------------------- shared helpers


def check_inputs(inputs: torch.Tensor) -> None:
    """Teachers explain batches of floating-point images (B, C, H, W)."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise DataError(
            f"inputs must be a floating-point tensor (B, C, H, W), got "
            f"{type(inputs).__name__} {getattr(inputs, 'dtype', '')}; convert images with .float()"
        )
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise DataError(
            f"inputs must be a non-empty batch (B, ...), got shape {tuple(inputs.shape)}; "
            "add a batch dimension with inputs.unsqueeze(0)"
        )


def as_target(target: TargetLike, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class indices as a LongTensor (B,) on ``device``; a single int is used for every image."""
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"target must hold integer class indices, got dtype {t.dtype}; pass labels.long()")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size)
    if t.numel() != batch_size:
        raise DataError(
            f"target has {t.numel()} entries for a batch of {batch_size} inputs; pass one class index per input"
        )
    return t


def target_logits(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``outputs[i, target[i]]`` (B,), after checking the output is (B, num_classes)."""
    if outputs.dim() != 2 or outputs.shape[0] != target.shape[0]:
        raise DataError(
            f"the model must return logits (B, num_classes), got shape {tuple(outputs.shape)} for "
            f"{target.shape[0]} inputs; explain a classifier (or wrap the model so it returns 2-D logits)"
        )
    num_classes = outputs.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise DataError(
            f"target class {bad} is out of range for a model with {num_classes} outputs; "
            f"targets must be class indices in [0, {num_classes})"
        )
    return outputs.gather(1, target.view(-1, 1)).squeeze(1)


def input_gradients(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit[target_i] / d inputs_i for each row, via autograd w.r.t. the inputs only.

    Rows are independent (the sum of per-row logits has per-row gradients), so this works on
    any stack of images, e.g. the points of an integration path.
    """
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        logits = target_logits(model(x), target)
        (grad,) = torch.autograd.grad(logits.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def as_float32(maps: torch.Tensor) -> torch.Tensor:
    return maps.detach().to(torch.float32).contiguous()


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's shape and float32 values, for options() cache keys."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _optional_batch_size(value: Any) -> int | None:
    return None if value is None else _positive_int("internal_batch_size", value)


# ----------------------------------------------------------------------------- saliency, g x i


@TEACHERS.register("saliency", "gradient")
class Saliency(Teacher):
    """Vanilla gradient (Simonyan et al. 2014): d f_t / d x, by default its absolute value.

    Args:
        abs: true takes the absolute value (the original method, captum's default); false keeps
            the sign (needed when the map is used as a signed constraint)
    """

    name = "saliency"

    def __init__(self, abs: bool = True):  # noqa: A002 - the option is called ``abs`` everywhere
        if not isinstance(abs, bool):
            raise ConfigError(f"saliency option abs must be true or false, got {abs!r}")
        self.abs = abs

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        grads = input_gradients(model, inputs, as_target(target, inputs.shape[0], inputs.device))
        return as_float32(grads.abs() if self.abs else grads)

    def options(self) -> dict[str, Any]:
        return {"abs": self.abs}


@TEACHERS.register("gradient_x_input", "gxi", "input_x_gradient")
class GradientXInput(Teacher):
    """Gradient times input (Shrikumar et al. 2016): exact decomposition for linear bias-free models."""

    name = "gradient_x_input"

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        grads = input_gradients(model, inputs, as_target(target, inputs.shape[0], inputs.device))
        return as_float32(grads * inputs.detach())


# ----------------------------------------------------------------------------- integrated gradients


def _riemann(kind: str) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    def rule(n: int) -> tuple[np.ndarray, np.ndarray]:
        if kind == "left":
            return np.arange(n) / n, np.full(n, 1.0 / n)
        if kind == "right":
            return np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
        if kind == "middle":
            return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
        # trapezoid on n equally spaced nodes including both ends: spacing 1/(n-1), half weight at
        # the ends, so the weights sum to exactly 1 (captum 0.9 uses spacing 1/n here, which makes
        # its weights sum to (n-1)/n and scales its maps by that factor).
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights

    return rule


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1]
    return (nodes + 1) / 2, weights / 2


QUADRATURE_RULES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "gausslegendre": _gauss_legendre,
    "riemann_trapezoid": _riemann("trapezoid"),
    "riemann_left": _riemann("left"),
    "riemann_right": _riemann("right"),
    "riemann_middle": _riemann("middle"),
}
"""Name -> (n -> (alphas in [0, 1], weights summing to 1)); the names are captum's."""


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (float64) of the path-integral rule ``method`` with ``steps`` points."""
    if method not in QUADRATURE_RULES:
        raise ConfigError(
            f"unknown integrated_gradients method '{method}'; valid methods: {', '.join(QUADRATURE_RULES)}"
        )
    return QUADRATURE_RULES[method](steps)


BaselineLike = Union[str, float, int, torch.Tensor]


@TEACHERS.register("integrated_gradients", "ig", "integratedgradients")
class IntegratedGradients(Teacher):
    """Integrated Gradients (Sundararajan et al. 2017): (x - x') * integral of grad f along x' -> x.

    Every quadrature rule's weights sum to 1, so completeness is exact on linear models.

    Args:
        baseline: the reference image x': ``zero`` (zeros in the model's input space, i.e. after
            normalisation), ``mean`` (each image's own per-channel mean: a flat image of its
            average colour), a number (constant image), or (Python API) a tensor broadcastable
            to the inputs
        steps: points on the path from x' to x
        method: quadrature rule: ``gausslegendre`` (captum's default, exact for polynomial
            integrands of degree < 2*steps) or ``riemann_trapezoid`` / ``_left`` / ``_right`` / ``_middle``
        internal_batch_size: at most this many path points per forward pass (bounds memory; null:
            all B*steps at once); does not change the maps
    """

    name = "integrated_gradients"

    def __init__(
        self,
        baseline: BaselineLike = "zero",
        steps: int = 32,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
    ):
        self.steps = _positive_int("integrated_gradients steps", steps)
        self.method = str(method).lower()
        quadrature(self.method, 2)  # validates the name
        if self.method == "riemann_trapezoid" and self.steps < 2:
            raise ConfigError("integrated_gradients method 'riemann_trapezoid' needs steps >= 2")
        self.internal_batch_size = _optional_batch_size(internal_batch_size)
        if isinstance(baseline, str):
            if baseline.lower() not in ("zero", "mean"):
                raise ConfigError(
                    f"unknown integrated_gradients baseline '{baseline}'; use 'zero', 'mean', a number or a tensor"
                )
            baseline = baseline.lower()
        elif isinstance(baseline, bool) or not isinstance(baseline, (int, float, torch.Tensor)):
            raise ConfigError(
                "integrated_gradients baseline must be 'zero', 'mean', a number or a tensor, "
                f"got {type(baseline).__name__}"
            )
        elif isinstance(baseline, torch.Tensor):
            baseline = baseline.detach().clone()
        self.baseline = baseline
        self._baseline_key: Any = (
            {"tensor_shape": list(baseline.shape), "tensor_sha256": tensor_sha256(baseline)}
            if isinstance(baseline, torch.Tensor)
            else baseline
            if isinstance(baseline, str)
            else float(baseline)
        )

    def baseline_for(self, inputs: torch.Tensor) -> torch.Tensor:
        """The baseline image for each input, shaped like ``inputs``."""
        if isinstance(self.baseline, str):
            if self.baseline == "zero":
                return torch.zeros_like(inputs)
            spatial = tuple(range(2, inputs.dim()))
            return inputs.mean(dim=spatial, keepdim=True).expand_as(inputs) if spatial else inputs
        if isinstance(self.baseline, torch.Tensor):
            try:
                return self.baseline.to(inputs.device, inputs.dtype).expand_as(inputs)
            except RuntimeError:
                raise ConfigError(
                    f"integrated_gradients baseline of shape {tuple(self.baseline.shape)} does not broadcast to "
                    f"inputs of shape {tuple(inputs.shape)}; pass a (C, H, W) or (1, C, H, W) tensor"
                ) from None
        return torch.full_like(inputs, float(self.baseline))

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        x = inputs.detach()
        batch = x.shape[0]
        target = as_target(target, batch, x.device)
        baseline = self.baseline_for(x)
        delta = x - baseline
        alphas, weights = quadrature(self.method, self.steps)
        alphas_t = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
        weights_t = torch.as_tensor(weights, dtype=x.dtype, device=x.device)

        # Rows are (step, image) pairs in step-major order; evaluate them in chunks of at most
        # ``internal_batch_size`` rows and accumulate weight * gradient per image.
        rows = self.steps * batch
        chunk = rows if self.internal_batch_size is None else self.internal_batch_size
        total = torch.zeros_like(x)
        view = (-1,) + (1,) * (x.dim() - 1)
        for start in range(0, rows, chunk):
            idx = torch.arange(start, min(start + chunk, rows), device=x.device)
            step, image = idx // batch, idx % batch
            points = baseline[image] + alphas_t[step].view(view) * delta[image]
            grads = input_gradients(model, points, target[image])
            total.index_add_(0, image, grads * weights_t[step].view(view))
        return as_float32(total * delta)

    def options(self) -> dict[str, Any]:
        return {"baseline": self._baseline_key, "steps": self.steps, "method": self.method}


__all__ = [
    "GradientXInput",
    "IntegratedGradients",
    "QUADRATURE_RULES",
    "Saliency",
    "TargetLike",
    "as_target",
    "check_inputs",
    "input_gradients",
    "quadrature",
    "target_logits",
    "tensor_sha256",
]
