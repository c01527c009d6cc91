"""The contract every training method follows, parallel to the teachers' (``teachx.teachers.base``).

A training method decides *what* model is trained and *how its loss uses explanations*; the loop
that trains it -- seeding, batching, augmentation, checkpoints without pickle, exact resume, DDP,
progress -- is :class:`teachx.training.trainer.Trainer`, the same for every method. A method is
one file with a :class:`TrainingMethod` subclass decorated ``@METHODS.register("name")``; a run
picks it with ``method.name`` and sets its options under ``method.options`` (declared below as
:class:`Option` s, so that ``teachx methods`` and ``teachx config --describe`` can list them and a
misspelt or foreign option is refused in one line).

What a method may use to set itself up is a :class:`MethodContext`: the resolved run config, the
data plan (images, splits, and the artefact masks of shortcut datasets), the teacher's maps of the
training split (only when ``needs_teacher_maps`` says so: making them costs a pass of the teacher
over the training set), the trained teacher model, and a loader of the run's trained baseline (for
methods that fine-tune it, such as the ClArC corrections).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, get_type_hints

import numpy as np
import torch
from torch import nn

from teachx.config.loader import coerce, from_dict, to_dict
from teachx.config.schema import MethodConfig, RunConfig, add_hook, add_section_alias
from teachx.errors import ConfigError
from teachx.models import backbone_explains_itself, build_model
from teachx.registry import Registry, suggest

if TYPE_CHECKING:  # pragma: no cover
    from teachx.teachers.store import MapStore
    from teachx.training.trainer import DataPlan, Task


@dataclass(frozen=True)
class Option:
    """One option of a method: default, what it does (shown by ``teachx methods``), and a check.

    ``choices`` restricts a string option; ``minimum``/``maximum`` bound a number (inclusive).
    """

    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    def check(self, where: str, value: Any) -> Any:
        """The value, converted to the default's type; a ConfigError line naming ``where`` otherwise."""
        kind = type(self.default)
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif isinstance(self.default, (int, float)) and self.default is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            if kind is int and float(value) != int(value):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            value = kind(value)
            if self.minimum is not None and value < self.minimum:
                raise ConfigError(f"{where} must be >= {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ConfigError(f"{where} must be <= {self.maximum}, got {value}")
        if self.choices and value not in self.choices:
            raise ConfigError(
                f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}{suggest(str(value), [str(c) for c in self.choices])}"
            )
        return value


@dataclass
class MethodContext:
    """What a method may read to build its model and task."""

    cfg: "RunConfig"
    plan: "DataPlan"
    device: torch.device
    train_maps: Optional["MapStore"] = None  # the teacher's maps of the training split (needs_teacher_maps)
    teacher_model: Optional[nn.Module] = None  # the trained teacher (the baseline by default)
    log: Callable[[str], None] = print
    # services of the orchestration that runs the method (teachx.runs.pipeline supplies them), so that a
    # method never reaches up into it: the class each training-split teacher map explains, and a hook that
    # re-explains the training split with the model being trained (``hook(task, out_dir)``)
    explained_classes: Optional[Callable[[], np.ndarray]] = None
    self_teaching: Optional[Callable[[Any, Path], Callable[[int], None]]] = None
    # loads the run's trained baseline: the model that methods which fine-tune an existing model start from
    baseline_model: Optional[Callable[[], nn.Module]] = None

    def train_map_classes(self) -> np.ndarray:
        """The class each training image's teacher map explains: the labels (``teacher.target=label``)
        or, for ``predicted``, what the orchestration's ``explained_classes`` computes from the teacher."""
        if self.explained_classes is not None:
            return self.explained_classes()
        if self.cfg.teacher.target != "predicted":
            return np.asarray(self.plan.dataset.train.labels, dtype=np.int64).copy()
        raise ValueError("teacher.target=predicted needs MethodContext.explained_classes (the teacher's predictions)")


