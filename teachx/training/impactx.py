"""IMPACTX training: cross-entropy of C plus lambda times the MSE between D(LEP(x)) and the teacher map.

The map source is pluggable so the ablation controls train the *same* architecture with the same
loss but with a different explanation signal: ``teacher`` (the real maps), ``shuffled`` (each
image gets another image's map), ``constant`` (the mean training map) and ``random`` (a fixed
smooth random map per image). With lambda = 0 no map is read at all (capacity control).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from teachx.models.impactx import ImpactX
from teachx.teachers.store import MapStore


class MapSource:
    """Looks up the target map of each dataset index, according to the ablation mode."""

    def __init__(self, store: MapStore, mode: str, train_idx: np.ndarray, seed: int):
        self.store, self.mode, self.seed = store, mode, seed
        self.perm: Optional[np.ndarray] = None
        self.mean_map: Optional[torch.Tensor] = None
        if mode == "shuffled":
            # a derangement of the training indices: no image keeps its own map
            rng = np.random.default_rng(seed + 7)
            order = rng.permutation(train_idx)
            shifted = np.roll(order, 1)
            self.perm = np.arange(store.maps.shape[0])
            self.perm[order] = shifted
        elif mode in ("constant", "random"):
            self.mean_map = store.mean_map(train_idx)
            self.scale = float(self.mean_map.abs().max().clamp_min(1e-8))

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        if self.mode == "teacher":
            return self.store.read(indices)
        if self.mode == "shuffled":
            return self.store.read(self.perm[indices.cpu().numpy()])
        if self.mode == "constant":
            return self.mean_map.unsqueeze(0).expand(indices.shape[0], *self.mean_map.shape).clone()
        # random: one fixed smooth random map per image, independent of the image content
        out = torch.empty(indices.shape[0], *self.mean_map.shape)
        for row, i in enumerate(indices.tolist()):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            c, h, w = self.mean_map.shape
            coarse = torch.randn(1, c, max(2, h // 4), max(2, w // 4), generator=g)
            out[row] = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        return out / out.flatten(1).abs().amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)


class ImpactxTask:
    """Loss = CE(C([M(x), LEP(x)]), y) + lam * MSE(D(LEP(x)), map)."""

    def __init__(self, model: ImpactX, maps: Optional[MapSource], lam: float, label_smoothing: float = 0.0):
        self.model, self.source, self.lam, self.label_smoothing = model, maps, lam, label_smoothing

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        if self.lam == 0 or self.source is None:
            return None
        return self.source(indices)

    def loss(self, x, y, maps):
        if maps is None:
            logits = self.model(x)
            ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            return ce, logits, {"ce": ce.detach()}
        logits, pred = self.model.forward_all(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        mse = F.mse_loss(pred.float(), maps)
        return ce + self.lam * mse, logits, {"ce": ce.detach(), "map_mse": mse.detach()}

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)
