"""Fault injection for teachx subprocesses started by tests/test_faults.py (put on PYTHONPATH).

Does nothing unless ``TEACHX_FAULT`` is set to ``ACTION:WHERE:N[:ERRNO]``, which fires at the N-th
matching event of the process (N counts from 1):

- WHERE ``maps``: the N-th batch of teacher maps, after it is computed and before it is stored;
- any other WHERE is a glob matched against the absolute path of a file teachx writes atomically
  (``*/baseline/checkpoints/last.safetensors``); the event is that write, after its temporary file
  is complete and before it is renamed into place (``ACTION`` ``kill``, ``int``, ``oserror``), or
  just after the rename (``kill-after``, ``int-after``).

ACTION ``kill``: SIGKILL the process (nothing runs after it, as with ``kill -9`` or a power cut);
``int``: SIGINT (what Ctrl-C sends); ``oserror``: raise OSError(ERRNO) as a full or read-only
file system would, while the temporary file is half-written; ``stop``: SIGSTOP, the process stays
alive (holding its locks) until the test sends SIGCONT.
"""

import os

_SPEC = os.environ.get("TEACHX_FAULT")
if _SPEC:
    import contextlib
    import errno as _errno
    import fnmatch
    import signal

    _action, _where, _n, *_rest = _SPEC.split(":")
    _n = int(_n)
    _count = [0]

    def _fire(stage: str, path: str, tmp=None) -> None:
        phase = "after" if _action.endswith("-after") else "before"
        if stage != phase:
            return
        if _where == "maps" and path != "maps" or _where != "maps" and not fnmatch.fnmatch(path, _where):
            return
        _count[0] += 1
        if _count[0] != _n:
            return
        if _action.startswith("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif _action.startswith("stop"):
            os.kill(os.getpid(), signal.SIGSTOP)
        elif _action.startswith("int"):
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt at the next bytecode, as on Ctrl-C
        elif _action == "oserror":
            code = getattr(_errno, _rest[0])
            if tmp is not None:
                with open(tmp, "wb") as f:
                    f.write(b"half")
            raise OSError(code, os.strerror(code), str(tmp or path))

    if _where == "maps":
        from teachx.teachers import store as _store

        _fill = _store.fill_store

        def fill_store(store, indices, compute, *args, **kwargs):
            def counted(idx):
                out = compute(idx)
                _fire("before", "maps")
                _fire("after", "maps")
                return out

            return _fill(store, indices, counted, *args, **kwargs)

        _store.fill_store = fill_store
    else:
        from teachx.utils import io as _io

        _atomic = _io.atomic_path

        @contextlib.contextmanager
        def atomic_path(path):
            target = os.path.abspath(os.fspath(path))
            with _atomic(path) as tmp:
                yield tmp
                _fire("before", target, tmp)
            _fire("after", target)

        _io.atomic_path = atomic_path
