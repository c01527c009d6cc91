"""What teachx owns in an output directory, and how it knows a directory is its own.

teachx never deletes a file it did not make:

- a run directory carries a marker file, ``.teachx-run`` (a study directory ``.teachx-study``);
  a directory made by an older teachx, without the marker, is recognised by its ``config.yaml``
  (``study.yaml``) and gets the marker when it is resumed;
- a non-empty directory that is neither is *foreign*: it is refused, with or without
  ``--overwrite``, and the message does not suggest deleting it;
- ``--overwrite`` on a teachx run directory removes only the entries of teachx's layout
  (:data:`RUN_LAYOUT`, by name, directories only where everything in them is teachx's); a file a
  user put into a run directory (notes, an analysis notebook, even inside ``baseline/``) survives
  and is named in the log.

A run is identified by the result-changing part of its config (:func:`run_identity`): the
command and every option except :data:`~teachx.config.schema.NEUTRAL_KEYS` (progress bars,
TensorBoard logging, the map-store location and batch size), so re-running a command with or
without ``--quiet`` resumes the same run. Its hash (:func:`config_hash`) goes into every stage record
and ``results.json``, binding them to the config that made them.

One process at a time writes in a run directory: it holds ``.teachx-lock`` there
(:func:`hold_run_dir`, the file lock the studies use) from before its first change to the
directory until its last write; another process is refused with a line naming the holder, or waits.

Why one module of over 500 lines: ownership, identity and locking of run and study directories are one
decision (what teachx may write, resume, replace or delete), kept in one place so that no command decides it
differently.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from teachx import __version__
from teachx.config.loader import dump_yaml, from_dict, load_yaml
from teachx.config.schema import NEUTRAL_KEYS, SECTION_ALIASES, RunConfig
from teachx.errors import ConfigError, OutputError, RunDirError
from teachx.training.methods import legacy_layout, method_stages
from teachx.utils.hashing import hash_json
from teachx.utils.io import is_temp_name, output_error, sweep_stale_temps, write_json_atomic, write_text_atomic
from teachx.utils.locking import STALE_AFTER_S, Busy, file_lock, held_by

RUN_MARKER = ".teachx-run"
STUDY_MARKER = ".teachx-study"
#: the lock of the process writing in a run directory (:func:`hold_run_dir`); never removed by ``--overwrite``
RUN_LOCK = ".teachx-lock"
#: what `--launcher submitit` keeps in a run or study directory (the job record and the jobs' logs):
#: written before the job starts and while it runs, so neither a fresh run nor --overwrite touches it
LAUNCHER_DIR = "launcher"

#: name pattern -> None (a regular file teachx writes) or the layout of a directory teachx makes
Layout = dict[str, Optional[dict]]

_CHECKPOINTS: Layout = {"*.safetensors": None, "*.json": None}
_MAP_STORE: Layout = {"*.npy": None, "*.json": None}
_SELF_MAPS: Layout = {"current.json": None, "[0-9a-f]" * 20: _MAP_STORE}
#: a training stage (also the top of a `teachx train` directory)
STAGE_LAYOUT: Layout = {
    "stage.json": None,
    "history.json": None,
    "checkpoints": _CHECKPOINTS,
    "tensorboard": {"events.out.tfevents.*": None},
    "self_maps": _SELF_MAPS,
}
#: everything `teachx train`, `run`, `demo` and `report` write into a run directory
RUN_LAYOUT: Layout = {
    RUN_MARKER: None,
    "config.yaml": None,
    "results.json": None,
    "timings.json": None,
    "report.html": None,
    "report.md": None,
    "report_files": {"*.png": None},
    "figures": {"*.png": None},
    "reveal": {"*": {"*.json": None, "*.npz": None, "*.png": None}},  # `teachx reveal`: per method, and concepts
    # `teachx revise`: per correction, its concept, the fine-tuned stage and the record
    "revise": {"*": {"concept.json": None, "concept.npz": None, "revision.json": None, "model": STAGE_LAYOUT}},
    # the stages: baseline, teacher and the method stage, named after the training method
    **{stage: STAGE_LAYOUT for stage in ("baseline", "teacher", *method_stages())},
    **STAGE_LAYOUT,
}
#: files teachx may leave in any directory it writes: atomic-write temp files, locks
_ANYWHERE = (".*.tmp", "*.lock", ".lock", "*.lock.takeover", RUN_LOCK + ".takeover")


# -- recognising directories ----------------------------------------------------------------------


def _ignorable(name: str, files: tuple[str, ...]) -> bool:
    """A temp file of one of ``files`` being written right now by a process starting on the directory,
    or the lock of a process about to write in it."""
    return name in (RUN_LOCK, RUN_LOCK + ".takeover") or any(
        name.startswith(f".{f}.") and name.endswith(".tmp") for f in files
    )


def dir_kind(path: str | Path, marker: str, legacy: Callable[[Path], bool], first_files: tuple[str, ...]) -> str:
    """'absent', 'empty', 'teachx' (marker, or made by an older teachx) or 'foreign'."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "foreign"
    if (path / marker).is_file() and not (path / marker).is_symlink():
        return "teachx"
    entries = [e for e in path.iterdir() if not _ignorable(e.name, (marker, *first_files))]
    if not entries:
        return "empty"
    return "teachx" if legacy(path) else "foreign"


