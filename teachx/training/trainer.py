"""One training loop for every model teachx trains (baseline/teacher and IMPACTX).

What differs between them is a ``Task`` (which model, which loss, which extra targets such as
teacher maps); the loop -- seeding, batching, augmentation, mixed precision, validation,
checkpoints, resume, progress and logging -- is written once here.

Determinism and resume: every random choice of epoch ``e`` (batch order, augmentation, dropout)
is drawn from generators seeded by ``(seed, e)``, and a checkpoint is written atomically after
every epoch. A run killed at any point and restarted therefore replays the interrupted epoch
exactly and ends with the same weights as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teachx.data.base import ImageDataset, Split
from teachx.data.loading import BatchIterator
from teachx.data.transforms import Augment, normalize
from teachx.errors import CheckpointError, ConfigError
from teachx.training.checkpoint import (
    load_checkpoint,
    load_state_into,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from teachx.training.config import TrainConfig
from teachx.training.schedule import lr_at
from teachx.utils.io import write_json_atomic
from teachx.utils.seeding import choose_device


class Task(Protocol):
    """What is trained and how its loss is computed."""

    model: nn.Module

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Spatial targets aligned with the images (augmented together with them), or None."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, maps: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logits, extra scalar logs) for one normalised, augmented batch."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer updates."""


