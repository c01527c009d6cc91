"""Atomic file writes (a reader never sees a half-written file) and trusted JSON records.

A JSON record that teachx later trusts (stage records, study unit results, store and cache meta)
is written with ``write_json_atomic(path, obj, digest=True)``: a ``"digest"`` field holds the
sha256 of the canonical JSON (sorted keys, no spaces) of everything else. ``read_trusted_json``
verifies it, so a flipped byte (bit rot, a bad disk, an edit by hand) is one clear
:class:`~teachx.errors.CorruptionError` naming the file and the fix -- never a wrong number. A
record without a digest was written by an older teachx and is accepted as it is (legacy).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from teachx.errors import CorruptionError, OutputError
from teachx.utils.locking import process_alive

#: temp files are named ``.<name>.<host>-<pid>.<random>.tmp``: a later process can tell that the
#: writer (on this host) is gone and remove what it left behind (see :func:`sweep_stale_temps`)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\..+\.([0-9a-f]{6})-(\d+)\.[^.]+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    An ``OSError`` while writing (full or read-only file system, no permission) becomes an
    :class:`~teachx.errors.OutputError` naming ``path``; the temporary file is removed either way.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o644 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp_path, path)
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(exc, path) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def output_error(
    exc: OSError,
    path: str | os.PathLike | None = None,
    option: str = "--out; $TEACHX_CACHE for teacher maps and data caches",
) -> OutputError:
    """One line for a failed write: the file, the problem, the fix (``option``: how the user moves it)."""
    path = path if path is not None else (exc.filename or "?")
    problem = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    where = f"choose another location ({option})"
    blocker = blocking_file(exc, path)
    if blocker is not None:  # `--out afile/run` with afile a file: no folder can be made there
        return OutputError(
            f"cannot write '{path}': '{blocker}' is a file, not a folder; {where}, or move that file away",
            exc.errno,
            str(path),
        )
    if exc.errno in _NO_SPACE:
        fix = f"free space there or {where}, then run the same command again to resume"
    elif exc.errno in _NOT_WRITABLE:
        fix = f"{where} that you can write to"
    else:
        fix = f"check that location or {where}"
    return OutputError(f"cannot write '{path}': {problem}; {fix}", exc.errno, str(path))


def blocking_file(exc: OSError, path: str | os.PathLike) -> Path | None:
    """The file standing where a folder of ``path`` must be, for the errors a folder path through a
    file gives (ENOTDIR below it; EEXIST from making a folder where a file is); else None."""
    if exc.errno == errno.ENOTDIR:
        candidates = list(Path(path).parents)
    elif exc.errno == errno.EEXIST and exc.filename:
        candidates = [Path(exc.filename)]
    else:
        return None
    for candidate in candidates:
        if candidate.is_symlink() or candidate.exists():
            return candidate if not candidate.is_dir() else None
    return None


def sweep_stale_temps(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files that writers on this host left when they were killed (their
    process is gone); returns them. Temp files of live processes, other hosts or other programs
    are never touched."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.rglob(".*.tmp") if recursive else root.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if (
            m
            and m.group(1) == _HOST
            and int(m.group(2)) != os.getpid()
            and not process_alive(int(m.group(2)))
            and p.is_file()
            and not p.is_symlink()
        ):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_path`'s temporary files (of any process)."""
    return _TEMP.match(name) is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, digest: bool = False) -> None:
    """Write ``obj`` as JSON atomically; ``digest=True`` (a dict only) adds its content digest."""
    if digest:
        if not isinstance(obj, dict) or DIGEST_KEY in obj:
            raise TypeError(f"a digested JSON record must be a dict without a {DIGEST_KEY!r} key")
        obj = json.loads(
            json.dumps(obj, default=_json_default)
        )  # what a reader will see: str keys, lists, plain numbers
        obj[DIGEST_KEY] = json_digest(obj)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


DIGEST_KEY = "digest"
_DIGEST_PREFIX = "sha256:"
_DIGEST_LEN = len(_DIGEST_PREFIX) + 64


def json_digest(obj: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``obj`` (as read back from a file)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return _DIGEST_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_trusted_json(path: str | os.PathLike, fix: str, what: str = "file") -> dict[str, Any]:
    """The JSON object in ``path``, verified against its digest (without the digest field).

    Not JSON, not an object, or a digest that does not match: :class:`CorruptionError` with
    ``fix`` as its way forward. No digest at all: written by an older teachx, returned as it is --
    unless a top-level value still looks like a digest (one flipped byte in the key ``"digest"``
    must not turn a current record into a 'legacy' one). A missing file raises ``OSError`` as usual.
    """
    raw = Path(path).read_bytes()
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptionError.of(path, f"not valid JSON: {str(exc).splitlines()[0][:60]}", fix, what) from None
    if not isinstance(obj, dict):
        raise CorruptionError.of(path, f"a JSON {type(obj).__name__}, not an object", fix, what)
    stored = obj.pop(DIGEST_KEY, None)
    if stored is None:
        if any(_looks_like_digest(v) for v in obj.values()):
            raise CorruptionError.of(path, "its digest field is damaged", fix, what)
        return obj  # legacy: written before records carried digests
    if stored != json_digest(obj):
        raise CorruptionError.of(path, "content digest mismatch", fix, what)
    return obj


def _looks_like_digest(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != _DIGEST_LEN:
        return False
    tail = value[-64:]
    return all(c in "0123456789abcdef" for c in tail)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
