"""Studies: one base config, several seeds, named arms (ablations) and data regimes, with statistics.

A study YAML is a normal run config plus a top-level ``study:`` section::

    study:
      seeds: [0, 1, 2, 3, 4]        # or n_seeds: 5 (seeds 0..4)
      arms:                         # name -> overrides of the base config (dotted keys)
        impactx: {}
        lambda0: {impactx.lam: 0}
        shuffled: {impactx.maps: shuffled}
      regimes:                      # optional; each applied on top of every arm, each its own baseline
        - {data.train_size: 1000}
        - {name: full}              # a list of override dicts (``name`` optional) or a mapping name -> overrides
      control: lambda0              # optional; default: the arm with impactx.lam == 0
      controls: {impactx_noaug: lambda0_noaug}  # optional; an arm's own lambda=0 control (default: control)
      arm_regimes: {self_teach: [1k]}  # optional; run an (expensive) arm only in these regimes (default: all)
      eval: {faithfulness: false, n_images: 256, steps: 16, examples: 6}

Every (regime, arm, seed) is a *unit of work*; work is shared wherever the result is the same:
a classifier (the baseline, or a stronger teacher model) is keyed by a hash of what changes it
(data, backbone, train, seed) and trained once for all arms that need it; teacher maps are shared
by the map store. Units live in ``OUT/units/<key>/`` and write their records atomically, so a
re-run skips what is complete. ``OUT/study.json`` holds every number; the statistics compare
every arm with its regime's baseline and every IMPACTX arm with the lambda=0 control, paired by seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.loader import dump_yaml, from_dict, load_yaml, merge, parse_override, set_dotted
from teachx.config.schema import NEUTRAL_KEYS, RunConfig
from teachx.config.shipped import find_config
from teachx.data import get_source
from teachx.data.transforms import normalize
from teachx.errors import ConfigError
from teachx.evaluation import build_metric, evaluate_maps
from teachx.evaluation.stats import holm, paired_compare, summarize, verdict
from teachx.registry import suggest
from teachx.runs import rundir
from teachx.runs.evaluation import map_quality, shortcut_evaluation
from teachx.runs.pipeline import train_method_stage
from teachx.runs.plan import eval_indices, make_plan, teacher_training
from teachx.runs.recovery import stage_checkpoint, stage_done
from teachx.runs.stages import load_classifier, load_stage_model, train_classifier
from teachx.runs.teacher import as_nchw, make_teacher, teacher_maps
from teachx.runs.resolve import check_names
from teachx.teachers.postprocess import postprocess
from teachx.training.methods import METHODS, build_method, method_name, recorded_method
from teachx.utils.hashing import hash_json
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic
from teachx.utils.locking import Busy, file_lock
from teachx.utils.seeding import choose_device

BASELINE = "baseline"
STUDY_VERSION = 2  # 2: keys hash non-default values only
#: config keys that never change a result (display and logging only)
_NEUTRAL = NEUTRAL_KEYS


@dataclass
class EvalSpec:
    """What is measured per IMPACTX unit besides accuracy (map quality is always measured)."""

    faithfulness: bool = False  # MoRF/LeRF AUCs of built-in, post-hoc teacher, teacher-on-baseline and random maps
    n_images: int = 256  # test images (seeded, stratified-ish) for faithfulness and the post-hoc maps
    steps: int = 16  # pixel-flipping steps
    patch_size: int = 1  # side of the square patches flipped together (1: single pixels)
    examples: int = 6  # images kept per unit for the report's example grids

    def validate(self) -> None:
        if self.n_images < 1 or self.steps < 1 or self.examples < 0:
            raise ConfigError("study.eval: n_images and steps must be >= 1 and examples >= 0")


@dataclass
class StudySpec:
    base: dict[str, Any]  # the run config (without ``study``), as a plain dict
    seeds: list[int]
    arms: dict[str, dict[str, Any]]  # name -> dotted overrides
    regimes: dict[str, dict[str, Any]]  # name -> dotted overrides ({"all": {}} when none given)
    control: Optional[str] = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    alpha: float = 0.05
    source: Optional[str] = None
    arm_regimes: dict[str, list[str]] = field(default_factory=dict)  # arm -> the only regimes it runs in
    controls: dict[str, str] = field(default_factory=dict)  # arm -> its own lambda=0 control (default: control)

    def control_of(self, arm: str) -> Optional[str]:
        """The lambda=0 arm ``arm`` is compared with: its own (``study.controls``), else the study's."""
        return self.controls.get(arm, self.control)

    def runs(self, regime: str, arm: Optional[str]) -> bool:
        """Whether the unit exists: baselines run in every regime, an arm where arm_regimes allows."""
        return arm is None or arm == BASELINE or regime in self.arm_regimes.get(arm, self.regimes)

    def config(self, regime: str, arm: Optional[str], seed: int) -> RunConfig:
        """The resolved RunConfig of one unit: base <- arm <- regime, with the seed."""
        data = _deep(self.base)
        for key, value in (self.arms[arm] if arm else {}).items():
            set_dotted(data, key, value)
        for key, value in self.regimes[regime].items():
            set_dotted(data, key, value)
        data["seed"] = int(seed)
        where = f"study arm '{arm}', regime '{regime}'" if arm else f"study regime '{regime}'"
        try:
            cfg = from_dict(RunConfig, data)
            check_names(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cfg

    def section(self) -> dict[str, Any]:
        """The ``study:`` section as resolved: every key of :data:`STUDY_KEYS` with its default filled in
        (seeds for n_seeds), in their order; read back as a config it gives this study again."""
        values = {
            "seeds": self.seeds,
            "arms": self.arms,
            "regimes": self.regimes,
            "control": self.control,
            "controls": self.controls,
            "eval": asdict(self.eval),
            "alpha": self.alpha,
            "arm_regimes": self.arm_regimes,
        }
        return {key: _deep(values[key]) for key in STUDY_KEYS if key in values}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "seeds": self.seeds,
            "arms": self.arms,
            "regimes": self.regimes,
            "control": self.control,
            "eval": asdict(self.eval),
            "alpha": self.alpha,
            "source": self.source,
            "arm_regimes": self.arm_regimes,
        }
        if self.controls:  # only where set: the records of studies without it stay as they were
            out["controls"] = self.controls
        return out


