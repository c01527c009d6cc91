"""A run config resolved for running: loaded with every floor's checks, and its names checked.

The config (:mod:`teachx.config`) sits on the ground floor; the checks that need the registries of the
floors above (dataset, decoder, map-loss and method names) are hooks those floors add when imported.
This module imports them all, so every config a run, study or the service resolves is checked alike.
"""

from __future__ import annotations

from typing import Any, Optional

import teachx.models.decoders  # noqa: F401 (adds IMPACTX's design and decoder checks)
import teachx.training.map_losses  # noqa: F401 (adds IMPACTX's map_loss check)
from teachx.config.load import load_config
from teachx.config.schema import RunConfig
from teachx.data import get_source
from teachx.errors import ConfigError
from teachx.data.options import load_options
from teachx.models import MODELS
from teachx.teachers import TEACHERS
from teachx.training.methods import DECODER_CHOSEN, impactx_options, uses_impactx_options  # the method.* checks


def resolve_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None
) -> RunConfig:
    """defaults <- base dict <- YAML file <- command-line overrides, validated, with its names checked."""
    cfg = load_config(path, overrides, base)
    check_names(cfg)
    return cfg


def study_base_config(base: dict[str, Any]) -> RunConfig:
    """The run config a study's units start from, as `teachx config` shows it: resolved, except that IMPACTX's
    options are only those the base gives (a design option given as null stays null): an arm may choose another
    method, or a decoder whose recommended design differs, so the printed study reads back as the same study."""
    cfg = resolve_config(base=base)
    if uses_impactx_options(cfg):
        given = RunConfig.normalize_data(dict(base)).get("method") or {}  # impactx.KEY given as method.options.KEY
        given = given.get("options") or {}
        cfg.method.options = {
            k: None if k in DECODER_CHOSEN and given[k] is None else v
            for k, v in cfg.method.options.items()
            if k in given
        }
    return cfg


def check_names(cfg: RunConfig) -> None:
    """Fail early (before any directory is made) on unknown dataset, backbone or teacher names."""
    get_source(cfg.data.name)
    load_options(cfg.data)  # data.image_size and co. only where the dataset's format has them
    options = impactx_options(cfg)
    for name in (cfg.model.backbone, cfg.teacher.backbone, options.lep_backbone):
        if name and ":" not in name:
            MODELS.canonical(name)
    TEACHERS.canonical(cfg.teacher.method)
    if options.self_teach_method not in (None, "teacher"):
        try:
            TEACHERS.canonical(options.self_teach_method)
        except ConfigError as exc:
            raise ConfigError(f"impactx.self_teach_method: {exc} (or teacher: the teacher method)") from None
    check_teacher_backbone(cfg)


def check_teacher_backbone(cfg: RunConfig) -> None:
    """A teacher that explains only some backbones (``Teacher.backbones``, e.g. bcos) refuses any other
    before a teacher model is trained; a given ``teacher.checkpoint`` is checked when it is explained."""
    accepted = TEACHERS.get(cfg.teacher.method).backbones
    if not accepted or cfg.teacher.checkpoint:
        return
    backbone = cfg.teacher.backbone or cfg.model.backbone
    if ":" in backbone or MODELS.canonical(backbone) not in accepted:
        raise ConfigError(
            f"teacher.method={cfg.teacher.method} explains {' or '.join(accepted)} models only, and the teacher "
            f"model would be {backbone}; set teacher.backbone={accepted[0]} or choose another teacher.method"
        )
