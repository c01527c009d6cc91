"""The run configuration: one YAML file with sections data / model / train / teacher / impactx.

Every option has a documented default here; ``teachx run --print-config`` shows the resolved
file. Unknown keys are rejected with a suggestion. The resolved config is saved in each run
directory, so runs can be diffed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_type_hints

from teachx.errors import ConfigError
from teachx.training.config import TrainConfig
from teachx.utils.config import apply_overrides, from_dict, load_yaml, merge, to_dict


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
    hflip: Optional[bool] = None  # horizontal flips; default: the dataset's choice, on only where a mirrored image keeps its class (CIFAR, STL-10, Fashion-MNIST), off for digits and imagefolder data (`teachx config` shows the resolved value)
    image_size: Optional[Union[int, str, list[int]]] = None  # imagefolder only: resize every image to this size (32, or H,W as 32,48; bilinear, aspect ratio not kept); default: keep each image's size (all must match)
    channels: Optional[int] = None  # imagefolder only: convert every image to 1 (greyscale), 3 (RGB) or 4 (RGBA) channels; default: keep them (all must match)
    test_fraction: Optional[float] = None  # imagefolder without train/ and test/ folders: fraction carved (stratified) as the test split; default 0.2
    test_seed: Optional[int] = None  # imagefolder without train/ and test/ folders: seed of that carved test split; default 0
    shortcut: Optional[str] = None  # add a shortcut artefact to any dataset: swatch (Decoy-MNIST's class-shaded grey corner square) | patch (class-coloured corner patch, colour images); test images get it independent of the class; default none
    shortcut_train: str = "confounded"  # with data.shortcut, the training images: confounded (artefact codes the class) | clean (untouched: the clean-data ceiling) | random (artefact independent of the class)
    shortcut_size: int = 4  # with data.shortcut: side of the artefact square in pixels
    shortcut_seed: int = 0  # with data.shortcut: seed of the artefact's corners (and of its test-split classes)

    def validate(self) -> None:
        self._validate_shortcut()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_size is not None and self.train_size < 10:
            raise ConfigError(f"data.train_size must be >= 10, got {self.train_size}")
        if self.image_size is not None:
            from teachx.data.imagefolder import parse_size

            parse_size(self.image_size, "data.image_size")
        if self.channels is not None and self.channels not in (1, 3, 4):
            raise ConfigError(f"data.channels must be 1, 3 or 4, got {self.channels}")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")

    def _validate_shortcut(self) -> None:
        from teachx.data.shortcuts import SHORTCUTS, TRAIN_MODES, DecoySource

        if self.shortcut_train not in TRAIN_MODES:
            raise ConfigError(f"data.shortcut_train must be one of {', '.join(TRAIN_MODES)}, got {self.shortcut_train!r}")
        if self.shortcut_size < 1:
            raise ConfigError(f"data.shortcut_size must be >= 1 (pixels), got {self.shortcut_size}")
        if self.shortcut_seed < 0:
            raise ConfigError(f"data.shortcut_seed must be >= 0, got {self.shortcut_seed}")
        if self.shortcut is None:
            return
        try:
            self.shortcut = SHORTCUTS.canonical(self.shortcut)
        except ConfigError as exc:
            raise ConfigError(f"data.shortcut: {exc}") from None
        from teachx.data import get_source

        if isinstance(get_source(self.name)[0], DecoySource):
            raise ConfigError(f"data.name={self.name} already carries its artefact; drop data.shortcut, or add it to "
                              f"the plain dataset (data.name={get_source(self.name)[0].base} data.shortcut={self.shortcut})")

    def load_options(self) -> dict[str, Any]:
        """The data.* keys that are options of the dataset's format, as ``load_dataset`` keywords."""
        from teachx.data import get_source

        source, _ = get_source(self.name)
        out = {}
        for key, option in FORMAT_OPTIONS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if option not in source.options:
                raise ConfigError(f"data.{key} applies to imagefolder:PATH data only, not to '{self.name}'; remove it")
            out[option] = value
        return out

    def augmentation(self) -> dict[str, Any]:
        """The training augmentation this section gives, with the dataset's default resolved from the
        source registry (nothing is loaded): augment, crop_padding, hflip, and where hflip comes from."""
        from teachx.data import get_source

        if not self.augment:
            return {"augment": False, "crop_padding": 0, "hflip": False, "hflip_from": "data.augment=false"}
        if self.hflip is not None:
            return {"augment": True, "crop_padding": self.crop_padding, "hflip": self.hflip, "hflip_from": "data.hflip"}
        if self.shortcut is not None:
            return {"augment": True, "crop_padding": self.crop_padding, "hflip": False,
                    "hflip_from": "data.shortcut: flips would move the artefact"}
        source, _ = get_source(self.name)
        return {"augment": True, "crop_padding": self.crop_padding, "hflip": bool(source.hflip),
                "hflip_from": f"{source.name}: {source.hflip_reason}"}


