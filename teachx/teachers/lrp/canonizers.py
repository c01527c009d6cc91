"""LRP canonizers: *how* the model is prepared so that rules see LRP-friendly layers.

A canonizer temporarily rewrites a model into an equivalent form (same outputs) and undoes it:

- ``merge_batchnorm``: folds each BatchNorm into the Conv/Linear right before it (consecutive
  children of one ``nn.Sequential``, as teachx backbones build them) and turns the BatchNorm
  into the identity (its forward is shadowed; its parameters and statistics are untouched), so
  the conv's rule sees the affine map the network really computes. The conv's original
  parameter *values* come back on ``restore()``; the Parameter objects are the same ones
  throughout (optimisers keep working).
- ``residual``: makes residual sums (``teachx.models.layers.Add``) split relevance in proportion
  to the two contributions (Norm rule: ``R_a = a R / (a + b)``, conserving relevance) and SE
  gates (``layers.Mul``) pass all relevance to the gated input (Gate rule). Without it the
  plain gradient would copy relevance into both branches of a sum and double it.

A canonizer's ``apply(model)`` returns a ``restore()`` callable; ``rules(model)`` may assign
rules to modules the composite leaves alone. A new canonizer is one subclass decorated
``@CANONIZERS.register("name")``.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from teachx.models.layers import Add, Mul
from teachx.registry import Registry
from teachx.teachers.lrp.rules import Gate, Norm, Rule, is_linear_layer

Restore = Callable[[], None]


class Canonizer:
    """Base class: ``apply`` rewrites the model in place and returns the function that undoes it."""

    name: ClassVar[str] = "canonizer"

    def apply(self, model: nn.Module) -> Restore:
        return lambda: None

    def rules(self, model: nn.Module) -> dict[nn.Module, Rule]:
        """Rules for modules this canonizer makes explicit (used where the composite has none)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


CANONIZERS: Registry[type[Canonizer]] = Registry("LRP canonizer")


def batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Module, _BatchNorm]]:
    """(linear layer, BatchNorm) pairs that are consecutive children of one ``nn.Sequential``."""
    pairs = []
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.children())
        for layer, norm in zip(children, children[1:]):
            if (
                is_linear_layer(layer)
                and isinstance(norm, _BatchNorm)
                and norm.running_mean is not None
                and norm.running_var is not None
                and norm.num_features == layer.weight.shape[0]
            ):
                pairs.append((layer, norm))
    return pairs


@CANONIZERS.register("merge_batchnorm", "batchnorm", "merge_bn")
class MergeBatchNorm(Canonizer):
    """Fold eval-mode BatchNorm into the preceding Conv/Linear; the BatchNorm becomes the identity."""

    name: ClassVar[str] = "merge_batchnorm"

    def apply(self, model: nn.Module) -> Restore:
        restores: list[Restore] = []

        def restore() -> None:
            for undo in reversed(restores):
                undo()

        try:
            for layer, norm in batchnorm_pairs(model):
                restores.append(self._merge(layer, norm))
        except BaseException:
            restore()  # never leave a half-merged model behind
            raise
        return restore

    @staticmethod
    def _merge(layer: nn.Module, norm: _BatchNorm) -> Restore:
        weight, bias = layer.weight, layer.bias
        saved_weight = weight.detach().clone()
        saved_bias = None if bias is None else bias.detach().clone()
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
            if bias is None:
                layer.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=False)
            else:
                bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))
        # The BatchNorm itself becomes the identity by shadowing its forward on the instance: no
        # compute, no backward, and its parameters and running statistics are never touched.
        shadowed = norm.__dict__.get("forward")
        norm.forward = _identity

        def restore() -> None:
            with torch.no_grad():
                weight.copy_(saved_weight)
                if saved_bias is None:
                    layer.bias = None
                else:
                    layer.bias.copy_(saved_bias)
            if shadowed is None:
                del norm.forward
            else:
                norm.forward = shadowed

        return restore


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@CANONIZERS.register("residual", "sum", "residual_gate")
class Residual(Canonizer):
    """Proportional relevance split at residual sums and pass-through at SE gates."""

    name: ClassVar[str] = "residual"

    def __init__(self, add_types: tuple[type, ...] = (Add,), mul_types: tuple[type, ...] = (Mul,)):
        self.add_types = tuple(add_types)
        self.mul_types = tuple(mul_types)

    def rules(self, model: nn.Module) -> dict[nn.Module, Rule]:
        out: dict[nn.Module, Rule] = {}
        norm, gate = Norm(), Gate()
        for module in model.modules():
            if self.add_types and isinstance(module, self.add_types):
                out[module] = norm
            elif self.mul_types and isinstance(module, self.mul_types):
                out[module] = gate
        return out


def make_canonizer(spec: str | Canonizer) -> Canonizer:
    return spec if isinstance(spec, Canonizer) else CANONIZERS.get(spec)()


__all__ = ["CANONIZERS", "Canonizer", "MergeBatchNorm", "Residual", "batchnorm_pairs", "make_canonizer"]
