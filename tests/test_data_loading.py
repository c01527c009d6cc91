"""train_val_split and BatchIterator: seeded, stratified, resumable, DDP-like sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from teachx.data.base import Split
from teachx.data.loading import BatchIterator, train_val_split
from teachx.errors import ConfigError


def make_split(n=23, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # make each sample identifiable
    return Split(images, rng.integers(0, 3, n).astype(np.int64))


def test_train_val_split_partition_seeded_stratified():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    tr, va = train_val_split(100, 0.2, seed=3, labels=labels)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(100))
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.bincount(labels[va], minlength=3), [10, 6, 4])
    tr2, va2 = train_val_split(100, 0.2, seed=3, labels=labels)
    np.testing.assert_array_equal(va, va2)
    _, va3 = train_val_split(100, 0.2, seed=4, labels=labels)
    assert not np.array_equal(va, va3)
    tr4, va4 = train_val_split(10, 0.3, seed=0)
    assert len(va4) == 3 and len(tr4) == 7
    assert len(train_val_split(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(ConfigError):
        train_val_split(10, 1.0, seed=0)


def test_batches_carry_dataset_indices_and_matching_samples():
    split = make_split()
    indices = np.array([1, 4, 5, 9, 10, 11, 20])
    it = BatchIterator(split, indices, batch_size=3, shuffle=True, seed=0)
    seen = []
    for images, labels, idx in it:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 4, 5)
        assert labels.dtype == torch.int64 and idx.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), split.images[idx.numpy()].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(labels.numpy(), split.labels[idx.numpy()])
        seen += idx.tolist()
    assert sorted(seen) == indices.tolist() and len(it) == 3


def test_order_depends_only_on_seed_and_epoch_and_resumes():
    split = make_split(50)
    idx = np.arange(50)

    def order(seed, epoch, start=0):
        it = BatchIterator(split, idx, batch_size=8, shuffle=True, seed=seed)
        it.set_epoch(epoch, start_batch=start)
        return [b[2].tolist() for b in it]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert order(0, 3, start=4) == order(0, 3)[4:]  # resuming mid-epoch reproduces the rest
    it = BatchIterator(split, idx, batch_size=8, shuffle=False, seed=0)
    assert [b[2].tolist() for b in it][0] == list(range(8))


@pytest.mark.parametrize(
    "n,world,batch,drop_last", [(23, 4, 5, False), (23, 3, 4, True), (5, 8, 2, False), (24, 4, 3, False)]
)
def test_ddp_sharding_like_distributed_sampler(n, world, batch, drop_last):
    split = make_split(n)
    idx = np.arange(n)
    shards = []
    for rank in range(world):
        it = BatchIterator(
            split, idx, batch_size=batch, shuffle=True, seed=9, drop_last=drop_last, rank=rank, world_size=world
        )
        it.set_epoch(2)
        got = [i for b in it for i in b[2].tolist()]
        per_rank = math.ceil(n / world)
        assert len(it) == (per_rank // batch if drop_last else math.ceil(per_rank / batch))
        if not drop_last:
            assert len(got) == per_rank
        shards.append(it.epoch_order())
    # Equal lengths; together they cover every index; padding only repeats indices.
    assert len({len(s) for s in shards}) == 1
    union = np.concatenate(shards)
    assert set(union.tolist()) == set(range(n))
    assert len(union) == math.ceil(n / world) * world
    # Same as the reference rule: permute, pad by repeating from the start, take rank::world.
    full = BatchIterator(split, idx, batch_size=batch, shuffle=True, seed=9).epoch_order(2)
    padded = np.concatenate([full, np.tile(full, world)])[: math.ceil(n / world) * world]
    for rank in range(world):
        np.testing.assert_array_equal(shards[rank], padded[rank::world])


def test_bad_arguments():
    split = make_split(5)
    with pytest.raises(ConfigError):
        BatchIterator(split, np.arange(5), batch_size=0, shuffle=False, seed=0)
    with pytest.raises(ConfigError):
        BatchIterator(split, np.arange(5), batch_size=2, shuffle=False, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        BatchIterator(split, np.array([0, 7]), batch_size=2, shuffle=False, seed=0)
