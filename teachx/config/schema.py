"""The run configuration: one YAML file with sections data / model / train / teacher / method.

Every option has a documented default here; ``teachx run --print-config`` shows the resolved
file. Unknown keys are rejected with a suggestion. The resolved config is saved in each run
directory, so runs can be diffed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from teachx.config.loader import to_dict
from teachx.config.train import TrainConfig
from teachx.errors import ConfigError

#: Checks and resolutions of a section that need the registries of upper floors (dataset, decoder,
#: map-loss and method names), by hook name: the floor that owns each registry adds its own when it is
#: imported (:mod:`teachx.data.options`, :mod:`teachx.models.decoders`, :mod:`teachx.training.map_losses`,
#: :mod:`teachx.training.methods`), so that the config itself stays on the ground floor.
#: :func:`teachx.runs.resolve.resolve_config` imports them all before it reads a config.
HOOKS: dict[str, list[Callable[[Any], None]]] = {}


def add_hook(name: str, fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Run ``fn(section)`` at hook ``name``: ``data.validate``, ``method.validate``, ``run.validate``, or a hook
    a method's typed options run (IMPACTX's ``impactx.design`` and ``impactx.validate``), each one once, however
    often its module is reloaded; at ``run.normalize``, ``fn(data) -> data`` rewrites the raw config mapping
    before it is read."""
    hooks = HOOKS.setdefault(name, [])
    key = (fn.__module__, fn.__qualname__)
    hooks[:] = [h for h in hooks if (h.__module__, h.__qualname__) != key] + [fn]
    return fn


def run_hooks(name: str, section: Any) -> None:
    """Call every hook added at ``name`` with ``section``."""
    for fn in HOOKS.get(name, ()):
        fn(section)


@dataclass(frozen=True)
class SectionAlias:
    """A top-level section that is another spelling of some methods' options (``impactx.KEY`` is
    ``method.options.KEY`` of IMPACTX's methods)."""

    keys: tuple[str, ...]  # the option keys it holds
    methods: tuple[str, ...]  # the methods (names and aliases) whose options they are


#: section aliases by section name; added by the layer that owns the methods (:func:`add_section_alias`), so that
#: the config floor knows no method. Read, each key is folded into ``method.options`` (a ``run.normalize`` hook of
#: that layer); written, a config has ``method.options`` alone.
SECTION_ALIASES: dict[str, SectionAlias] = {}


def add_section_alias(section: str, keys: tuple[str, ...], methods: tuple[str, ...]) -> None:
    """Accept the top-level ``section``'s ``keys`` as another spelling of ``method.options.KEY`` of ``methods``."""
    SECTION_ALIASES[section] = SectionAlias(tuple(keys), tuple(methods))


