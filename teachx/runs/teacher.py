"""The teacher a run explains its images with: built from the config, its background drawn from the
training split (shared by the pipeline, the built-in maps' evaluation, studies and the service)."""

from __future__ import annotations

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.teachers import TEACHERS
from teachx.teachers import build as build_teacher
from teachx.training.trainer import DataPlan


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
