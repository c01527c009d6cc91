"""The backbone contract: image -> spatial features -> feature vector -> logits.

IMPACTX needs the feature vector M(x) separately from the classifier, Grad-CAM needs the last
spatial feature map, and LRP/DeepSHAP need every non-linearity to be its own ``nn.Module``
(hooks attach to modules). So every backbone is ``body`` -> ``neck`` -> ``classifier``:

- ``body``: ``nn.Module``, (B, C, H, W) -> (B, C', h, w) spatial features (Grad-CAM's layer);
- ``neck``: ``nn.Module``, (B, C', h, w) -> (B, feature_dim) (pooling/flatten/FC layers);
- ``classifier``: ``nn.Module``, (B, feature_dim) -> (B, num_classes).

``feature_layer`` names the module whose *output* Grad-CAM reads: ``body`` for our backbones,
the chosen inner layer for wrapped user models (``teachx.models.adapter``), whose ``body`` is a
view that is not called by ``forward``. Hook ``model.feature_layer``, not ``model.body``.
``spec`` (when set by ``build_model``) is the JSON-able recipe that rebuilds the model.

Rules for implementers, which the explanation methods rely on:

- every activation is a module instance (``nn.ReLU()``, ``nn.ReLU6()``, ``nn.SiLU()``,
  ``nn.Sigmoid()``...), never ``F.relu``/``torch.sigmoid`` in ``forward``;
- a module instance is used once per forward (no re-use of one ReLU or pool at two places);
- no in-place ops (``inplace=False`` everywhere, no ``x += y``);
- every ``BatchNorm2d`` directly follows the ``Conv2d`` that feeds it, as consecutive children of
  the same ``nn.Sequential`` (so a canonizer can fold BN into the conv by walking Sequentials);
- residual additions go through ``teachx.models.layers.Add`` (``forward(a, b) = a + b``) and
  gating products (squeeze-and-excitation) through ``teachx.models.layers.Mul``
  (``forward(x, gate) = x * gate``), so LRP canonizers/rules can find them;
- flattening is an ``nn.Flatten`` module.

Multi-scale features (``feature_pyramid``; read by IMPACTX decoders that see spatial features):
every backbone names the points of its ``body`` whose outputs form a pyramid, from high to low
resolution. Built-in backbones set ``pyramid_taps`` (indices of ``body``'s children, ``body``
being an ``nn.Sequential``), ``pyramid_channels`` and ``pyramid_strides`` at construction (see
``set_pyramid``), so a decoder can be built from ``pyramid_shapes(image_size)`` without running
the network; ``features_with_pyramid(x)`` returns the feature vector and the pyramid from ONE
pass through ``body`` and ``neck`` (no second forward), by running ``body``'s children in order
and keeping the tapped outputs. ``forward`` and ``features`` are unchanged, so module hooks that
explanation methods attach (LRP, DeepSHAP) see exactly the modules they saw before. Wrapped user
models (``teachx.models.adapter``) pick their pyramid layers by name and read them with forward
hooks instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class Backbone(nn.Module):
    """A classifier that exposes its feature extractor and head."""

    feature_dim: int
    num_classes: int
    in_channels: int

    body: nn.Module
    neck: nn.Module
    classifier: nn.Module

    spec: dict[str, Any] | None = None
    """Set by ``teachx.models.build_model``: name + constructor arguments (see ``model_spec``)."""

    @property
    def feature_layer(self) -> nn.Module:
        """The module whose output is the last spatial feature map (Grad-CAM's layer)."""
        return self.body

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """M(x): the feature vector that the classifier reads."""
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    # -- multi-scale features ------------------------------------------------------------------
    pyramid_taps: tuple[int, ...] = ()
    """Indices of ``body``'s children whose outputs are the pyramid levels (high to low resolution)."""
    pyramid_channels: tuple[int, ...] = ()
    """Channels of each pyramid level."""
    pyramid_strides: tuple[int, ...] = ()
    """Nominal downsampling of each level relative to the input (a level of an H x W input is
    ceil(H / stride) x ceil(W / stride), except where ``pyramid_shapes`` is overridden)."""

    def pyramid_shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each pyramid level for an ``image_size`` input, high to low
        resolution, computed without running the network."""
        if not self.pyramid_taps:
            raise NotImplementedError(
                f"{type(self).__name__} exposes no feature pyramid; set pyramid_taps/"
                "pyramid_channels/pyramid_strides (teachx.models.base.set_pyramid)"
            )
        h, w = int(image_size[0]), int(image_size[1])
        return [(c, -(-h // s), -(-w // s)) for c, s in zip(self.pyramid_channels, self.pyramid_strides)]

    def features_with_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(M(x), pyramid) from one pass: the feature vector ``features(x)`` and the list of
        multi-scale feature maps, high to low resolution."""
        if not self.pyramid_taps:
            raise NotImplementedError(f"{type(self).__name__} exposes no feature pyramid")
        taps = set(self.pyramid_taps)
        levels: list[torch.Tensor] = []
        h = x
        for i, layer in enumerate(self.body):
            h = layer(h)
            if i in taps:
                levels.append(h)
        return self.neck(h), levels

    def feature_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps of ``x``, high to low resolution (see ``pyramid_shapes``)."""
        return self.features_with_pyramid(x)[1]


def tell_input_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Tell every module of ``model`` that reads raw pixel values how its inputs were normalised
    (``(x - mean) / std``, per channel, in [0, 1] units): the B-cos input encoding ``[x, 1 - x]`` needs
    the image in [0, 1]. Such modules define ``set_input_normalization(mean, std)`` and keep the values
    in buffers, so checkpoints carry them; other models are left as they are."""
    for module in model.modules():
        setter = getattr(module, "set_input_normalization", None)
        if callable(setter):
            setter(mean, std)


def set_pyramid(model: Backbone, strides: list[int], channels: list[int]) -> None:
    """Declare the pyramid of a backbone whose ``body`` is an ``nn.Sequential``.

    ``strides[i]`` / ``channels[i]``: the downsampling factor and the width of ``body[i]``'s output.
    The levels are the last child at each resolution (a child followed by one that downsamples),
    plus the last child.
    """
    n = len(strides)
    if n != len(model.body) or n != len(channels):
        raise ValueError(
            f"set_pyramid needs one stride and one width per body child ({len(model.body)}), "
            f"got {len(strides)} and {len(channels)}"
        )
    taps = [i for i in range(n) if i == n - 1 or strides[i + 1] > strides[i]]
    model.pyramid_taps = tuple(taps)
    model.pyramid_channels = tuple(int(channels[i]) for i in taps)
    model.pyramid_strides = tuple(int(strides[i]) for i in taps)
