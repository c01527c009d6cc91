"""The data.* config section as the dataset registry reads it: its checks, the format options it passes
to ``load_dataset``, the training augmentation it gives and the values it leaves to the dataset.

The checks are added to the config (:mod:`teachx.config.schema`) as the ``data.validate`` hook when
:mod:`teachx.data` is imported: the config stays on the ground floor, the data floor knows its names.
"""

from __future__ import annotations

from typing import Any

from teachx.config.schema import DataConfig, add_hook
from teachx.data.artefacts import ARTEFACTS, TEST_SPLITS
from teachx.data.imagefolder import parse_size
from teachx.data.shortcuts import SHORTCUTS, TRAIN_MODES, DecoySource
from teachx.data.sources import get_source
from teachx.errors import ConfigError

#: data.* keys that are options of a dataset format (imagefolder), with their ``load_dataset`` names.
FORMAT_OPTIONS = {"image_size": "size", "channels": "channels", "test_fraction": "test_fraction", "test_seed": "seed"}


def validate(data: DataConfig) -> None:
    """data.shortcut* and data.image_size: the shortcut artefact registry and the image-size syntax."""
    if data.shortcut_train not in TRAIN_MODES:
        raise ConfigError(f"data.shortcut_train must be one of {', '.join(TRAIN_MODES)}, got {data.shortcut_train!r}")
    if data.shortcut_size < 1:
        raise ConfigError(f"data.shortcut_size must be >= 1 (pixels), got {data.shortcut_size}")
    if data.shortcut_seed < 0:
        raise ConfigError(f"data.shortcut_seed must be >= 0, got {data.shortcut_seed}")
    if data.shortcut is not None:
        try:
            data.shortcut = SHORTCUTS.canonical(data.shortcut)
        except ConfigError as exc:
            raise ConfigError(f"data.shortcut: {exc}") from None
        if isinstance(get_source(data.name)[0], DecoySource):
            raise ConfigError(
                f"data.name={data.name} already carries its artefact; drop data.shortcut, or add it to "
                f"the plain dataset (data.name={get_source(data.name)[0].base} data.shortcut={data.shortcut})"
            )
    if data.artefact is not None:
        validate_artefact(data)
    if data.image_size is not None:
        parse_size(data.image_size, "data.image_size")


def validate_artefact(data: DataConfig) -> None:
    """data.artefact.*: the kind registry and the ranges (the class indices are checked on load, against the
    dataset's classes)."""
    art = data.artefact
    if not art.kind:
        raise ConfigError(f"data.artefact.kind is required: one of {', '.join(ARTEFACTS.names())} (e.g. timestamp)")
    try:
        art.kind = ARTEFACTS.canonical(art.kind)
    except ConfigError as exc:
        raise ConfigError(f"data.artefact.kind: {exc}") from None
    if not art.classes:
        raise ConfigError("data.artefact.classes must name at least one class index (e.g. [0])")
    if any(c < 0 for c in art.classes) or len(set(art.classes)) != len(art.classes):
        raise ConfigError(
            f"data.artefact.classes must be distinct class indices >= 0 (e.g. [0] or [0, 3]), got {art.classes}"
        )
    if not 0.0 <= art.p <= 1.0:
        raise ConfigError(
            f"data.artefact.p must be a fraction in [0, 1] (e.g. 0.1; 0 for the clean-data ceiling), got {art.p}"
        )
    if art.seed < 0:
        raise ConfigError(f"data.artefact.seed must be >= 0, got {art.seed}")
    if art.test not in TEST_SPLITS:
        raise ConfigError(f"data.artefact.test must be one of {', '.join(TEST_SPLITS)}, got {art.test!r}")
    if data.shortcut is not None:
        raise ConfigError("data.artefact and data.shortcut are two benchmarks; set one of them (drop data.shortcut)")
    if isinstance(get_source(data.name)[0], DecoySource):
        raise ConfigError(
            f"data.name={data.name} already carries its artefact; use the plain dataset with data.artefact "
            f"(data.name={get_source(data.name)[0].base})"
        )


add_hook("data.validate", validate)


def load_options(data: DataConfig) -> dict[str, Any]:
    """The data.* keys that are options of the dataset's format, as ``load_dataset`` keywords."""
    source, _ = get_source(data.name)
    out = {}
    for key, option in FORMAT_OPTIONS.items():
        value = getattr(data, key)
        if value is None:
            continue
        if option not in source.options:
            raise ConfigError(f"data.{key} applies to imagefolder:PATH data only, not to '{data.name}'; remove it")
        out[option] = value
    return out


def augmentation(data: DataConfig) -> dict[str, Any]:
    """The training augmentation the data section gives, with the dataset's default resolved from the
    source registry (nothing is loaded): augment, crop_padding, hflip, and where hflip comes from."""
    if not data.augment:
        return {"augment": False, "crop_padding": 0, "hflip": False, "hflip_from": "data.augment=false"}
    if data.hflip is not None:
        return {"augment": True, "crop_padding": data.crop_padding, "hflip": data.hflip, "hflip_from": "data.hflip"}
    if data.shortcut is not None:
        return {
            "augment": True,
            "crop_padding": data.crop_padding,
            "hflip": False,
            "hflip_from": "data.shortcut: flips would move the artefact",
        }
    source, _ = get_source(data.name)
    return {
        "augment": True,
        "crop_padding": data.crop_padding,
        "hflip": bool(source.hflip),
        "hflip_from": f"{source.name}: {source.hflip_reason}",
    }


def resolved_notes(data: DataConfig) -> dict[str, str]:
    """data.* values left to the dataset (null), as the dataset resolves them: from the source
    registry alone, so ``teachx config`` states them without reading any data."""
    source, _ = get_source(data.name)
    notes = {}
    if data.hflip is None:
        aug = augmentation(data)
        notes["hflip"] = f"{str(aug['hflip']).lower()} ({aug['hflip_from']})"
    if "size" in source.options:  # imagefolder: what happens to the user's images
        defaults = source.options
        if data.image_size is None:
            notes["image_size"] = "each image's own size (all images must match)"
        if data.channels is None:
            notes["channels"] = (
                "each image's own channel count (all images must match; an alpha channel is kept as "
                "a channel, palette images count as RGB, 16-bit ones are scaled to 8 bits)"
            )
        if data.test_fraction is None:
            notes["test_fraction"] = f"{defaults['test_fraction']} (used only without train/ and test/ folders)"
        if data.test_seed is None:
            notes["test_seed"] = f"{defaults['seed']} (used only without train/ and test/ folders)"
    return notes
