"""Grad-CAM (Selvaraju et al. 2017) as a teacher.

Map convention: Grad-CAM gives one value per spatial location of a feature layer. It is
upsampled bilinearly to the input's (H, W) (``align_corners=False``, as ``F.interpolate`` and
captum's ``LayerAttribution.interpolate`` do) and spread evenly over the C input channels:
every channel holds ``cam / C``. So the channel sum -- the default reduction of
``teachx.teachers.postprocess`` and the one that keeps completeness for additive methods --
gives back exactly the Grad-CAM map, and ``reduce='mean'`` gives ``cam / C``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.teachers.base import TEACHERS, Teacher
from teachx.teachers.gradients import TargetLike, as_float32, as_target, check_inputs, target_logits

DEFAULT_LAYER = "body"
"""Every teachx ``Backbone`` exposes its last spatial feature map as the output of ``body``."""


def resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """The module whose output Grad-CAM explains: ``layer`` by dotted name; by default the
    backbone's ``feature_layer`` (``body`` for teachx backbones, the chosen inner layer of an
    adapted user model, whose ``body`` is not called by ``forward``)."""
    if layer is None:
        chosen = getattr(model, "feature_layer", None)
        if isinstance(chosen, nn.Module):
            for name, module in model.named_modules():
                if module is chosen and name:
                    return name, module
    name = DEFAULT_LAYER if layer is None else layer
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        if layer is None:
            raise ConfigError(
                "gradcam needs a feature layer but the model has no 'body' module; pass "
                f"layer='<module name>' (modules: {shown})"
            ) from None
        raise ConfigError(f"gradcam layer '{name}' is not a module of the model; valid names: {shown}") from None


@TEACHERS.register("gradcam", "grad_cam")
class GradCam(Teacher):
    """Grad-CAM: ReLU(sum_k mean_hw(d f_t / d A_k) * A_k) at a feature layer, upsampled to the input.

    The layer's output must be (B, K, h, w) and the layer must run once per forward.

    Args:
        layer: dotted name of the module whose output is explained; null: ``body``, the
            backbone's last spatial features
        relu: true keeps only evidence *for* the class (as in the paper); false keeps the sign
    """

    name = "gradcam"

    def __init__(self, layer: str | None = None, relu: bool = True):
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"gradcam layer must be a module name such as 'body', got {layer!r}")
        if not isinstance(relu, bool):
            raise ConfigError(f"gradcam option relu must be true or false, got {relu!r}")
        self.layer = layer
        self.relu = relu

    def layer_cam(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        """The Grad-CAM map at the layer's resolution, (B, 1, h, w), before upsampling."""
        check_inputs(inputs)
        name, module = resolve_layer(model, self.layer)
        target = as_target(target, inputs.shape[0], inputs.device)
        captured: list[torch.Tensor] = []

        def keep_output(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output)

        handle = module.register_forward_hook(keep_output)
        try:
            with torch.enable_grad():
                # inputs require grad so the activations are in a graph even when the
                # parameters are frozen; only d logit / d activation is computed.
                x = inputs.detach().requires_grad_(True)
                score = target_logits(model(x), target).sum()
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ConfigError(
                f"gradcam layer '{name}' ran {len(captured)} times in one forward; choose a layer used exactly once"
            )
        acts = captured[0]
        if not isinstance(acts, torch.Tensor) or acts.dim() != 4:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise ConfigError(
                f"gradcam layer '{name}' outputs {shape}, not a spatial map (B, K, h, w); choose a convolutional layer"
            )
        (grads,) = torch.autograd.grad(score, acts, allow_unused=True)
        if grads is None:
            grads = torch.zeros_like(acts)
        with torch.no_grad():
            channel_weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = (channel_weights * acts).sum(dim=1, keepdim=True)
            return F.relu(cam) if self.relu else cam

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        cam = self.layer_cam(model, inputs, target)
        if inputs.dim() != 4:
            raise ConfigError(f"gradcam explains images (B, C, H, W), got inputs of shape {tuple(inputs.shape)}")
        batch, channels, height, width = inputs.shape
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
        return as_float32((cam / channels).expand(batch, channels, height, width))

    def options(self) -> dict[str, Any]:
        return {"layer": DEFAULT_LAYER if self.layer is None else self.layer, "relu": self.relu}
