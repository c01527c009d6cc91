"""The IMPACTX model: a classifier that predicts its own attribution map in the same forward pass.

Components (Apicella et al. 2025):
- M: a backbone feature extractor, x -> m;
- LEP: the latent explanation predictor, a second feature extractor (same backbone family by
  default), x -> z;
- D: a decoder, z -> attribution map at the map resolution (convolutions, a fully connected layer
  and upsampling, 3x3 kernels, as in the paper's Fig. 2 for 32x32 inputs);
- C: the classifier on concat[m, z].

Training minimises CE(C([m, z]), y) + lambda * MSE(D(z), teacher map); the teacher is only needed
during training. At inference ``forward_all`` returns logits and the map from one forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from teachx.models.base import Backbone


def _upsamplings(size: int) -> int:
    """How many x2 upsamplings take a small seed grid (>= 4 px) to ``size``."""
    return max(1, min(4, int(math.floor(math.log2(max(size, 8) / 4)))))


class MapDecoder(nn.Module):
    """z -> (B, out_channels, H, W): FC to a coarse grid, then [upsample x2, conv3x3, ReLU] blocks.

    The convolutions run up to ``H / scale``; a final bilinear resize reaches the map size. With
    ``scale=1`` every block is convolved at full resolution (the paper's Fig. 2 layout for 32x32);
    ``scale=2`` (default) skips the costliest full-resolution convolutions -- for LeNet-5 they cost
    more than the whole backbone -- and teacher maps at pixel level are mostly noise there anyway.
    The last conv is linear because maps are signed.
    """

    def __init__(self, latent_dim: int, map_size: tuple[int, int], out_channels: int = 1, width: int = 32, scale: int = 2):
        super().__init__()
        h, w = map_size
        self.map_size = (int(h), int(w))
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"decoder scale must be a power of two >= 1, got {scale}")
        inner = (max(4, h // scale), max(4, w // scale))
        n = _upsamplings(min(inner))
        self.seed_hw = (math.ceil(inner[0] / 2**n), math.ceil(inner[1] / 2**n))
        self.seed_channels = width
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, width * self.seed_hw[0] * self.seed_hw[1]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        ch = width
        for i in range(n):
            nxt = max(16, ch // 2) if i > 0 else ch
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, nxt, 3, padding=1), nn.ReLU()]
            ch = nxt
        self.up = nn.Sequential(*blocks)
        self.out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.seed_channels, *self.seed_hw)
        x = self.out(self.up(x))
        if tuple(x.shape[-2:]) != self.map_size:
            x = nn.functional.interpolate(x, size=self.map_size, mode="bilinear", align_corners=False)
        return x


class ImpactX(nn.Module):
    """M + LEP + D + C. ``forward(x)`` gives logits; ``explain(x)`` the built-in map."""

    def __init__(
        self,
        m: Backbone,
        lep: Backbone,
        num_classes: int,
        map_size: tuple[int, int],
        map_channels: int = 1,
        decoder_width: int = 32,
        classifier_hidden: int = 0,
        spec: Optional[dict[str, Any]] = None,
        decoder_scale: int = 2,
    ):
        super().__init__()
        self.m = m
        self.lep = lep
        self.decoder = MapDecoder(lep.feature_dim, map_size, map_channels, decoder_width, decoder_scale)
        in_dim = m.feature_dim + lep.feature_dim
        if classifier_hidden > 0:
            self.classifier = nn.Sequential(nn.Linear(in_dim, classifier_hidden), nn.ReLU(), nn.Linear(classifier_hidden, num_classes))
        else:
            self.classifier = nn.Linear(in_dim, num_classes)
        self.num_classes = num_classes
        self.spec = spec
        self.m_frozen = False
        # the backbones' own heads are not part of IMPACTX: C replaces them
        for b in (self.m, self.lep):
            for p in b.classifier.parameters():
                p.requires_grad_(False)

    def freeze_m(self) -> None:
        """Keep M fixed (e.g. initialised from the teacher): no gradients, BatchNorm statistics frozen."""
        self.m_frozen = True
        for p in self.m.parameters():
            p.requires_grad_(False)
        self.m.eval()

    def train(self, mode: bool = True) -> "ImpactX":
        super().train(mode)
        if self.m_frozen:
            self.m.eval()  # a frozen M stays in eval mode, whatever the training loop asks
        return self

    @property
    def feature_layer(self) -> nn.Module:
        """Grad-CAM's default layer on an IMPACTX model: M's last spatial features (the
        classification branch); the LEP branch also reaches the logits but is not a single layer."""
        return self.m.feature_layer

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, built-in map) from one forward pass."""
        m = self.m.features(x)
        z = self.lep.features(x)
        logits = self.classifier(torch.cat([m, z], dim=1))
        return logits, self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m.features(x)
        z = self.lep.features(x)
        return self.classifier(torch.cat([m, z], dim=1))

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> torch.Tensor:
        """The built-in attribution map D(LEP(x)); no gradients, no teacher."""
        return self.decoder(self.lep.features(x))

    def state_dict_for_training(self) -> dict[str, torch.Tensor]:
        return self.state_dict()


def build_impactx(
    backbone: str,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    backbone_options: Optional[dict[str, Any]] = None,
    lep_backbone: Optional[str] = None,
    lep_options: Optional[dict[str, Any]] = None,
    map_size: Optional[tuple[int, int]] = None,
    map_channels: int = 1,
    decoder_width: int = 32,
    classifier_hidden: int = 0,
    decoder_scale: int = 2,
) -> ImpactX:
    """Build an IMPACTX model; the returned model's ``spec`` rebuilds it (for checkpoints)."""
    from teachx.models import build_model

    backbone_options = dict(backbone_options or {})
    lep_name = lep_backbone or backbone
    lep_options = dict(lep_options if lep_options is not None else (backbone_options if lep_name == backbone else {}))
    image_size = (int(image_size[0]), int(image_size[1]))
    map_size = tuple(int(s) for s in (map_size or image_size))
    spec = {
        "name": "impactx",
        "backbone": backbone,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": list(image_size),
        "backbone_options": backbone_options,
        "lep_backbone": lep_name,
        "lep_options": lep_options,
        "map_size": list(map_size),
        "map_channels": map_channels,
        "decoder_width": decoder_width,
        "decoder_scale": decoder_scale,
        "classifier_hidden": classifier_hidden,
    }
    m = build_model(backbone, in_channels, num_classes, image_size, **backbone_options)
    lep = build_model(lep_name, in_channels, num_classes, image_size, **lep_options)
    return ImpactX(m, lep, num_classes, map_size, map_channels, decoder_width, classifier_hidden, spec=spec, decoder_scale=decoder_scale)


def impactx_from_spec(spec: dict[str, Any]) -> ImpactX:
    kw = {k: v for k, v in spec.items() if k != "name"}
    kw["image_size"] = tuple(kw["image_size"])
    kw["map_size"] = tuple(kw["map_size"])
    return build_impactx(**kw)