#: data.* keys that are options of a dataset format (imagefolder), with their ``load_dataset`` names.
FORMAT_OPTIONS = {"image_size": "size", "channels": "channels", "test_fraction": "test_fraction", "test_seed": "seed"}


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
    target: Literal["label", "predicted"] = "label"  # which class is explained: the true label (default) or the teacher's prediction
    reduce: str = "sum"  # channel reduction; sum keeps completeness of additive methods
    normalize: str = "maxabs"  # per-image normalisation; maxabs keeps sign and zero
    smooth: float = 0.0  # Gaussian smoothing sigma (pixels) applied to the maps
    checkpoint: Optional[str] = None  # explain this checkpoint instead of training a teacher
    backbone: Optional[str] = None  # teacher backbone if it differs from the student's (a stronger teacher)
    backbone_options: dict[str, Any] = field(default_factory=dict)  # constructor options of teacher.backbone
    seed: Optional[int] = None  # seed of the teacher model's training (default: the run's seed); fix it to share one teacher across seeds
    # how the teacher model is trained, as overrides of this config's data.* and train.* keys, e.g.
    # {data.train_size: null, train.epochs: 15}: a teacher that saw the full training split (more
    # knowledge than a student trained on a subset); its maps are still made on the student's images
    training: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # images per teacher call when making maps (memory, not results)
    eval_images: Optional[int] = 1000  # test images explained for map-quality evaluation (None: all)
    faith_images: int = 256  # of those, test images for the built-in maps' faithfulness to the IMPACTX model in map_quality (MoRF/LeRF/insertion, post-hoc maps; 0: off)
    maps_dir: Optional[str] = None  # store location; default $TEACHX_CACHE/maps, else ~/.cache/teachx/cache/maps (shared by runs and seeds; `teachx cache`)


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
class ImpactxConfig:
    lam: float = 1.0  # weight of the explanation loss (0 = same architecture, no explanation signal)
    maps: Literal["teacher", "shuffled", "constant", "random"] = "teacher"  # controls for ablations
    lep_backbone: Optional[str] = None  # latent explanation predictor; default: the student backbone
    m_init: Literal["fresh", "teacher"] = "fresh"  # initialise M from the teacher (same backbone only)
    m_frozen: bool = False  # keep M fixed (only with m_init=teacher)
    # channels of the decoder's first conv block (paper decoder: halved per block, >= 16; unet decoders: every pyramid
    # level); null: the decoder's recommended width (unet_input: 64, the others: 32)
    decoder_width: Optional[int] = None
    decoder_scale: int = 2  # paper decoder: convolves up to map_size / scale, then upsamples bilinearly (1: full resolution)
    classifier_hidden: int = 0  # 0: C is linear on concat[m, z]
    map_size: Optional[int] = None  # decoder output resolution; default: the input resolution
    self_teach_every: int = 0  # > 0: self-teaching, the maps are re-made every K epochs by the teacher method applied to the model being trained
    # map decoder: unet_input (default: LEP's feature pyramid with skip connections plus the input image; the
    # built-in-maps study's best) | paper (the paper's, from LEP's pooled vector) | unet | additive | lite | lite_additive
    decoder: str = "unet_input"
    # one map per class (FastSHAP-style): trained on the explained class's map, inference gives the predicted
    # class's map; null: the decoder's recommended setting (paper: false, the others: true)
    per_class: Optional[bool] = None
    additive_reference: float = 0.0  # additive decoder: the reference the map measures x from, in normalised space (0 = the dataset mean)
    # built-in vs teacher map loss: mse (the paper's) | pearson (1 - per-image r) | cosine (1 - per-image cosine: scale-free,
    # zero kept) | standardized_mse (target z-scored per image) | rank (pairwise pixel order); null: the decoder's
    # recommended loss (paper: mse, the others: pearson)
    map_loss: Optional[str] = None
    map_target_pool: int = 1  # average-pool built-in and teacher maps by K x K before the map loss (1: the teacher's resolution)
    # the decoder also reads M's feature pyramid (detached: M still learns from CE alone), so the map can see what the
    # classification branch computes; null: the decoder's recommended setting (unet_input: true, the others: false;
    # false when impactx.lep_backbone is set: the two pyramids must match)
    decoder_reads_m: Optional[bool] = None
    faith_weight: float = 0.0  # > 0: FastSHAP-style term, the built-in map must predict the model's own output on masked inputs
    faith_patch: int = 4  # patch size (pixels) that the faithfulness term masks
    faith_samples: int = 2  # masked copies per image and step for the faithfulness term (each second one the complement of the one before)

    def __post_init__(self) -> None:
        self.resolve_design()

    def resolve_design(self) -> None:
        """Fill per_class / map_loss / decoder_width / decoder_reads_m left unset (None) from the decoder's
        ``recommended`` setting, so that ``impactx.decoder=paper`` alone is the paper's method and every
        written config states the values."""
        from teachx.models.decoders import resolve_design

        try:
            design = resolve_design(self.decoder, self.per_class, self.map_loss, self.decoder_width, self.decoder_reads_m,
                                    separate_lep=self.lep_backbone is not None)
        except ConfigError:
            return  # an unknown decoder: validate() names the valid ones
        self.per_class, self.map_loss = design["per_class"], design["map_loss"]
        self.decoder_width, self.decoder_reads_m = design["decoder_width"], design["decoder_reads_m"]

    def validate(self) -> None:
        self.resolve_design()
        if self.lam < 0:
            raise ConfigError(f"impactx.lam must be >= 0, got {self.lam}")
        if self.decoder_scale < 1 or self.decoder_scale & (self.decoder_scale - 1):
            raise ConfigError(f"impactx.decoder_scale must be a power of two >= 1, got {self.decoder_scale}")
        if self.self_teach_every < 0:
            raise ConfigError(f"impactx.self_teach_every must be >= 0 (0 = off), got {self.self_teach_every}")
        if self.self_teach_every and self.maps != "teacher":
            raise ConfigError(f"impactx.self_teach_every needs impactx.maps=teacher (got maps={self.maps}): self-teaching replaces the teacher's maps")
        if self.m_frozen and self.m_init != "teacher":
            raise ConfigError("impactx.m_frozen=true needs impactx.m_init=teacher (a frozen fresh M would be random)")
        self._validate_builtin_maps()

    def _validate_builtin_maps(self) -> None:
        from teachx.models.decoders import DECODERS, per_class_error, reads_m_error
        from teachx.training.map_losses import MAP_LOSSES

        try:
            decoder = DECODERS.canonical(self.decoder)
        except ConfigError as exc:
            raise ConfigError(f"impactx.decoder: {exc}") from None
        if self.per_class and not DECODERS.get(decoder).supports_per_class:
            raise ConfigError(per_class_error(decoder))
        if self.decoder_reads_m and not DECODERS.get(decoder).needs_pyramid:
            raise ConfigError(reads_m_error(decoder))
        try:
            MAP_LOSSES.canonical(self.map_loss)
        except ConfigError as exc:
            raise ConfigError(f"impactx.map_loss: {exc}") from None
        for key in ("decoder_width", "map_target_pool", "faith_patch", "faith_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"impactx.{key} must be an integer >= 1, got {getattr(self, key)}")
        if self.faith_weight < 0:
            raise ConfigError(f"impactx.faith_weight must be >= 0 (0 = off), got {self.faith_weight}")


@dataclass
class MethodConfig:
    """Which training method the run's method stage uses (`teachx methods` lists them with options)."""

    name: str = "impactx"  # training method: impactx (its options are the impactx.* keys) | baseline | abn | rrr | saliency_guided | reldrop (`teachx methods`)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options, e.g. {lam: 1000, mask: annotation} for rrr (`teachx methods` lists them)

    def validate(self) -> None:
        from teachx.training.methods import METHODS

        try:
            name = METHODS.canonical(self.name)
        except ConfigError as exc:
            raise ConfigError(f"method.name: {exc}") from None
        METHODS.get(name).resolve_options(self.options)


#: (section, key) of options that never change a result (display, logging, where and in what batch
#: size shared teacher maps are made): left out of a run's identity and of study unit keys
NEUTRAL_KEYS = frozenset({("train", "progress"), ("train", "tensorboard"), ("teacher", "batch_size"), ("teacher", "maps_dir")})


@dataclass
class RunConfig:
    seed: int = 0  # seed of the run (initialisation, augmentation, data order)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    impactx: ImpactxConfig = field(default_factory=ImpactxConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @staticmethod
    def normalize_data(data: dict[str, Any]) -> dict[str, Any]:
        """``method.options.KEY`` of a method whose options live in a section of their own (IMPACTX's
        ``impactx.*``) is that section's KEY: the same option under the spelling every method uses. The
        config keeps the section's (so saved configs and study unit keys stay as they were); an option
        given both ways with two values is refused."""
        from teachx.training.methods import METHODS
        from teachx.training.methods.base import unknown_option_message

        method = data.get("method")
        if not isinstance(method, dict) or not isinstance(method.get("options"), dict) or not method["options"]:
            return data
        name = method.get("name", MethodConfig.name)
        if not isinstance(name, str) or name not in METHODS or not METHODS.get(name).config_section:
            return data  # another method's options (MethodConfig.validate checks them), or an unknown name
        section = METHODS.get(name).config_section
        own = data.get(section) if data.get(section) is not None else {}
        if not isinstance(own, dict):
            return data  # from_dict names the section that is no mapping
        keys = [f.name for f in dataclasses.fields(get_type_hints(RunConfig)[section])]
        own = dict(own)
        for key, value in method["options"].items():
            if key not in keys:
                raise ConfigError(unknown_option_message(METHODS.canonical(name), str(key), keys))
            if key in own and own[key] != value:
                raise ConfigError(f"{section}.{key} and method.options.{key} are the same option of method {METHODS.canonical(name)}, "
                                  f"set to {own[key]!r} and {value!r}; keep one of them")
            own[key] = value
        return {**data, section: own, "method": {**method, "options": {}}}

    def validate(self) -> None:
        self._validate_method()
        ic = self.impactx
        if ic.per_class and ic.self_teach_every and self.teacher.target == "predicted":
            raise ConfigError("impactx.per_class with impactx.self_teach_every needs teacher.target=label: a refresh would "
                              "explain the training model's predicted classes, which the per-class loss does not track")

    def _validate_method(self) -> None:
        """A method's own config section (impactx.*) belongs to it: set with another method it would be ignored."""
        from teachx.training.methods import METHODS

        name = METHODS.canonical(self.method.name)
        for owner in METHODS.names():
            section = METHODS.get(owner).config_section
            if not section or owner == name:
                continue
            values = getattr(self, section)
            changed = [k for k, v in to_dict(values).items() if v != getattr(type(values)(), k)]
            if changed:
                raise ConfigError(f"{section}.{changed[0]} is an option of method {owner}, not of '{name}'; remove it "
                                  f"(or set method.name={owner}); {name}'s options go under method.options")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def resolve_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None) -> RunConfig:
    """defaults <- base dict <- YAML file <- command-line overrides, validated."""
    data: dict[str, Any] = dict(base or {})
    if path:
        from teachx.interfaces.shipped_configs import find_config

        data = merge(data, load_yaml(find_config(path)))  # a file, or a shipped config's name
    data = apply_overrides(data, list(overrides or []))
    if "study" in data:  # a study config (or study.* overrides) given to `teachx run` / `train`
        raise ConfigError("the study: section (study.* keys) belongs to `teachx study` configs: run a study with "
                          "`teachx study CONFIG --out DIR` (`teachx config CONFIG` shows it), or drop the study.* keys")
    cfg = from_dict(RunConfig, data)
    check_names(cfg)
    return cfg


