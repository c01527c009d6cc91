"""The data plan of a run: the dataset, its training / validation split, augmentation, the test images
maps are evaluated on, and how the teacher model is trained (its own seed, backbone, data or training)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np

from teachx.config.loader import from_dict, set_dotted
from teachx.config.schema import RunConfig
from teachx.data import load_dataset, options as data_options
from teachx.data.loading import train_val_split
from teachx.data.artefacts import apply_artefact
from teachx.data.shortcuts import apply_shortcut
from teachx.data.transforms import Augment
from teachx.errors import ConfigError
from teachx.training.trainer import DataPlan


def make_plan(cfg: RunConfig, progress: bool = True) -> DataPlan:
    ds = load_dataset(
        cfg.data.name,
        root=cfg.data.root,
        download=cfg.data.download,
        progress=progress,
        **data_options.load_options(cfg.data),
    )
    if cfg.data.shortcut is not None:  # a shortcut benchmark: the artefact and its masks (teachx.data.shortcuts)
        ds = apply_shortcut(
            ds,
            cfg.data.shortcut,
            train=cfg.data.shortcut_train,
            size=cfg.data.shortcut_size,
            seed=cfg.data.shortcut_seed,
            progress=progress,
        )
    art = cfg.data.artefact
    if art is not None:  # an R2R artefact benchmark: a fraction of some classes poisoned (teachx.data.artefacts)
        ds = apply_artefact(
            ds,
            art.kind,
            classes=list(art.classes),
            p=art.p,
            seed=art.seed,
            test=art.test,
            oracle_masks=art.oracle_masks,
            progress=progress,
        )
    labels = np.asarray(ds.train.labels)
    pool = np.arange(len(labels))
    if cfg.data.train_size is not None:
        if cfg.data.train_size > len(labels):
            raise ConfigError(
                f"data.train_size={cfg.data.train_size} exceeds the {len(labels)} training images of {ds.name}"
            )
        if cfg.data.train_size < len(labels):
            keep, _ = train_val_split(len(labels), 1.0 - cfg.data.train_size / len(labels), cfg.data.split_seed, labels)
            pool = np.sort(keep)
    if cfg.data.val_fraction > 0:
        tr, va = train_val_split(len(pool), cfg.data.val_fraction, cfg.data.split_seed, labels[pool])
        train_idx, val_idx = pool[np.sort(tr)], pool[np.sort(va)]
    else:
        train_idx, val_idx = pool, pool[:0]
    return DataPlan(ds, train_idx, val_idx, training_augment(cfg))


def training_augment(cfg: RunConfig) -> Optional[Augment]:
    """The crop / flip augmentation ``cfg`` trains with (None: none); data.hflip left unset is the dataset's
    default, flips only where a mirrored image keeps its class."""
    aug = data_options.augmentation(cfg.data)
    return Augment(crop_padding=aug["crop_padding"], hflip=aug["hflip"]) if aug["augment"] else None


def data_summary(plan: DataPlan, cfg: Optional[RunConfig] = None) -> dict[str, Any]:
    """What the run trains and tests on, including the choices that change results (augmentation,
    image conversion) and the dataset's notices (a carved test split, ignored entries)."""
    ds = plan.dataset
    aug = plan.augment
    augmentation = {
        "augment": aug is not None,
        "crop_padding": aug.crop_padding if aug else 0,
        "hflip": bool(aug and aug.hflip),
    }
    if cfg is not None:
        augmentation["hflip_from"] = data_options.augmentation(cfg.data)["hflip_from"]
    out = {
        "dataset": ds.name,
        "channels": ds.channels,
        "image_size": list(ds.image_size),
        "classes": ds.num_classes,
        "train_images": int(len(plan.train_idx)),
        "val_images": int(len(plan.val_idx)),
        "test_images": int(len(ds.test)),
        "augmentation": augmentation,
    }
    if ds.extra.get("converted"):
        out["converted"] = ds.extra["converted"]  # imagefolder: every image resized / converted on load
    out["notices"] = list(ds.extra.get("notices", []))
    return out


def log_data(plan: DataPlan, cfg: Optional[RunConfig], log: Callable[[str], None], suffix: str = "") -> None:
    """The run log's ``data: {...}`` line, then one line per dataset notice."""
    summary = data_summary(plan, cfg)
    notices = summary.pop("notices")
    log(f"data: {json.dumps(summary)}{suffix}")
    for notice in notices:
        log(f"data: note: {notice}")


def eval_indices(cfg: RunConfig, plan: DataPlan) -> np.ndarray:
    """The test images used for map-quality evaluation: a seeded stratified subset (fixed across seeds)."""
    n = len(plan.dataset.test)
    k = cfg.teacher.eval_images
    if k is None or k >= n:
        return np.arange(n)
    keep, _ = train_val_split(n, 1.0 - k / n, cfg.data.split_seed, np.asarray(plan.dataset.test.labels))
    if len(keep) < min(k, n):  # fewer images than classes: a stratified subset rounds down to nothing
        keep = np.random.default_rng(cfg.data.split_seed).choice(n, size=min(k, n), replace=False)
    return np.sort(keep)


# -- the teacher model's training ----------------------------------------------------------------


def teacher_training(cfg: RunConfig) -> tuple[RunConfig, str, dict[str, Any]]:
    """How the teacher model is trained: (config carrying the teacher's seed, backbone, backbone options).

    By default it is the student's baseline; ``teacher.backbone`` makes it a different (e.g. stronger)
    model, ``teacher.seed`` fixes its seed, so that every student seed shares one teacher, and
    ``teacher.training`` changes its data or training (e.g. the full split for a student trained on 1k).
    """
    tcfg = replace(cfg, seed=cfg.teacher.seed) if cfg.teacher.seed is not None else cfg
    if cfg.teacher.training:
        tcfg = _with_teacher_training(tcfg)
    if cfg.teacher.backbone and cfg.teacher.backbone != cfg.model.backbone:
        return tcfg, cfg.teacher.backbone, dict(cfg.teacher.backbone_options)
    return tcfg, cfg.model.backbone, dict(cfg.model.options)


def _with_teacher_training(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``teacher.training``'s data.* / train.* overrides applied (validated as usual)."""
    data = cfg.to_dict()
    for key, value in cfg.teacher.training.items():
        set_dotted(data, key, value)
    return from_dict(RunConfig, data, "teacher.training")


def separate_teacher(cfg: RunConfig) -> bool:
    """Whether the teacher is a model of its own rather than the student's baseline."""
    tcfg, backbone, options = teacher_training(cfg)
    return (
        tcfg.seed != cfg.seed
        or backbone != cfg.model.backbone
        or options != dict(cfg.model.options)
        or tcfg.data != cfg.data
        or tcfg.train != cfg.train
    )
