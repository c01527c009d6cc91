"""The run configuration: one YAML file with sections data / model / train / teacher / impactx.

Every option has a documented default here; ``teachx run --print-config`` shows the resolved
file. Unknown keys are rejected with a suggestion. The resolved config is saved in each run
directory, so runs can be diffed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

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
    augment: bool = True
    crop_padding: int = 4  # random crop with this much zero padding
    hflip: Optional[bool] = None  # horizontal flips; default: the dataset's own choice (no for digits)

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_size is not None and self.train_size < 10:
            raise ConfigError(f"data.train_size must be >= 10, got {self.train_size}")


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
    backbone_options: dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None  # seed of the teacher model's training (default: the run's seed); fix it to share one teacher across seeds
    # how the teacher model is trained, as overrides of this config's data.* and train.* keys, e.g.
    # {data.train_size: null, train.epochs: 15}: a teacher that saw the full training split (more
    # knowledge than a student trained on a subset); its maps are still made on the student's images
    training: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_images: Optional[int] = 1000  # test images explained for map-quality evaluation (None: all)
    maps_dir: Optional[str] = None  # store location; default $TEACHX_CACHE/maps (shared by runs and seeds)


    def validate(self) -> None:
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
    decoder_width: int = 32  # channels of the decoder's first conv block (halved per block, >= 16)
    decoder_scale: int = 2  # decoder convolves up to map_size / scale, then upsamples bilinearly (1: full resolution)
    classifier_hidden: int = 0  # 0: C is linear on concat[m, z]
    map_size: Optional[int] = None  # decoder output resolution; default: the input resolution
    self_teach_every: int = 0  # > 0: self-teaching, the maps are re-made every K epochs by the teacher method applied to the model being trained

    def validate(self) -> None:
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


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    impactx: ImpactxConfig = field(default_factory=ImpactxConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def resolve_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None) -> RunConfig:
    """defaults <- base dict <- YAML file <- command-line overrides, validated."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, load_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(RunConfig, data, "config")
    check_names(cfg)
    return cfg


def check_names(cfg: RunConfig) -> None:
    """Fail early (before any directory is made) on unknown dataset, backbone or teacher names."""
    from teachx.data import get_source
    from teachx.models import MODELS
    from teachx.teachers import TEACHERS

    get_source(cfg.data.name)
    for name in (cfg.model.backbone, cfg.teacher.backbone, cfg.impactx.lep_backbone):
        if name and ":" not in name:
            MODELS.canonical(name)
    TEACHERS.canonical(cfg.teacher.method)