#: impactx.* keys that null leaves to the decoder (``ImpactxConfig.resolve_design``)
DECODER_CHOSEN = ("per_class", "map_loss", "decoder_width", "decoder_reads_m")


def study_base_config(base: dict[str, Any]) -> RunConfig:
    """The run config a study's units start from, as `teachx config` shows it: resolved, except the
    impactx.* keys the base leaves to the decoder, which stay null -- each arm's decoder (impactx.decoder)
    resolves them, so the printed study reads back as the same study."""
    cfg = resolve_config(base=base)
    base = RunConfig.normalize_data(dict(base))  # method.options.KEY of IMPACTX given as its impactx.KEY
    given = base.get("impactx") if isinstance(base.get("impactx"), dict) else {}
    for key in DECODER_CHOSEN:
        if given.get(key) is None:
            setattr(cfg.impactx, key, None)
    return cfg


def missing_value(arg: str) -> Optional[ConfigError]:
    """The error for a KEY given without =VALUE (``train.epochs``, ``seed``, ``study.n_seeds``) where a
    CONFIG or an override goes: a key of the config (or its study section) that is no file; else None."""
    import dataclasses
    from pathlib import Path

    parts = arg.split(".")
    sections = {f.name for f in dataclasses.fields(RunConfig)} | {"study"}
    if "=" in arg or Path(arg).expanduser().exists() or parts[0] not in sections or not all(p.isidentifier() for p in parts):
        return None
    return ConfigError(f"'{arg}' has no value; write {arg}=VALUE (no spaces around '=')")


