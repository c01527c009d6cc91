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

This module is the spec and the unit keys computed from it (the keys the runner, `--status` and the viewers
agree on); it runs a little over 500 lines to keep them together. Running is :mod:`teachx.studies.runner`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from teachx.config.loader import apply_overrides, from_dict, load_yaml, merge, parse_override, set_dotted
from teachx.config.schema import NEUTRAL_KEYS, RunConfig, drop_other_spellings
from teachx.config.shipped import find_config
from teachx.data import get_source
from teachx.errors import ConfigError
from teachx.registry import suggest
from teachx.runs.plan import teacher_training
from teachx.reveal import ALGORITHM_VERSION
from teachx.runs.reveal_benchmark import RevealSettings
from teachx.runs.revise import CONCEPT_MASKS_VERSION, POST_HOC, recipe_config, revise_methods
from teachx.runs.resolve import check_names
from teachx.studies.records import BASELINE
from teachx.training.methods import METHODS, build_method, legacy_layout, method_name
from teachx.utils.hashing import hash_json

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
    # on artefact benchmarks (data.artefact): reveal every baseline without annotations and score what it finds
    # against the benchmark's ground truth (the teachx.runs.reveal_benchmark.RevealSettings keys; null: off)
    reveal: Optional[RevealSettings] = None

    def validate(self) -> None:
        if self.n_images < 1 or self.steps < 1 or self.examples < 0:
            raise ConfigError("study.eval: n_images and steps must be >= 1 and examples >= 0")


@dataclass
class LauncherSpec:
    """Where the workers of ``teachx study --launcher submitit`` run and with what resources.

    Nothing here changes a result (unit keys never see it): it only says how the study's workers
    are submitted. ``cluster: auto`` uses SLURM where ``sbatch`` is found and otherwise runs the
    workers as local processes (submitit's local executor: the same code path without a scheduler).
    """

    cluster: str = "auto"  # auto | slurm | local
    partition: Optional[str] = None  # SLURM partition (--partition)
    gpus_per_worker: int = 0  # GPUs of each worker job (--gpus-per-node)
    cpus_per_worker: int = 1  # CPU cores of each worker job (--cpus-per-task); also its torch threads
    mem_gb: Optional[float] = None  # memory of each worker job in GiB (--mem); None: the partition's default
    time_min: int = 240  # time limit of each worker job in minutes; a worker that reaches it is requeued and resumes
    account: Optional[str] = None  # SLURM account (--account)
    qos: Optional[str] = None  # SLURM quality of service (--qos)
    max_running: Optional[int] = None  # at most this many workers run at once (the job array's % limit)
    setup: list[str] = field(
        default_factory=list
    )  # shell lines run before each worker, e.g. module load or venv activation
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # further sbatch options, e.g. {constraint: a100, exclusive: true}

    def validate(self) -> None:
        if self.cluster not in ("auto", "slurm", "local"):
            raise ConfigError(f"study.launcher.cluster must be auto, slurm or local, got {self.cluster!r}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 1 or self.time_min < 1:
            raise ConfigError(
                "study.launcher: gpus_per_worker must be >= 0, cpus_per_worker >= 1 and time_min >= 1 "
                f"(got {self.gpus_per_worker}, {self.cpus_per_worker}, {self.time_min})"
            )
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"study.launcher.mem_gb must be > 0 (or left out), got {self.mem_gb}")
        if self.max_running is not None and self.max_running < 1:
            raise ConfigError(f"study.launcher.max_running must be >= 1 (or left out), got {self.max_running}")


#: the row name of a regime's reference baseline (``study.ceiling``)
CEILING = "ceiling"
#: where a correction's concept comes from -> its rows' prefix: ``reveal+rrclarc`` is RR-ClArC along the concept
#: the unannotated reveal found, ``annotated+rrclarc`` along the CAV fitted on the true labels (a reference)
CONCEPT_SOURCES = {"revealed": "reveal+", "annotated": "annotated+"}


