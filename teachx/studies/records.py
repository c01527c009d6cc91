"""The records a study writes, typed: the unit file (``units/<key>/unit.json``), a unit's record and a row of
``study.json``, and the study record around them.

The runner writes them and the readers (the report, ``scripts/study_table.py``, the ``teachx serve`` catalog)
read them through these classes, so the JSON has one definition. ``to_dict`` gives exactly the JSON teachx
writes (keys, their order, values); ``from_dict`` reads it back, and reads records of older teachx too (keys
they lack take their defaults). A training method adds its own keys to a unit's record and to its rows
(``unit_record`` and ``study_row``, e.g. IMPACTX's ``lam`` and ``maps``): they stay a mapping, in their place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

BASELINE = "baseline"  # the arm name of a regime's baseline row (teachx.studies.spec re-uses it)


@dataclass
class UnitFile:
    """``units/<key>/unit.json``: what a unit is, written when it is first met (before anything is trained)."""

    key: str
    kind: str  # "classifier", else the method's unit kind ("impactx", "method")
    config: dict[str, Any]  # the unit's resolved run config

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitFile":
        return cls(str(data.get("key", "")), str(data.get("kind", "")), dict(data.get("config") or {}))


#: the keys of a unit record with a field of their own (the rest are the method's or the evaluation's)
_UNIT_KEYS = (
    "kind",
    "backbone",
    "seed",
    "teacher",
    "baseline_unit",
    "teacher_unit",
    "test_acc",
    "val_acc",
    "seconds",
    "seconds_per_epoch",
    "history",
    "shortcut",
    "test_splits",
    "reveal",
    "revision",
)
#: the keys of a method unit's evaluation (study_evaluation), as the runner writes them
_EVAL_KEYS = ("map_quality", "errors", "examples", "faithfulness", "timings", "map_store")


@dataclass
class UnitRecord:
    """One unit's entry in ``study.json``'s ``units``: a classifier unit (a baseline or teacher model) or a unit
    of an arm's training method, with its accuracy, timings and (method units) its evaluation."""

    kind: str
    seed: int
    test_acc: float
    val_acc: Optional[float] = None
    seconds: Optional[float] = None
    seconds_per_epoch: Optional[float] = None
    history: list[Any] = field(default_factory=list)
    backbone: Optional[str] = None  # a classifier unit's
    method_fields: dict[str, Any] = field(default_factory=dict)  # a method unit's: the method's unit_record
    teacher: Optional[str] = None  # a method unit's teacher method, its baseline and teacher model units
    baseline_unit: Optional[str] = None
    teacher_unit: Optional[str] = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # map_quality, examples, faithfulness, errors, ...
    shortcut: Optional[dict[str, Any]] = None  # on a shortcut dataset: attribution shares on the artefact
    test_splits: Optional[dict[str, dict[str, Any]]] = None  # on an artefact benchmark: clean / attacked / ch
    reveal: Optional[dict[str, Any]] = None  # a classifier unit's unannotated reveal, scored (study.eval.reveal)
    # a correction unit's (study.revise): the concept, its before and after measures (teachx.runs.revise.Revision)
    revision: Optional[dict[str, Any]] = None

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    @property
    def map_quality(self) -> Optional[dict[str, Any]]:
        return self.evaluation.get("map_quality")

    @property
    def faithfulness(self) -> Optional[dict[str, Any]]:
        return self.evaluation.get("faithfulness")

    @property
    def errors(self) -> list[str]:
        return list(self.evaluation.get("errors") or [])

    @property
    def examples(self) -> Optional[dict[str, Any]]:
        return self.evaluation.get("examples")

    @property
    def timings(self) -> Optional[dict[str, Any]]:
        return self.evaluation.get("timings")

    def to_dict(self) -> dict[str, Any]:
        tail = {
            "test_acc": self.test_acc,
            "val_acc": self.val_acc,
            "seconds": self.seconds,
            "seconds_per_epoch": self.seconds_per_epoch,
            "history": self.history,
        }
        if self.is_classifier:
            out = {"kind": self.kind, "backbone": self.backbone, "seed": self.seed, **tail}
        else:
            out = {
                "kind": self.kind,
                **self.method_fields,
                "seed": self.seed,
                "teacher": self.teacher,
                "baseline_unit": self.baseline_unit,
                "teacher_unit": self.teacher_unit,
                **tail,
                **self.evaluation,
            }
        for key in ("shortcut", "test_splits", "reveal", "revision"):  # only where measured: others stay as they were
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitRecord":
        method_fields: dict[str, Any] = {}
        evaluation: dict[str, Any] = {}
        after_history = False
        for key, value in data.items():  # the keys of neither kind go where they stand: before seed, after history
            if key == "history":
                after_history = True
            elif key not in _UNIT_KEYS:
                (evaluation if after_history or key in _EVAL_KEYS else method_fields)[key] = value
        return cls(
            kind=str(data.get("kind", "")),
            seed=data.get("seed"),
            test_acc=data.get("test_acc"),
            val_acc=data.get("val_acc"),
            seconds=data.get("seconds"),
            seconds_per_epoch=data.get("seconds_per_epoch"),
            history=list(data.get("history") or []),
            backbone=data.get("backbone"),
            method_fields=method_fields,
            teacher=data.get("teacher"),
            baseline_unit=data.get("baseline_unit"),
            teacher_unit=data.get("teacher_unit"),
            evaluation=evaluation,
            shortcut=data.get("shortcut"),
            test_splits=data.get("test_splits"),
            reveal=data.get("reveal"),
            revision=data.get("revision"),
        )


