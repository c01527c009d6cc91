"""A run config resolved for running: loaded with every floor's checks, and its names checked.

The config (:mod:`teachx.config`) sits on the ground floor; the checks that need the registries of the
floors above (dataset, decoder, map-loss and method names) are hooks those floors add when imported.
This module imports them all, so every config a run, study or the service resolves is checked alike.
"""

from __future__ import annotations

from typing import Any, Optional

import teachx.models.decoders  # noqa: F401 (adds the impactx.* design and decoder checks)
import teachx.training.map_losses  # noqa: F401 (adds the impactx.map_loss check)
import teachx.training.methods  # noqa: F401 (adds the method.* checks)
from teachx.config.load import load_config
from teachx.config.schema import DECODER_CHOSEN, RunConfig
from teachx.data import get_source
from teachx.errors import ConfigError
from teachx.data.options import load_options
from teachx.models import MODELS
from teachx.teachers import TEACHERS


def resolve_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None
) -> RunConfig:
    """defaults <- base dict <- YAML file <- command-line overrides, validated, with its names checked."""
    cfg = load_config(path, overrides, base)
    check_names(cfg)
    return cfg


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


def check_names(cfg: RunConfig) -> None:
    """Fail early (before any directory is made) on unknown dataset, backbone or teacher names."""
    get_source(cfg.data.name)
    load_options(cfg.data)  # data.image_size and co. only where the dataset's format has them
    for name in (cfg.model.backbone, cfg.teacher.backbone, cfg.impactx.lep_backbone):
        if name and ":" not in name:
            MODELS.canonical(name)
    TEACHERS.canonical(cfg.teacher.method)
    if cfg.impactx.self_teach_method not in (None, "teacher"):
        try:
            TEACHERS.canonical(cfg.impactx.self_teach_method)
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
