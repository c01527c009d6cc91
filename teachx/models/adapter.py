"""Wrap any user ``nn.Module`` classifier as a teachx ``Backbone``.

``adapt(module)`` keeps the module's own ``forward`` (so its logits are untouched) and uses
forward hooks to read intermediate values:

- ``classifier``: the named submodule (default: the last ``nn.Linear`` in registration order);
  ``features(x)`` is its input, captured by a pre-hook that stops the forward right there;
- ``feature_layer``: the named submodule whose output Grad-CAM reads (default: the last
  ``nn.Conv2d`` in registration order);
- ``body(x)``: the ``feature_layer`` output (runs the module up to that layer);
- ``neck(h)``: re-runs the module on the input of the most recent ``body`` call with the
  ``feature_layer`` output replaced by ``h`` and returns the classifier's input, so
  ``neck(body(x)) == features(x)`` with gradients flowing through ``h``.

- ``feature_pyramid(x)`` / ``features_with_pyramid(x)``: the outputs of the layers named by
  ``pyramid_layers`` (default: the last ``nn.Conv2d`` at each spatial resolution, in call order),
  read by forward hooks during the ONE pass that computes ``features(x)``, ordered from high to low
  resolution. The wrapped module's shapes are not known without running it, so
  ``pyramid_shapes(image_size)`` runs it once on a zero image of that size (batch 1, no
  gradients, eval mode, the mode restored afterwards) and remembers the result; this is the only
  backbone that needs such a dry run.

Limits (checked where cheap, documented otherwise): the classifier must be the last operation
of ``forward`` and take the features as its first argument (``forward(x) ==
classifier(features(x))``); registration order is taken as execution order for the defaults;
a layer called twice in one forward is read at its first call; ``body``/``neck`` are views that
own no parameters (use ``model.parameters()``) and ``neck`` is not thread-safe. The wrapped
module's own rules (in-place ops, module re-use) are not changed: LRP/DeepSHAP need the same
conventions as ``teachx.models.base`` describes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.models.base import Backbone


class _Stop(BaseException):
    """Raised by a hook to end a forward early (BaseException so user ``except Exception`` won't eat it)."""


def _last_of(module: nn.Module, kind: type) -> str | None:
    names = [name for name, m in module.named_modules() if isinstance(m, kind) and name]
    return names[-1] if names else None


def _first_of(module: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in module.modules() if isinstance(m, kind)), None)


def _submodule(module: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in module.named_modules() if n][:20]
        raise ConfigError(
            f"{role} '{name}' is not a submodule of {type(module).__name__}; valid names include: {', '.join(valid)}"
        ) from None


