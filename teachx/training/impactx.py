"""IMPACTX training: cross-entropy of C plus lambda times the MSE between D(LEP(x)) and the teacher map.

The map source is pluggable so the ablation controls train the *same* architecture with the same
loss but with a different explanation signal: ``teacher`` (the real maps), ``shuffled`` (each
image gets another image's map), ``constant`` (the mean training map) and ``random`` (a fixed
smooth random map per image). With lambda = 0 no map is read at all (capacity control).

Beyond the paper: the map loss is pluggable (``teachx.training.map_losses``: mse, pearson,
standardized_mse, rank, after optional pooling); per-class models are trained on the map of the
class the teacher explained (``MapSource(classes=...)``: the label, or the teacher's prediction;
a shuffled map keeps the class it explains); and ``SelfFaithfulness`` adds a FastSHAP-style term
that asks the built-in map to predict the model's own output on masked inputs.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from teachx.errors import ConfigError
from teachx.models.impactx import ImpactX
from teachx.teachers.store import MapStore
from teachx.training.map_losses import MapLoss


class MapSource:
    """Looks up the target map of each dataset index, according to the ablation mode."""

    def __init__(
        self, store: MapStore, mode: str, train_idx: np.ndarray, seed: int, classes: Optional[np.ndarray] = None
    ):
        """``classes``: for every dataset index, the class its stored map explains (the label, or
        the teacher's prediction); read by per-class models (``classes_for``)."""
        self.store, self.mode, self.seed = store, mode, seed
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64)
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

    def classes_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The class each returned map explains (None without ``classes``): a shuffled map keeps
        the class of the image it was made for; constant and random maps take the image's own."""
        if self.classes is None:
            return None
        idx = indices.cpu().numpy()
        if self.mode == "shuffled":
            idx = self.perm[idx]
        return torch.from_numpy(self.classes[idx])

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