def _deep(d: Any) -> Any:
    return json.loads(json.dumps(d))


def _dict_options() -> set[str]:
    """Dotted names of the config's dict-valued options, e.g. 'model.options', 'teacher.training'."""
    import dataclasses
    from typing import get_origin, get_type_hints

    out = set()
    for section, section_type in get_type_hints(RunConfig).items():
        if dataclasses.is_dataclass(section_type):
            out.update(
                f"{section}.{name}" for name, hint in get_type_hints(section_type).items() if get_origin(hint) is dict
            )
    return out


_DICT_OPTIONS = _dict_options()


def _flatten(overrides: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """{impactx: {lam: 0}} and {impactx.lam: 0} both -> {"impactx.lam": 0}."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of overrides like {{impactx.lam: 0}}, got {overrides!r}")
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        # dict-valued options (model.options, teacher.training...) are values, not sections to flatten
        if isinstance(v, dict) and v and key not in _DICT_OPTIONS:
            out.update(_flatten(v, where, key + "."))
        else:
            out[key] = v
    return out


def _regime_name(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "all"
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


#: the keys of a study config's ``study:`` section, with their one-line descriptions (``teachx config --describe``)
STUDY_KEYS: dict[str, str] = {
    "seeds": "explicit list of seeds, e.g. [0, 1, 2]; each unit runs once per seed (default: 0..n_seeds-1)",
    "n_seeds": "number of seeds 0..N-1 when seeds is not given (default 1; --seeds N overrides both)",
    "arms": "name -> overrides of the base config, one IMPACTX variant each, e.g. {impactx: {}, lambda0: {impactx.lam: 0}}",
    "regimes": "data or training regimes applied on top of every arm, each with its own baseline: a list of overrides or name -> overrides",
    "control": "the arm every other arm is compared with (default: the arm with impactx.lam: 0)",
    "controls": "arm -> its own lambda=0 control instead of study.control, e.g. {impactx_noaug: lambda0_noaug} for arms trained on other data",
    "eval": "what is measured per IMPACTX unit besides accuracy: the study.eval.* keys",
    "alpha": "significance level of the paired tests (Holm-adjusted over all control comparisons; default 0.05)",
    "arm_regimes": "arm -> the only regimes it runs in (default: all), e.g. {self_teach: [1k]} for an expensive arm",
}
_STUDY_KEYS = tuple(STUDY_KEYS)


def load_study(path: str, overrides: Optional[list[str]] = None, n_seeds: Optional[int] = None) -> StudySpec:
    """Read a study YAML; ``overrides`` are KEY=VALUE (``study.*`` keys change the study section)."""
    return _study_from_raw(
        load_yaml(find_config(path)), str(path), overrides, n_seeds
    )  # a file, or a shipped config's name


def load_study_dir(study_dir: str | Path) -> StudySpec:
    """The spec a study directory records in its study.yaml (as teachx wrote it: ``source`` names the file the
    study was started from and is dropped); raises ConfigError when the file is not a readable study."""
    path = Path(study_dir) / "study.yaml"
    raw = load_yaml(path)
    if isinstance(raw.get("study"), dict):
        raw["study"] = {k: v for k, v in raw["study"].items() if k != "source"}
    return _study_from_raw(raw, str(path))


def _study_from_raw(
    raw: dict[str, Any], path: str, overrides: Optional[list[str]] = None, n_seeds: Optional[int] = None
) -> StudySpec:
    if "study" not in raw or not isinstance(raw["study"], dict):
        raise ConfigError(
            f"'{path}' has no 'study:' section; add study: {{n_seeds: 5, arms: {{impactx: {{}}, lambda0: {{impactx.lam: 0}}}}}}"
        )
    section = dict(raw.pop("study"))
    base: dict[str, Any] = raw
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys[0] == "study":
            if len(keys) < 2:
                raise ConfigError(f"override '{text}': name a key of the study section, e.g. study.n_seeds=3")
            node = section
            for part in keys[1:-1]:
                node = node.setdefault(part, {})
            node[keys[-1]] = value
        else:
            set_dotted(base, ".".join(keys), value)
    for key in section:
        if key not in _STUDY_KEYS:
            raise ConfigError(
                f"unknown option 'study.{key}'{suggest(str(key), list(_STUDY_KEYS), 'study.')}; valid options in 'study': {', '.join(_STUDY_KEYS)}"
            )
    # seeds
    if n_seeds is not None:
        seeds = list(range(int(n_seeds)))
    elif section.get("seeds") is not None:
        seeds = section["seeds"]
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"study.seeds must be a list of integers, got {seeds!r}")
    else:
        seeds = list(range(int(section.get("n_seeds", 1))))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"study seeds must be a non-empty list of distinct integers, got {seeds}; set study.n_seeds or --seeds"
        )
    # arms
    arms_raw = section.get("arms") or {"impactx": {}}
    if not isinstance(arms_raw, dict):
        raise ConfigError(
            "study.arms must be a mapping name -> overrides, e.g. {impactx: {}, lambda0: {impactx.lam: 0}}"
        )
    arms = {str(name): _flatten(ov, f"study.arms.{name}") for name, ov in arms_raw.items()}
    if BASELINE in arms:
        raise ConfigError(
            f"study arm name '{BASELINE}' is reserved (every regime has its own baseline); rename the arm"
        )
    # regimes
    regimes_raw = section.get("regimes")
    regimes: dict[str, dict[str, Any]] = {}
    if regimes_raw is None:
        regimes = {"all": {}}
    elif isinstance(regimes_raw, list):
        for i, item in enumerate(regimes_raw):
            item = dict(item or {})
            name = str(item.pop("name", "")) or None
            ov = _flatten(item, f"study.regimes[{i}]")
            regimes[name or _regime_name(ov)] = ov
    elif isinstance(regimes_raw, dict):
        regimes = {str(k): _flatten(v, f"study.regimes.{k}") for k, v in regimes_raw.items()}
    else:
        raise ConfigError("study.regimes must be a list of override mappings or a mapping name -> overrides")
    if not regimes:
        raise ConfigError("study.regimes is empty; leave it out for a single regime")
    ev = from_dict(EvalSpec, section.get("eval") or {}, "study.eval")
    spec = StudySpec(
        base,
        [int(s) for s in seeds],
        arms,
        regimes,
        section.get("control"),
        ev,
        float(section.get("alpha", 0.05)),
        str(path),
        _arm_regimes(section.get("arm_regimes"), arms, regimes),
        _controls(section.get("controls"), arms),
    )
    # resolve every config now: a typo fails before anything is trained
    first_regime = next(iter(regimes))
    for regime in regimes:
        spec.config(regime, None, seeds[0])
        for arm in arms:
            if spec.config(regime, arm, seeds[0]).teacher.checkpoint:
                raise ConfigError(
                    f"study arm '{arm}': teacher.checkpoint is not supported in studies (one fixed model for every seed); use teacher.backbone"
                )

    def lambda0(arm: str) -> bool:  # an arm without the explanation signal (IMPACTX with impactx.lam: 0)
        return build_method(spec.config(first_regime, arm, seeds[0])).is_control()

    if spec.control is None:
        spec.control = next((a for a in arms if lambda0(a)), None)
    elif spec.control not in arms:
        raise ConfigError(
            f"study.control '{spec.control}' is not an arm{suggest(spec.control, list(arms))}; arms: {', '.join(arms)}"
        )
    elif not lambda0(spec.control):
        raise ConfigError(
            f"study.control '{spec.control}' must have impactx.lam: 0 (the same model without the explanation signal)"
        )
    for arm, control in spec.controls.items():
        if not lambda0(control):
            raise ConfigError(
                f"study.controls.{arm}: '{control}' must be an IMPACTX arm with impactx.lam: 0 (the same model without the explanation signal)"
            )
    for arm in arms:
        control = spec.control_of(arm)
        missing = [g for g in regimes if control and spec.runs(g, arm) and not spec.runs(g, control)]
        if missing:
            raise ConfigError(
                f"study.arm_regimes: arm '{arm}' runs in regime(s) {', '.join(missing)} where its control "
                f"'{control}' does not; run the control wherever the other arms run"
            )
    return spec


def _controls(raw: Any, arms: dict[str, Any]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"study.controls must map arm names to their lambda=0 control arms, e.g. {{impactx_noaug: lambda0_noaug}}; got {raw!r}"
        )
    for arm, control in raw.items():
        for name, what in ((arm, "an arm"), (control, "a control arm")):
            if str(name) not in arms:
                raise ConfigError(
                    f"study.controls: '{name}' is not {what}{suggest(str(name), list(arms))}; arms: {', '.join(arms)}"
                )
        if str(arm) == str(control):
            raise ConfigError(f"study.controls.{arm}: an arm cannot be its own control; remove the entry")
    return {str(a): str(c) for a, c in raw.items()}


def _arm_regimes(raw: Any, arms: dict[str, Any], regimes: dict[str, Any]) -> dict[str, list[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"study.arm_regimes must map arm names to lists of regime names, e.g. {{self_teach: [1k, 5k]}}; got {raw!r}"
        )
    out: dict[str, list[str]] = {}
    for arm, names in raw.items():
        if arm not in arms:
            raise ConfigError(
                f"study.arm_regimes: '{arm}' is not an arm{suggest(str(arm), list(arms))}; arms: {', '.join(arms)}"
            )
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names:
            raise ConfigError(f"study.arm_regimes.{arm} must be a non-empty list of regime names, got {names!r}")
        for name in names:
            if str(name) not in regimes:
                raise ConfigError(
                    f"study.arm_regimes.{arm}: '{name}' is not a regime{suggest(str(name), list(regimes))}; regimes: {', '.join(regimes)}"
                )
        out[str(arm)] = [str(n) for n in names]
    return out


# -- unit keys ----------------------------------------------------------------------------------


def _relevant(cfg: RunConfig) -> dict[str, Any]:
    """The config as it decides a result: only values that differ from the defaults, minus neutral keys.

    Hashing only non-default values keeps every existing unit's key when a new option (with a
    default that keeps the old behaviour) is added; a changed default goes into the method's
    ``key_reference`` at its old value (or needs a STUDY_VERSION bump), so a unit keeps its key (and a
    resumed study its trained units) for the same resolved config whichever default it relied on.
    """
    values = (
        cfg.to_dict()
    )  # other methods' impactx.* are the current defaults (RunConfig.validate): no reference for them
    defaults = merge(RunConfig().to_dict(), METHODS.get(method_name(cfg)).key_reference)
    for section, key in _NEUTRAL:
        values[section].pop(key)
    if values["data"]["hflip"] is None and _source_name(cfg.data.name) == "imagefolder":
        # imagefolder data used to be flipped by default and no longer is: such units hash the value
        # now resolved (the key of an explicit data.hflip=false), so a resumed study never reuses a
        # model trained with the old default (flips), and other datasets keep their keys
        values["data"]["hflip"] = False
    return _non_default(values, defaults)


def _source_name(name: str) -> str:
    return get_source(name)[0].name


def _non_default(values: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        base = defaults.get(k)
        if (
            isinstance(v, dict) and isinstance(base, dict) and f"{prefix}{k}" not in _DICT_OPTIONS
        ):  # sections recurse, option dicts are values
            sub = _non_default(v, base, f"{prefix}{k}.")
            if sub:
                out[k] = sub
        elif k not in defaults or v != base:
            out[k] = v
    return out


def classifier_key(cfg: RunConfig, backbone: str, options: dict[str, Any]) -> str:
    """What changes a trained classifier: data, backbone, training, seed, device."""
    d = _relevant(cfg)
    return (
        "c-"
        + hash_json(
            {
                "v": STUDY_VERSION,
                "kind": "classifier",
                "seed": cfg.seed,
                "device": cfg.device,
                "data": d.get("data", {}),
                "backbone": backbone,
                "options": options,
                "train": d.get("train", {}),
            }
        )[:16]
    )


def unit_key(cfg: RunConfig) -> str:
    """The key of a unit of the configured training method: what changes its result, with the method's
    unit kind and key prefix (IMPACTX units keep the ``x-`` keys they always had, other methods' are ``m-``)."""
    method = METHODS.get(method_name(cfg))
    return (
        method.unit_key_prefix
        + hash_json({"v": STUDY_VERSION, "kind": method.unit_kind, "config": _relevant(cfg)})[:16]
    )


def impactx_key(cfg: RunConfig) -> str:
    """The key of an IMPACTX unit (:func:`unit_key`)."""
    return unit_key(cfg)


def eval_key(cfg: RunConfig, ev: EvalSpec) -> str:
    return hash_json({"v": STUDY_VERSION, "eval": asdict(ev), "teacher": _relevant(cfg).get("teacher", {})})[:12]


@dataclass(frozen=True)
class PlannedUnit:
    """One unit a study makes, as its spec determines it: nothing trained or read."""

    key: str
    kind: str  # "classifier" (a baseline or teacher model), else the method's unit_kind ("impactx" or "method")
    regime: str
    arm: str  # the arm's name, BASELINE, or "teacher" (a teacher model that is no arm's own baseline)
    seed: int
    config: RunConfig  # the config the unit trains with (a teacher's: its own seed / training)

    @property
    def method(self) -> Optional[Any]:
        """The training method class of a method unit; None for a classifier unit."""
        return None if self.kind == "classifier" else METHODS.get(method_name(self.config))


def planned_units(spec: StudySpec) -> list[PlannedUnit]:
    """Every unit of the study once, in the order the runner meets them (per regime and seed: the
    baseline, then the arms, each after its own baseline where its data.* / train.* / model.* differ
    from the regime's, named "ARM baseline"), the teacher models that are no arm's own baseline last.
    The keys are the runner's; viewers and `teachx study --status` name the units of an unfinished
    study with them."""
    units: dict[str, PlannedUnit] = {}
    teachers: dict[str, PlannedUnit] = {}
    for regime in spec.regimes:
        for seed in spec.seeds:
            for arm in [None, *spec.arms]:
                if not spec.runs(regime, arm):
                    continue
                cfg = spec.config(regime, arm, seed)
                base = classifier_key(
                    cfg, cfg.model.backbone, dict(cfg.model.options)
                )  # an arm's: the runner trains it first
                units.setdefault(
                    base, PlannedUnit(base, "classifier", regime, f"{arm} {BASELINE}" if arm else BASELINE, seed, cfg)
                )
                if arm is None:
                    continue
                key = unit_key(cfg)
                units.setdefault(key, PlannedUnit(key, METHODS.get(method_name(cfg)).unit_kind, regime, arm, seed, cfg))
                tcfg, tb, topts = teacher_training(cfg)
                tkey = classifier_key(tcfg, tb, topts)
                teachers.setdefault(tkey, PlannedUnit(tkey, "classifier", regime, "teacher", tcfg.seed, tcfg))
    for key, unit in teachers.items():
        units.setdefault(key, unit)
    return list(units.values())


def unit_names(spec: StudySpec) -> dict[str, dict[str, Any]]:
    """unit key -> {arm, regime, seed} for every unit the study makes (:func:`planned_units`)."""
    return {u.key: {"arm": u.arm, "regime": u.regime, "seed": u.seed} for u in planned_units(spec)}


# -- running --------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    path: Path  # study.json
    data: dict[str, Any]
    trained: int  # models trained by this invocation (0 when everything was complete)


class _Runner:
    def __init__(self, spec: StudySpec, out: Path, log: Callable[[str], None], progress: bool, verbose: bool):
        self.spec, self.out, self.log, self.progress, self.verbose = spec, out, log, progress, verbose
        self.plans: dict[str, Any] = {}
        self.trained = 0
        self.units: dict[str, dict[str, Any]] = {}

    def stage_log(self, msg: str) -> None:
        if self.verbose:
            self.log("    " + msg)

    def plan(self, cfg: RunConfig):
        key = hash_json(cfg.to_dict()["data"])
        if key not in self.plans:
            self.plans[key] = make_plan(cfg, progress=self.progress)
        return self.plans[key]

    def unit_dir(self, key: str, cfg: RunConfig, kind: str) -> Path:
        d = self.out / "units" / key
        if not (d / "unit.json").exists():
            write_json_atomic(d / "unit.json", {"key": key, "kind": kind, "config": cfg.to_dict()})
        return d

    def checkpoint(self, key: str) -> Path:
        """A classifier unit's best checkpoint: always the unit's own file, even if the study folder
        was moved or copied (never the one its record names elsewhere)."""
        return stage_checkpoint(self.out / "units" / key, stage_done(self.out / "units" / key) or {})

    def classifier(self, cfg: RunConfig, backbone: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Train one classifier unit (or read it back); raises Busy while another process trains it."""
        key = classifier_key(cfg, backbone, options)
        d = self.unit_dir(key, cfg, "classifier")
        done = stage_done(d)
        if done is None:
            with file_lock(d / ".lock", wait=False):
                done = stage_done(d)  # another process may have finished it since we looked
                if done is None:
                    self.trained += 1
                    done = train_classifier(cfg, self.plan(cfg), d, backbone, options, self.stage_log)
        self.units[key] = {
            "kind": "classifier",
            "backbone": backbone,
            "seed": cfg.seed,
            "test_acc": done["test_acc"],
            "val_acc": done.get("val_acc"),
            "seconds": done.get("seconds"),
            "seconds_per_epoch": done.get("seconds_per_epoch"),
            "history": done.get("history", []),
        }
        shortcut = self._shortcut(cfg, d, lambda: {"model": self._load_classifier(cfg, key)})
        if shortcut is not None:
            self.units[key]["shortcut"] = shortcut
        return key, done

    def _load_classifier(self, cfg: RunConfig, key: str):
        return load_classifier(self.checkpoint(key), self.plan(cfg).dataset)

    def _shortcut(self, cfg: RunConfig, d: Path, models) -> Optional[dict[str, Any]]:
        """On a shortcut dataset: the unit's attribution share on the artefact (``shortcut.json``, made once)."""
        path = d / "shortcut.json"
        if path.exists():
            return read_trusted_json(
                path, f"delete '{path}' and re-run the same `teachx study` command", "shortcut evaluation"
            )
        if cfg.data.shortcut is None and not _source_name(cfg.data.name).startswith("decoy"):
            return None
        plan = self.plan(cfg)
        if getattr(plan.dataset.test, "masks", None) is None:
            return None
        out = shortcut_evaluation(cfg, plan, models(), choose_device(cfg.device))
        block = out["model"]
        block["images"] = out["images"]
        write_json_atomic(path, block, digest=True)
        return block

    def method(self, cfg: RunConfig, base_key: str, teacher_key: str) -> tuple[str, dict[str, Any], bool]:
        """Train one unit of the arm's training method, and evaluate it where the method asks for it
        (``study_evaluation``), or read it back; returns (key, record, was_cached)."""

        method = build_method(cfg)
        key = unit_key(cfg)
        d = self.unit_dir(key, cfg, method.unit_kind)
        eval_path = d / f"eval-{eval_key(cfg, self.spec.eval)}.json" if method.study_evaluation else None
        if method.reuses_baseline:  # the arm's own baseline is this model: nothing more to train
            (stage, ev), cached = (dict(stage_done(self.out / "units" / base_key) or {}), {}), True
        else:
            found = self._cached(d, eval_path)
            cached = found is not None
            if found is None:
                with file_lock(d / ".lock", wait=False):
                    found = self._cached(d, eval_path)  # another process may have finished it since we looked
                    cached = found is not None
                    if found is None:
                        found = self._train(cfg, method, d, eval_path, base_key, teacher_key)
            stage, ev = found
        self.units[key] = {
            "kind": method.unit_kind,
            **method.unit_record(stage),
            "seed": cfg.seed,
            "teacher": cfg.teacher.method,
            "baseline_unit": base_key,
            "teacher_unit": teacher_key,
            "test_acc": stage["test_acc"],
            "val_acc": stage.get("val_acc"),
            "seconds": stage.get("seconds"),
            "seconds_per_epoch": stage.get("seconds_per_epoch"),
            "history": stage.get("history", []),
            **ev,
        }
        if method.reuses_baseline:  # the classifier unit's own evaluation (made by `classifier`)
            shortcut = self.units[base_key].get("shortcut")
        else:
            shortcut = self._shortcut(cfg, d, lambda: {"model": self._method_model(d)})
        if shortcut is not None:
            self.units[key]["shortcut"] = shortcut
        return key, self.units[key], cached

    @staticmethod
    def _method_model(d: Path):
        return load_stage_model(d)

    @staticmethod
    def _cached(d: Path, eval_path: Optional[Path]) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(stage record, evaluation) of a complete unit: trained, and evaluated where ``eval_path`` is given."""
        stage = stage_done(d)  # verified against its digest, like the evaluation below
        if stage is None:
            return None
        if eval_path is None:
            return stage, {}
        return (stage, read_unit_evaluation(eval_path)) if eval_path.exists() else None

    def _train(
        self, cfg: RunConfig, method, d: Path, eval_path: Optional[Path], base_key: str, teacher_key: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Train the unit with the pipeline's stage code (:func:`train_method_stage`) on the teacher maps the
        method asks for, then evaluate it into ``eval_path`` (when given)."""
        plan = self.plan(cfg)
        ds = plan.dataset
        device = choose_device(cfg.device)
        timings: dict[str, float] = {}
        teacher_model = load_classifier(self.checkpoint(teacher_key), ds)
        t0 = time.perf_counter()
        stores = {
            split: teacher_maps(
                cfg,
                plan,
                teacher_model,
                split,
                plan.train_idx if split == "train" else eval_indices(cfg, plan),
                device,
                self.stage_log,
                self.progress,
                wait=False,
            )
            for split in method.study_maps()
        }
        timings["maps"] = time.perf_counter() - t0
        if stage_done(d) is None:
            self.trained += 1
        t0 = time.perf_counter()
        record, model = train_method_stage(cfg, plan, stores.get("train"), teacher_model, d, self.stage_log)
        timings[method.name] = time.perf_counter() - t0
        if eval_path is None:
            return record, {}
        t0 = time.perf_counter()
        train_store, test_store = stores["train"], stores["test"]
        ev: dict[str, Any] = {
            "map_quality": map_quality(
                model, plan, test_store, train_store, device, cfg=cfg, teacher_model=teacher_model
            )
        }
        baseline = load_classifier(self.checkpoint(base_key), ds)
        ev.update(_evaluate_unit(cfg, self.spec.eval, plan, model, baseline, test_store, device, d))
        timings["evaluation"] = time.perf_counter() - t0
        ev["timings"] = timings
        ev["map_store"] = {"train": str(train_store.path), "test": str(test_store.path)}
        write_json_atomic(eval_path, ev, digest=True)
        return record, ev


def read_unit_evaluation(eval_path: Path) -> dict[str, Any]:
    """An IMPACTX unit's ``eval-<key>.json``, verified against its digest (a damaged one names the fix)."""
    fix = f"delete '{eval_path}' and re-run the same `teachx study` command (it evaluates that unit again)"
    return read_trusted_json(eval_path, fix, "study unit evaluation")


def _eval_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed, class-balanced (round-robin) subset of the test set: the same for every unit."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < min(n, labels.size):
        for pool in per_class:
            if pool and len(out) < n:
                out.append(pool.pop())
    return np.sort(np.array(out, dtype=np.int64))


def _evaluate_unit(
    cfg: RunConfig, ev: EvalSpec, plan, model, baseline, test_store, device, unit_dir: Path
) -> dict[str, Any]:
    """Post-hoc teacher maps on the IMPACTX model, example arrays, optional MoRF/LeRF AUCs."""
    ds = plan.dataset
    out: dict[str, Any] = {}
    n_eval = ev.n_images if ev.faithfulness else ev.examples
    if n_eval == 0:
        return out

    pool = eval_indices(cfg, plan)  # test images whose teacher maps are stored
    idx = pool[_eval_indices(np.asarray(ds.test.labels)[pool], min(n_eval, len(pool)), 2024)]
    x_u8 = as_nchw(ds.test.images[idx])
    x = normalize(x_u8.to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(ds.test.labels[idx])).long().to(device)
    model = model.to(device).eval()
    baseline = baseline.to(device).eval()
    built_in = model.explain(x).float()
    teacher_maps = test_store.read(idx).to(device)
    teacher = make_teacher(cfg, plan, device)

    def explain(m: torch.nn.Module) -> Optional[torch.Tensor]:
        try:
            maps = []
            for s in range(0, len(idx), 64):
                raw = teacher.attribute(m, x[s : s + 64], y[s : s + 64])
                maps.append(
                    postprocess(
                        raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=cfg.teacher.smooth
                    ).detach()
                )
            return torch.cat(maps)
        except Exception as exc:  # an optional diagnostic must not lose hours of training
            out.setdefault("errors", []).append(
                f"{cfg.teacher.method} on {type(m).__name__}: {type(exc).__name__}: {exc}"
            )
            return None

    post_hoc = explain(model)
    if ev.examples:
        k = min(ev.examples, len(idx))
        pick = np.linspace(0, len(idx) - 1, k).round().astype(int)
        arrays = {
            "index": idx[pick],
            "images": x_u8[pick].numpy(),
            "labels": y[pick].cpu().numpy(),
            "teacher": teacher_maps[pick].cpu().numpy(),
            "built_in": built_in[pick].cpu().numpy(),
        }
        if post_hoc is not None:
            arrays["post_hoc"] = post_hoc[pick].cpu().numpy()
        with atomic_path(unit_dir / "examples.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        out["examples"] = {"file": "examples.npz", "class_names": list(ds.class_names)}
    if ev.faithfulness:
        metrics = [_metric("pixel_flipping_morf", ev), _metric("pixel_flipping_lerf", ev)]
        on_impactx = {"built_in": built_in}
        if post_hoc is not None:
            on_impactx["teacher_post_hoc"] = post_hoc
        rep1 = evaluate_maps(model, x, y, on_impactx, metrics, seed=cfg.seed)
        on_base = {"teacher_on_baseline": explain(baseline)}
        on_base = {k: v for k, v in on_base.items() if v is not None}
        faith: dict[str, Any] = {"n_images": int(len(idx)), "sets": {}}
        for name, res in rep1["maps"].items():
            faith["sets"][name if name != "random" else "random"] = _auc_summary(res)
        if on_base:
            rep2 = evaluate_maps(baseline, x, y, on_base, metrics, seed=cfg.seed)
            for name, res in rep2["maps"].items():
                faith["sets"][name if name != "random" else "random_on_baseline"] = _auc_summary(res)
        out["faithfulness"] = faith
    return out


def _metric(name: str, ev: EvalSpec):
    return build_metric(name, steps=ev.steps, patch_size=ev.patch_size)


def _auc_summary(res: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for metric, r in res.items():
        out[metric] = {
            "auc": r.get("mean"),
            "std": r.get("std"),
            "curve": r.get("mean_curve"),
            "curve_x": r.get("curve_x"),
        }
    return out


def prepare_study_dir(out: Path, spec: StudySpec) -> Path:
    """Create OUT, or reuse a study directory.

    Units are keyed by content, so a changed study (more seeds, a new arm) reuses every unit that
    is identical and trains only the rest. A non-empty directory that teachx did not make as a
    study (no ``.teachx-study`` marker; a study of an older teachx is known by its study.yaml) is
    refused: its files -- a study.yaml of the user's own, say -- are never replaced. Another
    process starting on the same directory at the same moment (its marker or study.yaml still a
    temp file) is not a reason to refuse.
    """
    return rundir.prepare_study_dir(Path(out).resolve(), dump_yaml({"study": spec.to_dict(), **spec.base}))


_POLL_SECONDS = 5.0


def _run_job(
    spec: StudySpec,
    r: "_Runner",
    cells: dict[tuple[str, str], dict[int, str]],
    regime: str,
    seed: int,
    arm: Optional[str],
    progress: bool,
) -> str:
    """One unit of work (a baseline when ``arm`` is None); returns its log line."""
    cfg = spec.config(regime, arm, seed)
    cfg.train.progress = progress
    before = r.trained
    t0 = time.perf_counter()
    own_base, brec = r.classifier(cfg, cfg.model.backbone, dict(cfg.model.options))
    if arm is None:
        cells.setdefault((regime, BASELINE), {})[seed] = own_base
        how = f"trained {time.perf_counter() - t0:.1f}s" if r.trained > before else "cached"
        return f"regime={regime} arm={BASELINE} seed={seed} test_acc={brec['test_acc']:.4f} ({how})"
    tcfg, tb, topts = teacher_training(cfg)
    tkey, trec = r.classifier(tcfg, tb, topts)
    key, rec, _cached = r.method(cfg, own_base, tkey)
    cells.setdefault((regime, arm), {})[seed] = key
    how = f"trained {time.perf_counter() - t0:.1f}s" if r.trained > before else "cached"
    extra = ""
    q = rec.get("map_quality")
    if q:
        extra = f" map_corr={q['corr']:.3f}"
    if tkey != own_base:
        extra += f" teacher_acc={trec['test_acc']:.4f}"
    sc = rec.get("shortcut")
    if sc:
        extra += " artefact_share=" + "/".join(f"{m}:{sc[m]:.3f}" for m in ("gradient", "lrp") if m in sc)
    return f"regime={regime} arm={arm} seed={seed} test_acc={rec['test_acc']:.4f}{extra} ({how})"


def run_study(
    spec: StudySpec,
    out: str | Path,
    log: Callable[[str], None] = print,
    progress: bool = False,
    verbose: bool = False,
) -> StudyResult:
    """Run (or resume) every (regime, arm, seed) unit, then write OUT/study.json with the statistics."""
    out = prepare_study_dir(Path(out), spec)
    t_start = time.perf_counter()
    r = _Runner(spec, out, log, progress, verbose)
    cells: dict[tuple[str, str], dict[int, str]] = {}  # (regime, arm) -> seed -> unit key
    # every (regime, seed, arm) in order; arm None is the regime's baseline
    pending: list[tuple[str, int, Optional[str]]] = [
        (regime, seed, arm)
        for regime in spec.regimes
        for seed in spec.seeds
        for arm in [None, *spec.arms]
        if spec.runs(regime, arm)
    ]
    total, done = len(pending), 0
    waiting_for = -1
    while pending:
        deferred = []
        for regime, seed, arm in pending:
            try:
                line = _run_job(spec, r, cells, regime, seed, arm, progress)
            except Busy:  # another process (study worker) holds a unit or a map store this job needs
                deferred.append((regime, seed, arm))
                continue
            done += 1
            log(f"[{done}/{total}] {line}")
            for err in r.units[cells[(regime, arm or BASELINE)][seed]].get("errors", []) or []:
                log(f"    warning: {err}")
        if deferred and len(deferred) == len(pending):
            if waiting_for != len(deferred):
                log(
                    f"waiting for other processes working on this study: {len(deferred)} unit(s) left, all in progress elsewhere"
                )
                waiting_for = len(deferred)
            time.sleep(_POLL_SECONDS)
        pending = deferred
    data = summarize_study(spec, cells, r.units)
    data["trained_this_invocation"] = r.trained
    data["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    data["elapsed"] = _elapsed(out, [k for by_seed in cells.values() for k in by_seed.values()])
    path = out / "study.json"
    write_json_atomic(path, data, digest=True)
    for line in summary_lines(data):
        log(line)
    return StudyResult(path, data, r.trained)


def _elapsed(out: Path, keys: list[str]) -> dict[str, Any]:
    """Wall time of the whole study, over all invocations and processes: from the first unit's
    creation to the last record written (file times, so it includes any pauses between invocations)."""
    from datetime import datetime, timezone

    starts, ends = [], []
    for key in set(keys):
        d = out / "units" / key
        starts.append((d / "unit.json").stat().st_mtime)
        ends.extend(p.stat().st_mtime for p in [d / "stage.json", *d.glob("eval-*.json")] if p.exists())
    if not starts or not ends:
        return {}
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    return {
        "first_unit_created": iso(min(starts)),
        "last_record_written": iso(max(ends)),
        "seconds": max(ends) - min(starts),
    }


# -- statistics -------------------------------------------------------------------------------------


def summarize_study(
    spec: StudySpec, cells: dict[tuple[str, str], dict[int, str]], units: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    seeds = spec.seeds
    for regime in spec.regimes:
        for arm in [BASELINE, *spec.arms]:
            if not spec.runs(regime, arm):
                continue
            keys = cells[(regime, arm)]
            accs = [units[keys[s]]["test_acc"] for s in seeds]
            cfg = spec.config(regime, arm if arm != BASELINE else None, seeds[0])
            trained = build_method(cfg) if arm != BASELINE else None  # the arm's method (the baseline row has none)
            row: dict[str, Any] = {
                "regime": regime,
                "arm": arm,
                "kind": trained.unit_kind if trained else "classifier",
                "method": trained.name if trained else BASELINE,
                "overrides": spec.arms.get(arm, {}),
                "regime_overrides": spec.regimes[regime],
                "seeds": seeds,
                "units": [keys[s] for s in seeds],
                "test_acc": accs,
                "summary": summarize(accs).to_dict(),
            }
            if arm != BASELINE:
                _, tb, _ = teacher_training(cfg)
                row.update({"teacher": cfg.teacher.method, "teacher_backbone": tb})
                row.update(trained.study_row(units[keys[seeds[0]]]))
                base_accs = [units[units[keys[s]]["baseline_unit"]]["test_acc"] for s in seeds]
                row["vs_baseline"] = paired_compare(accs, base_accs).to_dict()
                own = {units[keys[s]]["baseline_unit"] for s in seeds} != {cells[(regime, BASELINE)][s] for s in seeds}
                row["vs_baseline"]["baseline"] = "own (the arm changes data/model/train)" if own else BASELINE
                t_units = [units[keys[s]]["teacher_unit"] for s in seeds]
                if t_units[0] != units[keys[seeds[0]]]["baseline_unit"]:
                    row["teacher_test_acc"] = summarize([units[t]["test_acc"] for t in t_units]).to_dict()
                control = spec.control_of(arm)
                if control and arm != control and not trained.is_control():
                    ckeys = cells[(regime, control)]
                    row["vs_control"] = paired_compare(accs, [units[ckeys[s]]["test_acc"] for s in seeds]).to_dict()
                    row["vs_control"]["control"] = control
                quality = [units[keys[s]].get("map_quality") for s in seeds]
                if all(quality):
                    row["map_quality"] = {
                        m: summarize([q[m] for q in quality]).to_dict()
                        for m in (
                            "corr",
                            "corr_mean_map",
                            "corr_mean_map_augmented",
                            "r2_vs_mean_map",
                            "r2_vs_mean_map_affine",
                        )
                        if all(m in q for q in quality)
                    }  # units evaluated before a measure existed lack it
                    row["map_quality"].update(_builtin_faith_summary([q.get("faithfulness") for q in quality]))
                faith = [units[keys[s]].get("faithfulness") for s in seeds]
                if all(faith):
                    row["faithfulness"] = _faith_summary(faith)
            shortcut = [units[keys[s]].get("shortcut") for s in seeds]
            if all(shortcut):  # the measures every seed has (units made by older teachx may lack the built-in map's)
                common = [
                    m
                    for m in shortcut[0]
                    if m != "images" and all(isinstance(b.get(m), (int, float)) for b in shortcut)
                ]
                row["shortcut"] = {m: summarize([b[m] for b in shortcut]).to_dict() for m in common}
            rows.append(row)
    # Holm over each family (all vs-baseline tests; all vs-control tests)
    for family in ("vs_baseline", "vs_control"):
        members = [row[family] for row in rows if family in row]
        for m, adj in zip(members, holm([m.get("p_ttest") for m in members])):
            m["p_ttest_holm"] = adj
    verdicts = []
    for row in rows:
        if "vs_control" in row:
            c = row["vs_control"]
            ok = c.get("p_ttest") is not None and c["p_ttest"] < spec.alpha and c["mean_diff"] > 0
            text = verdict(c, spec.alpha)
            verdicts.append(
                {
                    "regime": row["regime"],
                    "arm": row["arm"],
                    "control": c["control"],
                    "beats_control": bool(ok),
                    "mean_diff": c["mean_diff"],
                    "ci_low": c.get("ci_low"),
                    "ci_high": c.get("ci_high"),
                    "p_ttest": c.get("p_ttest"),
                    "p_ttest_holm": c.get("p_ttest_holm"),
                    "p_wilcoxon": c.get("p_wilcoxon"),
                    "n": c["n"],
                    "text": f"regime {row['regime']}: {row['arm']} vs {c['control']}: {text}",
                }
            )
    timings = _timings(units)
    return {
        "version": STUDY_VERSION,
        "study": spec.to_dict(),
        "base_config": spec.config(next(iter(spec.regimes)), None, seeds[0]).to_dict(),
        "alpha": spec.alpha,
        "rows": rows,
        "verdicts": verdicts,
        "units": units,
        "timings": timings,
        "notes": [
            "accuracies are test-set accuracies of the best-validation checkpoint; comparisons are paired by seed",
            "p_ttest: paired t-test; p_wilcoxon: Wilcoxon signed-rank (zeros dropped; exact/permutation for small n); "
            "p_ttest_holm: Holm-adjusted within the family (all vs-baseline or all vs-control tests)",
            "with fewer than 6 seeds the Wilcoxon test cannot reach p < 0.05 (smallest p = 2/2^n)",
        ],
    }


def _builtin_faith_summary(blocks: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """map_quality's faithfulness blocks over seeds -> summaries keyed 'corr_self', 'pixel_flipping_morf.built_in', ..."""
    if not blocks or not all(blocks):
        return {}
    flat = []
    for b in blocks:
        f = {k: b[k] for k in ("corr_self", "corr_self_mean_map", "corr_post_hoc_teacher") if b.get(k) is not None}
        for metric, by_set in (b.get("auc") or {}).items():
            f.update({f"{metric}.{name}": v for name, v in by_set.items() if v is not None})
        flat.append(f)
    return {k: summarize([f[k] for f in flat]).to_dict() for k in flat[0] if all(k in f for f in flat)}


def _faith_summary(faith: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for set_name in faith[0]["sets"]:
        if not all(set_name in f["sets"] for f in faith):
            continue
        out[set_name] = {}
        for metric, v in faith[0]["sets"][set_name].items():
            aucs = [f["sets"][set_name][metric]["auc"] for f in faith]
            curves = [f["sets"][set_name][metric]["curve"] for f in faith]
            entry: dict[str, Any] = {
                "auc": summarize([a for a in aucs if a is not None]).to_dict()
                if any(a is not None for a in aucs)
                else None
            }
            if all(curves):
                entry["curve"] = np.nanmean(np.array(curves, dtype=float), axis=0).tolist()
                entry["curve_x"] = v.get("curve_x")
            out[set_name][metric] = entry
    return out


def _timings(units: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def agg(vals: list[float]) -> dict[str, Any]:
        vals = [v for v in vals if v is not None]
        return {"n": len(vals), "total_s": float(sum(vals)), "mean_s": float(np.mean(vals)) if vals else None}

    # per unit kind (the methods' "method", classifiers, and each method's own, e.g. "impactx"), units that trained
    # nothing of their own left out (a method that reuses its baseline: its seconds are the baseline unit's)
    by_kind: dict[str, list[dict[str, Any]]] = {"method": [], "classifier": []}
    for kind in sorted({METHODS.get(n).unit_kind for n in METHODS.names()}):
        by_kind.setdefault(kind, [])
    for u in units.values():
        method = recorded_method(u)
        if method is None or not method.reuses_baseline:
            by_kind.setdefault(u["kind"], []).append(u)
    out: dict[str, Any] = {}
    for kind, members in by_kind.items():
        out[f"{kind}_training"] = agg([u.get("seconds") for u in members])
        out[f"{kind}_seconds_per_epoch"] = agg([u.get("seconds_per_epoch") for u in members])
    evaluated = [
        u for u in units.values() if u.get("timings")
    ]  # the units evaluated beyond accuracy (study_evaluation)
    out["teacher_maps"] = agg([u["timings"].get("maps") for u in evaluated])
    out["evaluation"] = agg([u["timings"].get("evaluation") for u in evaluated])
    return out


def _fmt(x: Optional[float], nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _fp(p: Optional[float]) -> str:
    return "n/a" if p is None else (f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}")


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The end-of-study table: accuracy per (regime, arm) with the paired comparisons."""
    head = f"{'regime':<14} {'arm':<16} {'n':>2} {'test acc mean+-std':>20} {'95% CI':>17} {'d vs base':>9} {'p_t':>7} {'d vs ctrl':>9} {'p_t':>7} {'p_w':>7}"
    lines = ["", head, "-" * len(head)]
    for row in data["rows"]:
        s = row["summary"]
        std = _fmt(s["std"]) if s["std"] is not None else "n/a"
        ci = f"[{_fmt(s['ci_low'])},{_fmt(s['ci_high'])}]" if s["ci_low"] is not None else "n/a"
        vb, vc = row.get("vs_baseline"), row.get("vs_control")
        db = f"{vb['mean_diff']:+.4f}" if vb else ""
        pb = _fp(vb["p_ttest"]) if vb else ""
        dc = f"{vc['mean_diff']:+.4f}" if vc else ""
        pc = _fp(vc["p_ttest"]) if vc else ""
        pw = _fp(vc["p_wilcoxon"]) if vc else ""
        mean_std = _fmt(s["mean"]) + " +- " + std
        lines.append(
            f"{row['regime']:<14} {row['arm']:<16} {s['n']:>2} {mean_std:>20} {ci:>17} {db:>9} {pb:>7} {dc:>9} {pc:>7} {pw:>7}"
        )
    shortcut_rows = [row for row in data["rows"] if row.get("shortcut")]
    if shortcut_rows:
        lines.append("")
        lines.append(
            "Share of post-hoc attribution on the artefact, de-correlated test images (mean over seeds; lower = fewer wrong reasons)"
        )
        for row in shortcut_rows:
            sc = row["shortcut"]
            parts = [f"{m} {_fmt(sc[m]['mean'], 3)}" for m in ("gradient", "lrp", "built_in", "area") if m in sc]
            lines.append(f"  {row['regime']:<14} {row['arm']:<16} " + "  ".join(parts))
    if data["verdicts"]:
        lines.append("")
        lines.append(
            f"Does the gain come from the explanations? (each arm vs the control '{data['study'].get('control')}'"
            + "".join(f", {a} vs '{c}'" for a, c in (data["study"].get("controls") or {}).items())
            + ", paired t-test)"
        )
        lines.extend("  " + v["text"] for v in data["verdicts"])
    elif data["study"].get("control") is None:
        lines.append(
            "(no lambda=0 control arm: add e.g. lambda0: {impactx.lam: 0} to study.arms to test whether gains come from the explanations)"
        )
    return lines
