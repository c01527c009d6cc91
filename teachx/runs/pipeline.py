"""The IMPACTX pipeline: teacher (baseline) training -> teacher maps -> IMPACTX training -> test.

Each stage lives in its own sub-directory of the run directory and writes ``stage.json`` when it
is complete; a re-run skips complete stages and resumes interrupted ones (training from its last
checkpoint, map generation from its store's done-mask). The pieces live next to it: the run directory
and its recovery (:mod:`~teachx.runs.recovery`), the data plan (:mod:`~teachx.runs.plan`), the
classifier stages (:mod:`~teachx.runs.stages`), the teacher and its maps (:mod:`~teachx.runs.teacher`)
and the evaluation (:mod:`~teachx.runs.evaluation`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.runs.figures import save_example_grid, save_training_curves
from teachx.runs.rundir import run_config_hash
from teachx.teachers.store import MapStore
from teachx.training.checkpoint import load_checkpoint, load_state_into
from teachx.training.impactx import ImpactxTask
from teachx.training.methods import MethodContext, build_method, impactx_options, method_name
from teachx.training.self_teaching import SelfTeaching
from teachx.training.trainer import DataPlan, Trainer
from teachx.utils import distributed as dist_utils
from teachx.utils.hashing import hash_json
from teachx.utils.io import write_json_atomic
from teachx.utils.seeding import choose_device, seed_everything
from teachx.runs.evaluation import (
    MAX_EXAMPLE_CLASSES,
    example_indices,
    example_label,
    explained_classes,
    map_quality,
    predict_classes,
    shortcut_evaluation,
)
from teachx.runs.plan import data_summary, eval_indices, log_data, make_plan, separate_teacher
from teachx.runs.recovery import (
    check_bound,
    redo_hint,
    results_bound,
    stage_checkpoint,
    stage_done,
    stage_fix,
)
from teachx.runs.records import RunResults, StageRecord
from teachx.runs.stages import fit_and_test, load_classifier, train_classifier
from teachx.runs.teacher import as_nchw, make_teacher, map_fn, map_recipe, teacher_maps, teacher_stage


def train_method_stage(
    cfg: RunConfig,
    plan: DataPlan,
    store: Optional[MapStore],
    teacher_model: Optional[torch.nn.Module],
    out_dir: Path,
    log: Callable[[str], None] = print,
    config_hash: Optional[str] = None,
    baseline: Optional[Callable[[], torch.nn.Module]] = None,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train (or resume, or read back) the configured training method's model; (stage record, model in eval mode).

    ``store``: the teacher's maps of the training split, when the method needs them; ``config_hash``: as
    for :func:`train_classifier`; ``baseline``: loads the trained baseline (for methods that fine-tune it).
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
        baseline_model=baseline,
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
    ic = impactx_options(cfg)
    what = method.describe() + (
        f", self-teaching every {ic.self_teach_every} epochs ({ic.self_teach_method})" if hook else ""
    )
    log(f"[{out_dir.name}] training {what}, {cfg.train.epochs} epochs")
    head = {**method.record(), **({"self_teaching": hook.refreshes} if hook else {})}
    return fit_and_test(trainer, task, plan, out_dir, log, head, config_hash), model.eval()


def self_teaching_hook(
    cfg: RunConfig, plan: DataPlan, task: ImpactxTask, store: MapStore, out_dir: Path, log: Callable[[str], None]
):
    """The hook that re-explains the training set with the model being trained (IMPACTX's self_teach_every), by the
    teacher method or, with a method named in its self_teach_method, by that method (its default options,
    unsmoothed)."""
    device = dist_utils.device_for(choose_device(cfg.device))
    ic = impactx_options(cfg)
    method = ic.self_teach_method
    if method and method != "teacher":
        cfg = replace(cfg, teacher=replace(cfg.teacher, method=method, options={}, smooth=0.0))
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
        ic.self_teach_every,
        out_dir / "self_maps",
        material,
        cfg.seed,
        cfg.teacher.batch_size,
        log,
        progress=cfg.train.progress,
        epochs=cfg.train.epochs,
    )


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
    t0, todo = time.perf_counter(), stage_todo(run_dir / "baseline")
    baseline_dict = train_classifier(cfg, plan, run_dir / "baseline", cfg.model.backbone, cfg.model.options, log, bound)
    baseline = StageRecord.from_dict(baseline_dict)
    timings.add("baseline", time.perf_counter() - t0, *todo)
    t0, todo = time.perf_counter(), stage_todo(run_dir / "teacher")
    teacher_dict, teacher_model = teacher_stage(cfg, plan, run_dir, baseline_dict, log, progress, bound)
    teacher_record = StageRecord.from_dict(teacher_dict)
    if not cfg.teacher.checkpoint and separate_teacher(cfg):
        timings.add("teacher", time.perf_counter() - t0, *todo)

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
        method_record = replace(baseline, head={**baseline.head, **method.record()})
        model = load_classifier(stage_checkpoint(run_dir / "baseline", baseline_dict), ds)
    else:
        t0, todo = time.perf_counter(), stage_todo(run_dir / stage)
        method_dict, model = train_method_stage(
            cfg,
            plan,
            train_store if need_maps else None,
            teacher_model,
            run_dir / stage,
            log,
            bound,
            baseline=lambda: load_classifier(stage_checkpoint(run_dir / "baseline", baseline_dict), ds),
        )
        method_record = StageRecord.from_dict(method_dict)
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
            models = {
                "baseline": load_classifier(stage_checkpoint(run_dir / "baseline", baseline_dict), ds),
                stage: model,
            }
        shortcut = dist_utils.on_main(shortcut_evaluation, cfg, plan, models, device)
    label = method.display_name()
    examples = None  # the test images of figures/examples.png: index, true and predicted class
    if figures and test_store is not None and dist_utils.is_main():
        ev = eval_indices(cfg, plan)
        ev_pred = predict_classes(model, plan, ev, device)
        pick = example_indices(np.asarray(ds.test.labels)[ev], MAX_EXAMPLE_CLASSES, cfg.seed, ev_pred)
        idx, pred = ev[pick], ev_pred[pick]
        x_u8 = as_nchw(ds.test.images[idx])
        columns = {f"teacher ({cfg.teacher.method})": test_store.read(idx)}
        if method.explains_itself():
            x = normalize(x_u8.to(device), plan.mean, plan.std)
            name = getattr(model, "built_in_map_name", "built-in")  # a B-cos model's: its contributions
            columns[f"{label} {name}"] = model.to(device).explain(x).float().cpu()
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
            {"baseline": baseline.history, label: method_record.history},
            losses={"baseline": "CE", label: method.training_loss()},
        )
    timings.add("evaluation", time.perf_counter() - t0, True, True)

    results = RunResults(
        data=data_summary(plan, cfg),
        class_names=list(ds.class_names),
        backbone=cfg.model.backbone,
        method=method.name,
        method_options=method.opts,
        teacher=cfg.teacher.method,
        teacher_backbone=teacher_record.head.get("backbone", cfg.model.backbone),
        teacher_test_acc=teacher_record.test_acc,
        seed=cfg.seed,
        epochs=cfg.train.epochs,
        baseline_test_acc=baseline.test_acc,
        method_test_acc=method_record.test_acc,
        baseline_val_acc=baseline.val_acc,
        method_val_acc=method_record.val_acc,
        baseline_seconds_per_epoch=baseline.seconds_per_epoch,
        method_seconds_per_epoch=method_record.seconds_per_epoch,
        map_quality=quality,
        # measured over the invocations that did the work (see _Timings), not by a re-run that skipped it
        stage_seconds=dict(timings.stage_seconds),
        wall_seconds=timings.wall_seconds,
        device=str(device),
        torch_threads=timings.torch_threads,
        config_hash=bound,
        extra=method.results(method_record.to_dict()),
        shortcut=shortcut,
        examples=None if examples is None else {"model": label, "images": examples},
        world_size=dist_utils.world_size() if dist_utils.is_distributed() else None,
        test_splits=None
        if baseline.test_splits is None
        else {"baseline": baseline.test_splits, label: method_record.test_splits},
    )
    results.write(run_dir)
    return RunOutputs(results.to_dict(), run_dir)


def stage_todo(stage_dir: Path) -> tuple[bool, bool]:
    """(will the stage do work, will it start from scratch): before a training stage runs."""
    return stage_done(stage_dir) is None, not (stage_dir / "checkpoints" / "last.safetensors").exists()


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
