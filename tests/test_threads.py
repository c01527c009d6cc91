"""Thread-count policy (issue 11, item 16): threads follow the CPUs the process may use, overridable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from teachx.errors import ConfigError
from teachx.runs.resolve import resolve_config
from teachx.utils.runtime import available_cpus, threads_for

CHILD = r"""
import json, os, sys
os.sched_setaffinity(0, {0})            # as `taskset -c 0` or a batch scheduler would
from teachx.utils.runtime import configure_threads
import torch
torch.set_num_threads(4)               # whatever torch picked on its own
n = configure_threads(json.loads(sys.argv[1]))
print(json.dumps([n, torch.get_num_threads()]))
"""


def _child(requested, **env) -> list[int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TEACHX_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(requested)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.slow
def test_default_threads_follow_the_affinity_mask_not_the_machine():
    assert _child(None) == [1, 1]  # pinned to one CPU: one thread, not os.cpu_count()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.slow
def test_explicit_settings_override_in_order():
    assert _child(3) == [3, 3]  # train.threads
    assert _child(None, TEACHX_THREADS="2") == [2, 2]  # environment
    assert _child(3, TEACHX_THREADS="2") == [3, 3]  # the config wins over the environment


def test_cgroup_quota_caps_the_count(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")  # 1.5 CPUs of quota -> 1 thread
    assert available_cpus(str(f)) == 1
    f.write_text("max 100000\n")
    assert available_cpus(str(f)) == len(os.sched_getaffinity(0))


def test_bad_thread_counts_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="train.threads"):
        resolve_config(None, ["train.threads=0"])


def test_threads_for_leaves_the_cpus_others_keep_busy():
    assert threads_for(2, 0.0) == 2 and threads_for(2, 0.2) == 2  # background noise: keep both cores
    assert threads_for(2, 0.6) == 1 and threads_for(2, 1.0) == 1  # one busy competitor: one thread
    assert (
        threads_for(2, 2.0) == 1 and threads_for(8, 3.1) == 5 and threads_for(8, 3.5) == 4
    )  # never below one; one per busy CPU


BUSY_CHILD = r"""
import json, os, subprocess, sys, time
os.sched_setaffinity(0, {0, 1})
from teachx.utils.runtime import busy_cpus_of_others, configure_threads
idle, _ = busy_cpus_of_others(0.5)
n_idle = configure_threads(None)
hog = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {1})\nt = time.time() + 20\nwhile time.time() < t: pass"])
time.sleep(0.5)
try:
    busy, _ = busy_cpus_of_others(0.5)
    n_busy = configure_threads(None)
finally:
    hog.kill()
print(json.dumps([idle, busy, n_idle, n_busy]))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2 or not os.path.exists("/proc/stat"),
    reason="needs Linux /proc/stat and 2 CPUs",
)
@pytest.mark.slow
@pytest.mark.alone  # the idle measurement needs the other tests' workers idle
def test_default_takes_one_thread_fewer_next_to_a_busy_process():
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TEACHX_THREADS")}
    out = subprocess.run([sys.executable, "-c", BUSY_CHILD], env=clean, capture_output=True, text=True, check=True)
    idle, busy, n_idle, n_busy = json.loads(out.stdout.strip().splitlines()[-1])
    assert busy - idle > 0.7  # the competitor's core is seen as busy (a closed case: one spinning process)
    assert n_busy == 1
