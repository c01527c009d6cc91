"""CPU runtime tuning that changes speed, never results.

glibc's malloc returns large freed blocks to the OS and maps them again on the next step; for
PyTorch's per-step activation buffers on CPU this dominates small-model training. Raising the mmap
threshold (to glibc's maximum dynamic value, 32 MiB) and the trim threshold keeps those blocks in
the heap. `python bench/bench_allocator.py` measures the effect in fresh processes (results in
bench/results/allocator.json). Set TEACHX_NO_MALLOPT=1 to skip it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_cpu_allocator() -> bool:
    """Apply the malloc settings once per process (Linux/glibc only); True when applied."""
    global _done
    if _done:
        return True
    if os.environ.get("TEACHX_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 * 1024 * 1024)) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1) and ok
    _done = ok
    return ok
