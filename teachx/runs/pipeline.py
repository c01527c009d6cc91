"""The IMPACTX pipeline: teacher (baseline) training -> teacher maps -> IMPACTX training -> test.

Each stage lives in its own sub-directory of the run directory and writes ``stage.json`` when it
is complete; a re-run skips complete stages and resumes interrupted ones (training from its last
checkpoint, map generation from its store's done-mask).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.loader import from_dict, set_dotted
from teachx.config.schema import RunConfig
from teachx.data import load_dataset, options as data_options
from teachx.data.base import ImageDataset
from teachx.data.loading import train_val_split
from teachx.data.shortcuts import apply_shortcut
from teachx.data.transforms import Augment, normalize
from teachx.errors import ConfigError, CorruptionError, RunDirError
from teachx.evaluation.builtin_maps import map_corr
from teachx.evaluation.shortcut import artefact_share, wrong_reason_score
from teachx.models import any_model_from_spec, build_from_spec, build_model
from teachx.models.impactx import ImpactX
from teachx.registry import declare_measure
from teachx.runs import rundir
from teachx.runs.builtin_eval import explained_classes, faithfulness_block
from teachx.runs.figures import save_example_grid, save_training_curves
from teachx.runs.rundir import STAGE_LAYOUT, remove_owned, run_config_hash
from teachx.runs.teacher import as_nchw, make_teacher
from teachx.teachers.postprocess import postprocess
from teachx.teachers.store import MapStore, fill_store, open_store, store_key
from teachx.training.checkpoint import load_checkpoint, load_state_into
from teachx.training.impactx import ImpactxTask
from teachx.training.methods import MethodContext, build_method, method_name, method_stages
from teachx.training.self_teaching import SelfTeaching
from teachx.training.trainer import ClassifierTask, DataPlan, Trainer, evaluate
from teachx.utils import distributed as dist_utils
from teachx.utils.cache_admin import cache_root
from teachx.utils.hashing import hash_json, hash_state_dict
from teachx.utils.io import read_trusted_json, write_json_atomic
from teachx.utils.locking import file_lock
from teachx.utils.seeding import choose_device, seed_everything


# -- run directories --------------------------------------------------------------------------


def prepare_run_dir(
    run_dir: str | Path, cfg: RunConfig, command: str, overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Create ``run_dir`` with the resolved config, or resume the teachx run there with the same config.

    A directory teachx did not make is never used, with or without ``overwrite``. One made with a
    different config (options that change results: ``--quiet`` and other presentation options are
    not part of a run) is an error unless ``overwrite`` is given, which then removes only the files
    teachx wrote there (see :mod:`teachx.runs.rundir`).
    """
    return rundir.prepare_run_dir(run_dir, {"command": command, **cfg.to_dict()}, overwrite, log)


def stage_checkpoint(stage_dir: str | Path, record: dict[str, Any]) -> Path:
    """The best checkpoint of a complete stage: always the stage's own file, so that a moved or
    copied run works on its own files. Records hold it relative to the stage directory; older ones
    the path as typed then (absolute, or relative to that working directory): its file name is used."""
    return Path(stage_dir) / "checkpoints" / Path(record.get("checkpoint") or "best.safetensors").name


