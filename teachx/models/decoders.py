"""IMPACTX map decoders: what LEP computed -> the built-in attribution map(s).

Why one file of over 500 lines: the designs share their building blocks and the
recommended-design rule, and each is a few dozen lines, like zennit's rules in one module.


One class per design, registered by name in ``DECODERS`` (``impactx.decoder``). Each class says
*what* it reads (class attributes ``needs_pyramid``: LEP's multi-scale feature maps from
``Backbone.features_with_pyramid``; ``needs_input``: the normalised input image at full
resolution; every decoder gets LEP's pooled vector ``z``) and *how* it turns that into maps
(``forward``). The IMPACTX model computes only what the decoder needs, in the same single pass
through LEP that gives the classifier its ``z``.

- ``paper`` (:class:`MapDecoder`): the paper's decoder, z -> FC -> [upsample, 3x3 conv] blocks.
  It sees only the pooled vector, so its maps cannot localise much beyond the dataset-mean map.
- ``unet`` (:class:`UNetDecoder`): reads LEP's feature pyramid through 1x1 lateral convolutions
  and merges it top-down (upsample, add the skip, 3x3 conv), z added at the coarsest level
  (FPN / U-Net-like skip connections); the map is made at the finest pyramid level and resized.
- ``unet_input`` (:class:`InputDecoder`): ``unet`` plus a 3x3 conv of the input image at full
  resolution, fused with the upsampled trunk before the output conv.
- ``additive`` (:class:`AdditiveDecoder`): the ``unet_input`` trunk predicts per-pixel,
  per-channel multipliers g, and the map is ``sum_c (x_c - reference_c) * g_c`` (a
  gradient x input-like form; ``reference`` 0 is the dataset mean in normalised space). With
  per-channel maps (``map_channels == in_channels``) the channel sum is left out.

- ``additive_fast`` (:class:`FastAdditiveDecoder`): ``additive`` with a 1x1 head, about a third of its
  multiply-adds on LeNet-5 (the per-class 3x3 head at full resolution was the largest layer).
- ``lite`` (:class:`LiteDecoder`) and ``lite_additive`` (:class:`LiteAdditiveDecoder`): the cost
  target's designs -- the pyramid merged with 1x1 convolutions and additions, one depthwise-separable
  conv and a 1x1 head at the finest pyramid level (no full-resolution convolution); ``lite_additive``
  turns the head's output into multipliers of ``x - reference`` at full resolution.

Every decoder returns ``(B, classes * out_channels, H, W)``: with ``classes > 1`` (``impactx.
per_class``) one map per class, FastSHAP-style; the IMPACTX model picks the class. ``paper`` makes
one map only (``supports_per_class = False``): it is kept exactly as the paper describes it.

Each class also declares ``recommended``: the ``impactx.per_class``, ``impactx.map_loss``,
``impactx.decoder_width``, ``impactx.decoder_reads_m``, ``impactx.self_teach_every`` and
``impactx.self_teach_method`` a config gets when it names the decoder and leaves those keys unset -- for
``paper`` the paper's own (one map, MSE, width 32, no self-teaching), for the others the setting the
built-in-maps study found to explain best (one map per class, 1 - Pearson); for ``unet_input``, the
default, also M's pyramid read as well (more faithful in every seed, with either teacher), width 16, and
self-teaching every epoch with gradient x input of the model being trained (the maps follow the model,
not the teacher). So ``impactx.decoder=paper`` alone is the paper's method.

Decoders are not part of the logits' graph (``ImpactX.forward`` never calls them), so post-hoc
explanation methods applied to an IMPACTX model never see them; they use inline ``+`` and
``F.interpolate`` freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachx.config.schema import add_hook
from teachx.errors import ConfigError
from teachx.registry import Registry


@dataclass
class DecoderSpec:
    """Everything a decoder may be built from (each decoder reads the fields it needs)."""

    latent_dim: int  # size of LEP's pooled vector z
    map_size: tuple[int, int]  # output resolution
    out_channels: int = 1  # channels of one map (1 after a channel sum, C for per-channel maps)
    classes: int = 1  # maps per image (> 1: one per class)
    width: int = 32
    scale: int = 2  # the paper decoder's internal resolution divisor
    in_channels: int = 3  # input image channels (decoders that read the input)
    pyramid: Optional[list[tuple[int, int, int]]] = None  # (C, h, w) of LEP's pyramid levels, high -> low resolution
    reference: Sequence[float] = field(
        default_factory=lambda: (0.0,)
    )  # the additive form's reference, per channel or one value


class Decoder(nn.Module):
    """Base class: ``forward(z, pyramid=None, x=None) -> (B, classes * out_channels, H, W)``."""

    needs_pyramid: ClassVar[bool] = False
    needs_input: ClassVar[bool] = False
    supports_per_class: ClassVar[bool] = True
    #: impactx.per_class / impactx.map_loss when a config leaves them unset (README "Built-in maps")
    recommended: ClassVar[dict[str, object]] = {
        "per_class": True,
        "map_loss": "pearson",
        "decoder_width": 32,
        "decoder_reads_m": False,
        "self_teach_every": 0,
        "self_teach_method": "teacher",
    }

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "Decoder":
        raise NotImplementedError


DECODERS: Registry[type[Decoder]] = Registry("map decoder")


def _upsamplings(size: int) -> int:
    """How many x2 upsamplings take a small seed grid (>= 4 px) to ``size``."""
    return max(1, min(4, int(math.floor(math.log2(max(size, 8) / 4)))))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _reference(decoder: str, in_channels: int, out_channels: int, reference) -> torch.Tensor:
    """The additive form's reference as a (1, 1, C, 1, 1) tensor, after checking the map and reference shapes."""
    if out_channels not in (1, in_channels):
        raise ConfigError(
            f"the {decoder} decoder makes 1 map or one per input channel ({in_channels}), "
            f"not {out_channels}; use teacher.reduce=sum (or none)"
        )
    ref = [float(r) for r in (reference if isinstance(reference, (list, tuple)) else [reference])]
    if len(ref) not in (1, in_channels):
        raise ConfigError(
            f"impactx.additive_reference needs 1 value or {in_channels} (one per channel), got {len(ref)}"
        )
    return torch.tensor(ref).view(1, 1, -1, 1, 1).expand(1, 1, in_channels, 1, 1).clone()