@dataclass
class ReviseSpec:
    """Reveal-to-Revise with no person in the loop (``study.revise``): every baseline of an artefact benchmark is
    revealed (``study.eval.reveal``), the top group of its poisoned class becomes a concept, and each method
    corrects the baseline along it, as `teachx revise` does (post hoc, or fine-tuned with the R2R recipe). Each
    method is a row ``reveal+METHOD`` compared by seed with the baseline it corrected."""

    methods: list[str] = field(default_factory=list)  # `teachx revise --method` names, e.g. [pclarc, rrclarc]
    # where the concepts come from: revealed (the unannotated reveal's top group) and/or annotated (the CAV fitted on
    # the benchmark's true labels: a reference that tells a correction's failure from the reveal's)
    concepts: list[str] = field(default_factory=lambda: ["revealed"])
    # the layer the corrections act on and their CAV there, fitted on the revealed group (or the annotated images)
    # against the rest of its class (None: the features the classifier reads; pattern: RR-ClArC's recommendation)
    layer: Optional[str] = None
    cav: str = "pattern"
    # images localised per concept when a method needs the artefact's masks (rrr_revealed): the best-scoring ones
    localise: int = 2000
    # which revealed images the concept is fitted on: top (the reveal's top group of the poisoned class) or grown
    # (that group grown against the other classes, as the reveal's retrieval fits it: study.eval.reveal.refine > 0)
    group: str = "top"
    # method -> its KEY: VALUE overrides (train.* and method.options.*, as `teachx revise KEY=VALUE`)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # an arm that needs the annotations (e.g. RRR with the true masks), or the ceiling row: the gap between the
    # baseline and it on each test split is what a correction is measured against (the share of that gap it recovers)
    oracle: Optional[str] = None

    def validate(self) -> None:
        known = revise_methods()
        if not isinstance(self.methods, list) or not self.methods:
            raise ConfigError(
                f"study.revise.methods must be a non-empty list of corrections, e.g. [pclarc, rrclarc]; choose from {', '.join(known)}"
            )
        for m in self.methods:
            if m not in known:
                raise ConfigError(
                    f"study.revise.methods: unknown correction '{m}'{suggest(str(m), known)}; choose from {', '.join(known)}"
                )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("study.revise.methods names a correction twice; name each once")
        if isinstance(self.localise, bool) or not isinstance(self.localise, int) or self.localise < 1:
            raise ConfigError(f"study.revise.localise must be a whole number >= 1, got {self.localise!r}")
        if self.group not in ("top", "grown"):
            raise ConfigError(f"study.revise.group must be top or grown, got {self.group!r}")
        if self.cav not in ("pattern", "svm", "logistic"):
            raise ConfigError(f"study.revise.cav must be pattern, svm or logistic, got {self.cav!r}")
        sources = list(CONCEPT_SOURCES)
        if not isinstance(self.concepts, list) or not self.concepts or len(set(self.concepts)) != len(self.concepts):
            raise ConfigError(f"study.revise.concepts must be a list of distinct sources: {', '.join(sources)}")
        for c in self.concepts:
            if c not in sources:
                raise ConfigError(
                    f"study.revise.concepts: unknown source '{c}'{suggest(str(c), sources)}; choose from {', '.join(sources)}"
                )
        for m, opts in self.options.items():
            if m not in self.methods:
                raise ConfigError(
                    f"study.revise.options.{m}: '{m}' is not in study.revise.methods ({', '.join(self.methods)})"
                )
            if not isinstance(opts, dict):
                raise ConfigError(f"study.revise.options.{m} must map KEY to VALUE, e.g. {{method.options.lam: 100}}")
            if opts and m in POST_HOC:
                raise ConfigError(f"study.revise.options.{m}: {m} trains nothing, so it takes no options; remove them")

    def items(self, method: str) -> list[str]:
        """The method's options as `teachx revise` KEY=VALUE items."""
        flat = _flatten(self.options.get(method) or {}, f"study.revise.options.{method}")
        return [f"{k}={json.dumps(v)}" for k, v in flat.items()]

    @property
    def rows(self) -> dict[str, str]:
        """Row name -> correction, in order (per concept source, every method)."""
        return {CONCEPT_SOURCES[c] + m: m for c in self.concepts for m in self.methods}

    def concept_key(self, source: str, settings: RevealSettings) -> str:
        """What decides a correction concept: where its group comes from (the reveal's settings for a revealed
        one: an annotated one does not depend on them), and the correction's layer and CAV."""
        return hash_json(
            {
                "source": source,
                # the correction fits its concept on the top group itself, which growing it (refine) does not change,
                # unless it is fitted on the grown group (group: grown)
                "reveal": (reveal_key(settings if self.group == "grown" else replace(settings, refine=0), masks=False))
                if source == "revealed"
                else None,
                **({"group": "grown"} if self.group == "grown" and source == "revealed" else {}),
                "layer": self.layer,
                "cav": self.cav,
                # how many images it localises, and how it chooses and localises them (CONCEPT_MASKS_VERSION)
                **({"masks": self.localise, "masks_version": CONCEPT_MASKS_VERSION} if self.masks() else {}),
            }
        )[:12]

    def masks(self) -> int:
        """How many images each concept localises: ``localise`` when a method needs the masks, else none."""
        needs = any(getattr(METHODS.get(m), "concept_needs_masks", False) for m in self.methods if m in METHODS)
        return self.localise if needs else 0

    def source(self, row: str) -> str:
        """Where the concept of the row ``row`` comes from (``revealed`` or ``annotated``)."""
        return next(c for c, prefix in CONCEPT_SOURCES.items() if row.startswith(prefix))


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
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    revise: Optional[ReviseSpec] = None  # corrections along each baseline's revealed concept
    # overrides applied on top of each regime's: a baseline per regime and seed trained with them (``ceiling`` row)
    ceiling: dict[str, Any] = field(default_factory=dict)

    def is_ceiling(self, arm: Optional[str]) -> bool:
        """Whether ``arm`` names the ceiling row (only with ``study.ceiling``, whose name no arm may then take: a
        study without it may have an arm called "ceiling" of its own)."""
        return arm == CEILING and bool(self.ceiling)

    @property
    def extra_rows(self) -> list[str]:
        """The rows after the arms: the ceiling (with ``study.ceiling``), then the corrections."""
        return [*([CEILING] if self.ceiling else []), *self.revise_rows]

    @property
    def revise_rows(self) -> dict[str, str]:
        """``reveal+METHOD`` row name -> correction (empty without ``study.revise``)."""
        return self.revise.rows if self.revise else {}

    def control_of(self, arm: str) -> Optional[str]:
        """The lambda=0 arm ``arm`` is compared with: its own (``study.controls``), else the study's."""
        return self.controls.get(arm, self.control)

    def runs(self, regime: str, arm: Optional[str]) -> bool:
        """Whether the unit exists: baselines run in every regime, an arm where arm_regimes allows."""
        return arm is None or arm == BASELINE or regime in self.arm_regimes.get(arm, self.regimes)

    def config(self, regime: str, arm: Optional[str], seed: int) -> RunConfig:
        """The resolved RunConfig of one unit: base <- arm <- regime, with the seed (a correction row's is its
        baseline's: the correction's own settings are ``study.revise``'s)."""
        data = _deep(self.base)
        layers = [self.arms[arm] if arm in self.arms else {}, self.regimes[regime]]
        layers.append(self.ceiling if self.is_ceiling(arm) else {})  # on top of the regime's
        for layer in layers:
            data = _set_layer(data, layer)
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
            "launcher": asdict(self.launcher),
            "revise": asdict(self.revise) if self.revise else None,
            "ceiling": self.ceiling,
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
        if self.revise:
            out["revise"] = asdict(self.revise)
        if self.ceiling:
            out["ceiling"] = self.ceiling
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