#: the keys of a study row with a field of their own (the rest are the method's study_row)
_ROW_KEYS = (
    "regime",
    "arm",
    "kind",
    "method",
    "overrides",
    "regime_overrides",
    "seeds",
    "units",
    "test_acc",
    "summary",
    "teacher",
    "teacher_backbone",
    "vs_baseline",
    "teacher_test_acc",
    "vs_control",
    "map_quality",
    "faithfulness",
    "shortcut",
    "test_splits",
    "reveal",
    "splits_vs_baseline",
    "gap_recovered",
    "revision",
)


@dataclass
class StudyRow:
    """One (regime, arm) row of ``study.json``: the accuracies over seeds, their summary, the paired comparisons
    with the regime's baseline and the arm's lambda=0 control, and the means of what its units measured."""

    regime: str
    arm: str  # an arm's name, or BASELINE
    kind: Optional[str]  # "classifier" for the baseline row, else the method's unit kind
    method: Optional[str]  # the arm's training method, BASELINE for the baseline row
    overrides: dict[str, Any]
    regime_overrides: dict[str, Any]
    seeds: list[int]
    units: list[str]  # the unit key of each seed
    test_acc: list[float]
    summary: dict[str, Any]  # summarize(test_acc): mean, std, ci_low, ci_high, n
    teacher: Optional[str] = None  # arm rows: the teacher method and the teacher model's backbone
    teacher_backbone: Optional[str] = None
    method_fields: dict[str, Any] = field(default_factory=dict)  # arm rows: the method's study_row
    vs_baseline: Optional[dict[str, Any]] = None  # paired_compare with the baseline (+ p_ttest_holm, baseline)
    teacher_test_acc: Optional[dict[str, Any]] = None  # a teacher model that is not the arm's baseline
    vs_control: Optional[dict[str, Any]] = None  # paired_compare with the lambda=0 control (+ p_ttest_holm, control)
    map_quality: Optional[dict[str, Any]] = None
    faithfulness: Optional[dict[str, Any]] = None
    shortcut: Optional[dict[str, Any]] = None
    # on an artefact benchmark: per test split (clean, attacked, ch) the accuracy summary over seeds
    test_splits: Optional[dict[str, dict[str, Any]]] = None
    # the baseline row with study.eval.reveal: per headline measure of the unannotated reveal, its summary
    reveal: Optional[dict[str, dict[str, Any]]] = None
    # on an artefact benchmark: per test split, paired_compare with the baseline (+ p_ttest_holm over the split's rows)
    splits_vs_baseline: Optional[dict[str, dict[str, Any]]] = None
    # with study.revise.oracle: per test split, (row mean - baseline mean) / (oracle mean - baseline mean)
    gap_recovered: Optional[dict[str, Optional[float]]] = None
    # a correction row (study.revise): its concept and CAV measures before and after, summarised over seeds
    revision: Optional[dict[str, Any]] = None

    @property
    def is_baseline(self) -> bool:
        return self.arm == BASELINE

    @property
    def lam(self) -> Any:
        """IMPACTX's lambda for IMPACTX arms (None for other rows)."""
        return self.method_fields.get("lam")

    @property
    def maps(self) -> Optional[str]:
        """The maps an IMPACTX arm was trained on (None for other rows)."""
        return self.method_fields.get("maps")

    @property
    def honesty(self) -> Optional[dict[str, Any]]:
        """On a shortcut benchmark, the summary over seeds of the built-in map's artefact share divided by the
        same model's gradient share (``teachx.runs.records.ArtefactShares``); None for models without a
        built-in map and off shortcut benchmarks."""
        return (self.shortcut or {}).get("honesty")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "regime": self.regime,
            "arm": self.arm,
            "kind": self.kind,
            "method": self.method,
            "overrides": self.overrides,
            "regime_overrides": self.regime_overrides,
            "seeds": self.seeds,
            "units": self.units,
            "test_acc": self.test_acc,
            "summary": self.summary,
        }
        if not self.is_baseline:
            out.update({"teacher": self.teacher, "teacher_backbone": self.teacher_backbone})
            out.update(self.method_fields)
            out["vs_baseline"] = self.vs_baseline
            for key in ("teacher_test_acc", "vs_control", "map_quality", "faithfulness"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        for key in ("shortcut", "test_splits", "reveal", "splits_vs_baseline", "gap_recovered", "revision"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyRow":
        return cls(
            regime=str(data["regime"]),
            arm=str(data["arm"]),
            kind=data.get("kind"),
            method=data.get("method"),
            overrides=dict(data.get("overrides") or {}),
            regime_overrides=dict(data.get("regime_overrides") or {}),
            seeds=list(data.get("seeds") or []),
            units=list(data.get("units") or []),
            test_acc=list(data.get("test_acc") or []),
            summary=dict(data.get("summary") or {}),
            teacher=data.get("teacher"),
            teacher_backbone=data.get("teacher_backbone"),
            method_fields={k: v for k, v in data.items() if k not in _ROW_KEYS},
            vs_baseline=data.get("vs_baseline"),
            teacher_test_acc=data.get("teacher_test_acc"),
            vs_control=data.get("vs_control"),
            map_quality=data.get("map_quality"),
            faithfulness=data.get("faithfulness"),
            shortcut=data.get("shortcut"),
            test_splits=data.get("test_splits"),
            reveal=data.get("reveal"),
            splits_vs_baseline=data.get("splits_vs_baseline"),
            gap_recovered=data.get("gap_recovered"),
            revision=data.get("revision"),
        )


@dataclass
class StudyRecord:
    """``study.json``: the study as resolved, its rows and verdicts, every unit's record, the timings."""

    version: int
    study: dict[str, Any]  # StudySpec.to_dict()
    base_config: dict[str, Any]
    alpha: float
    rows: list[StudyRow]
    verdicts: list[dict[str, Any]]
    units: dict[str, UnitRecord]
    timings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    trained_this_invocation: Optional[int] = None  # the invocation that wrote the file
    wall_seconds_this_invocation: Optional[float] = None
    elapsed: dict[str, Any] = field(default_factory=dict)  # the whole study's wall time, over all invocations

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": self.version,
            "study": self.study,
            "base_config": self.base_config,
            "alpha": self.alpha,
            "rows": [r.to_dict() for r in self.rows],
            "verdicts": self.verdicts,
            "units": {k: u.to_dict() for k, u in self.units.items()},
            "timings": self.timings,
            "notes": self.notes,
        }
        if self.trained_this_invocation is not None:
            out.update(
                {
                    "trained_this_invocation": self.trained_this_invocation,
                    "wall_seconds_this_invocation": self.wall_seconds_this_invocation,
                    "elapsed": self.elapsed,
                }
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyRecord":
        return cls(
            version=data.get("version", 1),
            study=dict(data.get("study") or {}),
            base_config=dict(data.get("base_config") or {}),
            alpha=data.get("alpha", 0.05),
            rows=[StudyRow.from_dict(r) for r in data.get("rows", [])],
            verdicts=list(data.get("verdicts") or []),
            units={k: UnitRecord.from_dict(u) for k, u in (data.get("units") or {}).items()},
            timings=dict(data.get("timings") or {}),
            notes=list(data.get("notes") or []),
            trained_this_invocation=data.get("trained_this_invocation"),
            wall_seconds_this_invocation=data.get("wall_seconds_this_invocation"),
            elapsed=dict(data.get("elapsed") or {}),
        )