def _additive_maps(
    x: torch.Tensor, g: torch.Tensor, reference: torch.Tensor, out_channels: int, map_size: tuple[int, int]
) -> torch.Tensor:
    """sum_c (x_c - reference_c) * g_c for multipliers g (B, classes, C, H, W); per channel when out_channels > 1."""
    contrib = (x.unsqueeze(1) - reference.to(x.dtype)) * g  # (B, classes, C, H, W)
    if out_channels == 1:
        contrib = contrib.sum(dim=2, keepdim=True)
    return _resize(contrib.flatten(1, 2), map_size)


def _top_down(
    owner: str,
    lateral: nn.ModuleList,
    merge: Callable[[int, torch.Tensor], torch.Tensor],
    z_term: torch.Tensor,
    pyramid: Optional[list[torch.Tensor]],
) -> torch.Tensor:
    """LEP's pyramid merged coarse to fine: ``h = merge(L, lateral_L(f_L) + z_term)``, then for each finer level
    ``h = merge(i, resize(h, size of f_i) + lateral_i(f_i))``; returns h at the finest level."""
    if pyramid is None or len(pyramid) != len(lateral):
        raise ValueError(
            f"{owner} needs LEP's {len(lateral)} pyramid levels, got {0 if pyramid is None else len(pyramid)}"
        )
    last = len(pyramid) - 1
    h = merge(last, lateral[last](pyramid[last]) + z_term[:, :, None, None])
    for i in range(last - 1, -1, -1):
        h = merge(i, _resize(h, tuple(pyramid[i].shape[-2:])) + lateral[i](pyramid[i]))
    return h


