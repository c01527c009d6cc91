"""Run directories and their recovery: the stage records on disk, what a damaged file's way forward is
(``--redo STAGE``, deleting a study unit), and ``--redo`` itself.

Each stage of a run lives in its own sub-directory of the run directory and writes ``stage.json`` when
it is complete; a re-run skips complete stages and resumes interrupted ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional


from teachx.config.schema import RunConfig
from teachx.errors import ConfigError, CorruptionError, RunDirError
from teachx.runs import rundir
from teachx.runs.rundir import STAGE_LAYOUT, remove_owned
from teachx.training.checkpoint import load_checkpoint
from teachx.training.methods import method_name, method_stages
from teachx.runs.plan import separate_teacher
from teachx.runs.records import StageRecord, read_results, read_stage


def prepare_run_dir(
    run_dir: str | Path, cfg: RunConfig, command: str, overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Create ``run_dir`` with the resolved config, or resume the teachx run there with the same config.

    A directory teachx did not make is never used, with or without ``overwrite``. One made with a
    different config (options that change results: ``--quiet`` and other presentation options are
    not part of a run) is an error unless ``overwrite`` is given, which then removes only the files
    teachx wrote there (see :mod:`teachx.runs.rundir`).
    """
    return rundir.prepare_run_dir(run_dir, {"command": command, **cfg.to_dict()}, overwrite, log)


def stage_checkpoint(stage_dir: str | Path, record: dict[str, Any]) -> Path:
    """The best checkpoint of a complete stage: always the stage's own file, so that a moved or
    copied run works on its own files. Records hold it relative to the stage directory; older ones
    the path as typed then (absolute, or relative to that working directory): its file name is used."""
    return Path(stage_dir) / "checkpoints" / Path(record.get("checkpoint") or "best.safetensors").name


