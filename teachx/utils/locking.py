"""Advisory file locks, so several processes (or machines sharing a file system) can split work.

A lock is a small JSON file created with O_EXCL (atomic on local and NFSv3+ file systems) that
names its holder (pid, host, start time and, where the caller gives it, the command). A lock whose
holder process died on this host is stale and is taken over; a lock held from another host cannot
be checked and is respected until its owner removes it. Taking over goes through a short-lived
guard file, so that two processes finding the same stale lock never both end up holding it.
"""

from __future__ import annotations

import json
import os
import socket
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


def _read_holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: treat as held (checked again on the next try)


#: a takeover guard older than this was left by a process killed in the middle of a takeover
_GUARD_STALE_S = 30.0


def _is_stale(holder: dict, me: dict) -> bool:
    return (
        holder.get("host") == me["host"]
        and isinstance(holder.get("pid"), int)
        and holder["pid"] != me["pid"]
        and not process_alive(holder["pid"])
    )


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
            or not _is_stale(again, me)
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
    me = {**(info or {}), "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our two calls: try again
            if _is_stale(holder, me):
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
    holder = _read_holder(Path(path))
    if holder is None:
        return None
    if (
        holder.get("host") == socket.gethostname()
        and isinstance(holder.get("pid"), int)
        and not process_alive(holder["pid"])
    ):
        return None  # stale: its process is gone
    return holder


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
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