@DECODERS.register("paper")
class MapDecoder(Decoder):
    """z -> (B, out_channels, H, W): FC to a coarse grid, then [upsample x2, conv3x3, ReLU] blocks.

    The convolutions run up to ``H / scale``; a final bilinear resize reaches the map size. With
    ``scale=1`` every block is convolved at full resolution (the paper's Fig. 2 layout for 32x32);
    ``scale=2`` (default) skips the costliest full-resolution convolutions -- for LeNet-5 they cost
    more than the whole backbone -- and teacher maps at pixel level are mostly noise there anyway.
    The last conv is linear because maps are signed.
    """

    supports_per_class = False
    recommended = {  # the paper's
        "per_class": False,
        "map_loss": "mse",
        "decoder_width": 32,
        "decoder_reads_m": False,
        "self_teach_every": 0,
        "self_teach_method": "teacher",
    }

    def __init__(
        self, latent_dim: int, map_size: tuple[int, int], out_channels: int = 1, width: int = 32, scale: int = 2
    ):
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

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "MapDecoder":
        return cls(spec.latent_dim, spec.map_size, spec.out_channels, spec.width, spec.scale)

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.seed_channels, *self.seed_hw)
        return _resize(self.out(self.up(h)), self.map_size)


@DECODERS.register("unet")
class UNetDecoder(Decoder):
    """LEP's pyramid, merged top-down with skip connections; z joins at the coarsest level.

    level L (coarsest): h = conv3x3(lateral_L(f_L) + W z); then for each finer level i:
    h = conv3x3(upsample(h, size of f_i) + lateral_i(f_i)), each conv followed by a ReLU;
    the map is ``conv3x3(h)`` at the finest level's resolution, resized bilinearly to the map size.
    All levels have ``width`` channels.
    """

    needs_pyramid = True

    def __init__(
        self,
        latent_dim: int,
        pyramid: list[tuple[int, int, int]],
        map_size: tuple[int, int],
        out_channels: int = 1,
        width: int = 32,
        classes: int = 1,
    ):
        super().__init__()
        if not pyramid:
            raise ConfigError("this decoder reads LEP's feature pyramid, but the LEP backbone exposes none")
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.classes, self.out_channels, self.width = int(classes), int(out_channels), int(width)
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c, _, _ in pyramid])
        self.z_proj = nn.Linear(latent_dim, width)
        self.merge = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in pyramid])
        self.head = nn.Conv2d(width, self.classes * self.out_channels, 3, padding=1)

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "UNetDecoder":
        return cls(spec.latent_dim, spec.pyramid or [], spec.map_size, spec.out_channels, spec.width, spec.classes)

    def trunk(self, z: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """(B, width, h0, w0) at the finest pyramid level."""
        return _top_down(type(self).__name__, self.lateral, lambda i, t: self.merge[i](t), self.z_proj(z), pyramid)

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _resize(self.head(self.trunk(z, pyramid)), self.map_size)


@DECODERS.register("unet_input", "unet-input")
class InputDecoder(UNetDecoder):
    """``unet`` plus the input image at full resolution.

    The trunk is upsampled to the input's size and concatenated with ``ReLU(conv3x3(x))``
    (``width // 4`` channels, at least 8), fused by a 1x1 conv + ReLU, and a 3x3 conv makes the map.
    """

    needs_input = True
    #: the default design: M's pyramid too made the maps more faithful in every seed, with DeepSHAP and with
    #: self-teaching; self-taught every epoch with gradient x input of the model being trained, the maps follow
    #: the model that makes them, and at width 16 (64 before) the step costs about half as much with about
    #: the same faithfulness (docs/studies/builtin-maps.md "Faithful by default")
    recommended = {
        "per_class": True,
        "map_loss": "pearson",
        "decoder_width": 16,
        "decoder_reads_m": True,
        "self_teach_every": 1,
        "self_teach_method": "gradient_x_input",
    }

    def __init__(
        self,
        latent_dim: int,
        pyramid: list[tuple[int, int, int]],
        map_size: tuple[int, int],
        in_channels: int,
        out_channels: int = 1,
        width: int = 32,
        classes: int = 1,
    ):
        super().__init__(latent_dim, pyramid, map_size, out_channels, width, classes)
        fine = max(8, width // 4)
        self.in_channels = int(in_channels)
        self.input_conv = nn.Sequential(nn.Conv2d(in_channels, fine, 3, padding=1), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(width + fine, fine, 1), nn.ReLU())
        self.head = nn.Conv2d(fine, self.head_channels(), 3, padding=1)

    def head_channels(self) -> int:
        return self.classes * self.out_channels

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "InputDecoder":
        return cls(
            spec.latent_dim,
            spec.pyramid or [],
            spec.map_size,
            spec.in_channels,
            spec.out_channels,
            spec.width,
            spec.classes,
        )

    def fused(self, z: torch.Tensor, pyramid: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(B, fine, H, W): trunk and input features at the input's resolution."""
        if x is None:
            raise ValueError(f"{type(self).__name__} reads the input image; pass x")
        h = _resize(self.trunk(z, pyramid), tuple(x.shape[-2:]))
        return self.fuse(torch.cat([h, self.input_conv(x)], dim=1))

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _resize(self.head(self.fused(z, pyramid, x)), self.map_size)


@DECODERS.register("additive")
class AdditiveDecoder(InputDecoder):
    """map = sum_c (x_c - reference_c) * g_c, with multipliers g from the ``unet_input`` trunk.

    ``reference`` is one value or one per input channel, in normalised space (0 = the dataset
    mean). One map (``out_channels == 1``) sums over the input channels; per-channel maps
    (``out_channels == in_channels``) keep them apart. The map is exactly zero where the input
    equals the reference, as with gradient x input.
    """

    recommended = Decoder.recommended  # measured only at width 32 without M

    def __init__(
        self,
        latent_dim: int,
        pyramid: list[tuple[int, int, int]],
        map_size: tuple[int, int],
        in_channels: int,
        out_channels: int = 1,
        width: int = 32,
        classes: int = 1,
        reference: Sequence[float] = (0.0,),
    ):
        ref = _reference("additive", in_channels, out_channels, reference)
        super().__init__(latent_dim, pyramid, map_size, in_channels, out_channels, width, classes)
        self.register_buffer("reference", ref, persistent=False)

    def head_channels(self) -> int:
        return self.classes * self.in_channels  # one multiplier per class and input channel

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "AdditiveDecoder":
        return cls(
            spec.latent_dim,
            spec.pyramid or [],
            spec.map_size,
            spec.in_channels,
            spec.out_channels,
            spec.width,
            spec.classes,
            spec.reference,
        )

    def multipliers(self, z: torch.Tensor, pyramid: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """g: (B, classes, in_channels, H, W) at the input's resolution."""
        g = self.head(self.fused(z, pyramid, x))
        return g.view(g.shape[0], self.classes, self.in_channels, *g.shape[-2:])

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _additive_maps(x, self.multipliers(z, pyramid, x), self.reference, self.out_channels, self.map_size)


@DECODERS.register("additive_fast", "additive-fast")
class FastAdditiveDecoder(AdditiveDecoder):
    """``additive`` with a 1x1 head: the multipliers g come from the fused full-resolution features by a
    pointwise conv, so the per-class head (classes x input channels outputs) costs about a ninth of
    ``additive``'s 3x3 head, the largest layer of that decoder on LeNet-5; the map keeps the input's
    detail through ``x - reference`` and the 3x3 input conv."""

    recommended = Decoder.recommended

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = nn.Conv2d(self.head.in_channels, self.head.out_channels, 1)


@DECODERS.register("lite")
class LiteDecoder(Decoder):
    """A cheap per-class decoder: maps made at LEP's finest pyramid level, without full-resolution convolutions.

    The pyramid is merged top-down like ``unet`` but with 1x1 laterals and additions only (z joins at
    the coarsest level), then one depthwise-separable 3x3 conv (depthwise 3x3 + 1x1) and a 1x1 head
    at the finest level's resolution (14x14 for LeNet-5 on 32x32), resized bilinearly to the map
    size. For LeNet-5 with width 16 this is about 0.3x the backbone's multiply-adds, where ``unet``
    costs 3.3x and ``unet_input`` 4.2x: the cost target (IMPACTX step <= 2.5x the baseline's, with M
    and LEP already 2x) leaves about half a backbone for the decoder. Its maps are smooth at the
    finest level's scale; ``lite_additive`` adds the input's detail.
    """

    needs_pyramid = True

    def __init__(
        self,
        latent_dim: int,
        pyramid: list[tuple[int, int, int]],
        map_size: tuple[int, int],
        head_channels: int,
        width: int = 16,
    ):
        super().__init__()
        if not pyramid:
            raise ConfigError("this decoder reads LEP's feature pyramid, but the LEP backbone exposes none")
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c, _, _ in pyramid])
        self.z_proj = nn.Linear(latent_dim, width)
        self.mix = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, width, 1), nn.ReLU()
        )
        self.head = nn.Conv2d(width, head_channels, 1)

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "LiteDecoder":
        return cls(spec.latent_dim, spec.pyramid or [], spec.map_size, spec.classes * spec.out_channels, spec.width)

    def coarse(self, z: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """(B, head_channels, h0, w0): the head's output at the finest pyramid level."""
        h = _top_down(type(self).__name__, self.lateral, lambda _i, t: F.relu(t), self.z_proj(z), pyramid)
        return self.head(self.mix(h))

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _resize(self.coarse(z, pyramid), self.map_size)


@DECODERS.register("lite_additive", "lite-additive")
class LiteAdditiveDecoder(LiteDecoder):
    """``lite``'s head predicts multipliers g (per class and input channel) at the finest pyramid level;
    they are resized to the input and the map is ``sum_c (x_c - reference_c) * g_c``, as ``additive``
    does, so the map has the input's detail at no full-resolution convolution."""

    needs_input = True

    def __init__(
        self,
        latent_dim: int,
        pyramid: list[tuple[int, int, int]],
        map_size: tuple[int, int],
        in_channels: int,
        out_channels: int = 1,
        width: int = 16,
        classes: int = 1,
        reference: Sequence[float] = (0.0,),
    ):
        ref = _reference("lite_additive", in_channels, out_channels, reference)
        super().__init__(latent_dim, pyramid, map_size, classes * in_channels, width)
        self.classes, self.in_channels, self.out_channels = int(classes), int(in_channels), int(out_channels)
        self.register_buffer("reference", ref, persistent=False)

    @classmethod
    def from_spec(cls, spec: DecoderSpec) -> "LiteAdditiveDecoder":
        return cls(
            spec.latent_dim,
            spec.pyramid or [],
            spec.map_size,
            spec.in_channels,
            spec.out_channels,
            spec.width,
            spec.classes,
            spec.reference,
        )

    def forward(
        self, z: torch.Tensor, pyramid: Optional[list[torch.Tensor]] = None, x: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError(f"{type(self).__name__} reads the input image; pass x")
        g = _resize(self.coarse(z, pyramid), tuple(x.shape[-2:]))
        g = g.view(g.shape[0], self.classes, self.in_channels, *g.shape[-2:])
        return _additive_maps(x, g, self.reference, self.out_channels, self.map_size)


def build_decoder(name: str, spec: DecoderSpec) -> Decoder:
    """The registered decoder ``name`` built from ``spec`` (a ConfigError names the valid ones)."""
    cls = DECODERS.get(name)
    if spec.classes > 1 and not cls.supports_per_class:
        raise ConfigError(per_class_error(DECODERS.canonical(name)))
    return cls.from_spec(spec)


def resolve_design(
    name: str,
    per_class: Optional[bool] = None,
    map_loss: Optional[str] = None,
    width: Optional[int] = None,
    reads_m: Optional[bool] = None,
    separate_lep: bool = False,
) -> dict[str, object]:
    """The built-in-map settings of decoder ``name``: each one given stays, each one left None is the decoder's
    ``recommended`` value -- reading M's pyramid only when LEP is not another backbone (``separate_lep``), since
    the two pyramids must match. One rule for the config (IMPACTX's options) and the Python API (``build_impactx``)."""
    rec = DECODERS.get(name).recommended
    return {
        "per_class": bool(rec["per_class"]) if per_class is None else per_class,
        "map_loss": str(rec["map_loss"]) if map_loss is None else map_loss,
        "decoder_width": int(rec["decoder_width"]) if width is None else width,
        "decoder_reads_m": (bool(rec["decoder_reads_m"]) and not separate_lep) if reads_m is None else reads_m,
    }


def per_class_error(name: str) -> str:
    able = [n for n in DECODERS.names() if DECODERS.get(n).supports_per_class]
    return (
        f"impactx.per_class=true needs a decoder that can make one map per class ({', '.join(able)}); "
        f"'{name}' makes one map from the pooled vector, as in the paper; set impactx.per_class=false "
        "(or leave it out: each decoder has its own default)"
    )


def reads_m_error(name: str) -> str:
    pyramid = [n for n in DECODERS.names() if DECODERS.get(n).needs_pyramid]
    return (
        f"impactx.decoder_reads_m=true needs a decoder that reads feature pyramids ({', '.join(pyramid)}), not '{name}'"
    )


def _resolve_config_design(ic: Any) -> None:
    """The ``impactx.design`` hook of IMPACTX's options (``ImpactxOptions`` of :mod:`teachx.training.methods`, a
    floor above): design options left None get the decoder's recommendation."""
    try:
        design = resolve_design(
            ic.decoder,
            ic.per_class,
            ic.map_loss,
            ic.decoder_width,
            ic.decoder_reads_m,
            separate_lep=ic.lep_backbone is not None,
        )
    except ConfigError:
        return  # an unknown decoder: validation names the valid ones
    ic.per_class, ic.map_loss = design["per_class"], design["map_loss"]
    ic.decoder_width, ic.decoder_reads_m = design["decoder_width"], design["decoder_reads_m"]
    ic.self_teach_every, ic.self_teach_method = self_teaching_design(
        ic.decoder, ic.self_teach_every, ic.self_teach_method, ic.maps == "teacher" and ic.lam > 0
    )


def self_teaching_design(
    name: str, every: Optional[int], method: Optional[str], trains_on_teacher: bool
) -> tuple[int, str]:
    """(impactx.self_teach_every, impactx.self_teach_method) of decoder ``name``: a period left None is the
    decoder's recommendation where the maps are the teacher's and trained (``trains_on_teacher``), else 0; a method
    left None is the decoder's recommendation only when the period is too and self-teaching is on, else
    ``teacher`` (the teacher method, as self-teaching was before the decoders recommended it)."""
    rec = DECODERS.get(name).recommended
    chosen = every is None
    if chosen:
        every = int(rec.get("self_teach_every", 0)) if trains_on_teacher else 0
    if method is None:
        method = str(rec.get("self_teach_method", "teacher")) if chosen and every > 0 else "teacher"
    return every, method


def _check_config_decoder(ic: Any) -> None:
    """The ``impactx.validate`` hook of IMPACTX's options: the decoder is registered and can do what is asked."""
    try:
        decoder = DECODERS.canonical(ic.decoder)
    except ConfigError as exc:
        raise ConfigError(f"impactx.decoder: {exc}") from None
    if ic.per_class and not DECODERS.get(decoder).supports_per_class:
        raise ConfigError(per_class_error(decoder))
    if ic.decoder_reads_m and not DECODERS.get(decoder).needs_pyramid:
        raise ConfigError(reads_m_error(decoder))


add_hook("impactx.design", _resolve_config_design)
add_hook("impactx.validate", _check_config_decoder)
