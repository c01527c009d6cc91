"""Reading a run config: defaults <- base dict <- YAML file (or a shipped config's name) <- overrides."""

from __future__ import annotations

from typing import Any, Optional

from teachx.config.loader import apply_overrides, from_dict, load_yaml, merge
from teachx.config.schema import RunConfig, drop_other_spellings
from teachx.config.shipped import find_config
from teachx.errors import ConfigError


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None
) -> RunConfig:
    """defaults <- base dict <- YAML file <- command-line overrides, validated (the names of datasets,
    backbones and teachers are checked by :func:`teachx.runs.resolve.resolve_config`, which runs use). Each layer
    replaces an option however the one below spelt it (``impactx.lam=0`` over a file's ``method.options.lam``)."""
    data: dict[str, Any] = dict(base or {})
    if path:  # a file, or a shipped config's name
        layer = load_yaml(find_config(path))
        data = merge(drop_other_spellings(data, layer), layer)
    overrides = list(overrides or [])  # one layer: the command line (two spellings of one key there are refused)
    data = apply_overrides(drop_other_spellings(data, apply_overrides({}, overrides)), overrides)
    if "study" in data:  # a study config (or study.* overrides) given to `teachx run` / `train`
        raise ConfigError(
            "the study: section (study.* keys) belongs to `teachx study` configs: run a study with "
            "`teachx study CONFIG --out DIR` (`teachx config CONFIG` shows it), or drop the study.* keys"
        )
    return from_dict(RunConfig, data)
