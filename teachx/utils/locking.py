"""Advisory file locks, so several processes (or machines sharing a file system) can split work.

A lock is a small JSON file created with O_EXCL (atomic on local disks and on the shared file
systems of clusters: NFSv3 and later, Lustre, GPFS / Spectrum Scale, BeeGFS, CephFS; no flock or
fcntl support is needed) that names its holder (pid, host, start time, the scheduler job it runs in
and, where the caller gives it, the command). While it is held, a background thread refreshes the
file's modification time every :data:`HEARTBEAT_S` seconds.

A lock is stale, and is taken over, when

* its holder process died on this host (checked by pid);
* it names the scheduler job task this process runs in, but an earlier run of it (a SLURM job that
  was pre-empted or hit its time limit and was requeued: same job and task, another restart count);
* it was taken on another host and its heartbeat stopped :data:`STALE_AFTER_S` seconds ago (a
  worker killed on another node; clocks of cluster nodes agree far better than that).

Taking over goes through a short-lived guard file, so that two processes finding the same stale lock
never both end up holding it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from teachx.errors import TeachxError


class Busy(TeachxError):
    """The lock is held by another live process (the caller may do other work and come back)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(
            f"'{path}' is locked by pid {holder.get('pid')} on {holder.get('host')}; "
            "wait for it, or delete the lock file if that process is gone"
        )


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a lock or temp file of a dead one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: seconds between two refreshes of a held lock's modification time
HEARTBEAT_S = 30.0
#: a lock from another host whose heartbeat is this old is stale (its holder was killed)
STALE_AFTER_S = 600.0


def scheduler_job() -> Optional[dict[str, Any]]:
    """The SLURM job task this process runs in (job id, array task, task rank, restart count), or None.

    A requeued job keeps its id and task and gets a higher ``SLURM_RESTART_COUNT``: a lock that names
    this job task with another restart count was left by its earlier, killed run.
    """
    env = os.environ
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if not job:
        return None
    task = env.get("SLURM_ARRAY_TASK_ID")
    return {
        "id": f"{job}_{task}" if task and env.get("SLURM_ARRAY_JOB_ID") else job,
        "rank": env.get("SLURM_PROCID", "0"),
        "restart": env.get("SLURM_RESTART_COUNT", "0"),
    }


def _read_holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: treat as held (checked again on the next try)


#: a takeover guard older than this was left by a process killed in the middle of a takeover
_GUARD_STALE_S = 30.0


def _is_stale(holder: dict, me: dict, path: Optional[Path] = None) -> bool:
    """Whether ``holder``'s lock was left by a process that is gone (see the module docstring)."""
    if holder.get("host") == me["host"]:
        if isinstance(holder.get("pid"), int) and holder["pid"] != me["pid"] and not process_alive(holder["pid"]):
            return True
    job, mine = holder.get("job"), me.get("job")
    if (
        isinstance(job, dict)
        and mine
        and job.get("id") == mine["id"]
        and job.get("rank") == mine["rank"]
        and job.get("restart") != mine["restart"]
    ):
        return True  # this job task's earlier run, requeued since
    if path is not None and holder.get("host") != me["host"] and holder.get("heartbeat_s"):
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        return age > max(STALE_AFTER_S, 10 * float(holder["heartbeat_s"]))
    return False


def _remove_stale(path: Path, holder: dict, me: dict) -> Optional[bool]:
    """Remove the stale lock ``path`` of ``holder``: True when removed, False when it is no longer
    that stale lock, None when another process is taking it over right now (try again shortly).

    Under the guard the lock is read again: another process may have taken it over (and made its own)
    since we read it, and that one must not be deleted.
    """
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                guard.unlink()
        except FileNotFoundError:
            pass
        return None
    os.close(fd)
    try:
        again = _read_holder(path)
        if (
            again is None
            or again.get("pid") != holder.get("pid")
            or again.get("since") != holder.get("since")
            or not _is_stale(again, me, path)
        ):
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
    finally:
        guard.unlink(missing_ok=True)


def _try_acquire(
    path: Path, info: Optional[dict[str, Any]] = None, on_stale: Optional[Callable[[dict], None]] = None
) -> Optional[dict]:
    """Create the lock; return None on success, else the holder's record."""
    me = {
        **(info or {}),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.time(),
        "heartbeat_s": HEARTBEAT_S,
    }
    job = scheduler_job()
    if job:
        me["job"] = job
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our two calls: try again
            if _is_stale(holder, me, path):
                removed = _remove_stale(path, holder, me)
                if removed and on_stale is not None:
                    on_stale(holder)
                elif removed is None:
                    time.sleep(0.02)  # another process is taking it over: see who holds it then
                continue
            return holder
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return _read_holder(path) or {}


def held_by(path: str | os.PathLike) -> Optional[dict]:
    """The holder's record when another live process (or one on another host) holds ``path``, else None.

    A look only, for reports such as `teachx cache list`; to act on it, take the lock with :func:`file_lock`.
    """
    path = Path(path)
    holder = _read_holder(path)
    if holder is None:
        return None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "job": scheduler_job()}
    if holder and _is_stale(holder, me, path):
        return None  # stale: its process is gone
    return holder


class _Heartbeat:
    """Refreshes a held lock's modification time until stopped, so other hosts can tell it is alive."""

    def __init__(self, path: Path, every: float):
        self.path, self.every = path, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"teachx-lock-heartbeat:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                os.utime(self.path)
            except OSError:
                return  # removed (released, or taken over by force): nothing left to keep alive

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextmanager
def file_lock(
    path: str | os.PathLike,
    wait: bool = True,
    poll: float = 2.0,
    on_wait: Optional[Callable[[dict], None]] = None,
    info: Optional[dict[str, Any]] = None,
    on_stale: Optional[Callable[[dict], None]] = None,
) -> Iterator[None]:
    """Hold ``path`` as a lock for the ``with`` block.

    ``wait=False`` raises :class:`Busy` at once when another live process holds it; ``wait=True``
    polls until it is free (``on_wait`` is called once with the holder's record, e.g. to log).
    ``info`` goes into the holder's record (e.g. the command, for the message another process shows);
    ``on_stale`` is called with the record of a dead process's lock this call took over.
    """
    path = Path(path)
    told = False
    while True:
        holder = _try_acquire(path, info, on_stale)
        if holder is None:
            break
        if not wait:
            raise Busy(path, holder)
        if on_wait is not None and not told:
            on_wait(holder)
            told = True
        time.sleep(poll)
    heartbeat = _Heartbeat(path, HEARTBEAT_S)
    try:
        yield
    finally:
        heartbeat.stop()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