class TrainingMethod:
    """Base class. Subclasses set the class attributes and implement ``task`` (and ``build_model``
    when they train something other than the configured backbone).

    ``checkpoint_kind`` is the ``kind`` written into the method's checkpoints: ``classifier`` for
    methods that train the plain backbone (their models load wherever a classifier does: `teachx
    explain`, `teachx serve`, teacher.checkpoint), else the method's own architecture.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `teachx methods`
    reference: ClassVar[str] = ""  # the paper it follows
    options: ClassVar[dict[str, Option]] = {}
    checkpoint_kind: ClassVar[str] = "classifier"
    #: the model it trains gives its own attribution map (``model.explain(x, target)``), evaluated like IMPACTX's
    builtin_map: ClassVar[bool] = False
    #: the loss it trains on, as a figure's legend names it (every method's validation loss is cross-entropy alone)
    loss_text: ClassVar[str] = "CE"
    #: how figures, reports and the run's summary name its model; default: the method's name
    label: ClassVar[str] = ""
    #: it trains nothing of its own: its model is the run's baseline model (a run's baseline stage, a study's baseline unit)
    reuses_baseline: ClassVar[bool] = False
    #: the ``kind`` of its study units (unit.json, study.json) and the prefix of their keys: the keys of
    #: existing units hash these, so they never change for a method that has units
    unit_kind: ClassVar[str] = "method"
    unit_key_prefix: ClassVar[str] = "m-"
    #: its study units are evaluated beyond accuracy (``eval-<key>.json``: the built-in map's quality against
    #: the teacher's maps, post-hoc maps, example arrays, faithfulness per ``study.eval``)
    study_evaluation: ClassVar[bool] = False
    #: config values, by section, that its options had when study unit keys were first made: a unit's key
    #: hashes the differences from these, so a changed default keeps the keys of existing units
    key_reference: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the dataclass of its options, when they are typed (IMPACTX's): ``method.options`` then states every one of
    #: them (its fields, listed in ``options`` too), checked and resolved by the dataclass's ``validate``
    options_type: ClassVar[Optional[type]] = None
    #: the top-level config section its typed options were once written in (IMPACTX's ``impactx:``), still read as
    #: another spelling of ``method.options``; set with another method, its keys would be ignored, so they are refused
    config_section: ClassVar[str] = ""
    #: its built-in map is trained towards the teacher's maps (by a map loss), so comparing the two means something
    map_follows_teacher: ClassVar[bool] = False
    #: it corrects a run's model along a concept file (``method.options.concept``): a `teachx revise --method` and
    #: ``study.revise.methods`` correction
    corrects_concept: ClassVar[bool] = False
    #: (a correction) it fine-tunes the run's baseline, so `teachx revise` applies the Reveal-to-Revise recipe (a
    #: few epochs at a tenth of the learning rate); otherwise it trains anew with the run's own training settings
    fine_tunes_baseline: ClassVar[bool] = False

    def __init__(self, cfg: "RunConfig"):
        self.cfg = cfg
        self.opts: dict[str, Any] = self.resolve_options(cfg.method.options)

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults plus ``given``, each checked; an option of another method is named as such."""
        typed_keys = {f.name for f in dataclasses.fields(cls.options_type)} if cls.options_type else set()
        out = {k: o.default for k, o in cls.options.items() if k not in typed_keys}
        typed: dict[str, Any] = {}
        for key, value in (given or {}).items():
            if key not in cls.options:
                raise ConfigError(unknown_option_message(cls.name, str(key)))
            if key in typed_keys:
                typed[key] = value
            else:
                out[key] = cls.options[key].check(f"method.options.{key}", value)
        cls.check_combination(out)
        if cls.options_type is not None:  # checked and resolved by the type (its validate)
            out.update(to_dict(from_dict(cls.options_type, typed, "method.options")))
        return out

    @classmethod
    def check_combination(cls, opts: dict[str, Any]) -> None:
        """Checks across options (one ConfigError line); default: none."""

    # -- what the run must provide ---------------------------------------------------------
    def needs_teacher_maps(self) -> bool:
        """Whether the training split's teacher maps must be made before training."""
        return False

    def needs_masks(self) -> bool:
        """Whether the training data must carry artefact masks (a shortcut dataset)."""
        return False

    def check_data(self, plan: "DataPlan") -> None:
        """Refuse data the method cannot train on, in one line (before anything is trained)."""
        if self.needs_masks() and getattr(plan.dataset.train, "masks", None) is None:
            raise ConfigError(self.masks_missing_message(plan.dataset.name))

    def masks_missing_message(self, dataset: str) -> str:
        return (
            f"method {self.name} needs artefact masks, and '{dataset}' has none; use a shortcut dataset "
            "(data.shortcut=swatch, or data.name=decoy-fashion-mnist)"
        )

    # -- what is trained -------------------------------------------------------------------
    def build_model(self, ctx: MethodContext) -> nn.Module:
        """The model to train (random init from torch's global generator); default: the backbone."""
        ds = ctx.plan.dataset
        return build_model(
            self.cfg.model.backbone, ds.channels, ds.num_classes, ds.image_size, **self.cfg.model.options
        )

    def task(self, model: nn.Module, ctx: MethodContext) -> "Task":
        raise NotImplementedError

    def epoch_hook(self, task: "Task", ctx: MethodContext, out_dir: Path) -> Optional[Callable[[int], None]]:
        """Called at the start of every epoch (e.g. IMPACTX's self-teaching); default: none."""
        return None

    def describe(self) -> str:
        """How the run log names this training."""
        opts = ", ".join(f"{k}={v}" for k, v in self.opts.items())
        return f"{self.name}" + (f" ({opts})" if opts else "")

    def arm_text(self) -> str:
        """What a study arm trains, as `teachx study --dry-run` lists it: key=value words without spaces."""
        return "method=" + self.describe().replace(" ", "")

    def training_loss(self) -> str:
        """The training loss in a figure's words, so a loss curve says what it plots."""
        return self.loss_text

    def explains_itself(self) -> bool:
        """Whether the model it trains gives its own attribution map (``forward_all`` / ``explain``): a model of
        its own with a built-in map (``builtin_map``), or the configured backbone, where the method trains that
        (``checkpoint_kind`` classifier) and the backbone explains itself (a B-cos network: its contributions)."""
        return self.builtin_map or (
            self.checkpoint_kind == "classifier" and backbone_explains_itself(self.cfg.model.backbone)
        )

    def trains_builtin_map(self) -> bool:
        """Whether the trained model's own map is worth evaluating (map quality needs the teacher's
        maps then); default: whether the model has one (:meth:`explains_itself`)."""
        return self.explains_itself()

    def study_evaluates(self) -> bool:
        """Whether its study units are evaluated beyond accuracy (``eval-<key>.json``): ``study_evaluation``, or
        a model that explains itself, whose own map is then judged as IMPACTX's and ABN's are (a B-cos arm, even
        one that reuses its baseline)."""
        return self.study_evaluation or self.explains_itself()

    def record(self) -> dict[str, Any]:
        """What the stage record and results.json keep about the method."""
        return {"method": self.name, "method_options": dict(self.opts)}

    @classmethod
    def display_name(cls) -> str:
        """The model's name in figures, reports and summaries (``label``, else the method's name)."""
        return cls.label or cls.name

    def is_control(self) -> bool:
        """Whether this is the method's model trained without the explanation signal: a study's control
        arm, which the other arms are compared with; default: no such setting."""
        return False

    def checkpoint_meta(self) -> dict[str, Any]:
        """What its checkpoints' metadata carry besides kind, method, dataset and class names."""
        return {}

    def results(self, record: dict[str, Any]) -> dict[str, Any]:
        """Keys of results.json of its own besides the common ``method_*`` ones, from the stage record."""
        return {}

    def study_maps(self) -> tuple[str, ...]:
        """The splits whose teacher maps a study unit of it needs (the test split for its evaluation)."""
        if self.study_evaluates():
            return ("train", "test")
        return ("train",) if self.needs_teacher_maps() else ()

    def unit_record(self, stage: dict[str, Any]) -> dict[str, Any]:
        """What a study unit's record says about the method (after ``kind``), from its stage record."""
        return {"method": self.name, "method_options": stage.get("method_options") or dict(self.cfg.method.options)}

    def study_row(self, unit: dict[str, Any]) -> dict[str, Any]:
        """What a row of study.json says about the arm's method, from the record of its first seed's unit."""
        return {"method_options": unit.get("method_options", {})}

    # -- reading what a finished run recorded --------------------------------------------------
    @classmethod
    def model_label(cls, config: dict[str, Any]) -> str:
        """How `teachx serve` names a model of this method, from its run's config (a plain dict)."""
        return cls.display_name()

    @classmethod
    def model_info(cls, config: dict[str, Any]) -> dict[str, Any]:
        """What `teachx serve` shows about a model of this method besides its name, from its run's config."""
        return {}

    @classmethod
    def per_class_maps(cls, config: dict[str, Any]) -> bool:
        """Whether its model makes one built-in map per class, from its run's config (a plain dict)."""
        return False

    @classmethod
    def result_text(cls, results: dict[str, Any]) -> tuple[str, str]:
        """(the model's name, its settings in words) as a run's summary and report show them."""
        return cls.display_name(), ", ".join(f"{k}={v}" for k, v in (results.get("method_options") or {}).items())

    @classmethod
    def result_acc(cls, results: dict[str, Any], split: str) -> Optional[float]:
        """The method model's accuracy on ``split`` (test, val) in a run's results.json."""
        return results.get(f"method_{split}_acc")