def stage_done(stage_dir: Path, fix: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The stage's record when it is complete, verified against its digest (None: not complete).

    A damaged record is a :class:`CorruptionError` with ``fix`` as the way forward (default:
    :func:`stage_fix`); ``run_pipeline`` turns it into ``--redo STAGE``.
    """
    p = Path(stage_dir) / "stage.json"
    if not p.exists():
        return None
    return read_trusted_json(p, fix or stage_fix(stage_dir), "stage record")


def stage_fix(stage_dir: Path) -> str:
    """The way forward for a damaged file of a stage: --redo in a run directory, deleting a study
    unit, else deleting the stage directory (so that it is trained again)."""
    return (
        run_dir_fix(Path(stage_dir) / "stage.json")
        or f"delete '{stage_dir}' and run again (that stage is trained again)"
    )


@contextlib.contextmanager
def _stage_fixes(stage_dir: Path):
    """A damaged file of ``stage_dir`` (e.g. the checkpoint a resume reads) names :func:`stage_fix`."""
    try:
        yield
    except CorruptionError as err:
        inside = err.path and Path(stage_dir).resolve() in Path(err.path).resolve().parents
        if not inside:
            raise
        raise err.with_fix(stage_fix(stage_dir)) from None


# -- corrupted files inside a run: the exact way forward ------------------------------------------

#: the stages of `teachx run` / `teachx demo`, each a sub-directory of the run directory: the baseline,
#: a separate teacher, and the method stage, named after the training method (``impactx`` by default)
STAGES = ("baseline", "teacher", *method_stages())
#: what `teachx train` writes besides config.yaml (its single stage lives in the run directory itself)
TRAIN_STAGE_FILES = ("stage.json", "checkpoints", "history.json", "results.json", "tensorboard")


def redo_fix(stage: str) -> str:
    return f"re-run the same command with --redo {stage}"


def _stage_in(run_dir: Path, path: str | Path) -> Optional[str]:
    """The stage of ``run_dir`` that holds ``path`` ('train' for a `teachx train` directory), or None."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except (ValueError, OSError):
        return None
    if len(rel.parts) > 1 and rel.parts[0] in STAGES:
        return rel.parts[0]
    if rel.parts and rel.parts[0] in TRAIN_STAGE_FILES and _run_command(run_dir) == "train":
        return "train"
    return None


def _run_command(run_dir: Path) -> Optional[str]:
    """The teachx command that made ``run_dir`` (from its config.yaml), or None when it is not a run directory."""
    try:
        for line in (Path(run_dir) / "config.yaml").read_text().splitlines():
            if line.startswith("command:"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def run_dir_fix(path: str | Path) -> Optional[str]:
    """For a damaged file inside a teachx run directory or study unit: what exactly to re-run."""
    for run_dir in list(Path(path).resolve().parents)[:4]:  # <run>/<stage>/self_maps/<store>/maps.npy at most
        if (run_dir / "unit.json").is_file() and (run_dir.parent.parent / "study.yaml").is_file():
            return unit_fix(run_dir)
        command = _run_command(run_dir)
        if command:
            stage = _stage_in(run_dir, path)
            return f"re-run the `teachx {command}` command that made '{run_dir}' with --redo {stage}" if stage else None
    return None


def unit_fix(unit_dir: Path) -> str:
    """The way forward for a damaged file of a study unit: that unit is trained again."""
    return f"delete the study unit '{unit_dir}' and re-run the same `teachx study` command (it trains that unit again)"


def load_checkpoint_verified(path: str | Path) -> Any:
    """:func:`load_checkpoint` for a checkpoint named by a user (e.g. `teachx explain`): when it is
    damaged and lies in a run directory or study unit, the error names exactly what to re-run."""
    try:
        return load_checkpoint(path)
    except CorruptionError as err:
        fix = run_dir_fix(path)
        if fix is None:
            raise
        raise err.with_fix(fix) from None


@contextlib.contextmanager
def redo_hint(run_dir: Path, stage: Optional[str] = None):
    """A :class:`CorruptionError` of a file inside a stage of ``run_dir`` gets the exact way forward:
    ``re-run the same command with --redo STAGE`` (``stage`` forces the name, e.g. 'train')."""
    try:
        yield
    except CorruptionError as err:
        found = _stage_in(run_dir, err.path) if err.path else None
        if (
            found is None
            and stage is not None
            and err.path
            and Path(run_dir).resolve() in Path(err.path).resolve().parents
        ):
            found = stage
        if found is not None:
            raise err.with_fix(redo_fix(found)) from None
        other = run_dir_fix(err.path) if err.path else None  # e.g. teacher.checkpoint inside another run
        if other:
            raise err.with_fix(other) from None
        raise


def _bound(config_hash: Optional[str]) -> dict[str, Any]:
    return {} if config_hash is None else {"config_hash": config_hash}


def check_bound(run_dir: Path, expected: Optional[str], stages: tuple[str, ...] = STAGES) -> None:
    """Refuse a run directory whose stage records were made with another config than its config.yaml
    (``expected``: its hash): a record another process wrote under another config, a stage copied from
    another run, an edited config.yaml. Records without a hash (older teachx) are taken as they are."""
    if expected is None:
        return
    wrong = []
    for stage in stages:
        record = stage_done(run_dir if stage == "train" else run_dir / stage)
        if record is not None and record.get("config_hash", expected) != expected:
            wrong.append(stage)
    if wrong:
        which = f"the {wrong[0]} stage was" if len(wrong) == 1 else f"the {' and '.join(wrong)} stages were"
        raise RunDirError(
            f"run directory '{run_dir}': {which} made with another config than its config.yaml (by another "
            "process, or copied or edited by hand); re-run the same command with "
            + " ".join(f"--redo {s}" for s in wrong)
        )


def results_bound(run_dir: Path, expected: Optional[str]) -> Optional[dict[str, Any]]:
    """The run's results.json when it is there, readable and made with the config in config.yaml
    (a results.json without a hash, from an older teachx, counts as made with it); else None."""
    results = _complete_results(run_dir)
    if results is None or expected is None or results.get("config_hash", expected) == expected:
        return results
    return None


def redo_stages(
    run_dir: Path, cfg: RunConfig, stages: list[str] | tuple[str, ...], log: Callable[[str], None] = print
) -> list[str]:
    """``--redo``: discard the named stages of the run directory (teachx's own) and what was made from
    them, so that the run trains them again; returns what was discarded.

    IMPACTX learns from the teacher's maps, so redoing the teacher -- the baseline, unless the run has
    a separate teacher or a ``teacher.checkpoint`` -- redoes IMPACTX too. Maps need no discarding: a
    store is keyed by the teacher's weights, so new weights get new maps, and identical weights
    (CPU training is deterministic) reuse the verified ones. ``results.json`` is written again at the end.
    Only what teachx wrote is discarded: a file a user put into a stage directory stays.
    """
    stages = list(dict.fromkeys(stages))
    if not stages:
        return []
    run_dir = Path(run_dir)
    if stages == ["train"]:
        targets = [run_dir / name for name in TRAIN_STAGE_FILES]
    else:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"--redo {unknown[0]}: not a stage; the stages are {', '.join(STAGES)}")
        teacher_is_baseline = not cfg.teacher.checkpoint and not separate_teacher(cfg)
        if "teacher" in stages and (cfg.teacher.checkpoint or teacher_is_baseline):
            why = (
                "teacher.checkpoint is used as the teacher"
                if cfg.teacher.checkpoint
                else "the baseline is the teacher; use --redo baseline"
            )
            raise ConfigError(f"--redo teacher: this run has no teacher stage ({why})")
        if "teacher" in stages or ("baseline" in stages and teacher_is_baseline):
            stages.append(method_name(cfg))
        targets = [run_dir / s for s in STAGES if s in stages] + [run_dir / "results.json"]

    gone = []
    for t in targets:
        if t.is_dir() and not t.is_symlink():  # only what teachx wrote there: a user's file in a stage stays
            if not remove_owned(t, STAGE_LAYOUT if t.name in STAGES else (STAGE_LAYOUT.get(t.name) or {})):
                t.rmdir()
        elif t.is_file():
            t.unlink()
        else:
            continue
        gone.append(t.name)
    log(f"[redo] discarded {', '.join(gone) if gone else 'nothing (not there yet)'} in {run_dir}: trained again below")
    return gone


# -- data ---------------------------------------------------------------------------------------


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


# -- stages -------------------------------------------------------------------------------------


def train_classifier(
    cfg: RunConfig,
    plan: DataPlan,
    out_dir: Path,
    backbone: str,
    options: dict[str, Any],
    log: Callable[[str], None] = print,
    config_hash: Optional[str] = None,
) -> dict[str, Any]:
    """Train (or resume, or skip) a plain classifier; returns its stage record (with ``config_hash``, the
    run's :func:`~teachx.runs.rundir.config_hash`, when it is part of a run directory)."""
    done = stage_done(out_dir)
    if done:
        log(f"[{out_dir.name}] complete, skipped (test acc {done['test_acc']:.4f})")
        return done
    ds = plan.dataset
    seed_everything(cfg.seed)
    model = build_model(backbone, ds.channels, ds.num_classes, ds.image_size, **options)
    trainer = Trainer(
        ClassifierTask(model, cfg.train.label_smoothing),
        plan,
        cfg.train,
        out_dir,
        seed=cfg.seed,
        device=cfg.device,
        meta={"kind": "classifier", "dataset": ds.name, "class_names": ds.class_names},
        log=log,
    )
    log(f"[{out_dir.name}] training {backbone} on {ds.name} ({len(plan.train_idx)} images, {cfg.train.epochs} epochs)")
    return _fit_and_test(
        trainer, ClassifierTask(model), plan, out_dir, log, {"backbone": backbone, **_bound(config_hash)}
    )


def _fit_and_test(
    trainer: Trainer, task, plan: DataPlan, out_dir: Path, log: Callable[[str], None], extra: dict[str, Any]
) -> dict[str, Any]:
    """Train (resuming), reload the best checkpoint, test it, and write the stage record."""
    with _stage_fixes(out_dir):  # a damaged last checkpoint is refused, with the way forward
        res = trainer.fit(resume=True)
    ck = load_checkpoint(res.best_path, fix=stage_fix(out_dir))
    load_state_into(task.model, ck.group("model"), f"checkpoint '{res.best_path}'")
    ds = plan.dataset
    test = evaluate(
        task,
        plan,
        ds.test,
        np.arange(len(ds.test)),
        trainer.cfg.eval_batch_size,
        trainer.device,
        shard=True,
        confusion=True,
    )
    record = {
        **extra,
        "checkpoint": Path(res.best_path)
        .relative_to(trainer.out_dir)
        .as_posix(),  # inside the stage: moves with the run
        "best_epoch": res.best_epoch,
        "val_acc": max(h["val_acc"] for h in res.history) if plan.val_idx.size else None,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_confusion": test.get(
            "confusion"
        ),  # row = true class, column = predicted (the report's per-class accuracy)
        "seconds": res.seconds,
        "seconds_per_epoch": float(np.median([h["seconds"] for h in res.history])),
        "history": res.history,
    }
    dist_utils.on_main(write_json_atomic, out_dir / "stage.json", record, digest=True)
    log(f"[{out_dir.name}] test accuracy {test['acc']:.4f}")
    return record


