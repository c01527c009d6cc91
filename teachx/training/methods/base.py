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
over the training set) and the trained teacher model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from teachx.config.loader import to_dict
from teachx.config.schema import ImpactxConfig, MethodConfig, RunConfig, add_hook
from teachx.errors import ConfigError
from teachx.models import build_model
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
            raise ConfigError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}{suggest(str(value), [str(c) for c in self.choices])}")
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

    def __init__(self, cfg: "RunConfig"):
        self.cfg = cfg
        self.opts: dict[str, Any] = self.resolve_options(cfg.method.options)

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults plus ``given``, each checked; an option of another method is named as such."""
        out = {k: o.default for k, o in cls.options.items()}
        for key, value in (given or {}).items():
            if key not in cls.options:
                raise ConfigError(unknown_option_message(cls.name, str(key)))
            out[key] = cls.options[key].check(f"method.options.{key}", value)
        cls.check_combination(out)
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
        return (f"method {self.name} needs artefact masks, and '{dataset}' has none; use a shortcut dataset "
                "(data.shortcut=swatch, or data.name=decoy-fashion-mnist)")

    # -- what is trained -------------------------------------------------------------------
    def build_model(self, ctx: MethodContext) -> nn.Module:
        """The model to train (random init from torch's global generator); default: the backbone."""
        ds = ctx.plan.dataset
        return build_model(self.cfg.model.backbone, ds.channels, ds.num_classes, ds.image_size, **self.cfg.model.options)

    def task(self, model: nn.Module, ctx: MethodContext) -> "Task":
        raise NotImplementedError

    def epoch_hook(self, task: "Task", ctx: MethodContext, out_dir: Path) -> Optional[Callable[[int], None]]:
        """Called at the start of every epoch (e.g. IMPACTX's self-teaching); default: none."""
        return None

    def describe(self) -> str:
        """How the run log names this training."""
        opts = ", ".join(f"{k}={v}" for k, v in self.opts.items())
        return f"{self.name}" + (f" ({opts})" if opts else "")

    def training_loss(self) -> str:
        """The training loss in a figure's words, so a loss curve says what it plots."""
        return self.loss_text

    def trains_builtin_map(self) -> bool:
        """Whether the trained model's own map is worth evaluating (map quality needs the teacher's
        maps then); default: whether the model has one."""
        return self.builtin_map

    def record(self) -> dict[str, Any]:
        """What the stage record and results.json keep about the method."""
        return {"method": self.name, "method_options": dict(self.opts)}


METHODS: Registry[type[TrainingMethod]] = Registry("training method")


def unknown_option_message(method: str, key: str) -> str:
    """'method.options.K' is not an option of METHOD -- naming the method that has it, if any."""
    owners = [n for n in METHODS.names() if key in METHODS.get(n).options and n != method]
    own = list(METHODS.get(method).options) if method in METHODS else []
    if method == "impactx":
        return (f"method.options.{key}: method impactx takes its options from the impactx.* keys (impactx.lam, impactx.maps, ...); "
                "method.options is for the other methods" + (f" ({key} is an option of {' / '.join(owners)})" if owners else ""))
    if owners:
        return (f"method.options.{key} is an option of method {' / '.join(owners)}, not of '{method}'; remove it "
                f"or set method.name={owners[0]} (options of {method}: {', '.join(own) or 'none'})")
    return f"unknown option method.options.{key} of method '{method}'{suggest(key, own)}; its options: {', '.join(own) or 'none'}"


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
    """The ``method.validate`` hook of the config: method.name is registered, method.options are its options."""
    try:
        name = METHODS.canonical(method.name)
    except ConfigError as exc:
        raise ConfigError(f"method.name: {exc}") from None
    METHODS.get(name).resolve_options(method.options)


def _check_config_impactx_keys(cfg: RunConfig) -> None:
    """The ``run.validate`` hook of the config: impactx.* options belong to method impactx: set with another
    method they would be ignored."""
    name = METHODS.canonical(cfg.method.name)
    if name == "impactx":
        return
    changed = [k for k, v in to_dict(cfg.impactx).items() if v != getattr(ImpactxConfig(), k)]
    if changed:
        raise ConfigError(f"impactx.{changed[0]} is an option of method impactx, not of '{name}'; remove it "
                          f"(or set method.name=impactx); {name}'s options go under method.options")


add_hook("method.validate", _check_config_method)
add_hook("run.validate", _check_config_impactx_keys)


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
