"""Layer-wise Relevance Propagation (Bach et al. 2015; Montavon et al. 2019) as a teacher.

Designed like zennit, in four separable parts, each extensible by one subclass + a registry name:

- rules (``RULES``, :mod:`.rules`): *what* relevance a layer passes down (Epsilon, ZPlus, ...);
- composites (``COMPOSITES``, :mod:`.composites`): *where* each rule applies (by type, first layer);
- canonizers (``CANONIZERS``, :mod:`.canonizers`): *how* the model is prepared (BatchNorm folding,
  residual sums, SE gates);
- the attributor (``Lrp`` teacher, registered as ``lrp``): *how* it runs.

It runs as one hooked forward and one backward pass. Every rule-carrying module gets a forward
hook that precomputes what its rule needs (only ZPlus/AlphaBeta/Gamma/ZBox/Flat need an extra
forward, with modified weights) and wraps its output in an autograd function whose backward is
the rule. The backward then uses the same input-gradient kernels as a plain backward ("gradient
x input" form: ``R_in = x * W^T (R_out / z)``), so LRP-epsilon costs about one forward+backward.

Relevance starts at the target logit (one-hot times the output) and ends at the input, with the
input's shape. ``sum(R_in)`` equals the target logit up to what biases and stabilisers absorb.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.teachers.base import TEACHERS, Teacher
from teachx.teachers.gradients import TargetLike, as_target, check_inputs, target_logits
from teachx.teachers.lrp.canonizers import CANONIZERS, Canonizer, MergeBatchNorm, Residual, make_canonizer
from teachx.teachers.lrp.composites import COMPOSITES, Composite, make_composite
from teachx.teachers.lrp.rules import (
    RULES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Gate,
    Norm,
    Pass,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
    apply_rule,
    make_rule,
)

BoundLike = Union[None, float, Sequence[float], torch.Tensor]


@contextlib.contextmanager
def lrp_context(model: nn.Module, composite: Composite, canonizers: Sequence[Canonizer] = ()) -> Iterator[nn.Module]:
    """Within the block, ``model``'s backward pass computes LRP relevance instead of gradients.

    The model is put in eval mode, canonized and hooked; on exit hooks are removed, parameters
    restored and every module's train/eval flag set back, even if the block raised. Use it to
    read intermediate relevances (tensor hooks on layer outputs) or with a custom initial relevance.
    """
    modes = [(m, m.training) for m in model.modules()]
    restores = []
    handles = []
    try:
        model.eval()
        for canonizer in canonizers:
            restores.append(canonizer.apply(model))
        rules = composite.assign(model)
        for canonizer in canonizers:
            for module, rule in canonizer.rules(model).items():
                rules.setdefault(module, rule)
        for module, rule in rules.items():
            handles.append(module.register_forward_hook(_hook(rule)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for restore in reversed(restores):
            restore()
        for module, training in modes:
            module.training = training


def _hook(rule: Rule):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        return apply_rule(rule, module, args, output)

    return hook


def _bound(value: BoundLike, name: str) -> Any:
    """A JSON-able float or list of floats."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().reshape(-1).tolist()
        return value[0] if len(value) == 1 else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return [float(v) for v in value]
    raise ConfigError(f"LRP {name} must be a float or one float per channel, got {value!r}")