def load_classifier(path: str | Path, ds: ImageDataset) -> torch.nn.Module:
    """Rebuild a classifier from its checkpoint's spec and check it fits the dataset."""
    ck = load_checkpoint_verified(path)
    spec = ck.meta.get("model_spec")
    if not spec:
        raise ConfigError(f"checkpoint '{path}' has no model spec; use a checkpoint written by `teachx train`")
    model = build_from_spec(spec)
    load_state_into(model, ck.group("model"), f"checkpoint '{path}'")
    if (
        getattr(model, "num_classes", ds.num_classes) != ds.num_classes
        or getattr(model, "in_channels", ds.channels) != ds.channels
    ):
        raise ConfigError(
            f"checkpoint '{path}' is for {getattr(model, 'in_channels', '?')} channels / {getattr(model, 'num_classes', '?')} classes, "
            f"but {ds.name} has {ds.channels} / {ds.num_classes}; use a teacher trained on this dataset"
        )
    return model.eval()


def load_stage_model(stage_dir: Path) -> torch.nn.Module:
    """The best model of a complete stage (any method's: a classifier, IMPACTX, ABN), rebuilt from its
    checkpoint's spec; a damaged checkpoint names the stage's fix."""
    best = stage_checkpoint(stage_dir, stage_done(stage_dir) or {})
    ck = load_checkpoint(best, fix=stage_fix(stage_dir))
    model = any_model_from_spec(ck.meta.get("model_spec") or {})
    load_state_into(model, ck.group("model"), f"checkpoint '{best}'")
    return model.eval()


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