def check_names(cfg: RunConfig) -> None:
    """Fail early (before any directory is made) on unknown dataset, backbone or teacher names."""
    from teachx.data import get_source
    from teachx.models import MODELS
    from teachx.teachers import TEACHERS

    get_source(cfg.data.name)
    cfg.data.load_options()  # data.image_size and co. only where the dataset's format has them
    for name in (cfg.model.backbone, cfg.teacher.backbone, cfg.impactx.lep_backbone):
        if name and ":" not in name:
            MODELS.canonical(name)
    TEACHERS.canonical(cfg.teacher.method)


def resolved_notes(data: DataConfig) -> dict[str, str]:
    """data.* values left to the dataset (null), as the dataset resolves them: from the source
    registry alone, so ``teachx config`` states them without reading any data."""
    from teachx.data import get_source

    source, _ = get_source(data.name)
    notes = {}
    if data.hflip is None:
        aug = data.augmentation()
        notes["hflip"] = f"{str(aug['hflip']).lower()} ({aug['hflip_from']})"
    if "size" in source.options:  # imagefolder: what happens to the user's images
        defaults = source.options
        if data.image_size is None:
            notes["image_size"] = "each image's own size (all images must match)"
        if data.channels is None:
            notes["channels"] = ("each image's own channel count (all images must match; an alpha channel is kept as "
                                 "a channel, palette images count as RGB, 16-bit ones are scaled to 8 bits)")
        if data.test_fraction is None:
            notes["test_fraction"] = f"{defaults['test_fraction']} (used only without train/ and test/ folders)"
        if data.test_seed is None:
            notes["test_seed"] = f"{defaults['seed']} (used only without train/ and test/ folders)"
    return notes


def annotate_resolved(text: str, cfg: RunConfig) -> str:
    """The YAML of ``cfg`` with a trailing ``# resolved: ...`` comment on each data.* line left to the dataset.

    The data section is written one key per line (block style) so that each line can carry its note.
    """
    import yaml

    notes = resolved_notes(cfg.data)
    out, section = [], None
    for line in text.splitlines(keepends=True):
        if line[:1].strip():
            section = line.split(":", 1)[0]
            if section == "data":
                out.append("data:\n")
                for key, value in to_dict(cfg.data).items():
                    flow = yaml.safe_dump(value, default_flow_style=True, width=10**6).rstrip("\n")
                    flow = flow[: -len("\n...")] if flow.endswith("\n...") else flow  # a bare scalar ends its document
                    out.append(f"  {key}: {flow}" + (f"  # resolved: {notes[key]}\n" if key in notes else "\n"))
                continue
        if section != "data":
            out.append(line)
    return "".join(out)
