"""Pipeline pieces for built-in maps beyond the paper: which class a teacher map explains, and the
faithfulness block of ``results.json`` ``map_quality`` (see ``teachx.evaluation.builtin_maps``)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.evaluation.builtin_maps import builtin_map_faithfulness, map_corr
from teachx.registry import declare_measure
from teachx.runs.teacher import as_nchw, make_teacher
from teachx.teachers.postprocess import postprocess
from teachx.training.trainer import DataPlan


declare_measure(
    "corr_self",
    "The mean per-image Pearson correlation between the built-in map and the teacher method applied post "
    "hoc to the same model: does the built-in map agree with an explanation of the model itself?",
    True,
)
declare_measure(
    "corr_self_mean_map",
    "The same correlation for the mean training map: the level a map that ignores the image reaches.",
    None,
)


def explained_classes(
    cfg: RunConfig,
    plan: DataPlan,
    teacher_model: Optional[torch.nn.Module],
    split: str,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """For every image of ``split`` (an array as long as the split), the class its teacher map
    explains: the label (``teacher.target=label``) or, for ``predicted``, the teacher model's
    prediction on the unaugmented image -- computed for ``indices`` only (others keep the label),
    exactly as the map was made."""
    data = plan.dataset.train if split == "train" else plan.dataset.test
    classes = np.asarray(data.labels, dtype=np.int64).copy()
    if cfg.teacher.target != "predicted":
        return classes
    if teacher_model is None:
        raise ValueError("teacher.target=predicted needs the teacher model to know which class each map explains")
    indices = np.asarray(indices)
    teacher_model = teacher_model.to(device).eval()
    with torch.no_grad():
        for s in range(0, len(indices), batch_size):
            idx = indices[s : s + batch_size]
            x = normalize(as_nchw(data.images[idx]).to(device), plan.mean, plan.std)
            classes[idx] = teacher_model(x).argmax(1).cpu().numpy()
    return classes


def faith_indices(cfg: RunConfig, plan: DataPlan, pool: np.ndarray) -> np.ndarray:
    """``teacher.faith_images`` test indices from ``pool``, class-balanced (classes taken in turn,
    each in a seeded order), the same for every seed and arm of a data split."""
    pool = np.asarray(pool)
    k = int(cfg.teacher.faith_images)
    if k >= len(pool):
        return pool
    labels = np.asarray(plan.dataset.test.labels)[pool]
    rng = np.random.default_rng(cfg.data.split_seed + 4242)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < k:
        for members in per_class:
            if members and len(chosen) < k:
                chosen.append(int(members.pop()))
    return pool[np.sort(np.array(chosen, dtype=np.int64))]


def post_hoc_maps(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """The configured teacher method applied to ``model`` (any classifier, e.g. the IMPACTX model),
    post-processed like the teacher maps."""

    teacher = make_teacher(cfg, plan, device)
    maps = []
    for s in range(0, x.shape[0], batch_size):
        raw = teacher.attribute(model, x[s : s + batch_size], target[s : s + batch_size])
        maps.append(
            postprocess(
                raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=cfg.teacher.smooth
            ).detach()
        )
    return torch.cat(maps).float()


def faithfulness_block(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    test_store,
    train_store,
    device: torch.device,
    pool: np.ndarray,
    teacher_classes: Optional[np.ndarray] = None,
    steps: int = 16,
) -> dict[str, Any]:
    """Faithfulness of the built-in maps to the IMPACTX model (``map_quality["faithfulness"]``).

    Every map set explains the IMPACTX model's *predicted* class. Besides the AUCs and the
    self-agreement (``corr_self``), ``corr_post_hoc_teacher`` is the agreement of the post-hoc map
    with the baseline teacher's stored map, on the images whose predicted class is the class the
    teacher explained (``images_same_class``): how far two networks' explanations agree at all.
    """
    ds = plan.dataset
    idx = faith_indices(cfg, plan, pool)
    x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
    model = model.to(device).eval()
    with torch.no_grad():
        logits, built_in = model.forward_all(x)
    target = logits.argmax(1)
    errors = []
    try:
        post_hoc = post_hoc_maps(cfg, plan, model, x, target, device)
    except Exception as exc:  # an optional diagnostic must not lose the training before it
        errors.append(f"{cfg.teacher.method} on the IMPACTX model: {type(exc).__name__}: {exc}")
        post_hoc = None
    out = builtin_map_faithfulness(
        model, x, target, built_in.float(), train_store.mean_map(plan.train_idx), post_hoc, steps=steps, seed=cfg.seed
    )
    out["target"] = "predicted"
    if post_hoc is not None:
        explained = np.asarray(ds.test.labels)[idx] if teacher_classes is None else np.asarray(teacher_classes)[idx]
        same = torch.from_numpy(explained).to(device) == target
        out["images_same_class"] = int(same.sum())
        if same.any():
            teacher_maps = test_store.read(idx[same.cpu().numpy()]).to(device).float()
            out["corr_post_hoc_teacher"] = float(map_corr(post_hoc[same], teacher_maps).mean())
    if errors:
        out["errors"] = errors
    return out