METHODS: Registry[type[TrainingMethod]] = Registry("training method")


def unknown_option_message(method: str, key: str) -> str:
    """'method.options.K' is not an option of METHOD -- naming the method that has it, if any."""
    owners = [n for n in METHODS.names() if key in METHODS.get(n).options and n != method]
    own = list(METHODS.get(method).options) if method in METHODS else []
    if method in METHODS and METHODS.get(method).options_type is not None:  # many options: each named in full
        return (
            f"unknown option method.options.{key} of method {method}{suggest(key, own, 'method.options.')}; its "
            f"options: {', '.join(own)} (`teachx methods {method}` describes them)"
            + (f"; {key} is an option of {' / '.join(owners)}" if owners else "")
        )
    if owners:
        return (
            f"method.options.{key} is an option of method {' / '.join(owners)}, not of '{method}'; remove it "
            f"or set method.name={owners[0]} (options of {method}: {', '.join(own) or 'none'})"
        )
    return f"unknown option method.options.{key} of method '{method}'{suggest(key, own)}; its options: {', '.join(own) or 'none'}"


#: the method of records made before ``method.name`` existed (results.json, study units and rows without "method")
LEGACY_METHOD = "impactx"


def recorded_method(record: dict[str, Any]) -> Optional[type[TrainingMethod]]:
    """The method class a results.json, a study unit's record or a row of study.json was made by; None for
    a classifier unit or row that has no method, or for a method this teachx does not know."""
    name, kind = record.get("method"), record.get("kind")
    if name is None and kind is not None:  # a study unit or row: the method whose units are of that kind alone
        owners = [n for n in METHODS.names() if METHODS.get(n).unit_kind == kind]
        name = owners[0] if len(owners) == 1 else None  # none: a classifier (a baseline or teacher model)
        if name is None:
            return None
    return METHODS.get(name or LEGACY_METHOD) if (name or LEGACY_METHOD) in METHODS else None