def _set_layer(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the dotted ``overrides`` (an arm, a regime) set, each replacing the option however ``data``
    spelt it (``impactx.lam`` over ``method.options.lam``: :func:`teachx.config.schema.drop_other_spellings`)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(nested, key, value)
    data = drop_other_spellings(data, nested)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return data


def _regime_name(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "all"
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


#: the keys of a study config's ``study:`` section, with their one-line descriptions (``teachx config --describe``)
STUDY_KEYS: dict[str, str] = {
    "seeds": "explicit list of seeds, e.g. [0, 1, 2]; each unit runs once per seed (default: 0..n_seeds-1)",
    "n_seeds": "number of seeds 0..N-1 when seeds is not given (default 1; --seeds N overrides both)",
    "arms": "name -> overrides of the base config, one training method or IMPACTX variant each, e.g. {impactx: {}, lambda0: {impactx.lam: 0}}; {} trains only the regimes' baselines",
    "regimes": "data or training regimes applied on top of every arm, each with its own baseline: a list of overrides or name -> overrides",
    "control": "the arm every other arm is compared with (default: the arm with impactx.lam: 0)",
    "controls": "arm -> its own lambda=0 control instead of study.control, e.g. {impactx_noaug: lambda0_noaug} for arms trained on other data",
    "eval": "what is measured per IMPACTX unit besides accuracy: the study.eval.* keys",
    "alpha": "significance level of the paired tests (Holm-adjusted over all control comparisons; default 0.05)",
    "arm_regimes": "arm -> the only regimes it runs in (default: all), e.g. {self_teach: [1k]} for an expensive arm",
    "ceiling": "overrides applied on top of each regime's for a reference baseline per regime and seed (the ceiling row), e.g. {data.artefact.p: 0}: the clean-data ceiling of an artefact benchmark, on the same test splits",
    "revise": "on artefact benchmarks: correct every baseline along the concept its unannotated reveal found, one row per correction: {methods: [pclarc, rclarc, rrclarc, aclarc], options: {rrclarc: {method.options.lam: 100}}, oracle: ARM, concepts: [revealed, annotated], group: top} (annotated: along the CAV of the true labels, a reference; group: grown fits the revealed concept on the top group grown against the other classes)",
    "launcher": "where `teachx study --launcher submitit` runs its workers and with what resources: the study.launcher.* keys (never part of a result)",
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
    base: dict[str, Any] = drop_other_spellings(
        raw, apply_overrides({}, [t for t in overrides or [] if parse_override(t)[0][0] != "study"])
    )
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
    arms_raw = section.get("arms")  # left out: one IMPACTX arm; {}: the regimes' baselines only
    arms_raw = {"impactx": {}} if arms_raw is None else arms_raw
    if not isinstance(arms_raw, dict):
        raise ConfigError(
            "study.arms must be a mapping name -> overrides, e.g. {impactx: {}, lambda0: {impactx.lam: 0}}"
        )
    arms = {str(name): _flatten(ov, f"study.arms.{name}") for name, ov in arms_raw.items()}
    ceiling = _flatten(section.get("ceiling"), "study.ceiling")
    for reserved in (BASELINE, *([CEILING] if ceiling else [])):
        if reserved in arms:
            raise ConfigError(
                f"study arm name '{reserved}' is reserved (every regime has its own {reserved} row"
                + (", study.ceiling" if reserved == CEILING else "")
                + "); rename the arm"
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
    launcher = from_dict(LauncherSpec, section.get("launcher") or {}, "study.launcher")
    revise = from_dict(ReviseSpec, section["revise"], "study.revise") if section.get("revise") is not None else None
    if revise is not None:
        rows = [*arms, *([CEILING] if ceiling else [])]
        if revise.oracle is not None and revise.oracle not in rows:
            raise ConfigError(
                f"study.revise.oracle '{revise.oracle}' is not an arm{suggest(str(revise.oracle), rows)}; "
                f"arms: {', '.join(rows) or 'none'} (the ceiling row, with study.ceiling set, may be named too)"
            )
        if ev.reveal is None:  # the concepts come from the baselines' reveal: its default settings
            ev.reveal = RevealSettings()
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
        launcher,
        revise,
        ceiling,
    )
    # resolve every config now: a typo fails before anything is trained
    first_regime = next(iter(regimes))
    for regime in regimes:
        cfg = spec.config(regime, None, seeds[0])
        if ceiling:
            spec.config(regime, CEILING, seeds[0])
        if revise is not None:
            if (
                revise.group == "grown"
                and "revealed" in revise.concepts
                and not (spec.eval.reveal and spec.eval.reveal.refine)
            ):
                raise ConfigError(
                    "study.revise.group=grown fits the concept on the reveal's grown group, and the reveal grows none; "
                    "set study.eval.reveal.refine to a number of rounds >= 1 (e.g. 5) or study.revise.group=top"
                )
            if cfg.data.artefact is None:
                raise ConfigError(
                    f"study.revise corrects the artefact that reveal finds, and regime '{regime}' has none; "
                    "set data.artefact.kind (e.g. data.artefact.kind=timestamp) or drop study.revise"
                )
            for m in revise.methods:
                if m not in POST_HOC:  # the options are checked now, against the method (any path will do here)
                    try:
                        recipe_config(cfg, m, Path("concept.json"), revise.items(m))
                    except ConfigError as exc:
                        raise ConfigError(f"study.revise.options.{m}: {exc}") from None
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
    # hashed in the layout of before IMPACTX's options moved to method.options (legacy_layout), so that the same
    # settings keep their keys; other methods' impactx.* are the defaults there: no reference for them
    values = legacy_layout(cfg.to_dict())
    defaults = merge(legacy_layout(RunConfig().to_dict()), METHODS.get(method_name(cfg)).key_reference)
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
    """The key of a method unit's evaluation file: what changes it (the reveal of the baselines does not, and has
    its own file and key: :func:`reveal_key`)."""
    values = {k: v for k, v in asdict(ev).items() if k != "reveal"}
    return hash_json({"v": STUDY_VERSION, "eval": values, "teacher": _relevant(cfg).get("teacher", {})})[:12]


def revision_key(base_key: str, concept_key: str, method: str, items: list[str]) -> str:
    """The key of a correction unit: the baseline it corrects, its concept (:meth:`ReviseSpec.concept_key`), the
    method and its options."""
    return (
        "r-"
        + hash_json(
            {
                "v": STUDY_VERSION,
                "kind": "revision",
                "baseline": base_key,
                "concept": concept_key,
                "method": method,
                "options": items,
            }
        )[:16]
    )


def reveal_key(settings: RevealSettings, masks: bool = True) -> str:
    """The key of a classifier unit's reveal file (``reveal-<key>.json``): the settings it was revealed with.

    ``refine`` above 0 once meant refitting the CAV on what it retrieves; it now grows the top group against the
    other classes (:func:`teachx.reveal.cav.grow_concept`), so such a reveal is keyed anew (``grow``), while one
    made with ``refine: 0``, which computes what it did, keeps its key. The masks are now contrasted with the
    class's images least like the concept (:func:`teachx.reveal.localise.concept_masks`), which changes the
    scored mask IoU, so every reveal file is keyed anew (``masks``); ``masks=False`` gives the key without it,
    for what depends on the groups only (a correction's concept: :meth:`ReviseSpec.concept_key`), which the
    masks do not change. The grown set's CAV is now fitted against the other classes too
    (:func:`teachx.reveal.cav.fit_concept_cav`), which changes retrieval and the masks but not the groups, so a
    grown reveal's file is keyed anew (``cav``) and the key without the masks stays."""
    grown = {"grow": "against the other classes"} if settings.refine else {}
    localised = {"masks": "contrasted with the least-like images"} if masks else {}
    if masks and settings.refine:
        localised["cav"] = "against the rest of the class and the other classes"
    return hash_json(
        {"v": STUDY_VERSION, "algorithm": ALGORITHM_VERSION, "reveal": asdict(settings), **grown, **localised}
    )[:12]


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
        """The training method class of a method unit; None for a classifier or correction unit."""
        return None if self.kind in ("classifier", "revision") else METHODS.get(method_name(self.config))


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
                    if spec.ceiling:
                        ccfg = spec.config(regime, CEILING, seed)
                        ckey = classifier_key(ccfg, ccfg.model.backbone, dict(ccfg.model.options))
                        units.setdefault(ckey, PlannedUnit(ckey, "classifier", regime, CEILING, seed, ccfg))
                    for row, m in spec.revise_rows.items():  # the corrections of this baseline (study.revise)
                        assert spec.revise is not None
                        items = spec.revise.items(m)
                        ckey = spec.revise.concept_key(spec.revise.source(row), spec.eval.reveal or RevealSettings())
                        rkey = revision_key(base, ckey, m, items)
                        rcfg = cfg if m in POST_HOC else recipe_config(cfg, m, Path("concept.json"), items)[0]
                        units.setdefault(rkey, PlannedUnit(rkey, "revision", regime, row, seed, rcfg))
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