def _read_yaml(path: Path) -> Optional[dict[str, Any]]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _legacy_run(path: Path) -> bool:
    """A run directory of an older teachx (no marker): its config.yaml is a teachx run config."""
    import dataclasses

    cfg = _read_yaml(path / "config.yaml")
    names = {f.name for f in dataclasses.fields(RunConfig)} | set(SECTION_ALIASES)  # impactx: of older teachx
    return bool(cfg) and cfg.get("command") in ("train", "run", "demo") and set(cfg) - {"command"} <= names


def _legacy_study(path: Path) -> bool:
    """A study directory of an older teachx: its study.yaml is the resolved study teachx wrote."""
    cfg = _read_yaml(path / "study.yaml")
    section = (cfg or {}).get("study")
    return isinstance(section, dict) and {"seeds", "arms", "regimes", "eval", "alpha", "source"} <= set(section)


def saved_run_config(run_dir: str | Path) -> tuple[Optional[str], dict[str, Any]]:
    """(command, config) a run directory was made with: its ``config.yaml`` as :func:`prepare_run_dir` saved it,
    the command split off. The one reader of that file for the service and `teachx explain`; a missing or
    unreadable file is a one-line ConfigError."""
    raw = dict(load_yaml(str(Path(run_dir) / "config.yaml")))
    return raw.pop("command", None), raw


def run_dir_kind(path: str | Path) -> str:
    return dir_kind(path, RUN_MARKER, _legacy_run, ("config.yaml",))


def study_dir_kind(path: str | Path) -> str:
    return dir_kind(path, STUDY_MARKER, _legacy_study, ("study.yaml",))


def write_marker(path: Path, marker: str, kind: str) -> None:
    write_json_atomic(
        path / marker,
        {
            "teachx": __version__,
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "made by teachx; `--overwrite` removes only what teachx wrote here",
        },
    )


# -- removing what teachx made ---------------------------------------------------------------------


def _spec(name: str, layout: Layout) -> tuple[bool, Optional[dict]]:
    if name in layout:
        return True, layout[name]
    for pattern, sub in layout.items():
        if fnmatch.fnmatchcase(name, pattern):
            return True, sub
    if is_temp_name(name) or any(fnmatch.fnmatchcase(name, p) for p in _ANYWHERE):
        return True, None
    return False, None


