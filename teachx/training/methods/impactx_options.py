"""IMPACTX's options, typed: the ``method.options`` of ``impactx`` and ``impactx_cleaned``.

They were once a top-level section of the config (``impactx:``), and that spelling stays accepted everywhere a
config is read (a file, ``impactx.KEY=VALUE``, study arms and regimes, the config.yaml of an existing run
directory): the methods name it as their ``config_section``, :mod:`teachx.training.methods.base` registers it as
an alias of ``method.options`` (:func:`teachx.config.schema.add_section_alias`) and folds it into them. A config holds the options as plain values in
``cfg.method.options`` (every one stated, the decoder's choices resolved, as ``teachx`` writes them); code reads
them typed with :func:`impactx_options`.

Study unit keys and run-directory hashes were made from the old layout; :func:`legacy_layout` gives a config
dict back in it, the one place that maps the new layout to the old, so that every key and hash stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import teachx.models.decoders  # noqa: F401 (the impactx.design hook: the decoder's recommended design)
from teachx.config.loader import to_dict
from teachx.config.schema import RunConfig, add_hook, run_hooks
from teachx.errors import ConfigError
from teachx.training.methods.base import METHODS

#: the section these options were written in before they became IMPACTX's method options (still accepted)
SECTION = "impactx"


@dataclass
class ImpactxOptions:
    """IMPACTX's options (``method.options`` of ``impactx`` and ``impactx_cleaned``, also written ``impactx.KEY``),
    typed: what the method reads through :func:`impactx_options`."""

    lam: float = 1.0  # weight of the explanation loss (0 = same architecture, no explanation signal)
    maps: Literal["teacher", "shuffled", "constant", "random"] = "teacher"  # controls for ablations
    lep_backbone: Optional[str] = None  # latent explanation predictor; default: the student backbone
    m_init: Literal["fresh", "teacher"] = "fresh"  # initialise M from the teacher (same backbone only)
    m_frozen: bool = False  # keep M fixed (only with m_init=teacher)
    # channels of the decoder's first conv block (paper decoder: halved per block, >= 16; unet decoders: every pyramid
    # level); null: the decoder's recommended width (unet_input, the default: 16; the others: 32)
    decoder_width: Optional[int] = None
    decoder_scale: int = (
        2  # paper decoder: convolves up to map_size / scale, then upsamples bilinearly (1: full resolution)
    )
    classifier_hidden: int = 0  # 0: C is linear on concat[m, z]
    map_size: Optional[int] = None  # decoder output resolution; default: the input resolution
    # > 0: self-teaching, the maps are re-made every K epochs by method.options.self_teach_method applied to the model being
    # trained (0: off); null: the decoder's recommended setting (unet_input, the default: 1; the others: 0)
    self_teach_every: Optional[int] = None
    # the method of self-teaching's refreshes: teacher (the teacher method with every teacher.* setting) or a teacher
    # method's name (e.g. gradient_x_input; its default options, unsmoothed); null: the decoder's recommended method
    # when self_teach_every is left to the decoder too (unet_input: gradient_x_input), else teacher
    self_teach_method: Optional[str] = None
    # map decoder: unet_input (default: LEP's and M's feature pyramids with skip connections plus the input image,
    # self-taught with gradient x input; the built-in-maps studies' best) | paper (the paper's, from LEP's pooled
    # vector) | unet | additive | additive_fast | lite | lite_additive
    decoder: str = "unet_input"
    # one map per class (FastSHAP-style): trained on the explained class's map, inference gives the predicted
    # class's map; null: the decoder's recommended setting (paper: false, the others: true)
    per_class: Optional[bool] = None
    additive_reference: float = (
        0.0  # additive decoder: the reference the map measures x from, in normalised space (0 = the dataset mean)
    )
    # built-in vs teacher map loss: mse (the paper's) | pearson (1 - per-image r) | cosine (1 - per-image cosine: scale-free,
    # zero kept) | standardized_mse (target z-scored per image) | rank (pairwise pixel order); null: the decoder's
    # recommended loss (paper: mse, the others: pearson)
    map_loss: Optional[str] = None
    map_target_pool: int = (
        1  # average-pool built-in and teacher maps by K x K before the map loss (1: the teacher's resolution)
    )
    # the decoder also reads M's feature pyramid (detached: M still learns from CE alone), so the map can see what the
    # classification branch computes; null: the decoder's recommended setting (unet_input: true, the others: false;
    # false when lep_backbone is set: the two pyramids must match)
    decoder_reads_m: Optional[bool] = None
    faith_weight: float = (
        0.0  # > 0: FastSHAP-style term, the built-in map must predict the model's own output on masked inputs
    )
    faith_patch: int = 4  # patch size (pixels) that the faithfulness term masks
    faith_samples: int = 2  # masked copies per image and step for the faithfulness term (each second one the complement of the one before)

    def __post_init__(self) -> None:
        self.resolve_design()

    def resolve_design(self) -> None:
        """Fill per_class / map_loss / decoder_width / decoder_reads_m / self_teach_every / self_teach_method left
        unset (None) from the decoder's
        ``recommended`` setting (the hook of :mod:`teachx.models.decoders`), so that ``method.options.decoder=paper``
        alone is the paper's method and every written config states the values."""
        run_hooks("impactx.design", self)

    def validate(self) -> None:
        self.resolve_design()
        if self.lam < 0:
            raise ConfigError(f"impactx.lam must be >= 0, got {self.lam}")
        if self.decoder_scale < 1 or self.decoder_scale & (self.decoder_scale - 1):
            raise ConfigError(f"impactx.decoder_scale must be a power of two >= 1, got {self.decoder_scale}")
        if self.self_teach_every is not None and self.self_teach_every < 0:
            raise ConfigError(f"impactx.self_teach_every must be >= 0 (0 = off), got {self.self_teach_every}")
        if self.self_teach_every and self.maps != "teacher":
            raise ConfigError(
                f"impactx.self_teach_every needs impactx.maps=teacher (got maps={self.maps}): self-teaching replaces the teacher's maps"
            )
        if self.m_frozen and self.m_init != "teacher":
            raise ConfigError("impactx.m_frozen=true needs impactx.m_init=teacher (a frozen fresh M would be random)")
        run_hooks("impactx.validate", self)  # decoder and map-loss names, as their registries know them
        for key in ("decoder_width", "map_target_pool", "faith_patch", "faith_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:  # None: no decoder hook loaded
                raise ConfigError(f"impactx.{key} must be an integer >= 1, got {getattr(self, key)}")
        if self.faith_weight < 0:
            raise ConfigError(f"impactx.faith_weight must be >= 0 (0 = off), got {self.faith_weight}")


#: options that null leaves to the decoder (``ImpactxOptions.resolve_design``)
DECODER_CHOSEN = ("per_class", "map_loss", "decoder_width", "decoder_reads_m", "self_teach_every", "self_teach_method")

#: every option's name, in the order the config writes them
OPTION_NAMES = tuple(f.name for f in fields(ImpactxOptions))


def uses_impactx_options(cfg: RunConfig) -> bool:
    """Whether the configured method reads IMPACTX's options (``impactx`` and ``impactx_cleaned``)."""
    name = cfg.method.name
    return name in METHODS and METHODS.get(name).options_type is ImpactxOptions


def impactx_options(cfg: RunConfig) -> ImpactxOptions:
    """The typed IMPACTX options of ``cfg``: its method's (``method.options``) when the method is IMPACTX's, else
    the defaults (what an IMPACTX model of this config's other settings would be)."""
    if not uses_impactx_options(cfg):
        return ImpactxOptions()
    return ImpactxOptions(**{k: v for k, v in cfg.method.options.items() if k in OPTION_NAMES})


def saved_impactx_options(config: dict[str, Any]) -> dict[str, Any]:
    """IMPACTX's options in a run config saved as a plain dict (config.yaml, a study unit's unit.json), written
    either way: ``method.options`` (this teachx) or the ``impactx:`` section (teachx before)."""
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    options = method.get("options") if isinstance(method.get("options"), dict) else {}
    section = config.get(SECTION) if isinstance(config.get(SECTION), dict) else {}
    return {**section, **{k: v for k, v in options.items() if k in OPTION_NAMES}}


def legacy_layout(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict as teachx writes it (``cfg.to_dict()``, perhaps with ``command`` first) in the layout teachx
    wrote before IMPACTX's options became its method options: an ``impactx:`` section before ``method`` with every
    option (the method's for IMPACTX's methods, else the defaults), and ``method.options`` with the method's own
    options alone (impactx_cleaned's ``concept``; none for impactx).

    Study unit keys (:mod:`teachx.studies.spec`) and run-directory hashes (:mod:`teachx.runs.rundir`) hash this
    layout, so that the same settings keep the keys and hashes they always had: the units of existing studies and
    the stages of existing run directories are reused. This is the one place that maps the new layout back."""
    method = dict(values.get("method") or {})
    options = dict(method.get("options") or {})
    name = method.get("name", RunConfig().method.name)
    if isinstance(name, str) and name in METHODS and METHODS.get(name).options_type is ImpactxOptions:
        section = to_dict(ImpactxOptions(**{k: v for k, v in options.items() if k in OPTION_NAMES}))
        method["options"] = {k: v for k, v in options.items() if k not in OPTION_NAMES}
    else:
        section = to_dict(ImpactxOptions())
    out = {k: v for k, v in values.items() if k != "method"}
    out[SECTION] = section
    if "method" in values:
        out["method"] = method
    return out


def _check_across_sections(cfg: RunConfig) -> None:
    """The ``run.validate`` hook: per-class maps with self-teaching need the labels' maps."""
    if not uses_impactx_options(cfg):
        return
    ic = impactx_options(cfg)
    if ic.per_class and ic.self_teach_every and cfg.teacher.target == "predicted":
        raise ConfigError(
            "impactx.per_class with impactx.self_teach_every needs teacher.target=label: a refresh would "
            "explain the training model's predicted classes, which the per-class loss does not track; "
            "set impactx.self_teach_every=0 to train on the teacher's maps alone"
        )


add_hook("run.validate", _check_across_sections)
