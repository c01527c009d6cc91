"""File locks that let several processes split a study: exclusion, waiting, stale-lock takeover."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from teachx.utils.locking import Busy, file_lock


def test_held_lock_is_busy_and_released_after(tmp_path):
    lock = tmp_path / "a.lock"
    with file_lock(lock, wait=False):
        holder = json.loads(lock.read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(Busy, match="locked by pid"):
            with file_lock(lock, wait=False):
                pass
    assert not lock.exists()
    with file_lock(lock, wait=False):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "b.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    with file_lock(lock, wait=False):
        assert json.loads(lock.read_text())["pid"] != dead.pid


def test_lock_from_another_host_is_respected(tmp_path):
    lock = tmp_path / "c.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-machine", "since": 0}))
    with pytest.raises(Busy, match="some-other-machine"):
        with file_lock(lock, wait=False):
            pass


def test_waiting_blocks_until_the_holder_releases(tmp_path):
    lock = tmp_path / "d.lock"
    order: list[str] = []
    waited: list[dict] = []
    ready = threading.Event()

    def holder():
        with file_lock(lock):
            ready.set()
            time.sleep(0.3)
            order.append("holder done")

    t = threading.Thread(target=holder)
    t.start()
    ready.wait()
    with file_lock(lock, wait=True, poll=0.05, on_wait=waited.append):
        order.append("waiter in")
    t.join()
    assert order == ["holder done", "waiter in"] and len(waited) == 1


def test_holder_record_and_stale_takeover_are_reported(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "e.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0, "command": "teachx run"}))
    stale: list[dict] = []
    with file_lock(lock, wait=False, info={"command": "teachx train"}, on_stale=stale.append):
        mine = json.loads(lock.read_text())
        assert mine["command"] == "teachx train" and mine["since"] > 0
    assert [h["pid"] for h in stale] == [dead.pid]


def test_a_takeover_in_progress_is_not_raced(tmp_path):
    """Another process is taking the stale lock over (its guard file is there): we do not delete the
    lock under it; a guard left behind by a process killed mid-takeover is old and cleared."""
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "f.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    guard = tmp_path / "f.lock.takeover"
    guard.write_text("")
    with pytest.raises(Busy):
        with file_lock(lock, wait=False):
            pass
    assert json.loads(lock.read_text())["pid"] == dead.pid
    os.utime(guard, (time.time() - 3600, time.time() - 3600))
    with file_lock(lock, wait=False):
        assert json.loads(lock.read_text())["pid"] != dead.pid
    assert not guard.exists()
