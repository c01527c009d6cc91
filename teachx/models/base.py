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
"""

from __future__ import annotations

from typing import Any

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
