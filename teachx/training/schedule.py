"""Learning-rate schedules as a pure function of the global step.

A pure function makes resuming trivial and exact: the learning rate after a restart depends only
on the step counter stored in the checkpoint, not on a scheduler object's hidden state.
"""

from __future__ import annotations

import math

from teachx.config.train import TrainConfig


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    epoch = step / max(1, steps_per_epoch)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** int(epoch // cfg.step_size)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.schedule == "onecycle":
        # linear up for 30%, cosine down to lr/1e4 (as torch's OneCycleLR defaults)
        peak = int(0.3 * total)
        if step < peak:
            return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * step / max(1, peak)
        t = (step - peak) / max(1, total - peak)
        low = cfg.lr / 25 / 1e4
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(cfg.schedule)