@TEACHERS.register("lrp", "layerwise_relevance_propagation")
class Lrp(Teacher):
    """LRP with a named composite (rules per layer) and canonizers; relevance of the target logit.

    Args:
        composite: rules per layer: epsilon, epsilon_plus, epsilon_plus_flat, epsilon_alpha2_beta1,
            epsilon_alpha2_beta1_flat, epsilon_gamma_box, gamma or zplus
        canonizers: model rewrites applied while explaining: merge_batchnorm (fold BatchNorm into
            the layer before it), residual (split relevance at skip connections)
        input_low: lowest *normalised* input value (a float or one per channel); only the box
            composite (epsilon_gamma_box) needs it
        input_high: highest normalised input value, as input_low
        epsilon: stabiliser of the epsilon rule
        gamma: weight of positive contributions in the gamma rule
    """

    name = "lrp"

    def __init__(
        self,
        composite: Union[str, Composite] = "epsilon_plus_flat",
        canonizers: Sequence[Union[str, Canonizer]] = ("merge_batchnorm", "residual"),
        input_low: BoundLike = None,
        input_high: BoundLike = None,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
    ):
        if isinstance(canonizers, (str, Canonizer)):
            canonizers = (canonizers,)
        self.input_low = _bound(input_low, "input_low")
        self.input_high = _bound(input_high, "input_high")
        for key, value in (("epsilon", epsilon), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"LRP {key} must be a number >= 0, got {value!r}; e.g. {key}=0.25")
        self.epsilon = float(epsilon)
        self.gamma = float(gamma)
        if isinstance(composite, Composite):
            self.composite = composite
        else:
            self.composite = make_composite(
                str(composite), epsilon=self.epsilon, gamma=self.gamma, low=self.input_low, high=self.input_high
            )
        self.composite_name = self.composite.name
        self.canonizers = tuple(make_canonizer(c) for c in canonizers)

    def context(self, model: nn.Module):
        """``lrp_context`` with this teacher's composite and canonizers."""
        return lrp_context(model, self.composite, self.canonizers)

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        target = as_target(target, inputs.shape[0], inputs.device)
        with self.context(model), torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            outputs = model(x)
            logits = target_logits(outputs, target)
            seed = torch.zeros_like(outputs).scatter_(1, target.view(-1, 1), logits.detach().view(-1, 1))
            (relevance,) = torch.autograd.grad(outputs, x, seed, allow_unused=True)
        if relevance is None:
            return torch.zeros_like(inputs)
        return relevance.detach()

    def attribute_from_layer(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        layer: nn.Module,
        start: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Relevance started at ``layer``'s output instead of a logit and propagated to the input.

        ``start(a)`` gives the initial relevance from the layer's (detached) output ``a``, e.g. the activation
        times a concept direction (concept-conditional relevance, as CRP and Reveal-to-Revise localise an
        artefact). The layer's own rule and every rule below it apply, so ``sum(R_in)`` is about
        ``sum(start(a))``. The input's shape; zeros when the input does not reach the layer.
        """
        check_inputs(inputs)
        captured: list[torch.Tensor] = []
        with self.context(model), torch.enable_grad():
            # registered inside the context, after the rule hooks: it sees the output the rules wrap
            handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
            try:
                x = inputs.detach().requires_grad_(True)
                model(x)
            finally:
                handle.remove()
            if not captured:
                raise ValueError("the layer was not run in the model's forward pass")
            a = captured[0]
            seed = start(a.detach())
            if seed.shape != a.shape:
                raise ValueError(
                    f"start() must return the layer output's shape {tuple(a.shape)}, got {tuple(seed.shape)}"
                )
            (relevance,) = torch.autograd.grad(a, x, seed, allow_unused=True)
        if relevance is None:
            return torch.zeros_like(inputs)
        return relevance.detach()

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "composite": self.composite_name,
            "canonizers": [c.name for c in self.canonizers],
            "input_low": self.input_low,
            "input_high": self.input_high,
            "epsilon": self.epsilon,
            "gamma": self.gamma,
        }
        if self.composite_name == "custom":
            opts["composite_spec"] = self.composite.options()
        return opts


__all__ = [
    "Lrp",
    "lrp_context",
    "RULES",
    "COMPOSITES",
    "CANONIZERS",
    "Rule",
    "Composite",
    "Canonizer",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "ZBox",
    "Flat",
    "WSquare",
    "Norm",
    "Pass",
    "Gate",
    "MergeBatchNorm",
    "Residual",
    "make_rule",
    "make_composite",
    "make_canonizer",
]
