"""Backbones: ``build_model(name, in_channels, num_classes, image_size, **options)``.

Names: ``lenet5``, ``mobilenet`` (``mobilenet_v1``), ``efficientnet_b0``, ``efficientnet_b2``,
``resnet18``, ``resnet_cifar``, the B-cos networks ``bcos_lenet5`` and ``bcos_resnet``, plus
``torchvision:<name>`` / ``timm:<name>`` when those libraries import, and any
user module through ``adapt(module)``. Every backbone is a ``teachx.models.base.Backbone``
(body -> neck -> classifier) following the module conventions in that file's docstring.

``image_size`` sets LeNet-5's flatten size and, for the others, picks the stride layout: inputs
whose longer side is <= 64 px get CIFAR-style strides (8x total downsampling), larger ones the
ImageNet layout (32x); override with ``small_input=True/False``. Forward passes accept any size.

``model.spec`` / ``model_spec(model)`` is the JSON-able recipe (name, sizes, all options with
defaults and 'auto' values resolved) that ``build_from_spec`` turns back into the same architecture, so a
checkpoint can rebuild its model before loading the weights.
"""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any, Callable, get_type_hints

from torch import nn

from teachx.errors import CheckpointError, ConfigError
from teachx.models import bcos, efficientnet, lenet, mobilenet, resnet  # noqa: F401  (registration)
from teachx.models._common import MODELS, image_hw, positive_int, resolve_small_input
from teachx.models.adapter import EXTERNAL, AdaptedBackbone, adapt
from teachx.models.base import Backbone
from teachx.models.layers import Add, Mul, StochasticDepth
from teachx.registry import suggest

__all__ = [
    "MODELS",
    "Backbone",
    "AdaptedBackbone",
    "Add",
    "Mul",
    "StochasticDepth",
    "adapt",
    "build_model",
    "model_spec",
    "build_from_spec",
    "model_options",
    "any_model_from_spec",
    "BUILT_IN_MAP_MODELS",
    "shared_map_text",
    "explains_itself",
    "backbone_explains_itself",
]

#: the spec names of the models that give their own attribution map in the forward pass (``forward_all``)
BUILT_IN_MAP_MODELS = ("impactx", "abn")


def explains_itself(model: nn.Module) -> bool:
    """Whether ``model`` gives its own attribution map through the contract of the built-in-map models
    (``forward_all(x, target)`` -> (logits, map), ``explain(x, target)`` -> map): IMPACTX, ABN, and the B-cos
    backbones (their contributions). The evaluations that score a model's own map ask this, never a name."""
    return callable(getattr(model, "forward_all", None)) and callable(getattr(model, "explain", None))


def backbone_explains_itself(name: str) -> bool:
    """Whether the registered backbone ``name`` builds models that explain themselves (:func:`explains_itself`),
    read from its builder's return type so that nothing is built; False for external and unknown names."""
    if ":" in str(name) or name not in MODELS:
        return False
    try:
        built = get_type_hints(MODELS.get(name)).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve: no capability known
        return False
    return (
        isinstance(built, type)
        and callable(getattr(built, "forward_all", None))
        and callable(getattr(built, "explain", None))
    )


def shared_map_text(kind: str) -> str:
    """How a model whose built-in map does not depend on the class is described to users, in one place
    so that `teachx explain --class` and `teachx serve` say it the same way."""
    why = (
        "it was trained without impactx.per_class"
        if kind == "impactx"
        else "its attention map does not depend on the class"
    )
    return f"one built-in map shared by all classes ({why})"


SPEC_VERSION = 1


def model_options(name: str) -> dict[str, Any]:
    """The options a registered backbone accepts, with their defaults."""
    return _options_of(MODELS.get(name))


def _options_of(builder: Callable[..., Backbone]) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _resolved(options: dict[str, Any], model: Backbone, hw: tuple[int, int]) -> dict[str, Any]:
    """Replace 'auto' (None) options by the values used, so a spec rebuilds the same model later
    even if the auto rules change."""
    options = dict(options)
    if options.get("small_input", False) is None:
        options["small_input"] = resolve_small_input(None, hw)
    if "dropout" in options and options["dropout"] is None:
        options["dropout"] = next(m.p for m in model.neck.modules() if isinstance(m, nn.Dropout))
    if "padding" in options and options["padding"] is None:
        options["padding"] = model.padding
    return options


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int | tuple[int, int], **options: Any
) -> Backbone:
    """Build backbone ``name`` (random init from torch's global generator) and record its spec."""
    in_channels = positive_int("in_channels", in_channels)
    num_classes = positive_int("num_classes", num_classes)
    hw = image_hw(image_size)
    library, sep, external_name = str(name).partition(":")
    if sep:
        if library.lower() not in EXTERNAL:
            raise ConfigError(f"unknown model library '{library}'; use torchvision:<name> or timm:<name>")
        canonical = f"{library.lower()}:{external_name}"
        model = EXTERNAL[library.lower()](external_name, in_channels, num_classes, hw, **options)
        full_options = dict(options)
    else:
        canonical = MODELS.canonical(name)
        builder = MODELS.get(canonical)
        valid = _options_of(builder)
        for key in options:
            if key not in valid:
                raise ConfigError(
                    f"unknown option '{key}' for model '{canonical}'{suggest(key, list(valid))}; "
                    f"valid options: {', '.join(valid) or 'none'}"
                )
        model = builder(in_channels, num_classes, hw, **options)
        full_options = _resolved({**valid, **options}, model, hw)
    spec = {
        "version": SPEC_VERSION,
        "name": canonical,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": list(hw),
        "options": full_options,
    }
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        raise ConfigError(
            f"options of model '{canonical}' must be JSON values (numbers, strings, lists), got {options!r}"
        ) from None
    model.spec = spec
    return model


def model_spec(model: Backbone) -> dict[str, Any]:
    """The JSON-able recipe of a model made by ``build_model`` (a copy)."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{type(model).__name__} was not made by teachx.models.build_model, so it has no spec; "
            "rebuild it in your code and load its state_dict"
        )
    return copy.deepcopy(spec)


def build_from_spec(spec: dict[str, Any]) -> Backbone:
    """Rebuild the architecture that ``model_spec`` described (weights are loaded separately)."""
    if not isinstance(spec, dict) or not {"name", "in_channels", "num_classes", "image_size"} <= set(spec):
        raise CheckpointError(
            "model spec must be a dict with name, in_channels, num_classes, image_size; "
            "the checkpoint is corrupted or not a teachx checkpoint"
        )
    if spec.get("version", SPEC_VERSION) > SPEC_VERSION:
        raise CheckpointError(
            f"model spec version {spec['version']} is newer than this teachx supports ({SPEC_VERSION}); upgrade teachx"
        )
    options = spec.get("options") or {}
    try:
        return build_model(spec["name"], spec["in_channels"], spec["num_classes"], spec["image_size"], **options)
    except ConfigError as error:
        raise CheckpointError(f"cannot rebuild the checkpoint's model: {error}") from None


def any_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild any teachx model from its ``model_spec``: IMPACTX, ABN or a plain backbone."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name == "impactx":
        from teachx.models.impactx import impactx_from_spec  # here: models.impactx builds on this module

        return impactx_from_spec(spec)
    if name == "abn":
        from teachx.models.abn import abn_from_spec  # here: models.abn builds on this module

        return abn_from_spec(spec)
    return build_from_spec(spec)
