"""The Attention Branch Network (Fukui, Hirakawa, Yamashita, Fujiyoshi, CVPR 2019) on a built-in backbone.

The backbone's ``body`` (an ``nn.Sequential``) is cut after one of its pyramid taps:

- feature extractor g = body[:split] (x -> g, C x h x w);
- attention branch on g: ``blocks`` conv3x3-BN-ReLU blocks that keep the resolution, then a 1x1
  conv to K = num_classes channels, the class-activation maps A_k. (a) global average pooling of
  A -> the attention branch's logits (trained with their own cross-entropy); (b) a 1x1 conv
  (K -> 1) + BN + sigmoid -> the attention map M(x) in [0, 1] at g's resolution;
- perception branch: the rest of the body on g' = (1 + M) * g (the paper's residual attention,
  computed as ``Add(Mul(g, M), g)`` so LRP finds the gate and the residual), then the backbone's
  neck and classifier -> the perception logits, which ``forward`` returns.

Default cut (``split=None``): the second-to-last pyramid level, i.e. the attention branch takes
the place of the last stage, as in the paper (its ResNets branch off before the last stage). For
32x32 / 28x28 inputs that is stride 2 for LeNet-5 (6 @ 14x14) and stride 4 for MobileNet,
EfficientNet and ResNet-18 in their CIFAR layouts (8x8 maps). ``split=i`` picks pyramid level i
(0 = highest resolution); the last level cannot be cut at (nothing would be left to perceive with).

Simplifications, for a branch that costs little next to the backbone: the paper builds the
attention branch from residual blocks copied from the backbone's next stage (its width and depth);
here it is ``blocks`` (default 1) plain conv3x3-BN-ReLU blocks of ``width`` channels (default: g's
own channels), conv before BN as every teachx backbone (a canonizer folds BN into the conv). The
paper's 1x1 convs and GAP are kept. M is class-agnostic: ``explain(x, target)`` ignores ``target``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import CheckpointError, ConfigError
from teachx.models import build_model
from teachx.models._common import image_hw, output_in_eval_mode
from teachx.models.base import Backbone
from teachx.models.layers import Add, Mul, conv_bn, init_weights


def split_levels(backbone: Backbone) -> list[int]:
    """Pyramid levels ABN can cut ``backbone`` at: those with at least one body child after them."""
    body = getattr(backbone, "body", None)
    taps = tuple(getattr(backbone, "pyramid_taps", ()) or ())
    if not isinstance(body, nn.Sequential) or not taps:
        return []
    return [level for level, tap in enumerate(taps) if tap < len(body) - 1]


def resolve_split(backbone: Backbone, split: Optional[int], name: str = "") -> int:
    """The pyramid level to cut at: ``split`` checked, or the default (None / -1: the second-to-last
    level); a ConfigError line when the body cannot be cut there."""
    name = name or type(backbone).__name__
    levels = split_levels(backbone)
    if not levels:
        raise ConfigError(
            f"abn needs a built-in backbone whose body is an nn.Sequential with pyramid levels to cut at "
            f"(lenet5, mobilenet, efficientnet_b0/b2, resnet18, resnet_cifar); '{name}' has none"
        )
    if split is None or split == -1:
        return levels[-1]
    if isinstance(split, bool) or not isinstance(split, int) or split not in levels:
        desc = ", ".join(
            f"{lv}: {backbone.pyramid_channels[lv]} channels at stride {backbone.pyramid_strides[lv]}" for lv in levels
        )
        raise ConfigError(
            f"abn split (method.options.split) = {split!r} is out of range for '{name}': use -1 (auto) or a "
            f"pyramid level in {levels[0]}..{levels[-1]} ({desc})"
        )
    return split


class ABN(nn.Module):
    """Attention Branch Network around ``backbone``. ``forward(x)`` gives the perception logits;
    ``forward_branches(x)`` (perception logits, attention logits, M) from one pass (training);
    ``forward_all(x)`` (logits, built-in map at the input size), the contract of every built-in-map
    model (IMPACTX's too); ``explain(x)`` the map alone."""

    #: ABN's map is one class-agnostic map per image
    per_class = False
    #: what the training task calls through DDP (one call per step)
    ddp_forward_methods = ("forward_branches",)

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        split: Optional[int] = None,
        width: Optional[int] = None,
        blocks: int = 1,
        spec: Optional[dict[str, Any]] = None,
    ):
        super().__init__()
        level = resolve_split(backbone, split, (getattr(backbone, "spec", None) or {}).get("name", ""))
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ConfigError(f"abn blocks must be an integer >= 0, got {blocks!r}")
        if width is not None and width != 0 and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ConfigError(
                f"abn width must be a positive integer, or 0 / null for the split level's channels, got {width!r}"
            )
        self.backbone = backbone
        self.split_level = level
        self.split_index = backbone.pyramid_taps[level] + 1  # g = body[:split_index]
        channels = int(backbone.pyramid_channels[level])
        self.width = int(width) if width else channels
        self.blocks = blocks
        self.num_classes = int(num_classes)
        self.in_channels = getattr(backbone, "in_channels", None)
        self.attention = nn.Sequential(
            *(conv_bn(channels if i == 0 else self.width, self.width, 3, activation=nn.ReLU()) for i in range(blocks))
        )
        self.class_maps = nn.Conv2d(self.width if blocks else channels, self.num_classes, 1)  # A_k
        self.attention_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # GAP(A) -> attention logits
        self.attention_map = nn.Sequential(
            nn.Conv2d(self.num_classes, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid()
        )  # M
        self.gate = Mul()  # g * M
        self.residual = Add()  # g * M + g = (1 + M) * g
        init_weights(nn.ModuleList([self.attention, self.class_maps, self.attention_map]))
        self.spec = spec

    @property
    def feature_layer(self) -> nn.Module:
        """Grad-CAM's layer: the body's last child (its output is the last spatial feature map)."""
        return self.backbone.body[-1]

    # -- the three parts ---------------------------------------------------------------------
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """g: the body's children up to the cut."""
        h = x
        for i in range(self.split_index):
            h = self.backbone.body[i](h)
        return h

    def attend(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, M): the K class-activation maps and the attention map, both at g's resolution."""
        a = self.class_maps(self.attention(g))
        return a, self.attention_map(a)

    def perceive(self, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Perception logits from (1 + M) * g through the rest of the body, the neck and the classifier."""
        h = self.residual(self.gate(g, m), g)
        body = self.backbone.body
        for i in range(self.split_index, len(body)):
            h = body[i](h)
        return self.backbone.classifier(self.backbone.neck(h))

    # -- public ------------------------------------------------------------------------------
    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perception logits, attention logits, M (B, 1, h, w)) from one forward pass."""
        g = self.extract(x)
        a, m = self.attend(g)
        return self.perceive(g, m), self.attention_pool(a), m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.extract(x)
        return self.perceive(g, self.attend(g)[1])

    def forward_all(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(perception logits, M upsampled to the input size) from one pass: what every model with a
        built-in map gives (``target`` is ignored: the map is class-agnostic)."""
        g = self.extract(x)
        m = self.attend(g)[1]
        return self.perceive(g, m), F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """M upsampled bilinearly to the input size, (B, 1, H, W) in [0, 1]; no gradients. ``target``
        is ignored: ABN's attention map is class-agnostic (the same map for every class)."""
        m = self.attend(self.extract(x))[1]
        return F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def output_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Perception logits in eval mode without gradients; the training mode is restored afterwards."""
        return output_in_eval_mode(self, x)


def build_abn(
    backbone: str,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    backbone_options: Optional[dict[str, Any]] = None,
    split: Optional[int] = None,
    width: Optional[int] = None,
    blocks: int = 1,
) -> ABN:
    """Build ABN on backbone ``backbone`` (random init from torch's global generator: the backbone
    first, then the attention branch); the model's ``spec`` rebuilds it, with the split level, the
    width and the backbone's options resolved, so a later change of the defaults keeps old checkpoints."""
    hw = image_hw(image_size)
    net = build_model(backbone, in_channels, num_classes, hw, **dict(backbone_options or {}))
    bspec = net.spec or {}
    level = resolve_split(net, split, bspec.get("name", backbone))
    model = ABN(net, num_classes, level, width, blocks)
    model.spec = {
        "name": "abn",
        "backbone": bspec.get("name", backbone),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "image_size": list(hw),
        "backbone_options": dict(bspec.get("options", backbone_options or {})),
        "split": model.split_level,
        "width": model.width,
        "blocks": model.blocks,
    }
    return model


def abn_from_spec(spec: dict[str, Any]) -> ABN:
    """Rebuild the architecture ``model.spec`` describes (weights are loaded separately)."""
    if not isinstance(spec, dict) or spec.get("name") != "abn":
        raise CheckpointError(
            "abn model spec must be a dict named 'abn'; the checkpoint is corrupted or holds another model"
        )
    kw = {k: v for k, v in spec.items() if k != "name"}
    kw["image_size"] = tuple(kw["image_size"])
    return build_abn(**kw)
