"""The classifier stages of a run: training (or resuming, or reading back) a plain classifier, testing
it and writing its stage record, and loading a stage's or a checkpoint's model back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.artefacts import ground_truth, has_ground_truth
from teachx.data.base import ImageDataset
from teachx.errors import ConfigError
from teachx.models import any_model_from_spec, build_from_spec, build_model
from teachx.training.checkpoint import load_checkpoint, load_state_into
from teachx.training.trainer import ClassifierTask, DataPlan, Trainer, evaluate
from teachx.utils.seeding import seed_everything
from teachx.runs.records import StageRecord
from teachx.runs.recovery import (
    load_checkpoint_verified,
    stage_checkpoint,
    stage_done,
    stage_fix,
    stage_fixes,
)


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
    return fit_and_test(trainer, ClassifierTask(model), plan, out_dir, log, {"backbone": backbone}, config_hash)


def fit_and_test(
    trainer: Trainer,
    task,
    plan: DataPlan,
    out_dir: Path,
    log: Callable[[str], None],
    head: dict[str, Any],
    config_hash: Optional[str],
) -> dict[str, Any]:
    """Train (resuming), reload the best checkpoint, test it, and write the stage record (``head``: its
    first keys, see :class:`~teachx.runs.records.StageRecord`); returns the record as written."""
    with stage_fixes(out_dir):  # a damaged last checkpoint is refused, with the way forward
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
    by_split = artefact_splits(task, plan, trainer.cfg.eval_batch_size, trainer.device)
    record = StageRecord(
        checkpoint=Path(res.best_path).relative_to(trainer.out_dir).as_posix(),  # inside the stage: moves with the run
        best_epoch=res.best_epoch,
        val_acc=max(h["val_acc"] for h in res.history) if plan.val_idx.size else None,
        test_acc=test["acc"],
        test_loss=test["loss"],
        test_confusion=test.get("confusion"),  # the report's per-class accuracy
        seconds=res.seconds,
        seconds_per_epoch=float(np.median([h["seconds"] for h in res.history])),
        history=res.history,
        config_hash=config_hash,
        head=head,
        test_splits=by_split,
    )
    record.write(out_dir)
    log(f"[{out_dir.name}] test accuracy {test['acc']:.4f}{split_text(by_split)}")
    return record.to_dict()


def artefact_splits(task, plan: DataPlan, batch_size: int, device: torch.device) -> Optional[dict[str, dict[str, Any]]]:
    """On an artefact benchmark, the model on each of its test splits (clean, attacked, ch): ``acc``, ``loss``,
    ``n`` and ``called_poisoned``, the share of the images of other classes that the model assigns to a
    poisoned class (what the artefact does to a model that took the shortcut, apart from hiding part of the
    object); None on other data."""
    ds = plan.dataset
    if not has_ground_truth(ds):
        return None
    truth = ground_truth(ds)
    out = {}
    for name, split in truth.test_splits.items():
        got = evaluate(task, plan, split, np.arange(len(split)), batch_size, device, shard=True, confusion=True)
        counts = np.asarray(got.get("confusion", [[0]]), dtype=np.float64)
        others = [c for c in range(counts.shape[0]) if c not in truth.classes]
        total = counts[others].sum()
        called = counts[np.ix_(others, truth.classes)].sum() / total if total else float("nan")
        out[name] = {"acc": got["acc"], "loss": got["loss"], "n": got["n"], "called_poisoned": float(called)}
    return out


def split_text(by_split: Optional[dict[str, dict[str, Any]]]) -> str:
    """`` (ch 0.9012, clean 0.9103, attacked 0.5120)``: the accuracies on an artefact benchmark's test
    splits, for log lines; '' without them."""
    if not by_split:
        return ""
    return " (" + ", ".join(f"{name} {row['acc']:.4f}" for name, row in by_split.items()) + ")"


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
