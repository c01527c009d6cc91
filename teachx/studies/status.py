"""Where an unfinished study stands: `teachx study CONFIG --out DIR --status`.

A study on a small machine runs for hours, in several worker processes, over several sessions. This
reads what the workers left in ``DIR/units`` -- nothing is trained, written or locked -- and says per
unit whether it is done (its verified record and test accuracy), being trained (epoch k of n, by which
process), interrupted (a re-run resumes it from its last epoch) or not started; per arm, the accuracy
of the seeds done so far; and an estimate of the worker time left from the epochs and evaluations already timed.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from teachx.errors import TeachxError
from teachx.evaluation.stats import summarize
from teachx.runs.recovery import stage_done
from teachx.studies.runner import read_unit_evaluation
from teachx.runs.revise import TRAINED, read_revision
from teachx.studies.spec import PlannedUnit, StudySpec, classifier_key, eval_key, planned_units
from teachx.utils.locking import held_by
from teachx.utils.numbers import number

#: the states a unit can be in, in the order a run goes through them
STATES = ("not started", "interrupted", "training", "to evaluate", "evaluating", "done", "damaged")


@dataclass
class UnitStatus:
    unit: PlannedUnit
    state: str  # one of STATES
    epochs_done: int
    epochs: int
    test_acc: Optional[float] = None
    seconds_per_epoch: Optional[float] = None  # measured on this unit (its record, or the epochs timed so far)
    holder: Optional[dict[str, Any]] = None  # the process working on it (pid, host)
    message: str = ""  # a damaged unit: what is wrong and the fix
    eval_seconds: Optional[float] = None  # an evaluated IMPACTX unit: how long its evaluation took


@dataclass
class StudyStatus:
    spec: StudySpec
    out: Path
    units: list[UnitStatus]

    def by_arm(self) -> dict[tuple[str, str], list[UnitStatus]]:
        """(regime, arm) -> its units, in the study's order (teacher models under the arm "teacher")."""
        out: dict[tuple[str, str], list[UnitStatus]] = {}
        for u in self.units:
            out.setdefault((u.unit.regime, u.unit.arm), []).append(u)
        return out

    def seconds_left(self) -> Optional[float]:
        """Worker seconds the unfinished units still need: their epochs left at the median per-epoch time of
        the same arm's finished units (else of its units in progress: a paused worker's epoch counts its pause),
        plus, for an IMPACTX unit not yet evaluated, the median evaluation time of the arm's evaluated units
        (else of any IMPACTX unit's; 0 before the first); None when no epoch of such an arm is timed yet.
        Teacher maps (made once per teacher) are not counted."""
        finished: dict[tuple[str, str], list[float]] = {}
        running: dict[tuple[str, str], list[float]] = {}
        evals: dict[tuple[str, str], list[float]] = {}
        for u in self.units:
            arm = (u.unit.regime, u.unit.arm)
            if u.seconds_per_epoch:
                into = finished if u.state in ("done", "to evaluate", "evaluating") else running
                into.setdefault(arm, []).append(u.seconds_per_epoch)
            if u.eval_seconds is not None:
                evals.setdefault(arm, []).append(u.eval_seconds)
        any_eval = [t for ts in evals.values() for t in ts]
        total = 0.0
        for u in self.units:
            if u.state == "done":
                continue
            arm = (u.unit.regime, u.unit.arm)
            if u.state not in ("to evaluate", "evaluating") and u.epochs > u.epochs_done:
                known = finished.get(arm) or running.get(arm)  # finished units' records first: whole runs, fewer pauses
                if not known:
                    return None
                total += (u.epochs - u.epochs_done) * statistics.median(known)
            if _evaluated(u.unit) and u.state != "evaluating" and (evals.get(arm) or any_eval):
                total += statistics.median(evals.get(arm) or any_eval)
        return total


def epochs_timed(stage_dir: Path) -> tuple[int, Optional[float]]:
    """(epochs finished, mean seconds per epoch) from the trainer's running ``history.json``. It is a
    progress log, rewritten each epoch and not trusted for results: unreadable means no epochs known."""
    try:
        hist = json.loads((stage_dir / "history.json").read_text())
    except (OSError, ValueError):
        return 0, None
    if not isinstance(hist, list):
        return 0, None
    secs = [h["seconds"] for h in hist if isinstance(h, dict) and isinstance(h.get("seconds"), (int, float))]
    return len(hist), (sum(secs) / len(secs) if secs else None)


def _revision_status(out: Path, unit: PlannedUnit) -> UnitStatus:
    """A correction unit (``study.revise``): done once its revision.json is written; a fine-tuning one trains
    its ``model`` stage before (a post-hoc one trains nothing: 0 epochs)."""
    d = out / "units" / unit.key
    trained = unit.config.method.name in TRAINED
    status = UnitStatus(unit, "not started", 0, int(unit.config.train.epochs) if trained else 0)
    if not d.is_dir():
        return status
    status.holder = held_by(d / ".lock") if (d / ".lock").exists() else None
    try:
        if (d / "revision.json").exists():
            rec = read_revision(d / "revision.json")
            status.state, status.test_acc, status.epochs_done = "done", rec.after.test_acc, status.epochs
            status.seconds_per_epoch = (rec.train or {}).get("seconds_per_epoch")
            return status
    except TeachxError as exc:
        status.state, status.message = "damaged", str(exc)
        return status
    status.epochs_done, status.seconds_per_epoch = epochs_timed(d / "model")
    if status.holder:
        status.state = "training"
    elif status.epochs_done:
        status.state = "interrupted"
    return status