def map_recipe(cfg: RunConfig, teacher) -> dict[str, Any]:
    """What decides a map besides the data and the model: part of every map store's key."""
    return {
        "teacher": teacher.name if hasattr(teacher, "name") else cfg.teacher.method,
        "teacher_options": teacher.options(),
        "target": cfg.teacher.target,
        "reduce": cfg.teacher.reduce,
        "normalize": cfg.teacher.normalize,
        "smooth": cfg.teacher.smooth,
    }


def map_fn(
    cfg: RunConfig, plan: DataPlan, teacher, data: ImageDataset, device: torch.device
) -> Callable[[torch.nn.Module, np.ndarray], torch.Tensor]:
    """explain(model, indices): the configured teacher's post-processed maps of ``data[indices]``."""

    def explain(model: torch.nn.Module, idx: np.ndarray) -> torch.Tensor:
        x = normalize(as_nchw(data.images[idx]).to(device), plan.mean, plan.std)
        if cfg.teacher.target == "label":
            target = torch.from_numpy(np.asarray(data.labels[idx])).long().to(device)
        else:
            with torch.no_grad():
                target = model(x).argmax(1)
        raw = teacher.attribute(model, x, target)
        return postprocess(raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=cfg.teacher.smooth)

    return explain


def teacher_maps(
    cfg: RunConfig,
    plan: DataPlan,
    teacher_model: torch.nn.Module,
    split: str,
    indices: np.ndarray,
    device: torch.device,
    log: Callable[[str], None] = print,
    progress: bool = True,
    wait: bool = True,
    on_fill: Optional[Callable[[int], None]] = None,
) -> MapStore:
    """Maps of ``teacher_model`` for ``indices`` of a split, from (or into) the shared store.

    Stores are shared by runs, seeds and processes: a lock next to the store keeps two processes
    from filling it at once (``wait=False`` raises :class:`teachx.utils.locking.Busy` instead of waiting).
    ``on_fill(n)`` is called when ``n`` maps had to be made.
    """
    ds = plan.dataset
    data = ds.train if split == "train" else ds.test
    teacher = make_teacher(cfg, plan, device)
    teacher_model = teacher_model.to(device).eval()
    c = 1 if cfg.teacher.reduce != "none" else ds.channels
    material = {
        "dataset": ds.name,
        "source": ds.source,
        "split": split,
        "n": len(data),
        "data_hash": _split_fingerprint(data),
        **map_recipe(cfg, teacher),
        "model_hash": hash_state_dict(teacher_model.state_dict()),
        "mean": list(plan.mean),
        "std": list(plan.std),
    }
    maps_dir = Path(cfg.teacher.maps_dir) if cfg.teacher.maps_dir else cache_root() / "maps"

    explain = map_fn(cfg, plan, teacher, data, device)

    def open_and_fill() -> MapStore:
        store = open_store(maps_dir, material, len(data), (c, *ds.image_size), log=log)
        todo = store.missing(indices).size
        if todo:
            t0 = time.perf_counter()
            log(f"[maps] {cfg.teacher.method} maps for {todo} {split} images -> {store.path}")
            fill_store(
                store,
                indices,
                lambda idx: explain(teacher_model, idx),
                cfg.teacher.batch_size,
                progress=progress,
                desc=f"{cfg.teacher.method} maps ({split})",
            )
            log(f"[maps] {todo} maps in {time.perf_counter() - t0:.1f}s")
            if on_fill is not None:
                on_fill(int(todo))
        return store

    if dist_utils.world_size() > 1:  # the ranks fill one store together (open_store/fill_store coordinate them)
        return open_and_fill()
    lock = maps_dir / f"{store_key(material)[:20]}.lock"
    with file_lock(
        lock, wait=wait, on_wait=lambda h: log(f"[maps] waiting for pid {h.get('pid')}, which is filling {lock.stem}")
    ):
        return open_and_fill()


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


