"""Seeded splits and a minimal, resumable, shardable batch iterator over uint8 splits.

Why not ``torch.utils.data.DataLoader``: the images already sit decoded in one (memory-mapped)
array, so a batch is one fancy-index away; what matters is that the order depends only on
``(seed, epoch)`` -- so a resumed run sees exactly the batches it would have seen -- and that every
batch carries the *dataset indices* of its samples, which IMPACTX uses to look up teacher maps.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from teachx.data.base import Split
from teachx.errors import ConfigError


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (2**63), *stream]))


def train_val_split(
    n: int, val_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_idx, val_idx), both sorted int64 arrays that partition ``range(n)``.

    With ``labels`` the split is stratified: each class contributes ``round(val_fraction * n_c)``
    samples to validation. Carve validation out of the *training* split; the test split is never
    used for model selection.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    rng = _rng(seed, 0x5A1)
    if labels is None:
        order = rng.permutation(n)
        n_val = int(round(val_fraction * n))
        val = order[:n_val]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ConfigError(f"labels must have shape ({n},), got {labels.shape}")
        val_parts = []
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            take = int(round(val_fraction * len(members)))
            val_parts.append(rng.permutation(members)[:take])
        val = np.concatenate(val_parts) if val_parts else np.empty(0, dtype=np.int64)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


class BatchIterator:
    """Batches ``(images uint8 [B,C,H,W], labels int64 [B], indices int64 [B])`` of ``split[indices]``.

    ``indices`` are positions in ``split`` (e.g. the train part of :func:`train_val_split`), and the
    yielded ``indices`` are those dataset positions. The order is a function of ``(seed, epoch)``
    only; call :meth:`set_epoch` before each epoch (and pass ``start_batch`` to resume mid-epoch).
    With ``world_size > 1`` each rank gets a disjoint shard of equal length, like
    ``DistributedSampler``: the epoch order is padded by repeating its first indices.
    """

    def __init__(
        self,
        split: Split,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.split = split
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ConfigError(f"indices must be 1-D, got shape {self.indices.shape}")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(split)):
            raise ConfigError(f"indices must lie in [0, {len(split)}), got {self.indices.min()}..{self.indices.max()}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order to produce; ``start_batch`` skips batches already consumed."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    @property
    def per_rank(self) -> int:
        """Samples this rank sees per epoch (after padding)."""
        return math.ceil(len(self.indices) / self.world_size) if len(self.indices) else 0

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's dataset indices for ``epoch``, in iteration order (before batching)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = self.indices
        if self.shuffle:
            order = order[_rng(self.seed, 0xE90C, epoch).permutation(len(order))]
        if self.world_size > 1 and len(order):
            total = self.per_rank * self.world_size
            if total > len(order):
                order = np.concatenate([order, np.resize(order, total - len(order))])
            order = order[self.rank : total : self.world_size]
        return order

    def __len__(self) -> int:
        n = self.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        n_batches = len(self)
        for b in range(self.start_batch, n_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            # Reading in sorted order is kinder to a memory-mapped file; then restore the batch order.
            sort = np.argsort(idx, kind="stable")
            images = np.empty((len(idx), *self.split.images.shape[1:]), dtype=self.split.images.dtype)
            images[sort] = self.split.images[idx[sort]]
            labels = np.asarray(self.split.labels[idx], dtype=np.int64)
            yield (
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(labels),
                torch.from_numpy(idx.copy()),
            )
        self.start_batch = 0  # only the first iteration after a resume skips batches
