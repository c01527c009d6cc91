"""Teacher-map store: reuse, resume after interruption, stale/truncated detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teachx.teachers.store import fill_store, open_store


def _compute_factory(calls):
    def compute(idx):
        calls.append(len(idx))
        t = torch.as_tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1)
        return t.expand(-1, 1, 4, 4) / 100.0

    return compute


def test_fill_reuse_and_values(tmp_path):
    mat = {"teacher": "t", "model_hash": "abc"}
    calls = []
    s = open_store(tmp_path, mat, 20, (1, 4, 4), log=lambda m: None)
    assert fill_store(s, np.arange(20), _compute_factory(calls), 8, progress=False) == 20
    assert calls == [8, 8, 4] and s.complete
    again = open_store(tmp_path, mat, 20, (1, 4, 4), log=lambda m: None)
    assert fill_store(again, np.arange(20), _compute_factory(calls), 8, progress=False) == 0
    got = again.read(np.array([3, 17]))
    assert torch.allclose(got[:, 0, 0, 0], torch.tensor([0.03, 0.17]), atol=1e-3)  # float16


def test_resume_after_interruption(tmp_path):
    mat = {"teacher": "t"}
    s = open_store(tmp_path, mat, 10, (1, 2, 2), log=lambda m: None)
    n = {"k": 0}

    def flaky(idx):
        n["k"] += 1
        if n["k"] == 2:
            raise KeyboardInterrupt
        return torch.ones(len(idx), 1, 2, 2)

    with pytest.raises(KeyboardInterrupt):
        fill_store(s, np.arange(10), flaky, 4, progress=False)
    s2 = open_store(tmp_path, mat, 10, (1, 2, 2), log=lambda m: None)
    assert s2.done.sum() == 4
    calls = []
    assert (
        fill_store(
            s2, np.arange(10), lambda i: (calls.append(len(i)), torch.ones(len(i), 1, 2, 2))[1], 4, progress=False
        )
        == 6
    )
    assert calls == [4, 2]
    assert s2.complete


def test_stale_and_truncated_are_rebuilt(tmp_path):
    msgs = []
    s = open_store(tmp_path, {"teacher": "a"}, 6, (1, 2, 2), log=msgs.append)
    fill_store(s, np.arange(6), lambda i: torch.ones(len(i), 1, 2, 2), 6, progress=False)
    path = s.path
    # truncate maps.npy
    raw = (path / "maps.npy").read_bytes()
    (path / "maps.npy").write_bytes(raw[: len(raw) - 10])
    s2 = open_store(tmp_path, {"teacher": "a"}, 6, (1, 2, 2), log=msgs.append)
    assert any("damaged" in m for m in msgs) and s2.done.sum() == 0
    # a different key is a different store; a key mismatch inside a dir is stale
    import json

    from teachx.utils.io import write_json_atomic

    meta = json.loads((path / "meta.json").read_text())
    meta.pop("digest")
    meta["key"] = "0" * 64
    write_json_atomic(
        path / "meta.json", meta, digest=True
    )  # an intact meta of another key (a hand edit would be corruption)
    open_store(tmp_path, {"teacher": "a"}, 6, (1, 2, 2), log=msgs.append)
    assert any("stale" in m for m in msgs)
    other = open_store(tmp_path, {"teacher": "b"}, 6, (1, 2, 2), log=msgs.append)
    assert other.path != path


def test_read_store_reads_verified_and_refuses_damage(tmp_path):
    """A finished store read back without its material (scripts, viewers): the same maps, nothing writable;
    a flipped value is a CorruptionError naming the fix, a directory without meta.json a DataError."""
    from teachx.errors import CorruptionError, DataError
    from teachx.teachers.store import read_store

    s = open_store(tmp_path, {"teacher": "t"}, 12, (1, 4, 4), log=lambda m: None)
    fill_store(s, np.arange(0, 12, 2), _compute_factory([]), 4, progress=False)  # half the rows
    r = read_store(s.path)
    assert r.key == s.key and np.array_equal(np.asarray(r.done), np.arange(12) % 2 == 0)
    assert torch.equal(r.read(np.array([2, 10])), s.read(np.array([2, 10])))
    with pytest.raises(ValueError):  # read only
        r.maps[0, 0, 0, 0] = 1
    maps = np.load(s.path / "maps.npy", mmap_mode="r+")
    maps[4, 0, 1, 1] += 1  # one value of a finished row
    maps.flush()
    with pytest.raises(CorruptionError, match="remove"):
        read_store(s.path)
    with pytest.raises(DataError, match="meta.json"):
        read_store(tmp_path)