class SelfFaithfulness:
    """FastSHAP-style faithfulness term: the built-in map, summed over ``patch`` x ``patch`` patches,
    must predict how the model's own output changes when patches are masked.

    Per image (Jethani et al. 2022, with their additive efficiency normalisation): subsets S of the
    d patches are drawn with sizes from the Shapley kernel, p(s) ~ (d - 1) / (s (d - s)), and, with
    ``paired``, each with its complement; the masked image keeps S and sets the rest to
    ``reference`` (0 = the dataset mean in normalised space). With v(S) the model's probability of
    the explained class (eval mode, no gradients: the model is the thing explained, not trained by
    this term), phi the patch sums of the map and s = |S|,

        r = v(S) - v(0) - s/d (v(1) - v(0)),   u = (1_S - s/d)^T phi,
        loss = mean over (image, S) of (r - a u)^2  /  mean of r^2.

    The maps are on an arbitrary scale (the teacher-map loss sets it), so ``a`` is the batch's
    least-squares scale, kept >= a tenth of the ratio of the two sides' RMS so that a map pointing
    the wrong way still gets a gradient, and held constant in the backward pass (at the optimum
    its gradient is zero). Dividing by mean r^2 (held constant) makes the loss the share of the
    model's masked-output variation that the map leaves unexplained: 1 for a useless map, 0 for a
    perfect additive one, whatever the size of the probabilities. Cost per step: one no-gradient
    forward of (1 + samples) x B + 1 images.
    """

    def __init__(self, patch: int = 4, samples: int = 2, reference: float = 0.0):
        if patch < 1 or samples < 1:
            raise ConfigError(f"faithfulness term: patch and samples must be >= 1, got {patch}, {samples}")
        self.patch, self.samples, self.reference = int(patch), int(samples), float(reference)

    def _masks(self, batch: int, d: int, device: torch.device) -> torch.Tensor:
        """(samples, B, d) 0/1 masks; sizes from the Shapley kernel, pairs of complements."""
        sizes = torch.arange(1, d, device=device, dtype=torch.float64)
        kernel = (d - 1) / (sizes * (d - sizes))
        out = []
        for k in range(self.samples):
            if k % 2 == 1:  # the complement of the previous draw (paired sampling)
                out.append(1.0 - out[-1])
                continue
            s = sizes[torch.multinomial(kernel, batch, replacement=True)].long()
            order = torch.rand(batch, d, device=device).argsort(dim=1).argsort(dim=1)
            out.append((order < s[:, None]).float())
        return torch.stack(out)

    def __call__(self, model: ImpactX, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        gh, gw = -(-h // p), -(-w // p)
        d = gh * gw
        if d < 2:
            raise ConfigError(
                f"impactx.faith_patch={p} leaves fewer than 2 patches on {h}x{w} images; use a smaller patch"
            )
        phi = F.avg_pool2d(maps.float().sum(1, keepdim=True), p, stride=p, ceil_mode=True).flatten(1) * (
            p * p
        )  # (B, d)
        masks = self._masks(b, d, x.device)  # (S, B, d)
        pix = masks.view(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)[..., :h, :w]
        xs = x.unsqueeze(0).expand(self.samples, *x.shape).reshape(-1, *x.shape[1:])
        masked = xs * pix + self.reference * (1.0 - pix)
        empty = torch.full_like(x[:1], self.reference)
        probs = model.output_no_grad(torch.cat([x, masked, empty])).float().softmax(1)
        t = target.long()
        v1 = probs[:b].gather(1, t[:, None])[:, 0]
        vs = probs[b:-1].view(self.samples, b, -1).gather(2, t.view(1, b, 1).expand(self.samples, b, 1))[..., 0]
        v0 = probs[-1][t]
        frac = masks.mean(2)  # s / d
        r = vs - v0 - frac * (v1 - v0)  # (S, B): what the map must explain
        u = ((masks - frac[..., None]) * phi.unsqueeze(0)).sum(2)  # (S, B)
        with torch.no_grad():
            ur = (u * r).sum()
            uu = u.pow(2).sum().clamp_min(1e-12)
            floor = 0.1 * (r.pow(2).mean().sqrt() / uu.div(u.numel()).sqrt())
            a = torch.maximum(ur / uu, floor)
            scale = r.pow(2).mean().clamp_min(1e-12)
        return (r - a * u).pow(2).mean() / scale


class ImpactxTask:
    """Loss = CE(C([M(x), LEP(x)]), y) + lam * map_loss(D(...), map) [+ faith_weight * faithfulness].

    Per-class models read the map of the class each target map explains: ``maps_for`` keeps the
    batch's classes (``MapSource.classes_for``) for the ``loss`` call that follows it in the same
    step (the Trainer calls them in that order); without them the label ``y`` is the class.
    """

    def __init__(
        self,
        model: ImpactX,
        maps: Optional[MapSource],
        lam: float,
        label_smoothing: float = 0.0,
        map_loss: str | MapLoss = "mse",
        faith_weight: float = 0.0,
        faith: Optional[SelfFaithfulness] = None,
    ):
        self.model, self.source, self.lam, self.label_smoothing = model, maps, lam, label_smoothing
        self.map_loss = map_loss if isinstance(map_loss, MapLoss) else MapLoss(map_loss)
        self.faith_weight = float(faith_weight)
        self.faith = (faith or SelfFaithfulness()) if self.faith_weight > 0 else None
        self._classes: Optional[torch.Tensor] = None

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        self._classes = None
        if self.lam == 0 or self.source is None:
            return None
        classes_for = getattr(self.source, "classes_for", None)
        self._classes = classes_for(indices) if classes_for is not None else None
        return self.source(indices)

    def _explained(self, y: torch.Tensor) -> torch.Tensor:
        """The class each image's map explains: from the map source, else the label."""
        classes, self._classes = self._classes, None
        if classes is None or classes.shape[0] != y.shape[0]:
            return y
        return classes.to(y.device)

    def loss(self, x, y, maps):
        if maps is None and self.faith is None:
            logits = self.model(x)
            ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            return ce, logits, {"ce": ce.detach()}
        target = self._explained(y) if maps is not None else y
        logits, pred = self.model.forward_all(x, target=target)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        total, logs = ce, {"ce": ce.detach()}
        if maps is not None:
            map_loss = self.map_loss(pred.float(), maps)
            total = total + self.lam * map_loss
            logs[f"map_{self.map_loss.name}"] = map_loss.detach()
        if self.faith is not None:
            faith = self.faith(self.model, x, pred, target)
            total = total + self.faith_weight * faith
            logs["faith"] = faith.detach()
        return total, logits, logs

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)
