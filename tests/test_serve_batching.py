"""Request coalescing (teachx.service.batching): concurrent requests share batches, every row is
computed once, nothing is lost, and a failing row fails only the request that asked for it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from teachx.service.batching import Coalescer


class Rows:
    """A cache of n rows whose computation is slow, records its batches and can refuse some rows."""

    def __init__(self, n: int, delay: float = 0.03, bad: frozenset[int] = frozenset()):
        self.done = np.zeros(n, dtype=bool)
        self.values = np.full(n, -1, dtype=np.int64)
        self.batches: list[list[int]] = []
        self.delay, self.bad = delay, bad
        self.lock = threading.Lock()

    def missing(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return idx[~self.done[idx]]

    def compute(self, idx: np.ndarray) -> None:
        assert np.all(np.diff(idx) > 0), "a batch holds each row once, sorted"
        self.batches.append(idx.tolist())
        time.sleep(self.delay)
        if self.bad.intersection(idx.tolist()):
            raise ValueError(f"row {sorted(self.bad.intersection(idx.tolist()))} cannot be computed")
        self.values[idx] = idx * 10
        self.done[idx] = True


def test_concurrent_requests_share_batches_and_each_row_is_computed_once():
    rows, co = Rows(64), Coalescer(max_batch=32)
    requests = [np.array([i]) for i in range(16)] + [np.array([3, 20, 21])]
    with ThreadPoolExecutor(17) as pool:
        list(pool.map(lambda r: co.run(r, rows.missing, rows.compute), requests))
    computed = [i for b in rows.batches for i in b]
    assert sorted(computed) == sorted(set(computed)) == sorted({0, *range(1, 16), 20, 21}), "every row exactly once"
    assert len(rows.batches) < 17 // 2, f"requests waited for each other instead of joining: {rows.batches}"
    assert co.batches == len(rows.batches)
    np.testing.assert_array_equal(rows.values[:16], np.arange(16) * 10)
    assert not co._pending


def test_a_request_returns_only_when_its_rows_are_done_and_batches_respect_max_batch():
    rows, co = Rows(40, delay=0.01), Coalescer(max_batch=4)
    seen = []

    def ask(r):
        co.run(r, rows.missing, rows.compute)
        seen.append(bool(rows.done[r].all()))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, [np.arange(s, s + 5) for s in range(0, 40, 5)]))
    assert all(seen) and rows.done.all()
    assert max(len(b) for b in rows.batches) <= 4


def test_cached_rows_compute_nothing():
    rows, co = Rows(8), Coalescer(4)
    rows.done[:] = True
    co.run(np.arange(8), rows.missing, rows.compute)
    assert rows.batches == [] and co.batches == 0


def test_a_bad_row_fails_only_its_own_request():
    rows, co = Rows(16, bad=frozenset({5})), Coalescer(max_batch=16)
    gate = threading.Event()
    first = rows.compute

    def slow_first(idx):  # the first batch holds the lock long enough for everyone to queue behind it
        if not gate.is_set():
            gate.set()
            time.sleep(0.2)
        first(idx)

    rows.compute = slow_first

    def ask(i):
        try:
            co.run(np.array([i]), rows.missing, rows.compute)
            return "ok"
        except ValueError as exc:
            return str(exc)

    with ThreadPoolExecutor(10) as pool:
        out = list(pool.map(ask, range(10)))
    assert out[5] == "row [5] cannot be computed"
    assert all(o == "ok" for i, o in enumerate(out) if i != 5), out
    assert rows.done[[i for i in range(10) if i != 5]].all() and not rows.done[5]
    assert any(len(b) > 1 and 5 in b for b in rows.batches), "the test should make 5 share a batch"
    assert not co._pending


def test_the_service_coalesces_uncached_built_in_maps(tmp_path_factory, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _serve_fixtures import session_fixtures

    from teachx.service import Service

    torch.set_num_threads(1)
    dirs = session_fixtures(tmp_path_factory)  # shared with test_serve.py: built once per session
    monkeypatch.setenv("TEACHX_CACHE", str(dirs["cache"]))
    svc = Service([dirs["run"]], cache_dir=tmp_path / "serve")
    lm = svc.loaded("run.impactx")
    calls = []
    forward_all = lm.model.forward_all

    def counted(x):
        calls.append(x.shape[0])
        if len(calls) == 1:
            time.sleep(0.3)  # the others queue meanwhile
        return forward_all(x)

    monkeypatch.setattr(lm.model, "forward_all", counted)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: svc.map("run.impactx", i, "built_in")[0], range(16)))
    assert sum(calls) == 16 and len(calls) <= 3, calls
    with torch.no_grad():
        for i, m in enumerate(got):  # each answer is its own image's map, not a neighbour's in the batch
            x = svc._x(lm, svc.data(lm).test.images[[i]])
            expected = forward_all(x)[1][0].numpy()
            np.testing.assert_allclose(m, expected, atol=2e-3 * np.abs(expected).max())