def _run(
    module: nn.Module,
    x: torch.Tensor,
    stop_at: nn.Module,
    capture: str,
    replace: tuple[nn.Module, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``module(x)`` until ``stop_at`` is reached; return its first input or its output."""
    captured: list[torch.Tensor] = []
    handles = []
    if replace is not None:
        layer, value = replace
        handles.append(layer.register_forward_hook(lambda _m, _i, _o: value))

    def on_input(_m: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    def on_output(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        captured.append(out)
        raise _Stop

    if capture == "input":
        handles.append(stop_at.register_forward_pre_hook(on_input))
    else:
        handles.append(stop_at.register_forward_hook(on_output))
    try:
        module(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ConfigError(
            f"{type(stop_at).__name__} layer was not called by {type(module).__name__}.forward; "
            "pass classifier=/feature_layer= naming layers that forward uses"
        )
    return captured[0]


class _BodyView(nn.Module):
    """``body(x)``: the feature layer's output; remembers ``x`` for ``neck``."""

    def __init__(self, owner: "AdaptedBackbone"):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a child: no parameter double-counting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        object.__setattr__(owner, "_last_body_input", x)
        return _run(owner.module, x, owner.feature_layer, "output")


class _NeckView(nn.Module):
    """``neck(h)``: classifier input with the feature layer's output replaced by ``h``."""

    def __init__(self, owner: "AdaptedBackbone"):
        super().__init__()
        object.__setattr__(self, "owner", owner)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        x = owner.__dict__.get("_last_body_input")
        if x is None or x.shape[0] != h.shape[0]:
            raise ConfigError(
                "an adapted model's neck(h) needs h = model.body(x) computed just before; "
                "use model.features(x) to get the feature vector directly"
            )
        return _run(owner.module, x, owner.classifier, "input", replace=(owner.feature_layer, h))


class AdaptedBackbone(Backbone):
    """A user module seen as body -> neck -> classifier through hooks (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        classifier: str,
        feature_layer: str,
        in_channels: int,
        pyramid_layers: list[str] | None = None,
    ):
        super().__init__()
        self.module = module
        self.classifier_name = classifier
        self.feature_layer_name = feature_layer
        _submodule(module, feature_layer, "feature_layer")
        for name in pyramid_layers or ():
            _submodule(module, name, "pyramid layer")
        self.pyramid_layer_names: list[str] | None = list(pyramid_layers) if pyramid_layers else None
        self._pyramid_cache: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        head = _submodule(module, classifier, "classifier")
        self._check_head(head)
        self.in_channels = in_channels
        self.body = _BodyView(self)
        self.neck = _NeckView(self)

    def _check_head(self, head: nn.Module) -> None:
        if not (
            isinstance(getattr(head, "in_features", None), int) and isinstance(getattr(head, "out_features", None), int)
        ):
            raise ConfigError(
                f"classifier '{self.classifier_name}' ({type(head).__name__}) has no in_features/"
                "out_features; name an nn.Linear head with classifier="
            )
        self.feature_dim = head.in_features
        self.num_classes = head.out_features

    @property
    def classifier(self) -> nn.Module:  # type: ignore[override]
        return self.module.get_submodule(self.classifier_name)

    @property
    def feature_layer(self) -> nn.Module:
        return self.module.get_submodule(self.feature_layer_name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "classifier":  # replacing the head replaces it inside the wrapped module
            self._check_head(value)
            parent_name, _, leaf = self.classifier_name.rpartition(".")
            setattr(self.module.get_submodule(parent_name) if parent_name else self.module, leaf, value)
            return
        super().__setattr__(name, value)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.module, x, self.classifier, "input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    # -- multi-scale features (forward hooks) --------------------------------------------------
    def _dry_run(self, image_size: tuple[int, int], names: list[str]) -> dict[str, tuple[int, ...]]:
        """Output shapes (C, h, w) of the layers ``names`` (first call each) for one zero image."""
        shapes: dict[str, tuple[int, ...]] = {}
        order: list[str] = []
        handles = []
        for name in names:

            def hook(_m, _i, out, name=name):
                if name not in shapes and isinstance(out, torch.Tensor) and out.dim() == 4:
                    shapes[name] = tuple(out.shape[1:])
                    order.append(name)

            handles.append(self.module.get_submodule(name).register_forward_hook(hook))
        param = next(self.module.parameters(), None)
        x = torch.zeros(
            1,
            self.in_channels,
            int(image_size[0]),
            int(image_size[1]),
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None else None,
        )
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                _run(self.module, x, self.classifier, "input")
        finally:
            self.module.train(was_training)
            for h in handles:
                h.remove()
        return {name: shapes[name] for name in order}

    def pyramid_shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        key = (int(image_size[0]), int(image_size[1]))
        if key in self._pyramid_cache:
            return list(self._pyramid_cache[key])
        if self.pyramid_layer_names is None:  # default: the last Conv2d at each resolution, in call order
            convs = [n for n, m in self.module.named_modules() if isinstance(m, nn.Conv2d) and n]
            found = self._dry_run(key, convs)
            names = list(found)
            keep = [n for i, n in enumerate(names) if i == len(names) - 1 or found[names[i + 1]][1:] != found[n][1:]]
            if not keep:
                raise ConfigError(
                    f"{type(self.module).__name__} has no nn.Conv2d with a spatial output before its "
                    "classifier; pass pyramid_layers=[...] naming its multi-scale layers"
                )
            self.pyramid_layer_names = sorted(keep, key=lambda n: -found[n][1] * found[n][2])  # high -> low resolution
            found = {n: found[n] for n in self.pyramid_layer_names}
        else:
            found = self._dry_run(key, self.pyramid_layer_names)
            missing = [n for n in self.pyramid_layer_names if n not in found]
            if missing:
                raise ConfigError(
                    f"pyramid layers {', '.join(missing)} gave no (B, C, H, W) output before the classifier "
                    f"of {type(self.module).__name__}; name layers with spatial outputs"
                )
        shapes = [tuple(int(v) for v in found[n]) for n in self.pyramid_layer_names]
        self.pyramid_channels = tuple(c for c, _, _ in shapes)
        self._pyramid_cache[key] = shapes
        return list(shapes)

    def features_with_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.pyramid_layer_names is None:
            self.pyramid_shapes(tuple(x.shape[-2:]))
        names = list(self.pyramid_layer_names or [])
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:

            def hook(_m, _i, out, name=name):
                captured.setdefault(name, out)  # a layer called twice is read at its first call

            handles.append(self.module.get_submodule(name).register_forward_hook(hook))
        try:
            feats = _run(self.module, x, self.classifier, "input")
        finally:
            for h in handles:
                h.remove()
        return feats, [captured[n] for n in names]


def adapt(
    module: nn.Module,
    classifier: str | None = None,
    feature_layer: str | None = None,
    in_channels: int | None = None,
    pyramid_layers: list[str] | None = None,
) -> AdaptedBackbone:
    """Wrap ``module`` as a Backbone: ``classifier`` names its head (default: last nn.Linear),
    ``feature_layer`` Grad-CAM's layer (default: last nn.Conv2d), ``in_channels`` defaults to the
    first Conv2d's input channels, ``pyramid_layers`` the layers whose outputs form the feature
    pyramid (default: the last nn.Conv2d at each resolution, found by one dry run)."""
    if isinstance(module, Backbone):
        raise ConfigError("adapt() expects a plain nn.Module; this one already is a teachx Backbone")
    if classifier is None:
        classifier = _last_of(module, nn.Linear)
        if classifier is None:
            raise ConfigError(f"{type(module).__name__} has no nn.Linear layer; pass classifier='<name of the head>'")
    if feature_layer is None:
        feature_layer = _last_of(module, nn.Conv2d)
        if feature_layer is None:
            raise ConfigError(f"{type(module).__name__} has no nn.Conv2d layer; pass feature_layer='<layer name>'")
    if in_channels is None:
        first = _first_of(module, nn.Conv2d)
        if first is None:
            raise ConfigError("cannot infer in_channels (no nn.Conv2d); pass in_channels=")
        in_channels = first.in_channels
    return AdaptedBackbone(module, classifier, feature_layer, in_channels, pyramid_layers)


# ---- torchvision:<name> and timm:<name> -------------------------------------------------------


def _replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for a freshly initialised one reading ``in_channels`` channels."""
    for name, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return
            if conv.groups != 1:
                raise ConfigError(f"cannot change the input channels of grouped conv '{name}'")
            new = nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                1,
                conv.bias is not None,
                conv.padding_mode,
            )
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, leaf, new)
            return
    raise ConfigError(f"{type(module).__name__} has no nn.Conv2d whose input channels could be set")