def method_of_model(kind: str) -> Optional[type[TrainingMethod]]:
    """The method whose checkpoints are of ``kind`` (a model with built-in maps: ``impactx``, ``abn``); None for
    a kind several methods share (``classifier``) or none has. A method that subclasses the kind's owner and
    inherits its kind (``impactx_cleaned``: IMPACTX's model, trained on other maps) leaves it the owner's."""
    owners = [METHODS.get(n) for n in METHODS.names() if METHODS.get(n).checkpoint_kind == kind]
    owners = [m for m in owners if not any(o is not m and issubclass(m, o) for o in owners)]
    return owners[0] if len(owners) == 1 else None


def recorded_config_method(config: dict[str, Any]) -> Optional[type[TrainingMethod]]:
    """The method of a run config saved as a plain dict (config.yaml, a study unit's unit.json); configs made
    before ``method.name`` existed were IMPACTX's; None for a method this teachx does not know."""
    name = (config.get("method") or {}).get("name") or LEGACY_METHOD
    return METHODS.get(name) if name in METHODS else None


def method_name(cfg: "RunConfig") -> str:
    """The canonical name of the configured method; also the name of a run's method-stage directory."""
    return METHODS.canonical(cfg.method.name)


def method_stages() -> tuple[str, ...]:
    """The directories a run's method stage may have: one per method (``baseline`` reuses the baseline stage)."""
    return tuple(n for n in METHODS.names() if n != "baseline")


def build_method(cfg: "RunConfig") -> TrainingMethod:
    """The configured method, its options checked."""
    return METHODS.get(cfg.method.name)(cfg)