def _split_fingerprint(split) -> str:
    """Hash of the pixels and labels (cheap enough: one pass over uint8 memory)."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(split.images.shape).encode())
    h.update(np.ascontiguousarray(split.images).view(np.uint8).data)
    h.update(np.ascontiguousarray(split.labels).astype(np.int64).tobytes())
    return h.hexdigest()


def train_method_stage(
    cfg: RunConfig,
    plan: DataPlan,
    store: Optional[MapStore],
    teacher_model: Optional[torch.nn.Module],
    out_dir: Path,
    log: Callable[[str], None] = print,
    config_hash: Optional[str] = None,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train (or resume, or read back) the configured training method's model; (stage record, model in eval mode).

    ``store``: the teacher's maps of the training split, when the method needs them; ``config_hash``: as
    for :func:`train_classifier`.
    """
    ds = plan.dataset
    method = build_method(cfg)
    method.check_data(plan)
    device = choose_device(cfg.device)
    ctx = MethodContext(
        cfg,
        plan,
        device,
        store,
        teacher_model,
        log,
        explained_classes=lambda: explained_classes(cfg, plan, teacher_model, "train", plan.train_idx, device),
        self_teaching=lambda task, stage_dir: self_teaching_hook(cfg, plan, task, store, stage_dir, log),
    )
    seed_everything(cfg.seed)
    model = method.build_model(ctx)
    done = stage_done(out_dir)
    if done:
        best = stage_checkpoint(out_dir, done)
        ck = load_checkpoint(best, fix=stage_fix(out_dir))
        load_state_into(model, ck.group("model"), f"checkpoint '{best}'")
        log(f"[{out_dir.name}] complete, skipped (test acc {done['test_acc']:.4f})")
        return done, model.eval()
    task = method.task(model, ctx)
    hook = method.epoch_hook(task, ctx, out_dir)
    meta = {
        "kind": method.checkpoint_kind,
        "method": method.name,
        "dataset": ds.name,
        "class_names": ds.class_names,
        **method.checkpoint_meta(),
    }
    trainer = Trainer(
        task, plan, cfg.train, out_dir, seed=cfg.seed, device=cfg.device, meta=meta, log=log, on_epoch_start=hook
    )
    what = method.describe() + (f", self-teaching every {cfg.impactx.self_teach_every} epochs" if hook else "")
    log(f"[{out_dir.name}] training {what}, {cfg.train.epochs} epochs")
    extra = {**method.record(), **({"self_teaching": hook.refreshes} if hook else {}), **_bound(config_hash)}
    return _fit_and_test(trainer, task, plan, out_dir, log, extra), model.eval()


def self_teaching_hook(
    cfg: RunConfig, plan: DataPlan, task: ImpactxTask, store: MapStore, out_dir: Path, log: Callable[[str], None]
):
    """The hook that re-explains the training set with the model being trained (impactx.self_teach_every)."""
    device = dist_utils.device_for(choose_device(cfg.device))
    teacher = make_teacher(cfg, plan, device)
    material = {
        **map_recipe(cfg, teacher),
        "train_idx": hash_json(np.asarray(plan.train_idx).tolist()),
        "seed": cfg.seed,
    }
    return SelfTeaching(
        task,
        map_fn(cfg, plan, teacher, plan.dataset.train, device),
        plan.train_idx,
        store.maps.shape[0],
        tuple(store.maps.shape[1:]),
        cfg.impactx.self_teach_every,
        out_dir / "self_maps",
        material,
        cfg.seed,
        cfg.teacher.batch_size,
        log,
        progress=cfg.train.progress,
    )


declare_measure(
    "corr",
    "The mean per-image Pearson correlation between the built-in map and the teacher's map of a test image.",
    True,
)
declare_measure(
    "corr_mean_map",
    "The same correlation for the mean training map used for every image: the level a map "
    "that ignores the image reaches.",
    None,
)
declare_measure(
    "corr_mean_map_augmented",
    "The same for the mean map averaged over the training crops and flips: the best "
    "a map that is the same for every image can reach when trained on augmented maps.",
    None,
)
declare_measure(
    "r2_vs_mean_map",
    "How much closer (squared error) the built-in maps are to the teacher's maps than the mean "
    "training map is; above 0, the model learned per-image maps.",
    True,
)
declare_measure(
    "r2_vs_mean_map_affine",
    "The same after each map gets its best per-image scale and offset: the one to read "
    "for maps trained with a scale-free loss such as 1 - Pearson.",
    True,
)


