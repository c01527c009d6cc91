"""Batched tensor transforms: normalisation and a crop/flip augmentation that moves maps with images.

IMPACTX trains with a teacher attribution map per image, so whatever crop or flip an image gets,
its map must get too -- otherwise the constraint points at the wrong pixels. ``Augment`` draws the
random parameters once per batch (from an explicit ``torch.Generator``, so runs are reproducible)
and applies them to images and maps with the same gather, without a per-sample Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def _channel_view(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
    if t.shape[0] not in (1, like.shape[1]):
        raise ValueError(f"got {t.shape[0]} per-channel values for {like.shape[1]} channels")
    return t


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,C,H,W] (0..255) -> float32 ``(x/255 - mean) / std``; mean/std in [0, 1] units."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    elif not x.is_floating_point():
        raise TypeError(f"normalize expects uint8 (0..255) or float (0..1) images, got {x.dtype}")
    return (x - _channel_view(mean, x)) / _channel_view(std, x)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`, back to float images in [0, 1] (for plots)."""
    return x * _channel_view(std, x) + _channel_view(mean, x)


@dataclass(frozen=True)
class AugmentParams:
    """The random draw for one batch: crop offsets into the padded image, and which samples flip."""

    top: torch.Tensor  # int64 [B], in [0, 2 * padding]
    left: torch.Tensor  # int64 [B]
    flip: torch.Tensor  # bool [B]


class Augment:
    """Random crop (after ``crop_padding`` on each side) and horizontal flip, per sample.

    ``aug(images, generator)`` -> images; ``aug(images, generator, maps)`` -> (images, maps), where
    ``maps`` [B,k,H,W] receive exactly the same crop and flip as ``images`` [B,C,H,W]. Both are
    padded with ``pad_mode``: zeros for ``"constant"`` (an empty border carries no attribution), or
    mirrored content for ``"reflect"`` (the copied pixels keep their copied attribution).
    Output equals a per-sample ``pad -> crop -> flip`` exactly.
    """

    def __init__(self, crop_padding: int = 4, hflip: bool = True, pad_mode: str = "constant"):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.pad_mode = pad_mode

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip}, pad_mode={self.pad_mode!r})"

    def sample(self, batch: int, generator: torch.Generator) -> AugmentParams:
        """Draw the parameters for a batch (on the generator's device, then moved to CPU)."""
        device = generator.device
        span = 2 * self.crop_padding + 1
        offsets = torch.randint(0, span, (2, batch), generator=generator, device=device).cpu()
        if self.hflip:
            flip = (torch.rand(batch, generator=generator, device=device) < 0.5).cpu()
        else:
            flip = torch.zeros(batch, dtype=torch.bool)
        return AugmentParams(top=offsets[0], left=offsets[1], flip=flip)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply a given draw to a [B,*,H,W] tensor (images or maps)."""
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        p = self.crop_padding
        if p:
            if self.pad_mode == "reflect" and (p >= h or p >= w):
                raise ValueError(f"reflect padding {p} needs images larger than {p}x{p}, got {h}x{w}")
            x = F.pad(x, (p, p, p, p), mode=self.pad_mode)
        device = x.device
        top = params.top.to(device)
        left = params.left.to(device)
        flip = params.flip.to(device)
        rows = top[:, None] + torch.arange(h, device=device)[None, :]  # [B, H]
        cols = torch.arange(w, device=device)[None, :].expand(b, w)
        cols = torch.where(flip[:, None], (w - 1) - cols, cols) + left[:, None]  # [B, W]
        x = torch.gather(x, 2, rows[:, None, :, None].expand(b, c, h, x.shape[3]))
        x = torch.gather(x, 3, cols[:, None, None, :].expand(b, c, h, w))
        return x

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, maps: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        params = self.sample(images.shape[0], generator)
        out = self.apply(images, params)
        if maps is None:
            return out
        if maps.ndim != 4 or maps.shape[0] != images.shape[0] or maps.shape[2:] != images.shape[2:]:
            raise ValueError(
                f"maps must be [B, k, H, W] matching images {tuple(images.shape)}, got {tuple(maps.shape)}"
            )
        return out, self.apply(maps, params)

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip

    def expectation(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``apply(x, draw)`` over every draw ``sample`` can make, each as likely as it is there
        (all crop offsets, flipped or not): exact, by applying every draw. What a model trained on augmented
        targets sees on average; a map that is the same for every image can do no better against them."""
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        span = 2 * self.crop_padding + 1
        top, left = torch.meshgrid(torch.arange(span), torch.arange(span), indexing="ij")
        flips = [False, True] if self.hflip else [False]
        total = torch.zeros_like(x, dtype=torch.float64)
        for flip in flips:
            for t, lft in zip(top.flatten().tolist(), left.flatten().tolist()):
                params = AugmentParams(
                    top=torch.full((x.shape[0],), t),
                    left=torch.full((x.shape[0],), lft),
                    flip=torch.full((x.shape[0],), flip),
                )
                total += self.apply(x, params).double()
        return (total / (span * span * len(flips))).to(x.dtype)
