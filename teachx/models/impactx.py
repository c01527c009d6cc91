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

Beyond the paper (``teachx.models.decoders``): ``decoder`` picks another design that also reads
LEP's multi-scale feature maps (``unet``), the input image (``unet_input``) or builds the map as
``sum_c (x_c - reference_c) * g_c`` (``additive``); LEP then runs ``features_with_pyramid``, which
gives z and the pyramid from the same single pass. ``per_class=True`` makes one map per class
(FastSHAP-style): ``forward_all(x, target)`` / ``explain(x, target)`` return the map of ``target``
(default: the predicted class) and ``all_maps(x)`` every class's map.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.models.base import Backbone
from teachx.models.decoders import (
    DECODERS,
    Decoder,
    DecoderSpec,
    MapDecoder,  # noqa: F401  (a public name of this module)
    build_decoder,
    reads_m_error,
    resolve_design,
)
from teachx.models import build_model
from teachx.models._common import output_in_eval_mode


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
        decoder: str = "paper",
        per_class: bool = False,
        additive_reference: float | list[float] = 0.0,
        image_size: Optional[tuple[int, int]] = None,
        decoder_reads_m: bool = False,
    ):
        super().__init__()
        self.m = m
        self.lep = lep
        self.decoder_name = DECODERS.canonical(decoder)
        self.per_class = bool(per_class)
        self.map_channels = int(map_channels)
        self.decoder_reads_m = bool(decoder_reads_m)
        cls = DECODERS.get(self.decoder_name)
        ref = additive_reference if isinstance(additive_reference, (list, tuple)) else [additive_reference]
        pyramid = None
        if cls.needs_pyramid:
            size = tuple(image_size or map_size)
            pyramid = lep.pyramid_shapes(size)
            if self.decoder_reads_m:
                pyramid = _joined_pyramid(pyramid, m.pyramid_shapes(size))
        elif self.decoder_reads_m:
            raise ConfigError(reads_m_error(self.decoder_name))
        self.decoder: Decoder = build_decoder(
            self.decoder_name,
            DecoderSpec(
                latent_dim=lep.feature_dim,
                map_size=tuple(map_size),
                out_channels=map_channels,
                classes=num_classes if self.per_class else 1,
                width=decoder_width,
                scale=decoder_scale,
                in_channels=lep.in_channels,
                reference=tuple(float(r) for r in ref),
                pyramid=pyramid,
            ),
        )
        in_dim = m.feature_dim + lep.feature_dim
        if classifier_hidden > 0:
            self.classifier = nn.Sequential(
                nn.Linear(in_dim, classifier_hidden), nn.ReLU(), nn.Linear(classifier_hidden, num_classes)
            )
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

    def _lep_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """z (and the pyramid, when the decoder reads it) from ONE pass through LEP."""
        if self.decoder.needs_pyramid:
            return self.lep.features_with_pyramid(x)
        return self.lep.features(x), None

    def _passes(
        self, x: torch.Tensor, need_m: bool
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[list[torch.Tensor]]]:
        """(M(x) or None, z, the decoder's pyramid) from one pass through each branch that is needed. With
        ``decoder_reads_m`` the pyramid joins M's levels to LEP's, detached: the decoder sees what the
        classification branch computes, and the map loss never trains M (M learns from CE alone, as in the paper)."""
        z, pyramid = self._lep_pass(x)
        if not self.decoder_reads_m:
            return (self.m.features(x) if need_m else None), z, pyramid
        m, m_levels = self.m.features_with_pyramid(x)
        return m, z, [torch.cat([lep_level, m_level.detach()], dim=1) for lep_level, m_level in zip(pyramid, m_levels)]

    def _decode(self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
        """(B, classes, C, H, W) with per_class, else (B, C, H, W)."""
        maps = self.decoder(z, pyramid, x if self.decoder.needs_input else None)
        if self.per_class:
            maps = maps.view(maps.shape[0], self.num_classes, self.map_channels, *maps.shape[-2:])
        return maps

    @staticmethod
    def select_class(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) per-class maps -> (B, C, H, W), the map of ``target[b]`` for image b."""
        target = torch.as_tensor(target, device=maps.device).long().reshape(-1)
        if target.numel() == 1 and maps.shape[0] > 1:
            target = target.expand(maps.shape[0])
        return maps[torch.arange(maps.shape[0], device=maps.device), target]

    def forward_all(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, built-in map) from one forward pass. With per-class maps, the map of ``target``
        (class index per image, or one for all), default the predicted class; a one-map model
        returns its map whatever ``target`` is."""
        m, z, pyramid = self._passes(x, need_m=True)
        logits = self.classifier(torch.cat([m, z], dim=1))
        maps = self._decode(z, pyramid, x)
        if self.per_class:
            maps = self.select_class(maps, logits.argmax(1) if target is None else target)
        return logits, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m.features(x)
        z = self.lep.features(x)
        return self.classifier(torch.cat([m, z], dim=1))

    @torch.no_grad()
    def explain(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The built-in attribution map; no gradients, no teacher. Per-class maps: the map of
        ``target`` (default: the predicted class, which costs the M and classifier pass too)."""
        if self.per_class and target is None:
            return self.forward_all(x)[1]
        _, z, pyramid = self._passes(x, need_m=False)
        maps = self._decode(z, pyramid, x)
        return self.select_class(maps, target) if self.per_class else maps

    def all_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Every class's map, (B, K, C, H, W) (K = 1 for a one-map model)."""
        _, z, pyramid = self._passes(x, need_m=False)
        maps = self._decode(z, pyramid, x)
        return maps if self.per_class else maps.unsqueeze(1)

    @torch.no_grad()
    def output_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in eval mode without gradients (a value function for training objectives that
        query the model on perturbed inputs); the training mode is restored afterwards."""
        return output_in_eval_mode(self, x)

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
    decoder_width: Optional[int] = None,
    classifier_hidden: int = 0,
    decoder_scale: int = 2,
    decoder: str = "unet_input",
    per_class: Optional[bool] = None,
    additive_reference: float | list[float] = 0.0,
    decoder_reads_m: Optional[bool] = None,
) -> ImpactX:
    """Build an IMPACTX model; the returned model's ``spec`` rebuilds it (for checkpoints).

    The defaults are the config's (``impactx.decoder``): the built-in-maps study's design, one map
    per class; ``decoder="paper"`` is the paper's, and ``per_class`` / ``decoder_width`` /
    ``decoder_reads_m`` left None follow the decoder's ``recommended`` setting. Specs written before ``decoder``/``per_class``/``additive_reference``
    existed lack those keys and rebuild the paper's decoder, as they were trained with."""
    design = resolve_design(
        decoder, per_class, None, decoder_width, decoder_reads_m, separate_lep=(lep_backbone or backbone) != backbone
    )
    per_class, decoder_width, decoder_reads_m = design["per_class"], design["decoder_width"], design["decoder_reads_m"]

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
        "decoder": DECODERS.canonical(decoder),
        "per_class": bool(per_class),
        "additive_reference": additive_reference,
    }
    if decoder_reads_m:  # only then: specs of every other model stay as they were
        spec["decoder_reads_m"] = True
    m = build_model(backbone, in_channels, num_classes, image_size, **backbone_options)
    lep = build_model(lep_name, in_channels, num_classes, image_size, **lep_options)
    return ImpactX(
        m,
        lep,
        num_classes,
        map_size,
        map_channels,
        decoder_width,
        classifier_hidden,
        spec=spec,
        decoder_scale=decoder_scale,
        decoder=decoder,
        per_class=per_class,
        additive_reference=additive_reference,
        image_size=image_size,
        decoder_reads_m=decoder_reads_m,
    )


def _joined_pyramid(lep: list[tuple[int, int, int]], m: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """LEP's and M's pyramid levels side by side (channels added); they must match in number and size."""
    if len(lep) != len(m) or any(a[1:] != b[1:] for a, b in zip(lep, m)):
        raise ConfigError(
            f"impactx.decoder_reads_m=true needs M and LEP pyramids of the same levels and sizes (LEP {lep}, M {m}); "
            "use the same backbone for both (leave impactx.lep_backbone unset)"
        )
    return [(a[0] + b[0], a[1], a[2]) for a, b in zip(lep, m)]


def impactx_from_spec(spec: dict[str, Any]) -> ImpactX:
    kw = {k: v for k, v in spec.items() if k != "name"}
    kw.setdefault("decoder", "paper")  # written before decoders were options: the paper's, one map
    kw.setdefault("per_class", False)
    kw.setdefault("decoder_width", 32)  # specs state the width they were built with; the old default was 32
    kw.setdefault("decoder_reads_m", False)  # written only when true: a spec without it was built without M's pyramid
    kw["image_size"] = tuple(kw["image_size"])
    kw["map_size"] = tuple(kw["map_size"])
    return build_impactx(**kw)