def _evaluated(unit: PlannedUnit) -> bool:
    """Whether a method unit is evaluated beyond accuracy (an evaluation file of its own: the method's
    ``study_evaluates``, which a baseline that explains itself, a B-cos network, answers too)."""
    return unit.method is not None and unit.method(unit.config).study_evaluates()


def _unit_status(spec: StudySpec, out: Path, unit: PlannedUnit) -> UnitStatus:
    if unit.kind == "revision":
        return _revision_status(out, unit)
    cfg = unit.config
    epochs = int(cfg.train.epochs)
    own = d = out / "units" / unit.key  # the unit's folder: its evaluation file, even where it reuses a baseline
    if unit.method is not None and unit.method.reuses_baseline:  # the arm is its baseline model: nothing of its own
        d = out / "units" / classifier_key(cfg, cfg.model.backbone, dict(cfg.model.options))
    status = UnitStatus(unit, "not started", 0, epochs)
    if not d.is_dir():
        return status
    status.holder = held_by(d / ".lock") if (d / ".lock").exists() else None
    try:
        record = stage_done(d)
        if record is not None:
            status.epochs_done = len(record.get("history") or []) or epochs
            status.test_acc = record.get("test_acc")
            status.seconds_per_epoch = record.get("seconds_per_epoch")
            evaluation = own / f"eval-{eval_key(cfg, spec.eval)}.json"
            evaluated = _evaluated(unit)
            if evaluated and not evaluation.exists():
                busy = status.holder if own == d else (held_by(own / ".lock") if (own / ".lock").exists() else None)
                status.state = "evaluating" if busy else "to evaluate"
                return status
            if evaluated:  # verified like the record: a damaged evaluation is shown, not counted
                ev = read_unit_evaluation(evaluation)
                took = (ev.get("timings") or {}).get("evaluation")
                status.eval_seconds = float(took) if isinstance(took, (int, float)) else None
            status.state = "done"
            return status
    except TeachxError as exc:  # a damaged record: an error to show, never a number
        status.state, status.message, status.test_acc = "damaged", str(exc), None
        return status
    status.epochs_done, status.seconds_per_epoch = epochs_timed(d)
    if status.holder:
        status.state = "training"
    elif status.epochs_done:
        status.state = "interrupted"
    return status


def study_status(spec: StudySpec, out: str | Path) -> StudyStatus:
    """Read-only: the state of every unit ``spec`` makes in the study directory ``out``."""
    out = Path(out)
    return StudyStatus(spec, out, [_unit_status(spec, out, u) for u in planned_units(spec)])


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def status_lines(st: StudyStatus) -> list[str]:
    """The text `teachx study --status` prints."""
    workers = len({(u.holder.get("host"), u.holder.get("pid")) for u in st.units if u.holder})

    lines = [f"study {st.out}: {sum(u.state == 'done' for u in st.units)} of {len(st.units)} units done"]
    rw = max([len(u.unit.regime) for u in st.units] + [6])  # column widths: the longest regime and arm names
    aw = max([len(u.unit.arm) for u in st.units] + [16])
    for u in st.units:
        p = u.unit
        what = f"  {p.regime:>{rw}} {p.arm:<{aw}} seed {p.seed:<3} {u.state:<12}"
        if u.state in ("done", "to evaluate", "evaluating") and u.test_acc is not None:
            what += f" test_acc {number(u.test_acc)}"
        elif u.state in ("training", "interrupted"):
            what += f" epoch {u.epochs_done}/{u.epochs}"
        if u.holder:
            what += f" (pid {u.holder.get('pid')} on {u.holder.get('host')})"
        if u.message:
            what += f": {u.message}"
        lines.append(what + f"  [{p.key}]")
    lines.append("per arm, the seeds done so far (test accuracy; the statistics come when every seed is done):")
    for (regime, arm), units in st.by_arm().items():
        if arm == "teacher":
            continue
        accs = [u.test_acc for u in units if u.state == "done" and u.test_acc is not None]
        if accs:
            s = summarize(accs)
            spread = f" ± {100 * s.std:.1f}" if s.std is not None and not math.isnan(s.std) else ""
            acc = f"{100 * s.mean:.1f}{spread}%"
        else:
            acc = "-"
        lines.append(f"  {regime:>{rw}} {arm:<{aw}} {len(accs)}/{len(units)} seeds  {acc}")
    left = st.seconds_left()
    if left is None:
        lines.append("time left: not estimated yet (no epoch of an unfinished arm is timed)")
    elif left > 0:
        running = f", ~{_hours(left / workers)} with the {workers} workers running now" if workers > 1 else ""
        lines.append(
            f"time left: about {_hours(left)} of work for one worker{running} (epochs left x the measured "
            "time per epoch of the same arm's units, plus the IMPACTX evaluations; teacher maps not counted)"
        )
    return lines