@torch.no_grad()
def map_quality(
    model: ImpactX,
    plan: DataPlan,
    test_store: MapStore,
    train_store: MapStore,
    device: torch.device,
    batch_size: int = 256,
    indices: Optional[np.ndarray] = None,
    *,
    cfg: Optional[RunConfig] = None,
    teacher_model: Optional[torch.nn.Module] = None,
) -> dict[str, float]:
    """Did IMPACTX learn per-image maps? R^2 against the mean training map, and correlations.

    Computed on the test images ``indices`` (default: those the test store holds maps for). A
    per-class model is compared through the map of the class each teacher map explains. With
    ``cfg`` and ``teacher.faith_images > 0``, ``faithfulness`` holds the built-in maps' MoRF /
    LeRF / insertion AUCs on the IMPACTX model itself next to the teacher method applied post hoc
    to it, the mean map and random maps, and their agreement (``teachx.runs.builtin_eval``).
    R^2 and MSE compare values, so they mean little for maps trained with a scale-free
    ``impactx.map_loss`` (pearson, rank, the default decoder's); ``r2_vs_mean_map_affine`` is the
    scale-free R^2: each map, built-in and mean, first gets its least-squares scale and offset per
    image (residual ``var(t) (1 - r^2)``), so it compares what the maps can say about the teacher's.
    ``corr_mean_map_augmented`` (training with crop / flip augmentation): the correlation of the mean map
    averaged over the augmentation's draws -- what a decoder that learned one map for every image reaches
    at best, since it is trained on shifted and flipped targets; built-in maps near it learned no
    per-image content, even when the unaugmented mean map (fixed patterns such as stride artefacts) scores higher.
    """
    ds = plan.dataset
    if indices is None:
        indices = np.flatnonzero(np.asarray(test_store.done))
    indices = np.asarray(indices)
    n = len(indices)
    classes = None  # the class each teacher map explains (per-class models, and the faithfulness block)
    if getattr(model, "per_class", False) or (cfg is not None and cfg.teacher.faith_images > 0):
        classes = (
            np.asarray(ds.test.labels)
            if cfg is None
            else explained_classes(cfg, plan, teacher_model, "test", indices, device)
        )
    mean_map = train_store.mean_map(plan.train_idx)
    sums = {"mse": 0.0, "mse_mean_map": 0.0, "mse_zero": 0.0, "corr": 0.0, "corr_mean_map": 0.0}
    # the mean map as the training augmentation blurs it: the target a constant map is trained towards
    augmented_mean = None
    if plan.augment is not None and not plan.augment.is_identity:
        augmented_mean = plan.augment.expectation(mean_map.unsqueeze(0))
        sums["corr_mean_map_augmented"] = 0.0
    affine = {"built_in": 0.0, "mean_map": 0.0}  # sums of per-image residuals after the best scale + offset
    model = model.to(device).eval()
    for s in range(0, n, batch_size):
        idx = indices[s : s + batch_size]
        x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
        which = None if classes is None else torch.from_numpy(np.asarray(classes)[idx]).to(device)
        pred = model.explain(x, target=which).float().cpu()
        target = test_store.read(idx)
        mm = mean_map.unsqueeze(0).expand_as(target)
        sums["mse"] += ((pred - target) ** 2).flatten(1).mean(1).sum().item()
        sums["mse_mean_map"] += ((mm - target) ** 2).flatten(1).mean(1).sum().item()
        sums["mse_zero"] += (target**2).flatten(1).mean(1).sum().item()
        r, r_mm = map_corr(pred, target), map_corr(mm, target)
        sums["corr"] += r.sum().item()
        sums["corr_mean_map"] += r_mm.sum().item()
        if augmented_mean is not None:
            sums["corr_mean_map_augmented"] += map_corr(augmented_mean.expand_as(target), target).sum().item()
        var_t = target.flatten(1).var(1, unbiased=False)
        affine["built_in"] += (var_t * (1 - r**2)).sum().item()
        affine["mean_map"] += (var_t * (1 - r_mm**2)).sum().item()
    out = {k: v / n for k, v in sums.items()}
    out["images"] = int(n)
    out["r2_vs_mean_map"] = 1.0 - out["mse"] / max(out["mse_mean_map"], 1e-12)
    out["r2_vs_mean_map_affine"] = 1.0 - affine["built_in"] / max(affine["mean_map"], 1e-12)
    if cfg is not None and cfg.teacher.faith_images > 0:
        out["faithfulness"] = faithfulness_block(cfg, plan, model, test_store, train_store, device, indices, classes)
    return out


# -- the whole run -------------------------------------------------------------------------------


@dataclass
class RunOutputs:
    results: dict[str, Any]
    run_dir: Path


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
    figures: bool = True,
    plan: Optional[DataPlan] = None,
) -> RunOutputs:
    """Baseline (teacher) -> maps -> IMPACTX -> test evaluation, all resumable.

    A damaged file of a stage (checkpoint, stage record, self-teaching maps) ends in one line
    naming it and the way forward: ``--redo STAGE`` (see :func:`redo_stages`).
    """
    with redo_hint(run_dir):
        return _run_pipeline(cfg, run_dir, log, progress, figures, plan)


