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


def available_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may run on: its affinity mask (taskset, a batch scheduler's CPU set), capped
    by a cgroup v2 CPU quota (containers); ``os.cpu_count()`` counts the machine's CPUs instead."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count; returns it.

    Order: ``requested`` (``train.threads``) > ``$TEACHX_THREADS`` > ``$OMP_NUM_THREADS`` (torch
    reads it itself) > the CPUs available to this process (:func:`available_cpus`).
    """
    import torch

    if requested is None and os.environ.get("TEACHX_THREADS"):
        try:
            requested = int(os.environ["TEACHX_THREADS"])
        except ValueError:
            from teachx.errors import ConfigError

            raise ConfigError(f"TEACHX_THREADS must be a positive integer, got {os.environ['TEACHX_THREADS']!r}") from None
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = requested if requested is not None else available_cpus()
    if n < 1:
        from teachx.errors import ConfigError

        raise ConfigError(f"the thread count must be >= 1, got {n} (train.threads or TEACHX_THREADS)")
    torch.set_num_threads(n)
    return n