def drop_other_spellings(data: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``data`` (the layers read so far) ready for ``layer`` (nested, as read from YAML) on top: less the other
    spelling of every key ``layer`` sets, so that a later layer (a file over a base, a command-line override, a
    study arm or regime) replaces an option however the earlier one spelt it (``impactx.lam`` over
    ``method.options.lam`` and back; within one layer, two spellings with two values are refused when the config is
    read); and, where ``layer`` chooses a method, with the options of the method chosen so far that a section
    alias holds spelt in that section: they are the options of that method (IMPACTX's, in a run's config.yaml or
    a study's base), which the newly chosen one reads as its own if it is one of that method's family, and which
    another one accepts only at their defaults, as it accepts the section. ``data`` is not changed."""
    method = layer.get("method") if isinstance(layer.get("method"), dict) else {}
    in_options = set(method.get("options") or {}) if isinstance(method.get("options"), dict) else set()
    out = dict(data)
    for section, alias in SECTION_ALIASES.items():
        keys = alias.keys
        old = out.get("method") if isinstance(out.get("method"), dict) else {}
        options = old.get("options") if isinstance(old.get("options"), dict) else {}
        moved = {k: v for k, v in options.items() if k in keys}
        section_data = out.get(section) if isinstance(out.get(section), dict) else {}
        clash = any(k in section_data and section_data[k] != v for k, v in moved.items())  # refused when read
        if "name" in method and old.get("name", MethodConfig.name) in alias.methods and moved and not clash:
            out[section] = {**moved, **section_data}
            out["method"] = {**old, "options": {k: v for k, v in options.items() if k not in keys}}
        given = set(layer[section]) if isinstance(layer.get(section), dict) else set()
        section_data = out.get(section)
        if isinstance(section_data, dict) and in_options & set(keys) & set(section_data):
            out[section] = {k: v for k, v in section_data.items() if k not in in_options}
        method_data = out.get("method")
        options = method_data.get("options") if isinstance(method_data, dict) else None
        if isinstance(options, dict) and given & set(keys) & set(options):
            out["method"] = {**method_data, "options": {k: v for k, v in options.items() if k not in given}}
    return out


@dataclass
class ArtefactConfig:
    """An R2R artefact benchmark (``data.artefact``): an artefact in a fraction of some classes' training images."""

    kind: str = ""  # timestamp (bright clock digits in a corner) | bandaid (a plaster at a random place and angle) | frame (dark vignette at the border) | colour_shift (a warm tint or haze over the whole image); required
    classes: list[int] = field(
        default_factory=lambda: [0]
    )  # the classes (indices) whose training images get the artefact
    p: float = 0.25  # the fraction of each of those classes' training images that get it, in [0, 1]: round(p * images of the class), half up, at least one; 0: none (the clean-data ceiling, same test splits)
    seed: int = 0  # seed of which images get it and of each artefact's look (position, digits, colour)
    test: str = "ch"  # the test split test accuracy is measured on: ch (poisoned like training) | clean (no artefact) | attacked (the artefact in every image); all three are reported
    oracle_masks: bool = False  # put the true artefact masks on the splits (Split.masks) for mask-based methods such as rrr: an oracle, not the R2R protocol


@dataclass
class DataConfig:
    name: str = "bundled"  # a registered dataset or imagefolder:PATH (see `teachx datasets`)
    root: Optional[str] = None  # where the files are; default: the dataset's standard locations
    download: bool = False  # download missing files from the official URLs (checksummed)
    val_fraction: float = 0.1  # validation split carved (stratified, seeded) from the training data
    train_size: Optional[int] = None  # use a stratified subset of this many training images (data-size studies)
    split_seed: int = 0  # seed of the validation split and the subset: fixed across training seeds
    augment: bool = True  # random crop (and flip) of training images, applied identically to teacher maps
    crop_padding: int = 4  # random crop with this much zero padding
    hflip: Optional[bool] = (
        None  # horizontal flips; default: the dataset's choice, on only where a mirrored image keeps its class (CIFAR, STL-10, Fashion-MNIST), off for digits and imagefolder data (`teachx config` shows the resolved value)
    )
    image_size: Optional[Union[int, str, list[int]]] = (
        None  # imagefolder only: resize every image to this size (32, or H,W as 32,48; bilinear, aspect ratio not kept); default: keep each image's size (all must match)
    )
    channels: Optional[int] = (
        None  # imagefolder only: convert every image to 1 (greyscale), 3 (RGB) or 4 (RGBA) channels; default: keep them (all must match)
    )
    test_fraction: Optional[float] = (
        None  # imagefolder without train/ and test/ folders: fraction carved (stratified) as the test split; default 0.2
    )
    test_seed: Optional[int] = (
        None  # imagefolder without train/ and test/ folders: seed of that carved test split; default 0
    )
    shortcut: Optional[str] = (
        None  # add a shortcut artefact to any dataset: swatch (Decoy-MNIST's class-shaded grey corner square) | patch (class-coloured corner patch, colour images); test images get it independent of the class; default none
    )
    shortcut_train: str = "confounded"  # with data.shortcut, the training images: confounded (artefact codes the class) | clean (untouched: the clean-data ceiling) | random (artefact independent of the class)
    shortcut_size: int = 4  # with data.shortcut: side of the artefact square in pixels
    shortcut_seed: int = 0  # with data.shortcut: seed of the artefact's corners (and of its test-split classes)
    artefact: Optional[ArtefactConfig] = (
        None  # an R2R artefact benchmark: {kind, classes, p, seed, test, oracle_masks}: the artefact in a fraction p of the named classes' training images; default none (`teachx config --describe data.artefact.kind=timestamp` describes its keys)
    )

    def validate(self) -> None:
        run_hooks("data.validate", self)  # data.shortcut* and data.image_size, as the data floor reads them
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_size is not None and self.train_size < 10:
            raise ConfigError(f"data.train_size must be >= 10, got {self.train_size}")
        if self.channels is not None and self.channels not in (1, 3, 4):
            raise ConfigError(f"data.channels must be 1, 3 or 4, got {self.channels}")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class ModelConfig:
    backbone: str = "lenet5"  # see `teachx models`
    options: dict[str, Any] = field(default_factory=dict)  # backbone constructor options


@dataclass
class TeacherConfig:
    """How the teacher maps are made (the paper: SHAP of a trained model of the same backbone)."""

    method: str = "deepshap"  # any registered teacher (`teachx teachers`)
    options: dict[str, Any] = field(default_factory=dict)  # method options (e.g. composite for lrp)
    background_size: int = 100  # background images for deepshap / expected_gradients (seeded sample of train)
    target: Literal["label", "predicted"] = (
        "label"  # which class is explained: the true label (default) or the teacher's prediction
    )
    reduce: str = "sum"  # channel reduction; sum keeps completeness of additive methods
    normalize: str = "maxabs"  # per-image normalisation; maxabs keeps sign and zero
    smooth: float = 0.0  # Gaussian smoothing sigma (pixels) applied to the maps
    checkpoint: Optional[str] = None  # explain this checkpoint instead of training a teacher
    backbone: Optional[str] = None  # teacher backbone if it differs from the student's (a stronger teacher)
    backbone_options: dict[str, Any] = field(default_factory=dict)  # constructor options of teacher.backbone
    seed: Optional[int] = (
        None  # seed of the teacher model's training (default: the run's seed); fix it to share one teacher across seeds
    )
    # how the teacher model is trained, as overrides of this config's data.* and train.* keys, e.g.
    # {data.train_size: null, train.epochs: 15}: a teacher that saw the full training split (more
    # knowledge than a student trained on a subset); its maps are still made on the student's images
    training: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # images per teacher call when making maps (memory, not results)
    eval_images: Optional[int] = 1000  # test images explained for map-quality evaluation (None: all)
    faith_images: int = 256  # of those, test images for the built-in maps' faithfulness to the IMPACTX model in map_quality (MoRF/LeRF/insertion, post-hoc maps; 0: off)
    maps_dir: Optional[str] = (
        None  # store location; default $TEACHX_CACHE/maps, else ~/.cache/teachx/cache/maps (shared by runs and seeds; `teachx cache`)
    )

    def validate(self) -> None:
        if self.faith_images < 0:
            raise ConfigError(f"teacher.faith_images must be >= 0 (0 = off), got {self.faith_images}")
        if self.background_size < 1:  # otherwise deepshap fails later with "pass at least one background image"
            raise ConfigError(f"teacher.background_size must be >= 1, got {self.background_size}")
        for key in self.training:
            if not isinstance(key, str) or key.split(".")[0] not in ("data", "train") or key.count(".") != 1:
                raise ConfigError(
                    f"teacher.training key {key!r} must be a data.* or train.* option (e.g. data.train_size, train.epochs); "
                    "set the teacher's backbone with teacher.backbone and its seed with teacher.seed"
                )


@dataclass
class MethodConfig:
    """Which training method the run's method stage uses (`teachx methods` lists them with options)."""

    name: str = (
        "impactx"  # training method: impactx | baseline | abn | rrr | saliency_guided | reldrop (`teachx methods`)
    )
    options: dict[str, Any] = field(
        default_factory=dict
    )  # the method's options, e.g. {lam: 1000, mask: annotation} for rrr (`teachx methods` lists them)

    def validate(self) -> None:
        run_hooks("method.validate", self)  # the method's name and options (:mod:`teachx.training.methods`)


#: (section, key) of options that never change a result (display, logging, where and in what batch
#: size shared teacher maps are made): left out of a run's identity and of study unit keys
NEUTRAL_KEYS = frozenset(
    {("train", "progress"), ("train", "tensorboard"), ("teacher", "batch_size"), ("teacher", "maps_dir")}
)


@dataclass
class RunConfig:
    seed: int = 0  # seed of the run (initialisation, augmentation, data order)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @staticmethod
    def normalize_data(data: dict[str, Any]) -> dict[str, Any]:
        """The config as read, with other spellings of the same option made one (``run.normalize`` hooks,
        each ``data -> data``; e.g. :mod:`teachx.training.methods` folds a section alias's ``impactx.KEY``
        into ``method.options.KEY``, :data:`SECTION_ALIASES`)."""
        for fn in HOOKS.get("run.normalize", ()):
            data = fn(data)
        return data

    def validate(self) -> None:
        self.method.validate()  # also when the method is left to its default: its options are stated
        run_hooks("run.validate", self)  # checks across sections of a method's options (teachx.training.methods)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def missing_value(arg: str) -> Optional[ConfigError]:
    """The error for a KEY given without =VALUE (``train.epochs``, ``seed``, ``study.n_seeds``) where a
    CONFIG or an override goes: a key of the config (or its study section) that is no file; else None."""
    parts = arg.split(".")
    sections = {f.name for f in dataclasses.fields(RunConfig)} | {"study"} | set(SECTION_ALIASES)
    if (
        "=" in arg
        or Path(arg).expanduser().exists()
        or parts[0] not in sections
        or not all(p.isidentifier() for p in parts)
    ):
        return None
    return ConfigError(f"'{arg}' has no value; write {arg}=VALUE (no spaces around '=')")