def _run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    log: Callable[[str], None],
    progress: bool,
    figures: bool,
    plan: Optional[DataPlan],
) -> RunOutputs:
    timings = _Timings(run_dir, time.perf_counter())
    bound = run_config_hash(run_dir)  # every record of this run carries it; one that disagrees is refused
    check_bound(run_dir, bound)
    plan = plan or make_plan(cfg, progress=progress)
    ds = plan.dataset
    device = dist_utils.device_for(choose_device(cfg.device))
    log_data(
        plan,
        cfg,
        log,
        f"; device: {device}" + (f" x {dist_utils.world_size()} processes" if dist_utils.is_distributed() else ""),
    )

    # 1. the student's baseline, and the teacher model (the baseline itself by default)
    t0, todo = time.perf_counter(), _stage_todo(run_dir / "baseline")
    baseline = train_classifier(cfg, plan, run_dir / "baseline", cfg.model.backbone, cfg.model.options, log, bound)
    timings.add("baseline", time.perf_counter() - t0, *todo)
    teacher_record = baseline
    if cfg.teacher.checkpoint:
        teacher_model = load_classifier(cfg.teacher.checkpoint, ds)
        teacher_record = {
            "checkpoint": cfg.teacher.checkpoint,
            "backbone": (getattr(teacher_model, "spec", None) or {}).get("name"),
        }
    elif separate_teacher(cfg):
        t0, todo = time.perf_counter(), _stage_todo(run_dir / "teacher")
        tcfg, tbackbone, toptions = teacher_training(cfg)
        tplan = plan if tcfg.data == cfg.data else make_plan(tcfg, progress=progress)
        teacher_record = train_classifier(tcfg, tplan, run_dir / "teacher", tbackbone, toptions, log, bound)
        timings.add("teacher", time.perf_counter() - t0, *todo)
        teacher_model = load_classifier(stage_checkpoint(run_dir / "teacher", teacher_record), ds)
    else:
        teacher_model = load_classifier(stage_checkpoint(run_dir / "baseline", baseline), ds)

    # 2. teacher maps (train split when the method trains on them, test split for map-quality evaluation)
    method = build_method(cfg)
    method.check_data(plan)  # before any map is made: e.g. rrr with annotation masks on data without masks
    need_maps = method.needs_teacher_maps()
    builtin = method.trains_builtin_map()
    train_store = test_store = None
    t0, made = time.perf_counter(), []
    if need_maps or figures or builtin:
        train_store = teacher_maps(
            cfg, plan, teacher_model, "train", plan.train_idx, device, log, progress, on_fill=made.append
        )
        test_store = teacher_maps(
            cfg, plan, teacher_model, "test", eval_indices(cfg, plan), device, log, progress, on_fill=made.append
        )
    requested = len(plan.train_idx) + len(eval_indices(cfg, plan))
    timings.add("maps", time.perf_counter() - t0, bool(made), sum(made) >= requested)

    # 3. the training method (IMPACTX by default)
    stage = method_name(cfg)
    if method.reuses_baseline:  # the same model as the baseline stage: nothing more to train
        method_record = {**baseline, **method.record()}
        model = load_classifier(stage_checkpoint(run_dir / "baseline", baseline), ds)
    else:
        t0, todo = time.perf_counter(), _stage_todo(run_dir / stage)
        method_record, model = train_method_stage(
            cfg, plan, train_store if need_maps else None, teacher_model, run_dir / stage, log, bound
        )
        timings.add(stage, time.perf_counter() - t0, *todo)

    # 4. evaluation (a re-run that had nothing to do keeps the results -- and the timings -- it finds)
    kept = None if timings.worked else results_bound(run_dir, bound)
    if kept is not None:
        log("[evaluation] nothing was re-run: results.json is kept as it is")
        return RunOutputs(kept, run_dir)
    t0 = time.perf_counter()
    quality = None  # rank 0 alone evaluates and draws
    if builtin and train_store is not None:
        quality = dist_utils.on_main(
            map_quality, model, plan, test_store, train_store, device, cfg=cfg, teacher_model=teacher_model
        )
    shortcut = None
    if getattr(ds.test, "masks", None) is not None:
        if method.reuses_baseline:  # the method's model is the baseline, loaded above
            models = {"baseline": model}
        else:
            models = {"baseline": load_classifier(stage_checkpoint(run_dir / "baseline", baseline), ds), stage: model}
        shortcut = dist_utils.on_main(shortcut_evaluation, cfg, plan, models, device)
    label = method.display_name()
    examples = None  # the test images of figures/examples.png: index, true and predicted class
    if figures and test_store is not None and dist_utils.is_main():
        ev = eval_indices(cfg, plan)
        ev_pred = _predict(model, plan, ev, device)
        pick = _example_indices(np.asarray(ds.test.labels)[ev], MAX_EXAMPLE_CLASSES, cfg.seed, ev_pred)
        idx, pred = ev[pick], ev_pred[pick]
        x_u8 = as_nchw(ds.test.images[idx])
        columns = {f"teacher ({cfg.teacher.method})": test_store.read(idx)}
        if method.builtin_map:
            x = normalize(x_u8.to(device), plan.mean, plan.std)
            columns[f"{label} built-in"] = model.to(device).explain(x).float().cpu()
        names = ds.class_names
        save_example_grid(
            run_dir / "figures" / "examples.png",
            x_u8,
            columns,
            [example_label(names[int(ds.test.labels[i])], names[int(p)]) for i, p in zip(idx, pred)],
        )
        examples = [{"index": int(i), "label": int(ds.test.labels[i]), "predicted": int(p)} for i, p in zip(idx, pred)]
        save_training_curves(
            run_dir / "figures" / "curves.png",
            {"baseline": baseline["history"], label: method_record["history"]},
            losses={"baseline": "CE", label: method.training_loss()},
        )
    timings.add("evaluation", time.perf_counter() - t0, True, True)

    results = {
        **data_summary(plan, cfg),
        "class_names": list(ds.class_names),
        "backbone": cfg.model.backbone,
        "method": method.name,
        "method_options": method.opts,
        "teacher": cfg.teacher.method,
        "teacher_backbone": teacher_record.get("backbone", cfg.model.backbone),
        "teacher_test_acc": teacher_record.get("test_acc"),
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "baseline_test_acc": baseline["test_acc"],
        "method_test_acc": method_record["test_acc"],
        "baseline_val_acc": baseline["val_acc"],
        "method_val_acc": method_record["val_acc"],
        "baseline_seconds_per_epoch": baseline["seconds_per_epoch"],
        "method_seconds_per_epoch": method_record["seconds_per_epoch"],
        "map_quality": quality,
        # measured over the invocations that did the work (see _Timings), not by a re-run that skipped it
        "stage_seconds": dict(timings.stage_seconds),
        "wall_seconds": timings.wall_seconds,
        "device": str(device),
        "torch_threads": timings.torch_threads,
        **_bound(bound),
    }
    results.update(method.results(method_record))
    if shortcut is not None:
        results["shortcut"] = shortcut
    if examples is not None:
        results["examples"] = {"model": label, "images": examples}
    if dist_utils.is_distributed():
        results["world_size"] = dist_utils.world_size()
    dist_utils.on_main(write_json_atomic, run_dir / "results.json", results, digest=True)
    return RunOutputs(results, run_dir)


