"""The teacher of a run: the teacher method built from the config (its background drawn from the training
split), the teacher model (a ``teacher.checkpoint``, a separate teacher stage, or the baseline), and the
teacher's maps in the shared map store (used by the pipeline, the built-in maps' evaluation, studies and
the service)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.base import ImageDataset
from teachx.data.transforms import normalize
from teachx.teachers.postprocess import postprocess
from teachx.teachers.store import MapStore, fill_store, open_store, store_key
from teachx.training.trainer import DataPlan
from teachx.utils import distributed as dist_utils
from teachx.utils.cache_admin import cache_root
from teachx.utils.hashing import hash_state_dict
from teachx.utils.locking import file_lock
from teachx.teachers import TEACHERS
from teachx.teachers import build as build_teacher
from teachx.runs.plan import make_plan, separate_teacher, teacher_training
from teachx.runs.recovery import stage_checkpoint
from teachx.runs.stages import load_classifier, train_classifier


def as_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> contiguous uint8 (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def teacher_background(plan: DataPlan, size: int, seed: int, device: torch.device) -> torch.Tensor:
    rng = np.random.default_rng(seed + 12345)
    idx = np.sort(rng.choice(plan.train_idx, size=min(size, len(plan.train_idx)), replace=False))
    x = as_nchw(plan.dataset.train.images[idx])
    return normalize(x, plan.mean, plan.std).to(device)


def make_teacher(cfg: RunConfig, plan: DataPlan, device: torch.device):
    """The configured teacher method, with its background images (deepshap, expected_gradients) drawn
    from the training split by the data split's seed."""
    options = dict(cfg.teacher.options)
    name = TEACHERS.canonical(cfg.teacher.method)
    if name in ("deepshap", "expected_gradients") and "background" not in options:
        options["background"] = teacher_background(plan, cfg.teacher.background_size, cfg.data.split_seed, device)
    return build_teacher(name, **options)


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


def _split_fingerprint(split) -> str:
    """Hash of the pixels and labels (cheap enough: one pass over uint8 memory)."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(split.images.shape).encode())
    h.update(np.ascontiguousarray(split.images).view(np.uint8).data)
    h.update(np.ascontiguousarray(split.labels).astype(np.int64).tobytes())
    return h.hexdigest()


def teacher_stage(
    cfg: RunConfig,
    plan: DataPlan,
    run_dir: Path,
    baseline: dict[str, Any],
    log: Callable[[str], None] = print,
    progress: bool = True,
    config_hash: Optional[str] = None,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """The teacher model of a run and what its results name about it: a ``teacher.checkpoint``, a separate
    teacher stage (trained, resumed or read back here: see :func:`~teachx.runs.plan.teacher_training`), or
    by default the student's baseline (``baseline``: its stage record)."""
    ds = plan.dataset
    if cfg.teacher.checkpoint:
        teacher_model = load_classifier(cfg.teacher.checkpoint, ds)
        record = {
            "checkpoint": cfg.teacher.checkpoint,
            "backbone": (getattr(teacher_model, "spec", None) or {}).get("name"),
        }
        return record, teacher_model
    if separate_teacher(cfg):
        tcfg, tbackbone, toptions = teacher_training(cfg)
        tplan = plan if tcfg.data == cfg.data else make_plan(tcfg, progress=progress)
        record = train_classifier(tcfg, tplan, run_dir / "teacher", tbackbone, toptions, log, config_hash)
        return record, load_classifier(stage_checkpoint(run_dir / "teacher", record), ds)
    return baseline, load_classifier(stage_checkpoint(run_dir / "baseline", baseline), ds)