def _check_config_method(method: MethodConfig) -> None:
    """The ``method.validate`` hook of the config: method.name is registered, method.options are its options; a
    method with typed options (``options_type``) gets every one of them stated, so written configs show them."""
    try:
        name = METHODS.canonical(method.name)
    except ConfigError as exc:
        raise ConfigError(f"method.name: {exc}") from None
    cls = METHODS.get(name)
    resolved = cls.resolve_options(method.options)
    if cls.options_type is not None:
        typed = {f.name for f in dataclasses.fields(cls.options_type)}
        method.options = {
            **{k: v for k, v in method.options.items() if k not in typed},
            **{k: v for k, v in resolved.items() if k in typed},
        }


def _fold_config_sections(data: dict[str, Any]) -> dict[str, Any]:
    """The ``run.normalize`` hook of the config: a method's options written in the top-level section they once
    lived in (IMPACTX's ``impactx.KEY``, its ``config_section``) are its ``method.options.KEY``. Given both ways
    with two values, an option is refused; given with another method selected, the section's keys must keep their
    defaults (an old run directory's config.yaml states them all), else they would be ignored, so they are refused."""
    for section in dict.fromkeys(METHODS.get(n).config_section for n in METHODS.names()):
        if not section or section not in data:
            continue
        values = data[section]
        data = {k: v for k, v in data.items() if k != section}
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of options, got {values!r}")
        owner = next(n for n in METHODS.names() if METHODS.get(n).config_section == section)
        typed = METHODS.get(owner).options_type
        hints = get_type_hints(typed)
        keys = [f.name for f in dataclasses.fields(typed)]
        for key in values:
            if key not in keys:
                raise ConfigError(
                    f"unknown option '{section}.{key}'{suggest(str(key), keys, section + '.')}; valid options in '{section}': {', '.join(keys)}"
                )
        method = data.get("method", {})
        name = method.get("name", MethodConfig.name) if isinstance(method, dict) else None
        if not isinstance(name, str) or name not in METHODS:
            continue  # from_dict and the method.validate hook name what is wrong with the method
        if METHODS.get(name).config_section != section:
            given, default = from_dict(typed, values, section), typed()
            changed = [k for k in keys if getattr(given, k) != getattr(default, k)]
            name = METHODS.canonical(name)
            if changed:
                raise ConfigError(
                    f"{section}.{changed[0]} is an option of method {owner}, not of '{name}'; remove it "
                    f"(or set method.name={owner}); {name}'s options go under method.options"
                )
            continue
        options = method.get("options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            continue  # from_dict names the method.options that is no mapping
        for key, value in values.items():
            if key in options and options[key] != value:
                raise ConfigError(
                    f"{section}.{key} and method.options.{key} are the same option of method "
                    f"{METHODS.canonical(name)}, set to {value!r} and {options[key]!r}; keep one of them"
                )
        coerced = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
        data["method"] = {**method, "options": {**coerced, **options}}
    return data


def register_section_aliases() -> None:
    """Make each method's ``config_section`` another spelling of its options for the config
    (:func:`teachx.config.schema.add_section_alias`); called once every method is registered."""
    for section in dict.fromkeys(METHODS.get(n).config_section for n in METHODS.names()):
        if not section:
            continue
        owners = [n for n in METHODS.names() if METHODS.get(n).config_section == section]
        typed = METHODS.get(owners[0]).options_type
        names = tuple(a for n in owners for a in (n, *METHODS.aliases(n)))
        add_section_alias(section, tuple(f.name for f in dataclasses.fields(typed)), names)


add_hook("method.validate", _check_config_method)
add_hook("run.normalize", _fold_config_sections)


# -- helpers several methods share ----------------------------------------------------------------


class MethodTask:
    """What the tasks of the methods share: the model, no per-image targets by default, and every
    trainable parameter to the optimizer. Subclasses implement ``loss`` (see trainer.Task)."""

    model: nn.Module

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)


def at_least_float(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) in float32 for losses; float32/float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def raw_model(model: Any) -> nn.Module:
    """The model itself, also while the Trainer runs the task's calls through DDP (where
    ``task.model`` is a view): for passes that must not be synchronised (input gradients, relevance)."""
    return getattr(model, "unwrapped", model)


class IndexedTensor:
    """Rows of a per-image tensor, looked up by dataset index (masks of a shortcut dataset)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.cpu().numpy()
        rows = np.asarray(self.array[idx])
        t = torch.from_numpy(np.ascontiguousarray(rows)).float()
        return t.unsqueeze(1) if t.dim() == 3 else t
