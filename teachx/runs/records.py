"""The records a run writes, typed: a stage's record (``stage.json``) and a run's results (``results.json``
of `teachx run` / `teachx demo`, and of `teachx train`).

They are written and read here alone. ``to_dict()`` gives exactly the JSON teachx always wrote (keys, their
order, values; the digest is added on writing), and ``from_dict()`` reads what any teachx wrote: a field an
older record lacks is None, a key this teachx does not know is kept (in ``head`` / ``extra``) and written
back where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from teachx.errors import CorruptionError
from teachx.evaluation.shortcut import HONESTY_REFERENCE, honesty
from teachx.utils import distributed as dist_utils
from teachx.utils.io import read_trusted_json, write_json_atomic

#: the file of a complete stage, in its stage directory
STAGE_FILE = "stage.json"
#: the file of a complete run, in its run directory
RESULTS_FILE = "results.json"


def _bound(config_hash: Optional[str]) -> dict[str, Any]:
    return {} if config_hash is None else {"config_hash": config_hash}


@dataclass
class StageRecord:
    """A complete training stage: its best checkpoint (relative to the stage directory, so that it moves
    with the run), accuracies, timings and training history.

    ``head``: the keys that come first, which the kind of stage decides (a classifier's ``backbone``; a
    training method's ``method`` / ``method_options`` and its own, ``self_teaching``); ``config_hash``: the
    run's config hash, when the stage is part of a run directory.
    """

    checkpoint: Optional[str] = None
    best_epoch: Optional[int] = None
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    test_loss: Optional[float] = None
    test_confusion: Optional[list[list[int]]] = None  # row = true class, column = predicted
    seconds: Optional[float] = None
    seconds_per_epoch: Optional[float] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    config_hash: Optional[str] = None
    head: dict[str, Any] = field(default_factory=dict)
    # on an artefact benchmark (teachx.data.artefacts): {split: {acc, loss, n, called_poisoned}} for its ch / clean / attacked
    # test splits; written (last) only when there
    test_splits: Optional[dict[str, dict[str, Any]]] = None

    @property
    def backbone(self) -> Optional[str]:
        return self.head.get("backbone")

    def to_dict(self) -> dict[str, Any]:
        skip = ("config_hash", "head", "test_splits")
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        tail = {} if self.test_splits is None else {"test_splits": self.test_splits}
        return {**self.head, **_bound(self.config_hash), **common, **tail}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StageRecord:
        names = {f.name for f in fields(cls)} - {"head"}
        known = {k: v for k, v in record.items() if k in names}
        known["history"] = known.get("history") or []
        return cls(**known, head={k: v for k, v in record.items() if k not in names})

    def write(self, stage_dir: Path) -> None:
        """Write ``stage.json`` with its digest (on the main process): the stage is complete."""
        dist_utils.on_main(write_json_atomic, Path(stage_dir) / STAGE_FILE, self.to_dict(), digest=True)


def read_stage(stage_dir: Path, fix: str) -> Optional[dict[str, Any]]:
    """The record of a complete stage as written (verified against its digest; None: not complete).
    A damaged one is a :class:`CorruptionError` with ``fix`` as the way forward."""
    p = Path(stage_dir) / STAGE_FILE
    if not p.exists():
        return None
    return read_trusted_json(p, fix, "stage record")


#: the data summary's keys at the start of results.json (``teachx.runs.plan.data_summary``)
DATA_KEYS = (
    "dataset",
    "channels",
    "image_size",
    "classes",
    "train_images",
    "val_images",
    "test_images",
    "augmentation",
    "converted",
    "notices",
)


@dataclass
class ArtefactShares:
    """One model's attribution on the artefact of a shortcut benchmark's de-correlated test images
    (``results.json``'s ``shortcut`` block per model, a study unit's ``shortcut.json``).

    ``gradient`` / ``lrp``: the share of the model's |input gradient| / |LRP| of the true class on the
    artefact; ``built_in``: the same for the model's own map (IMPACTX, ABN; None for a model without one);
    ``honesty``: ``built_in`` divided by the same model's ``gradient`` share (1: the built-in map shows the
    artefact as much as the model's own gradient does; well below 1: it hides it); ``area``: the artefact's
    share of the image, what a map blind to it puts there. ``extra``: keys this teachx does not know.
    """

    area: Optional[float] = None
    gradient: Optional[float] = None
    lrp: Optional[float] = None
    built_in: Optional[float] = None
    honesty: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    #: the post-hoc share ``honesty`` divides by
    reference = HONESTY_REFERENCE

    @classmethod
    def measured(cls, post_hoc: dict[str, float], built_in: Optional[float] = None) -> ArtefactShares:
        """From ``artefact_share``'s answer and the built-in map's share: the ratio computed here, once."""
        known = {"area", "gradient", "lrp"}
        out = cls(
            **{k: v for k, v in post_hoc.items() if k in known},
            extra={k: v for k, v in post_hoc.items() if k not in known},
        )
        out.built_in = built_in
        out.honesty = honesty(built_in, post_hoc.get(cls.reference))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON as teachx writes it: the post-hoc shares in the order measured, then the built-in map's
        share and the ratio where the model has a built-in map."""
        out = {k: getattr(self, k) for k in ("gradient", "lrp") if getattr(self, k) is not None}
        out.update(self.extra)
        out["area"] = self.area
        out.update({k: getattr(self, k) for k in ("built_in", "honesty") if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, block: dict[str, Any]) -> ArtefactShares:
        """Read a block back; one written before the ratio was recorded gets it from its two shares."""
        names = ("area", "gradient", "lrp", "built_in", "honesty")
        out = cls(**{k: block.get(k) for k in names}, extra={k: v for k, v in block.items() if k not in names})
        if out.honesty is None:
            out.honesty = honesty(out.built_in, getattr(out, cls.reference))
        return out


def shortcut_shares(shortcut: Optional[dict[str, Any]]) -> dict[str, ArtefactShares]:
    """The models' blocks of a run's ``shortcut`` results (model name -> shares); {} without one."""
    return {
        name: ArtefactShares.from_dict(block)
        for name, block in (shortcut or {}).items()
        if isinstance(block, dict) and "area" in block
    }


@dataclass
class RunResults:
    """A complete run of `teachx run` / `teachx demo`: what it trained on (``data``, the data summary), its
    models' accuracies and timings, map quality and, where measured, the shortcut evaluation and the
    example images of its figure. ``extra``: the method's own keys (``TrainingMethod.results``) and any
    key this teachx does not know."""

    data: dict[str, Any] = field(default_factory=dict)
    class_names: Optional[list[str]] = None
    backbone: Optional[str] = None
    method: Optional[str] = None
    method_options: Optional[dict[str, Any]] = None
    teacher: Optional[str] = None
    teacher_backbone: Optional[str] = None
    teacher_test_acc: Optional[float] = None
    seed: Optional[int] = None
    epochs: Optional[int] = None
    baseline_test_acc: Optional[float] = None
    method_test_acc: Optional[float] = None
    baseline_val_acc: Optional[float] = None
    method_val_acc: Optional[float] = None
    baseline_seconds_per_epoch: Optional[float] = None
    method_seconds_per_epoch: Optional[float] = None
    map_quality: Optional[dict[str, Any]] = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: Optional[float] = None
    device: Optional[str] = None
    torch_threads: Optional[int] = None
    config_hash: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    shortcut: Optional[dict[str, Any]] = None
    examples: Optional[dict[str, Any]] = None
    world_size: Optional[int] = None
    # on an artefact benchmark: {model: {split: {acc, loss, n, called_poisoned}}} for the baseline and the method's model
    test_splits: Optional[dict[str, Any]] = None

    _TAIL = ("shortcut", "examples", "world_size", "test_splits")  # written only when there

    @property
    def artefact_shares(self) -> dict[str, ArtefactShares]:
        """On a shortcut benchmark, each model's attribution on the artefact ({} elsewhere)."""
        return shortcut_shares(self.shortcut)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.data)
        for f in fields(self):
            if f.name in ("data", "config_hash", "extra", *self._TAIL):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(_bound(self.config_hash))
        out.update(self.extra)
        out.update({k: getattr(self, k) for k in self._TAIL if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, results: dict[str, Any]) -> RunResults:
        names = {f.name for f in fields(cls)} - {"data", "extra"}
        return cls(
            data={k: v for k, v in results.items() if k in DATA_KEYS},
            extra={k: v for k, v in results.items() if k not in names and k not in DATA_KEYS},
            **{k: v for k, v in results.items() if k in names},
        )

    def write(self, run_dir: Path) -> None:
        """Write ``results.json`` with its digest (on the main process): the run is complete."""
        dist_utils.on_main(write_json_atomic, Path(run_dir) / RESULTS_FILE, self.to_dict(), digest=True)


@dataclass
class TrainResults:
    """A complete `teachx train` run: what it trained on (``data``, the data summary), its classifier's stage
    record without the training history (which stays in stage.json), and the command's wall time."""

    data: dict[str, Any]
    stage: StageRecord
    wall_seconds: float
    config_hash: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.data)
        out.update((k, v) for k, v in self.stage.to_dict().items() if k != "history")
        out["wall_seconds"] = self.wall_seconds
        out.update(_bound(self.config_hash))  # the stage record carries it already (same place), else last
        return out

    def write(self, run_dir: Path) -> None:
        """Write ``results.json`` with its digest (on the main process): the run is complete."""
        dist_utils.on_main(write_json_atomic, Path(run_dir) / RESULTS_FILE, self.to_dict(), digest=True)


def read_results(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's results.json as written, when it is there and readable (else None: evaluate again)."""
    try:
        return read_trusted_json(Path(run_dir) / RESULTS_FILE, "", "results")
    except (OSError, CorruptionError):
        return None