def remove_owned(root: str | Path, layout: Layout = RUN_LAYOUT) -> list[Path]:
    """Delete the entries of ``root`` that teachx's ``layout`` names; returns what was kept.

    A directory is removed only once it is empty; symlinks and anything of an unexpected type or
    name are kept, with the directories that hold them.
    """
    root = Path(root)
    kept: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name == RUN_LOCK or (entry.name == LAUNCHER_DIR and layout is RUN_LAYOUT):
            continue  # held by the process removing these files (or by one that --overwrite must not touch),
            # or the launcher's job record and logs, which the running job is writing
        known, sub = _spec(entry.name, layout)
        if not known or entry.is_symlink():
            kept.append(entry)
        elif sub is None:
            if entry.is_file():
                entry.unlink()
            else:
                kept.append(entry)
        elif entry.is_dir():
            inner = remove_owned(entry, sub)
            kept.extend(inner)
            if not inner:
                entry.rmdir()
        else:
            kept.append(entry)
    return kept


# -- run identity ----------------------------------------------------------------------------------


def run_identity(saved: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The result-deciding part of a saved run config (``{"command": ..., **config}``): every
    option with its default filled in, except the neutral ones; None if it is not a config this
    teachx can read."""
    data = dict(saved)
    command = data.pop("command", None)
    try:
        cfg = from_dict(RunConfig, data, "config")
    except (ConfigError, TypeError, ValueError):
        return None
    values = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as read back from YAML
    for section, key in NEUTRAL_KEYS:
        values.get(section, {}).pop(key, None)
    return {"command": command, **values}


def _without_defaults(values: Any, defaults: Any) -> Any:
    """``values`` less every leaf equal to ``defaults`` at the same place (sections left empty go too)."""
    if not (isinstance(values, dict) and isinstance(defaults, dict)):
        return values
    out = {}
    for k, v in values.items():
        if k in defaults and v == defaults[k]:
            continue
        v = _without_defaults(v, defaults.get(k))
        if v != {} or k not in defaults:
            out[k] = v
    return out


def config_hash(saved: dict[str, Any]) -> Optional[str]:
    """The hash of a saved run config's identity (:func:`run_identity`), which every stage record and
    ``results.json`` of the run carries; None if it is not a config this teachx can read.

    Only the values that differ from the defaults are hashed, so an option added by a later teachx
    (its default filled in) leaves the hashes of existing runs as they are; they are hashed in the layout of
    before IMPACTX's options moved to ``method.options`` (:func:`teachx.training.methods.legacy_layout`), so the
    same settings keep the hash their stage records carry.
    """
    identity = run_identity(saved)
    if identity is None:
        return None
    defaults = legacy_layout(run_identity({"command": identity["command"]}) or {})
    return hash_json({**_without_defaults(legacy_layout(identity), defaults), "command": identity["command"]})[:16]


def run_config_hash(run_dir: str | Path) -> Optional[str]:
    """:func:`config_hash` of the ``config.yaml`` in ``run_dir`` (None: none there, or unreadable)."""
    saved = _read_yaml(Path(run_dir) / "config.yaml")
    return config_hash(saved) if saved is not None else None


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"


def prepare_run_dir(
    run_dir: str | Path, saved: dict[str, Any], overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Create ``run_dir`` for the config ``saved`` (``{"command": ..., **config}``), or resume the
    teachx run there with the same identity. See the module docstring for what is refused."""
    run_dir = Path(run_dir)
    kind = run_dir_kind(run_dir)
    if kind == "foreign":
        raise _foreign(run_dir)
    if kind == "teachx":
        sweep_stale_temps(run_dir)  # what a killed process was writing
        old = _read_yaml(run_dir / "config.yaml")
        rest = [
            e
            for e in run_dir.iterdir()
            if e.name not in (RUN_MARKER, RUN_LOCK, LAUNCHER_DIR) and not is_temp_name(e.name)
        ]
        if old is None and not rest:
            kind = "empty"  # the marker alone: killed right after making the directory
        elif old is not None and run_identity(old) is not None and run_identity(old) == run_identity(saved):
            if not (run_dir / RUN_MARKER).exists():
                write_marker(run_dir, RUN_MARKER, "run")  # made by an older teachx
            return run_dir  # same run: resume
        elif not overwrite:
            if old is None:
                why = "has no readable config.yaml"
            else:
                diff = _first_difference(run_identity(old) or old, run_identity(saved))
                why = "was made with a different config" + (f" ({diff})" if diff else "")
            raise RunDirError(
                f"run directory '{run_dir}' {why}; choose a new --out directory or pass --overwrite "
                "to replace the files teachx wrote there"
            )
        else:
            kept = remove_owned(run_dir, RUN_LAYOUT)
            if kept:
                names = ", ".join(str(p.relative_to(run_dir)) for p in kept[:5]) + (", ..." if len(kept) > 5 else "")
                log(
                    f"--overwrite: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} teachx did not make in {run_dir}: {names}"
                )
    _make_dir(run_dir, RUN_MARKER, "run", "config.yaml", dump_yaml(saved), always_mark=True)
    return run_dir


def _foreign(run_dir: Path) -> RunDirError:
    return RunDirError(
        f"'{run_dir}' is not empty and was not made by teachx (it has no {RUN_MARKER} file); teachx never "
        "deletes files it did not make, so choose a new or empty --out directory"
    )


def _make_dir(path: Path, marker: str, kind: str, name: str, text: str, always_mark: bool) -> None:
    """Create ``path`` with its marker and ``name`` (= ``text``); on a write error leave nothing behind
    that this call made, and raise the one-line OutputError. (A directory that holds only the lock of
    this process was made for it a moment ago: :func:`hold_run_dir` removes it again.)"""
    created = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]  # innermost first
    if not created and path.is_dir() and [e.name for e in path.iterdir()] == [RUN_LOCK]:
        created = [path]
    try:
        path.mkdir(parents=True, exist_ok=True)
        if always_mark or not (path / marker).exists():
            write_marker(path, marker, kind)
        write_text_atomic(path / name, text)
    except OSError as exc:
        if created:  # undo only what this call made; under a file (--out afile/run) none of it exists
            for made in (marker, name):
                try:
                    (path / made).unlink(missing_ok=True)
                except OSError:
                    pass
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
        if isinstance(exc, OutputError):
            raise
        raise output_error(exc, exc.filename or path) from exc