def _import_error(library: str, name: str, error: BaseException) -> ConfigError:
    return ConfigError(
        f"model '{library}:{name}' needs {library}, which cannot be imported here "
        f"({type(error).__name__}: {error}); install it (pip install {library}) to use it"
    )


def build_torchvision(
    name: str, in_channels: int, num_classes: int, image_size: tuple[int, int], **options: Any
) -> AdaptedBackbone:
    """torchvision's ``name`` (random init), head sized for ``num_classes``, first conv for ``in_channels``."""
    try:
        import torchvision.models as tvm
    except Exception as error:  # noqa: BLE001 - a broken install raises more than ImportError
        raise _import_error("torchvision", name, error) from None
    if name not in tvm.list_models():
        raise ConfigError(f"unknown torchvision model '{name}'; valid: {', '.join(tvm.list_models())}")
    try:
        module = tvm.get_model(name, weights=None, num_classes=num_classes, **options)
    except TypeError as error:
        raise ConfigError(f"bad option for torchvision model '{name}': {error}") from None
    _replace_first_conv(module, in_channels)
    return adapt(module, in_channels=in_channels)


def build_timm(
    name: str, in_channels: int, num_classes: int, image_size: tuple[int, int], **options: Any
) -> AdaptedBackbone:
    """timm's ``name`` (random init) with ``num_classes`` and ``in_chans`` set by timm itself."""
    try:
        import timm
    except Exception as error:  # noqa: BLE001
        raise _import_error("timm", name, error) from None
    try:
        module = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigError(f"cannot build timm model '{name}': {error}") from None
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(head, str):
        try:
            if not isinstance(module.get_submodule(head), nn.Linear):
                head = None
        except AttributeError:
            head = None
    else:
        head = None
    return adapt(module, classifier=head, in_channels=in_channels)


EXTERNAL = {"torchvision": build_torchvision, "timm": build_timm}
