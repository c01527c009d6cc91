"""Request coalescing: concurrent requests for rows of one cache share one batched computation.

Sixteen clients asking for sixteen uncached images would otherwise run sixteen forward passes of
batch 1 one after the other (the model is used by one thread at a time). Here each request adds its
rows to a pending set and waits for the compute lock; whoever holds it computes every pending row
that is still missing, its own first, in one batch of at most ``max_batch``. A request whose rows
were computed while it waited returns without computing anything. There is no timer and no extra
thread: with one client nothing waits, and under load the batch grows with the queue.

A failed batch fails no one for another's rows: the request that ran it tries its own rows alone,
and the rows of the others are still missing, so each of them computes its own next and gets its
own answer (or its own error).
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class Coalescer:
    """Joins concurrent ``run`` calls over one set of rows into batches."""

    def __init__(self, max_batch: int):
        self.max_batch = max(1, int(max_batch))
        self._pending: set[int] = set()
        self._mutex = threading.Lock()  # guards _pending
        self._compute = threading.Lock()  # one batch at a time
        self.batches = 0  # computations run (for tests and benchmarks)

    def run(
        self, rows: np.ndarray, missing: Callable[[np.ndarray], np.ndarray], compute: Callable[[np.ndarray], None]
    ) -> None:
        """Make sure ``rows`` are computed. ``missing(idx)`` returns the rows of ``idx`` not computed yet
        (sorted); ``compute(idx)`` computes and stores them."""
        own = np.unique(np.asarray(rows, dtype=np.int64))
        if not missing(own).size:
            return
        with self._mutex:
            self._pending.update(own.tolist())
        solo = False  # after a shared batch failed: compute only our own rows, so we fail only for them
        try:
            while True:
                with self._compute:
                    mine = missing(own)
                    if not mine.size:
                        return
                    others = np.empty(0, dtype=np.int64)
                    if not solo and mine.size < self.max_batch:
                        with self._mutex:
                            others = np.fromiter(self._pending.difference(own.tolist()), dtype=np.int64)
                        others = missing(np.sort(others))[: self.max_batch - mine.size]
                    batch = (
                        np.sort(np.concatenate([mine, others]))[: self.max_batch]
                        if others.size
                        else mine[: self.max_batch]
                    )
                    try:
                        compute(batch)
                        self.batches += 1
                    except Exception:
                        if not others.size:
                            raise
                        solo = True  # a row of another request may be the cause: try ours alone
                    finally:
                        with self._mutex:  # rows of others we took: done, or left for their owners to retry
                            self._pending.difference_update(others.tolist())
        finally:
            with self._mutex:
                self._pending.difference_update(own.tolist())
