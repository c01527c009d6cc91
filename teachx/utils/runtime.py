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
import math
import os
import sys
import time
from teachx.errors import ConfigError

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


def busy_cpus_of_others(window_s: float = 0.25, since: "CpuSample | None" = None) -> tuple[float, "CpuSample"]:
    """How many of this process's CPUs other processes kept busy: over ``window_s`` seconds from now,
    or since an earlier sample. Busy time of those CPUs (``/proc/stat``) minus this process's own CPU
    time; 0.0 where ``/proc`` is unavailable."""
    first = since or CpuSample.take()
    if since is None:
        time.sleep(window_s)
    now = CpuSample.take()
    wall = now.wall - first.wall
    if now.busy is None or first.busy is None or wall <= 0:
        return 0.0, now
    others = (now.busy - first.busy) - (now.own - first.own)
    return max(0.0, others / wall), now


class CpuSample:
    """Busy seconds of this process's CPUs (from /proc/stat), its own CPU seconds, and the wall clock."""

    def __init__(self, busy: float | None, own: float, wall: float):
        self.busy, self.own, self.wall = busy, own, wall

    @classmethod
    def take(cls) -> "CpuSample":
        wall = time.monotonic()
        t = os.times()
        own = t.user + t.system
        try:
            cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
            hz = os.sysconf("SC_CLK_TCK")
            busy = 0
            with open("/proc/stat") as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in cpus:  # user nice system idle iowait irq softirq steal
                        v = [int(x) for x in parts[1:9]]
                        busy += sum(v) - v[3] - v[4]
            return cls(busy / hz, own, wall)
        except (OSError, ValueError, AttributeError):
            return cls(None, own, wall)


def threads_for(available: int, others_busy: float) -> int:
    """The CPUs left to us: one thread fewer for each CPU that other processes keep (mostly) busy.

    Measured in bench/bench_threads.py: next to a busy process, 2 threads on 2 cores ran a LeNet-5
    step 1.8x slower than 1 thread, and at times over 10x slower (OpenMP threads spinning at barriers
    while one of them waits for the core)."""
    return max(1, available - math.ceil(others_busy - 0.25))


class _ThreadPolicy:
    adaptive = False
    sample: "CpuSample | None" = None


_policy = _ThreadPolicy()


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count; returns it.

    Order: ``requested`` (``train.threads``) > ``$TEACHX_THREADS`` > ``$OMP_NUM_THREADS`` (torch
    reads it itself) > adaptive: the CPUs available to this process (:func:`available_cpus`) less
    those other processes keep busy (:func:`threads_for`), re-checked by :func:`adapt_threads`.
    A fixed count (any of the settings) keeps results bitwise reproducible across runs and resumes;
    the adaptive default may change float rounding when it changes the count.
    """
    import torch

    _policy.adaptive = False
    if requested is None and os.environ.get("TEACHX_THREADS"):
        try:
            requested = int(os.environ["TEACHX_THREADS"])
        except ValueError:
            raise ConfigError(
                f"TEACHX_THREADS must be a positive integer, got {os.environ['TEACHX_THREADS']!r}"
            ) from None
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if requested is None:
        others, _policy.sample = busy_cpus_of_others()
        _policy.adaptive = True
        n = threads_for(available_cpus(), others)
    else:
        n = requested
    if n < 1:
        raise ConfigError(f"the thread count must be >= 1, got {n} (train.threads or TEACHX_THREADS)")
    torch.set_num_threads(n)
    return n


def adapt_threads() -> tuple[int, int, float]:
    """Under the adaptive default, re-check since the last check how busy other processes kept our
    CPUs and set the thread count again; returns (old, new, CPUs busy with others)."""
    import torch

    old = torch.get_num_threads()
    if not _policy.adaptive or _policy.sample is None:
        return old, old, 0.0
    others, _policy.sample = busy_cpus_of_others(since=_policy.sample)
    new = threads_for(available_cpus(), others)
    if new != old:
        torch.set_num_threads(new)
    return old, new, others