def prepare_study_dir(out: Path, text: str) -> Path:
    """Create the study directory ``out`` (or reuse a teachx study directory) and write study.yaml."""
    kind = study_dir_kind(out)
    if kind == "foreign":
        raise RunDirError(
            f"'{out}' is not empty and is not a teachx study directory (it has no {STUDY_MARKER} file); teachx "
            "never deletes or replaces files it did not make, so choose a new --out directory"
        )
    if kind == "teachx":
        sweep_stale_temps(out)
    _make_dir(out, STUDY_MARKER, "study", "study.yaml", text, always_mark=False)
    return out


# -- one writer per run directory ------------------------------------------------------------------


def command_line() -> str:
    """This process's teachx command as a user typed it (for the lock's record)."""
    return " ".join(["teachx", *(shlex.quote(a) for a in sys.argv[1:])])


def _clock(since: Any) -> str:
    if not isinstance(since, (int, float)):
        return "an unknown time"
    t = time.localtime(since)
    return time.strftime("%H:%M:%S" if t[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", t)


def describe_holder(holder: dict[str, Any]) -> str:
    """``'teachx run --out x' (pid 123 on host, since 14:02:11)`` for a lock's record."""
    if not holder.get("pid"):
        return "another process (its lock record is being written or is unreadable)"
    command = str(holder.get("command") or "")
    command = command if len(command) <= 160 else command[:157] + "..."
    what = f"'{command}'" if command else "another process"
    return (
        f"{what} (pid {holder['pid']} on {holder.get('host', 'an unknown host')}, since {_clock(holder.get('since'))})"
    )


def _in_use(path: Path, holder: dict[str, Any], what: str) -> str:
    return f"{what} '{path}' is in use by {describe_holder(holder)}"


def in_use_message(path: Path, holder: dict[str, Any], what: str = "run directory") -> str:
    """The one line for a run directory another process holds."""
    lock = path / RUN_LOCK
    text = _in_use(path, holder, what)
    if holder.get("host") and holder.get("host") != socket.gethostname():
        return (
            f"{text}, a process on another machine; wait for it to finish, or pass --wait (a lock whose process "
            f"was killed is taken over {int(STALE_AFTER_S // 60)} minutes after its last heartbeat; or delete '{lock}')"
        )
    return f"{text}; wait for it to finish, or pass --wait"


def claim_for_job(path: str | Path, what: str = "run directory") -> list[Path]:
    """Before a job is submitted to work in ``path``: refuse a directory teachx did not make or one that
    another live process holds, and mark a new one as teachx's, so that the launcher's record and logs
    (:data:`LAUNCHER_DIR`) can go into it before the job makes it a run. Returns what it made
    (for :func:`unclaim` when the submission fails)."""
    path = Path(path)
    kind = run_dir_kind(path)
    if kind == "foreign":
        raise _foreign(path)
    holder = held_by(path / RUN_LOCK)
    if holder:
        raise RunDirError(in_use_message(path, holder, what))
    made: list[Path] = []
    if kind in ("absent", "empty"):
        made = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]  # innermost first
        try:
            path.mkdir(parents=True, exist_ok=True)
            write_marker(path, RUN_MARKER, "run")
        except OSError as exc:
            unclaim(path, made)
            raise output_error(exc, exc.filename or path) from exc
        made.insert(0, path / RUN_MARKER)
    return made


def unclaim(path: str | Path, made: list[Path]) -> None:
    """Undo :func:`claim_for_job`: remove the marker and the folders it made, and the launcher's folder in them."""
    if not made:
        return
    shutil.rmtree(Path(path) / LAUNCHER_DIR, ignore_errors=True)
    for p in made:
        try:
            p.unlink() if p.is_file() else p.rmdir()
        except OSError:
            break


def enclosing_run_dir(path: str | Path) -> Optional[Path]:
    """``path`` or the nearest folder above it that is a teachx run directory, as the user wrote it where
    it can be (None: not inside one)."""
    p = Path(path)
    for d in (p, *p.parents, *([] if p.is_absolute() else Path.cwd().parents)):
        if run_dir_kind(d) == "teachx" and not (d / STUDY_MARKER).exists():
            return d
    return None


@contextlib.contextmanager
def hold_run_dir(
    path: str | Path,
    wait: bool = False,
    log: Callable[[str], None] = print,
    what: str = "run directory",
    foreign_ok: bool = False,
) -> Iterator[Path]:
    """Hold the run directory ``path`` (its ``.teachx-lock``) while the ``with`` block writes in it.

    Another live process holding it: a :class:`RunDirError` naming it (command, pid, host, since when),
    or with ``wait`` a log line and a wait until it is free. A lock left by a dead process on this
    host is taken over with a warning (``log``). A directory that does not exist yet is made for the
    lock and removed again at the end if nothing was written into it. A directory teachx did not make
    is refused before anything is written into it (``foreign_ok``: any folder, e.g. `teachx explain --out`).
    """
    path = Path(path)
    if not foreign_ok and run_dir_kind(path) == "foreign":
        raise _foreign(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, exc.filename or path) from exc
    lock = file_lock(
        path / RUN_LOCK,
        wait=wait,
        poll=1.0,
        info={"command": command_line()},
        on_wait=lambda h: log(f"teachx: {_in_use(path, h, what)}; waiting until it is free"),
        on_stale=lambda h: log(
            f"teachx: warning: {what} '{path}' was locked by {describe_holder(h)}, "
            "which is no longer running; taking it over"
        ),
    )
    try:
        try:
            lock.__enter__()
        except Busy as busy:
            raise RunDirError(in_use_message(path, busy.holder, what)) from None
        except OSError as exc:
            raise output_error(exc, exc.filename or path) from exc
        try:
            yield path
        finally:
            lock.__exit__(None, None, None)
    finally:
        if created:
            try:
                path.rmdir()  # only when empty: nothing was written after all
            except OSError:
                pass