def stage_done(stage_dir: Path, fix: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The stage's record when it is complete, verified against its digest (None: not complete).

    A damaged record is a :class:`CorruptionError` with ``fix`` as the way forward (default:
    :func:`stage_fix`); ``run_pipeline`` turns it into ``--redo STAGE``.
    """
    return read_stage(stage_dir, fix or stage_fix(stage_dir))


def stage_record(stage_dir: Path, fix: Optional[str] = None) -> Optional[StageRecord]:
    """:func:`stage_done` as a typed :class:`~teachx.runs.records.StageRecord`."""
    record = stage_done(stage_dir, fix)
    return None if record is None else StageRecord.from_dict(record)


def stage_fix(stage_dir: Path) -> str:
    """The way forward for a damaged file of a stage: --redo in a run directory, deleting a study
    unit, else deleting the stage directory (so that it is trained again)."""
    return (
        run_dir_fix(Path(stage_dir) / "stage.json")
        or f"delete '{stage_dir}' and run again (that stage is trained again)"
    )


@contextlib.contextmanager
def stage_fixes(stage_dir: Path):
    """A damaged file of ``stage_dir`` (e.g. the checkpoint a resume reads) names :func:`stage_fix`."""
    try:
        yield
    except CorruptionError as err:
        inside = err.path and Path(stage_dir).resolve() in Path(err.path).resolve().parents
        if not inside:
            raise
        raise err.with_fix(stage_fix(stage_dir)) from None


# -- corrupted files inside a run: the exact way forward ------------------------------------------

#: the stages of `teachx run` / `teachx demo`, each a sub-directory of the run directory: the baseline,
#: a separate teacher, and the method stage, named after the training method (``impactx`` by default)
STAGES = ("baseline", "teacher", *method_stages())
#: what `teachx train` writes besides config.yaml (its single stage lives in the run directory itself)
TRAIN_STAGE_FILES = ("stage.json", "checkpoints", "history.json", "results.json", "tensorboard")


def redo_fix(stage: str) -> str:
    return f"re-run the same command with --redo {stage}"


def _stage_in(run_dir: Path, path: str | Path) -> Optional[str]:
    """The stage of ``run_dir`` that holds ``path`` ('train' for a `teachx train` directory), or None."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except (ValueError, OSError):
        return None
    if len(rel.parts) > 1 and rel.parts[0] in STAGES:
        return rel.parts[0]
    if rel.parts and rel.parts[0] in TRAIN_STAGE_FILES and _run_command(run_dir) == "train":
        return "train"
    return None


def _run_command(run_dir: Path) -> Optional[str]:
    """The teachx command that made ``run_dir`` (from its config.yaml), or None when it is not a run directory."""
    try:
        for line in (Path(run_dir) / "config.yaml").read_text().splitlines():
            if line.startswith("command:"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def run_dir_fix(path: str | Path) -> Optional[str]:
    """For a damaged file inside a teachx run directory or study unit: what exactly to re-run."""
    for run_dir in list(Path(path).resolve().parents)[:4]:  # <run>/<stage>/self_maps/<store>/maps.npy at most
        if (run_dir / "unit.json").is_file() and (run_dir.parent.parent / "study.yaml").is_file():
            return unit_fix(run_dir)
        command = _run_command(run_dir)
        if command:
            stage = _stage_in(run_dir, path)
            return f"re-run the `teachx {command}` command that made '{run_dir}' with --redo {stage}" if stage else None
    return None


def unit_fix(unit_dir: Path) -> str:
    """The way forward for a damaged file of a study unit: that unit is trained again."""
    return f"delete the study unit '{unit_dir}' and re-run the same `teachx study` command (it trains that unit again)"


def load_checkpoint_verified(path: str | Path) -> Any:
    """:func:`load_checkpoint` for a checkpoint named by a user (e.g. `teachx explain`): when it is
    damaged and lies in a run directory or study unit, the error names exactly what to re-run."""
    try:
        return load_checkpoint(path)
    except CorruptionError as err:
        fix = run_dir_fix(path)
        if fix is None:
            raise
        raise err.with_fix(fix) from None


@contextlib.contextmanager
def redo_hint(run_dir: Path, stage: Optional[str] = None):
    """A :class:`CorruptionError` of a file inside a stage of ``run_dir`` gets the exact way forward:
    ``re-run the same command with --redo STAGE`` (``stage`` forces the name, e.g. 'train')."""
    try:
        yield
    except CorruptionError as err:
        found = _stage_in(run_dir, err.path) if err.path else None
        if (
            found is None
            and stage is not None
            and err.path
            and Path(run_dir).resolve() in Path(err.path).resolve().parents
        ):
            found = stage
        if found is not None:
            raise err.with_fix(redo_fix(found)) from None
        other = run_dir_fix(err.path) if err.path else None  # e.g. teacher.checkpoint inside another run
        if other:
            raise err.with_fix(other) from None
        raise


def check_bound(run_dir: Path, expected: Optional[str], stages: tuple[str, ...] = STAGES) -> None:
    """Refuse a run directory whose stage records were made with another config than its config.yaml
    (``expected``: its hash): a record another process wrote under another config, a stage copied from
    another run, an edited config.yaml. Records without a hash (older teachx) are taken as they are."""
    if expected is None:
        return
    wrong = []
    for stage in stages:
        record = stage_record(run_dir if stage == "train" else run_dir / stage)
        if record is not None and record.config_hash not in (None, expected):
            wrong.append(stage)
    if wrong:
        which = f"the {wrong[0]} stage was" if len(wrong) == 1 else f"the {' and '.join(wrong)} stages were"
        raise RunDirError(
            f"run directory '{run_dir}': {which} made with another config than its config.yaml (by another "
            "process, or copied or edited by hand); re-run the same command with "
            + " ".join(f"--redo {s}" for s in wrong)
        )


def results_bound(run_dir: Path, expected: Optional[str]) -> Optional[dict[str, Any]]:
    """The run's results.json when it is there, readable and made with the config in config.yaml
    (a results.json without a hash, from an older teachx, counts as made with it); else None."""
    results = read_results(run_dir)
    if results is None or expected is None or results.get("config_hash", expected) == expected:
        return results
    return None


def redo_stages(
    run_dir: Path, cfg: RunConfig, stages: list[str] | tuple[str, ...], log: Callable[[str], None] = print
) -> list[str]:
    """``--redo``: discard the named stages of the run directory (teachx's own) and what was made from
    them, so that the run trains them again; returns what was discarded.

    IMPACTX learns from the teacher's maps, so redoing the teacher -- the baseline, unless the run has
    a separate teacher or a ``teacher.checkpoint`` -- redoes IMPACTX too. Maps need no discarding: a
    store is keyed by the teacher's weights, so new weights get new maps, and identical weights
    (CPU training is deterministic) reuse the verified ones. ``results.json`` is written again at the end.
    Only what teachx wrote is discarded: a file a user put into a stage directory stays.
    """
    stages = list(dict.fromkeys(stages))
    if not stages:
        return []
    run_dir = Path(run_dir)
    if stages == ["train"]:
        targets = [run_dir / name for name in TRAIN_STAGE_FILES]
    else:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"--redo {unknown[0]}: not a stage; the stages are {', '.join(STAGES)}")
        teacher_is_baseline = not cfg.teacher.checkpoint and not separate_teacher(cfg)
        if "teacher" in stages and (cfg.teacher.checkpoint or teacher_is_baseline):
            why = (
                "teacher.checkpoint is used as the teacher"
                if cfg.teacher.checkpoint
                else "the baseline is the teacher; use --redo baseline"
            )
            raise ConfigError(f"--redo teacher: this run has no teacher stage ({why})")
        if "teacher" in stages or ("baseline" in stages and teacher_is_baseline):
            stages.append(method_name(cfg))
        targets = [run_dir / s for s in STAGES if s in stages] + [run_dir / "results.json"]

    gone = []
    for t in targets:
        if t.is_dir() and not t.is_symlink():  # only what teachx wrote there: a user's file in a stage stays
            if not remove_owned(t, STAGE_LAYOUT if t.name in STAGES else (STAGE_LAYOUT.get(t.name) or {})):
                t.rmdir()
        elif t.is_file():
            t.unlink()
        else:
            continue
        gone.append(t.name)
    log(f"[redo] discarded {', '.join(gone) if gone else 'nothing (not there yet)'} in {run_dir}: trained again below")
    return gone
