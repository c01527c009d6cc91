"""LRP composites: *where* each rule applies, by module type and by position (the first layer).

A ``Composite`` is a list of ``(module types, rule)`` pairs tried in order, plus an optional
``first_map`` used for the first matching layer in ``model.modules()`` order (the layer that
sees the input, e.g. Flat or ZBox there). Modules that match nothing keep their plain gradient:
that is exact for max pooling (winner takes all), flatten/reshape, dropout and identities.

The registered names mirror zennit's (``epsilon_plus``, ``epsilon_gamma_box``, ...). A new
composite is one factory decorated ``@COMPOSITES.register("name")``; factories take the keyword
options ``epsilon``, ``gamma``, ``low``, ``high`` and ignore the ones they do not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from teachx.errors import ConfigError
from teachx.registry import Registry
from teachx.teachers.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, Rule, ZBox, ZPlus

ModuleTypes = tuple[type, ...]
LayerMap = list[tuple[ModuleTypes, Rule]]

CONVOLUTION: ModuleTypes = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENSE: ModuleTypes = (nn.Linear,)
LINEAR: ModuleTypes = CONVOLUTION + DENSE
AVG_POOL: ModuleTypes = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
ACTIVATION: ModuleTypes = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
)
"""Element-wise non-linearities: relevance passes through them unchanged (the Pass rule)."""


@dataclass
class Composite:
    """Rules by module type (``layer_map``), with ``first_map`` overriding for the first layer."""

    layer_map: LayerMap
    first_map: LayerMap = field(default_factory=list)
    name: str = "custom"

    def assign(self, model: nn.Module) -> dict[nn.Module, Rule]:
        """Module -> rule for every module of ``model`` that one of the maps matches."""
        rules: dict[nn.Module, Rule] = {}
        first_done = not self.first_map
        for module in model.modules():
            if module in rules:
                continue
            if not first_done:
                rule = _lookup(self.first_map, module)
                if rule is not None:
                    rules[module] = rule
                    first_done = True
                    continue
            rule = _lookup(self.layer_map, module)
            if rule is not None:
                rules[module] = rule
        return rules

    def options(self) -> dict[str, Any]:
        def describe(mapping: LayerMap) -> list[dict[str, Any]]:
            return [{"types": [t.__name__ for t in types], **rule.options()} for types, rule in mapping]

        return {"name": self.name, "layer_map": describe(self.layer_map), "first_map": describe(self.first_map)}


def _lookup(mapping: LayerMap, module: nn.Module) -> Optional[Rule]:
    for types, rule in mapping:
        if isinstance(module, types):
            return rule
    return None


COMPOSITES: Registry[Callable[..., Composite]] = Registry("LRP composite")


def base_map() -> LayerMap:
    """Rules every composite shares: Pass for activations, Norm for average pooling."""
    return [(ACTIVATION, Pass()), (AVG_POOL, Norm())]


def _box(low: Any, high: Any, name: str) -> ZBox:
    if low is None or high is None:
        raise ConfigError(
            f"LRP composite '{name}' needs the input bounds; pass input_low and input_high (the lowest and "
            "highest *normalised* input values, floats or one per channel), e.g. input_low=-2.2, input_high=2.7"
        )
    return ZBox(low=low, high=high)


@COMPOSITES.register("epsilon")
def epsilon(*, epsilon: float = 1e-6, **_: Any) -> Composite:
    """Epsilon on every Linear/Conv layer."""
    return Composite(base_map() + [(LINEAR, Epsilon(epsilon))], name="epsilon")


@COMPOSITES.register("epsilon_plus")
def epsilon_plus(*, epsilon: float = 1e-6, **_: Any) -> Composite:
    """ZPlus on convolutions, Epsilon on dense layers."""
    return Composite(base_map() + [(CONVOLUTION, ZPlus()), (DENSE, Epsilon(epsilon))], name="epsilon_plus")


@COMPOSITES.register("epsilon_plus_flat")
def epsilon_plus_flat(*, epsilon: float = 1e-6, **_: Any) -> Composite:
    """As epsilon_plus, with Flat on the first Linear/Conv layer."""
    return Composite(
        base_map() + [(CONVOLUTION, ZPlus()), (DENSE, Epsilon(epsilon))],
        first_map=[(LINEAR, Flat())],
        name="epsilon_plus_flat",
    )


@COMPOSITES.register("epsilon_gamma_box")
def epsilon_gamma_box(
    *, epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None, high: Any = None, **_: Any
) -> Composite:
    """ZBox on the first convolution, Gamma on the other convolutions, Epsilon on dense layers."""
    return Composite(
        base_map() + [(CONVOLUTION, Gamma(gamma)), (DENSE, Epsilon(epsilon))],
        first_map=[(CONVOLUTION, _box(low, high, "epsilon_gamma_box"))],
        name="epsilon_gamma_box",
    )


@COMPOSITES.register("epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(*, epsilon: float = 1e-6, **_: Any) -> Composite:
    """AlphaBeta(2, 1) on convolutions, Epsilon on dense layers."""
    return Composite(
        base_map() + [(CONVOLUTION, AlphaBeta(2.0, 1.0)), (DENSE, Epsilon(epsilon))], name="epsilon_alpha2_beta1"
    )


@COMPOSITES.register("epsilon_alpha2_beta1_flat")
def epsilon_alpha2_beta1_flat(*, epsilon: float = 1e-6, **_: Any) -> Composite:
    """As epsilon_alpha2_beta1, with Flat on the first Linear/Conv layer."""
    return Composite(
        base_map() + [(CONVOLUTION, AlphaBeta(2.0, 1.0)), (DENSE, Epsilon(epsilon))],
        first_map=[(LINEAR, Flat())],
        name="epsilon_alpha2_beta1_flat",
    )


@COMPOSITES.register("gamma")
def gamma(*, gamma: float = 0.25, **_: Any) -> Composite:
    """Gamma on every Linear/Conv layer."""
    return Composite(base_map() + [(LINEAR, Gamma(gamma))], name="gamma")


@COMPOSITES.register("zplus", "z_plus")
def zplus(**_: Any) -> Composite:
    """ZPlus on every Linear/Conv layer."""
    return Composite(base_map() + [(LINEAR, ZPlus())], name="zplus")


def make_composite(name: str, **options: Any) -> Composite:
    """The registered composite ``name`` built with ``options`` (epsilon, gamma, low, high)."""
    return COMPOSITES.get(name)(**options)


__all__ = [
    "COMPOSITES",
    "Composite",
    "make_composite",
    "base_map",
    "CONVOLUTION",
    "DENSE",
    "LINEAR",
    "AVG_POOL",
    "ACTIVATION",
]