class ClassifierTask:
    """Plain supervised classification: cross-entropy on the model's logits."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        self.model = model
        self.label_smoothing = label_smoothing

    def maps_for(self, indices: torch.Tensor) -> None:
        return None

    def loss(self, x, y, maps):
        logits = self.model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, {}

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)


@dataclass
class DataPlan:
    """Which images are used for training, validation and test, and how they are prepared."""

    dataset: ImageDataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    augment: Optional[Augment] = None

    @property
    def mean(self) -> tuple[float, ...]:
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.dataset.std


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_val: float
    seconds: float
    resumed_from: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + stream * 7_919) % (2**63 - 1)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen; unfreeze a part of the model")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def prepare_batch(
    images_u8: torch.Tensor,
    plan: DataPlan,
    device: torch.device,
    maps: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """uint8 NCHW -> normalised float on ``device``; augmentation (if given a generator) also moves maps."""
    x = images_u8.to(device, non_blocking=True)
    if maps is not None:
        maps = maps.to(device, non_blocking=True).float()
    if generator is not None and plan.augment is not None:
        x = x.float().div_(255.0)
        if maps is not None:
            x, maps = plan.augment(x, generator, maps)
        else:
            x = plan.augment(x, generator)
        mean = torch.tensor(plan.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(plan.std, device=device).view(1, -1, 1, 1)
        x = (x - mean) / std
    else:
        x = normalize(x, plan.mean, plan.std)
    return x, maps


class Trainer:
    """Trains ``task`` on ``plan`` according to ``cfg``, writing checkpoints under ``out_dir``."""

    def __init__(
        self,
        task: Task,
        plan: DataPlan,
        cfg: TrainConfig,
        out_dir: str | Path,
        seed: int = 0,
        device: str | torch.device = "auto",
        meta: Optional[dict[str, Any]] = None,
        log: Callable[[str], None] = print,
        on_epoch_start: Optional[Callable[[int], None]] = None,
    ):
        self.task, self.plan, self.cfg = task, plan, cfg
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.device = choose_device(str(device)) if not isinstance(device, torch.device) else device
        self.meta = dict(meta or {})
        self.log = log
        self.on_epoch_start = on_epoch_start
        self.ckpt_dir = self.out_dir / "checkpoints"

    # -- public ---------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        cfg, task = self.cfg, self.task
        task.model.to(self.device)
        opt = make_optimizer(cfg, task.parameters())
        train_it = BatchIterator(self.plan.dataset.train, self.plan.train_idx, cfg.batch_size, shuffle=True, seed=self.seed, drop_last=False)
        steps_per_epoch = len(train_it)
        if steps_per_epoch == 0:
            raise ConfigError("the training split is empty; use more training images or a smaller validation fraction")
        history: list[dict[str, Any]] = []
        start_epoch, best_val, best_epoch, resumed_from = 0, -math.inf, -1, None
        last_path = self.ckpt_dir / "last.safetensors"
        best_path = self.ckpt_dir / "best.safetensors"
        if resume and last_path.exists():
            ck = load_checkpoint(last_path)
            if ck.meta.get("kind") != self.meta.get("kind"):
                raise CheckpointError(f"'{last_path}' holds a {ck.meta.get('kind')} checkpoint, not {self.meta.get('kind')}; use a new run directory")
            load_state_into(task.model, ck.group("model"), f"checkpoint '{last_path}'")
            optimizer_from_flat(opt, ck.group("optim"), ck.meta["optimizer"])
            history = ck.meta["history"]
            start_epoch = ck.meta["epoch"] + 1
            best_val, best_epoch = ck.meta["best_val"], ck.meta["best_epoch"]
            resumed_from = start_epoch
            if start_epoch < cfg.epochs:
                self.log(f"resuming from epoch {start_epoch} ({last_path})")
        writer = self._tensorboard()
        amp_dtype, scaler = self._amp()
        t_start = time.perf_counter() - sum(h.get("seconds", 0.0) for h in history)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            if self.on_epoch_start is not None:
                self.on_epoch_start(epoch)
            torch.manual_seed(_epoch_seed(self.seed, epoch, 0))  # dropout etc.
            gen = torch.Generator(device="cpu").manual_seed(_epoch_seed(self.seed, epoch, 1))
            train_it.set_epoch(epoch)
            task.model.train()
            sums = {"loss": 0.0, "correct": 0.0, "n": 0.0}
            extra_sums: dict[str, float] = {}
            bar = _progress(train_it, cfg.progress, f"epoch {epoch + 1}/{cfg.epochs}")
            for i, (xb, yb, ib) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                lr = lr_at(cfg, step, steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                maps = task.maps_for(ib)
                x, maps = prepare_batch(xb, self.plan, self.device, maps, gen)
                y = yb.to(self.device)
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logits, extra = task.loss(x, y, maps)
                if not torch.isfinite(loss):
                    raise ConfigError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower train.lr or enable train.grad_clip")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                n = y.shape[0]
                sums["loss"] += loss.item() * n
                sums["correct"] += (logits.argmax(1) == y).sum().item()
                sums["n"] += n
                for k, v in extra.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + float(v) * n
                if hasattr(bar, "set_postfix") and i % 10 == 0:
                    bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", acc=f"{sums['correct'] / sums['n']:.3f}")
            val = evaluate(task, self.plan, self.plan.dataset.train, self.plan.val_idx, cfg.eval_batch_size, self.device, amp_dtype)
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": sums["loss"] / sums["n"],
                "train_acc": sums["correct"] / sums["n"],
                **{f"train_{k}": v / sums["n"] for k, v in extra_sums.items()},
                **{f"val_{k}": v for k, v in val.items()},
                "seconds": seconds,
            }
            history.append(record)
            score = record["val_acc"] if cfg.select == "val_acc" else -record["val_loss"]
            improved = score > best_val
            if improved:
                best_val, best_epoch = score, epoch + 1
            self._save(last_path, opt, epoch, history, best_val, best_epoch, with_optim=True)
            if improved:
                self._save(best_path, opt, epoch, history, best_val, best_epoch, with_optim=False)
            write_json_atomic(self.out_dir / "history.json", history)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} | {seconds:.1f}s"
                + (" *" if improved else "")
            )
        if writer is not None:
            writer.close()
        if not best_path.exists():
            raise CheckpointError(f"no best checkpoint in '{self.ckpt_dir}'; delete the run directory and train again")
        return TrainResult(best_path, last_path, history, best_epoch, best_val, time.perf_counter() - t_start, resumed_from)

    # -- internals ------------------------------------------------------------------------
    def _save(self, path, opt, epoch, history, best_val, best_epoch, with_optim: bool) -> None:
        tensors = {f"model.{k}": v for k, v in self.task.model.state_dict().items()}
        meta = {
            **self.meta,
            "epoch": epoch,
            "history": history,
            "best_val": best_val,
            "best_epoch": best_epoch,
            "seed": self.seed,
            "model_spec": getattr(self.task.model, "spec", None),
            "mean": list(self.plan.mean),
            "std": list(self.plan.std),
        }
        if with_optim:
            otensors, ometa = optimizer_to_flat(opt)
            tensors.update({f"optim.{k}": v for k, v in otensors.items()})
            meta["optimizer"] = ometa
        save_checkpoint(path, tensors, meta)

    def _amp(self):
        if not self.cfg.amp or self.device.type != "cuda":
            return None, None
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs tensorboard; pip install 'teachx[tensorboard]'") from None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))


@torch.no_grad()
def evaluate(
    task: Task,
    plan: DataPlan,
    split: Split,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    amp_dtype=None,
) -> dict[str, float]:
    """Loss and accuracy of ``task.model`` on ``split[indices]`` (no augmentation)."""
    model = task.model
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    for xb, yb, _ in BatchIterator(split, indices, batch_size, shuffle=False, seed=0):
        x, _ = prepare_batch(xb, plan, device)
        y = yb.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        total += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.shape[0]
    model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0}
    return {"loss": total / n, "acc": correct / n, "n": n}


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