def shortcut_evaluation(
    cfg: RunConfig, plan: DataPlan, models: dict[str, torch.nn.Module], device: torch.device
) -> dict[str, Any]:
    """On a shortcut dataset: how much of each model's post-hoc attribution (input gradient, LRP)
    falls on the artefact of the de-correlated test images, next to the artefact's share of the
    image (what a map blind to it would put there). Test accuracies are in the stage records."""
    ds = plan.dataset
    idx = eval_indices(cfg, plan)
    x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(ds.test.labels[idx])).long().to(device)
    masks = torch.from_numpy(np.ascontiguousarray(ds.test.masks[idx])).float().to(device)
    out: dict[str, Any] = {"images": int(len(idx)), "shortcut": ds.extra.get("shortcut")}
    for name, model in models.items():
        model = model.to(device).eval()
        out[name] = artefact_share(model, x, y, masks)
        if hasattr(model, "forward_all") and hasattr(
            model, "explain"
        ):  # a built-in map (IMPACTX, ABN): where does it point?
            with torch.no_grad():
                maps = torch.cat([model.explain(x[s : s + 256], target=y[s : s + 256]) for s in range(0, len(y), 256)])
            out[name]["built_in"] = float(wrong_reason_score(maps.float(), masks).mean())
    return out


def _stage_todo(stage_dir: Path) -> tuple[bool, bool]:
    """(will the stage do work, will it start from scratch): before a training stage runs."""
    return stage_done(stage_dir) is None, not (stage_dir / "checkpoints" / "last.safetensors").exists()


def _complete_results(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's results.json when it is there and readable (else None: evaluate again)."""
    try:
        return read_trusted_json(run_dir / "results.json", "", "results")
    except (OSError, CorruptionError):
        return None


class _Timings:
    """What a run measured, kept across invocations in ``timings.json``.

    Per stage: the seconds of the invocations that did that stage's work (summed over a resumed
    stage; a stage started from scratch, e.g. after ``--redo``, starts again from 0). The wall time
    is that of the invocations that did any work, the thread count that of the last one. A re-run
    with nothing to do changes none of it.
    """

    def __init__(self, run_dir: Path, t_start: float):
        self.path, self.t_start, self.worked = Path(run_dir) / "timings.json", t_start, False
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
        self.stage_seconds: dict[str, float] = dict(old.get("stage_seconds") or {})
        self.previous_wall = float(old.get("wall_seconds") or 0.0)
        self.torch_threads = old.get("torch_threads")

    @property
    def wall_seconds(self) -> float:
        return self.previous_wall + (time.perf_counter() - self.t_start if self.worked else 0.0)

    def add(self, stage: str, seconds: float, worked: bool, fresh: bool = False) -> None:
        if not worked:
            return
        self.worked = True
        self.stage_seconds[stage] = seconds + (0.0 if fresh else float(self.stage_seconds.get(stage, 0.0)))
        self.torch_threads = torch.get_num_threads()
        record = {
            "stage_seconds": self.stage_seconds,
            "wall_seconds": self.wall_seconds,
            "torch_threads": self.torch_threads,
        }
        dist_utils.on_main(write_json_atomic, self.path, record)


#: the example figure shows one image of each class up to this many classes, plus wrong predictions
MAX_EXAMPLE_CLASSES = 20
#: at least this many of the example images are wrong predictions, where the model made that many
MIN_WRONG_EXAMPLES = 3


def _example_indices(labels: np.ndarray, k: int, seed: int, predicted: Optional[np.ndarray] = None) -> np.ndarray:
    """One image of each of the first k classes (seeded), for figures; with ``predicted``, images the model
    got wrong are added (other classes first) until MIN_WRONG_EXAMPLES of them are shown, where there are
    that many, so the figure shows what the model confuses and not only what it gets right."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels)[:k]:
        out.append(int(rng.choice(np.flatnonzero(labels == c))))
    if predicted is not None:
        wrong = np.flatnonzero(np.asarray(predicted) != labels)
        need = MIN_WRONG_EXAMPLES - int(np.sum(np.asarray(predicted)[out] != labels[out]))
        extra = [int(i) for i in rng.permutation(wrong) if int(i) not in out]
        extra.sort(
            key=lambda i: labels[i] in {labels[j] for j in out if predicted[j] != labels[j]}
        )  # stable: new classes first
        out += extra[: max(need, 0)]
    return np.array(out)


def example_label(true: str, predicted: str) -> str:
    """A row label of the example figure: the true and the predicted class."""
    return f"true: {true}\npredicted: {predicted}" + ("" if true == predicted else " (wrong)")


@torch.no_grad()
def _predict(
    model: torch.nn.Module, plan: DataPlan, indices: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """The model's predicted class of the test images ``indices``."""
    model = model.to(device).eval()
    out = []
    for s in range(0, len(indices), batch_size):
        x = normalize(as_nchw(plan.dataset.test.images[indices[s : s + batch_size]]).to(device), plan.mean, plan.std)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
