"""Which runs and models `teachx serve` offers: discovery of run, demo and study directories.

A *run* directory (``teachx run`` / ``teachx demo``) has ``config.yaml`` and one sub-directory per
stage (``baseline/``, optionally ``teacher/``, ``impactx/``) with its ``stage.json`` record; a
*study* directory has ``study.yaml`` and ``units/<key>/`` (``unit.json``, ``stage.json``,
``checkpoints/``), and ``study.json`` names each unit's arm, regime and seed. Every trained stage or
unit becomes one selectable model. Nothing here loads a checkpoint: a unit whose records are
damaged is listed with its error, and the others stay usable.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from teachx.errors import DataError, TeachxError
from teachx.models import BUILT_IN_MAP_MODELS
from teachx.runs.records import ArtefactShares, shortcut_shares
from teachx.runs.recovery import STAGES, stage_checkpoint, stage_done
from teachx.runs.revise import read_revision
from teachx.runs.rundir import saved_run_config
from teachx.studies.status import epochs_timed
from teachx.studies.records import StudyRecord, UnitFile
from teachx.studies.spec import BASELINE, load_study_dir, unit_names
from teachx.utils.hashing import hash_json
from teachx.utils.io import read_trusted_json


def _stages() -> tuple[str, ...]:
    """The stage directories of a run (``teachx.runs.recovery.STAGES``): baseline, teacher and
    the method stage, named after the training method."""
    return STAGES


@dataclass
class ModelEntry:
    id: str  # "<run id>.<name>", unique, safe in a URL
    run_id: str
    name: str  # stage name (run) or unit key (study)
    label: str  # what the page shows
    kind: str  # "classifier" | "impactx"
    role: str  # baseline | teacher | impactx | a study arm
    config: dict[str, Any]  # the resolved run config of the model (data, teacher, ...)
    checkpoint: Optional[Path] = None
    test_acc: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)  # seed, arm, regime, lam
    error: Optional[str] = None
    shortcut: Optional[ArtefactShares] = None  # on a shortcut benchmark: the stored attribution on the artefact

    @functools.cached_property
    def config_hash(self) -> str:
        return hash_json(self.config)


@dataclass
class RunEntry:
    id: str
    path: Path
    kind: str  # "run" | "study"
    models: list[ModelEntry] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower()
    return s or "run"


def _record(path: Path, what: str) -> dict[str, Any]:
    return read_trusted_json(path, "re-run the command that made it to re-create it", what)


def _checkpoint(stage_dir: Path, record: dict[str, Any]) -> Path:
    """The stage's own checkpoint, even when the folder was moved or copied (never the file its
    record names in another folder)."""
    return stage_checkpoint(stage_dir, record)


def discover(paths: list[str | Path]) -> list[RunEntry]:
    """One entry per directory (a run or a study); a path that is neither is a one-line DataError."""
    runs: list[RunEntry] = []
    used: set[str] = set()
    for p in paths:
        path = Path(p).expanduser().resolve()
        if not path.is_dir():
            raise DataError(
                f"'{p}' is not a directory; pass a `teachx run`, `teachx demo` or `teachx study` output directory"
            )
        rid = base = _slug(path.name)
        n = 2
        while rid in used:
            rid, n = f"{base}-{n}", n + 1
        used.add(rid)
        if (path / "study.yaml").exists() or (path / "units").is_dir():
            runs.append(_study(rid, path))
        elif (path / "config.yaml").exists() and (
            any((path / s).is_dir() for s in _stages()) or (path / "stage.json").exists()  # teachx run | teachx train
        ):
            runs.append(_run(rid, path))
        else:
            raise DataError(
                f"'{p}' is neither a run directory (config.yaml, baseline/, impactx/ or stage.json) nor a study directory "
                "(study.yaml, units/); pass the --out directory of `teachx run`, `teachx train`, `teachx demo` or "
                "`teachx study`"
            )
    return runs


def default_model(runs: list[RunEntry]) -> Optional[str]:
    """The model a viewer opens on: the first usable one with built-in maps (IMPACTX, ABN), which is what
    people come to see, else the first usable one, else the first; None when there are none."""
    models = [m for r in runs for m in r.models]
    usable = [m for m in models if not m.error]
    pick = next((m for m in usable if m.kind in BUILT_IN_MAP_MODELS), None) or next(iter(usable or models), None)
    return pick.id if pick else None


def _run(rid: str, path: Path) -> RunEntry:
    run = RunEntry(rid, path, "run")
    try:
        config = saved_run_config(path)[1]
    except TeachxError as exc:
        run.error = str(exc)
        return run
    shares: dict[str, ArtefactShares] = {}
    if (path / "results.json").exists():
        try:
            results = _record(path / "results.json", "run results")
            run.summary = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) or v is None}
            shares = shortcut_shares(results.get("shortcut"))  # keyed by stage: baseline, impactx, abn, ...
        except TeachxError as exc:
            run.summary = {"error": str(exc)}
    from teachx.training.methods import METHODS

    for stage in _stages():
        d = path / stage
        if not d.is_dir():
            continue
        method = METHODS.get(stage) if stage in METHODS else None  # the baseline stage is method baseline's model too
        kind = (
            method.checkpoint_kind if method else "classifier"
        )  # the method stages of rrr, saliency_guided, reldrop train classifiers
        label = method.model_label(config) if method else {"teacher": "teacher model"}.get(stage, stage)
        entry = ModelEntry(
            f"{rid}.{stage}", rid, stage, label, kind, stage, config, info=method.model_info(config) if method else {}
        )
        entry.shortcut = shares.get(stage)
        _fill_from_stage(entry, d)
        run.models.append(entry)
    if (path / "stage.json").exists():  # a `teachx train` directory: the classifier is the directory itself
        entry = ModelEntry(f"{rid}.classifier", rid, ".", "classifier (teachx train)", "classifier", BASELINE, config)
        entry.shortcut = shares.get("classifier")
        _fill_from_stage(entry, path)
        run.models.append(entry)
    # the classifier as `teachx revise` fine-tuned it along a concept (a post-hoc correction has no model of its own)
    folder = path / "revise"
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (d / "model").is_dir():
            method = _revision_method(d / "model")
            kind = method.checkpoint_kind if method else "classifier"  # impactx_cleaned trains an IMPACTX model
            what = "classifier corrected" if kind == "classifier" else f"{method.display_name()} trained"
            entry = ModelEntry(
                f"{rid}.revise-{_slug(d.name)}",
                rid,
                f"revise/{d.name}",
                f"{what} by teachx revise ({d.name})",
                kind,
                "revision",
                config,
            )
            entry.shortcut = _revision_shortcut(d)
            _fill_from_stage(entry, d / "model")
            run.models.append(entry)
    return run


def _revision_method(d: Path):
    """The training method a `teachx revise` model stage was trained with (its stage record), if finished and known."""
    from teachx.training.methods import recorded_method

    try:
        rec = stage_done(d)
    except (TeachxError, OSError):
        return None  # _fill_from_stage reports it
    return recorded_method(rec) if rec and rec.get("method") else None


def _fill_from_stage(entry: ModelEntry, d: Path) -> None:
    if not (d / "stage.json").exists():
        done = epochs_timed(d)[0]
        progress = f" ({done} epoch{'s' if done != 1 else ''} trained so far)" if done else ""
        entry.error = (
            f"'{d}' has no stage.json: this model is not trained yet{progress} (re-run the command that makes it)"
        )
        return

    try:
        rec = stage_done(d) or {}
    except (TeachxError, OSError) as exc:
        entry.error = str(exc)
        return
    entry.checkpoint = _checkpoint(d, rec)
    acc = rec.get("test_acc")
    entry.test_acc = float(acc) if isinstance(acc, (int, float)) else None


def _unit_shortcut(unit_dir: Path) -> Optional[ArtefactShares]:
    """A study unit's stored attribution on the artefact (``shortcut.json``), where it was measured; a
    damaged file shows nothing here (the study's own commands report it)."""
    p = unit_dir / "shortcut.json"
    if not p.is_file():
        return None
    try:
        return ArtefactShares.from_dict(_record(p, "shortcut evaluation"))
    except (TeachxError, OSError, TypeError):
        return None


def _revision_shortcut(unit_dir: Path) -> Optional[ArtefactShares]:
    """A correction unit's gradient share on the artefact after the correction (its ``revision.json``)."""
    try:
        share = read_revision(unit_dir / "revision.json").after.artefact_share
    except (TeachxError, OSError, TypeError):
        return None
    return ArtefactShares.measured(share) if share else None


def _study(rid: str, path: Path) -> RunEntry:
    from teachx.training.methods import recorded_config_method

    run = RunEntry(rid, path, "study")
    names: dict[str, dict[str, Any]] = {}  # unit key -> arm / regime / seed
    if (path / "study.json").exists():
        try:
            data = StudyRecord.from_dict(_record(path / "study.json", "study record"))
            regimes = {row.regime for row in data.rows}
            for row in data.rows:
                for seed, key in zip(row.seeds, row.units):
                    names.setdefault(key, {"arm": row.arm, "regime": row.regime, "seed": seed, "regimes": len(regimes)})
            run.summary = {"units": len(data.units), "rows": len(data.rows)}
        except (TeachxError, OSError, KeyError, TypeError) as exc:
            run.summary = {"error": f"study.json unreadable: {exc}"}
    units = sorted((path / "units").iterdir()) if (path / "units").is_dir() else []
    if any(d.is_dir() and d.name not in names for d in units) and (path / "study.yaml").is_file():
        try:  # an unfinished study (or units of a newer spec): name them from the recorded spec
            spec = load_study_dir(path)
            for key, where in unit_names(spec).items():
                names.setdefault(key, {**where, "regimes": len(spec.regimes)})
        except (TeachxError, OSError, ValueError, KeyError, TypeError):
            pass  # units keep their keys as names
    for d in units:
        if not d.is_dir():
            continue
        key = d.name
        entry = ModelEntry(f"{rid}.{_slug(key)}", rid, key, key, "classifier", "unit", {})
        try:
            unit = UnitFile.from_dict(_record(d / "unit.json", "study unit record"))
            entry.config = unit.config
            # a method unit holds its method's model (a classifier for rrr, saliency_guided, reldrop, baseline)
            method = recorded_config_method(entry.config) if unit.kind != "classifier" else None
            entry.kind = method.checkpoint_kind if method else "classifier"
        except (TeachxError, OSError) as exc:
            entry.error = str(exc)
            run.models.append(entry)
            continue
        where = names.get(key)
        if where:
            entry.role = where["arm"]
            entry.info = {"arm": where["arm"], "regime": where["regime"], "seed": where["seed"]}
            entry.label = f"{where['arm']} seed {where['seed']}" + (
                f" ({where['regime']})" if where["regimes"] > 1 else ""
            )
        else:
            entry.role = "teacher" if entry.kind == "classifier" else "impactx"
            entry.label = f"{'classifier' if entry.kind == 'classifier' else 'IMPACTX'} unit {key}"
        if method is not None:
            entry.info.update(method.model_info(entry.config))
        entry.shortcut = _unit_shortcut(d)
        if unit.kind == "revision":  # a correction of a baseline (study.revise): its fine-tuned model, if it has one
            entry.shortcut = _revision_shortcut(d)
            if not (d / "model").is_dir():
                entry.error = (
                    "a post-hoc correction (a hook on its baseline's layer, no weights of its own): its accuracy per "
                    "test split and its measures along the concept are in the study's report"
                )
                run.models.append(entry)
                continue
            d = d / "model"
        _fill_from_stage(entry, d)
        run.models.append(entry)
    run.models.sort(
        key=lambda m: (
            m.info.get("regime", ""),
            m.role != BASELINE,
            m.info.get("arm", m.role),
            m.info.get("seed", 0),
            m.name,
        )
    )
    return run
