"""One training loop for every model teachx trains (baseline/teacher and IMPACTX).

Why one file of over 500 lines: the loop is written once for every method, and its parts
(seeding, resume, DDP, checkpoints) depend on each other's order.


What differs between them is a ``Task`` (which model, which loss, which extra targets such as
teacher maps); the loop -- seeding, batching, augmentation, mixed precision, validation,
checkpoints, resume, progress and logging -- is written once here.

Determinism and resume: every random choice of epoch ``e`` (batch order, augmentation, dropout)
is drawn from generators seeded by ``(seed, e)``, and a checkpoint is written atomically after
every epoch. A run killed at any point and restarted therefore replays the interrupted epoch
exactly and ends with the same weights as an uninterrupted run (on CPU).

Distributed data parallel (one process per device, started by ``torchrun``; see
:mod:`teachx.utils.distributed`): when a process group with world size W > 1 is up, ``fit`` is a
collective call (every rank calls it) and

- each rank trains on ``batch_size // W`` samples per step, so the *global* batch -- and with it
  the learning rate, the schedule's steps per epoch and the results -- stays that of the
  single-process run (exactly the same samples per step when W divides ``batch_size``);
- the epoch order is the single-process ``(seed, epoch)`` permutation dealt out round-robin
  (``BatchIterator(rank, world_size)``), so the union of the ranks' step-``i`` batches is the
  single-process step-``i`` batch; DDP averages the gradients, which equals the gradient of the
  global-batch mean loss because every rank's batch has the same size;
- so without augmentation/dropout/BatchNorm a W-process run is the 1-process computation up to
  the order of floating-point additions: weights agree to ~1e-7 with SGD. Adam can amplify that
  round-off where gradients are near zero (its first steps are sign-like): on Fashion-MNIST with
  lr 1e-2 a 1-process run with 1 vs 2 threads already differs by ~7e-3, and 2 processes vs 1
  differ by the same amount -- a property of Adam, not of the distribution;
- dropout and augmentation generators are seeded by ``(seed, epoch, rank)`` (rank 0 keeps the
  single-process seeds), so with augmentation or dropout a W-process run is *not* the same
  computation as a 1-process run, but it is still exactly reproducible and resumable for a fixed W;
- BatchNorm statistics are per rank (standard DDP; running buffers are broadcast from rank 0
  before validation and checkpoints);
- training metrics (loss/correct/n sums) are all-reduced at the end of the epoch; validation is
  sharded across ranks (``val_idx[rank::W]``) and its sums all-reduced;
- rank 0 alone writes checkpoints, ``history.json``, TensorBoard and the log, followed by a
  barrier; on resume every rank loads the same ``last.safetensors``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from teachx.registry import declare_measure
from torch import nn

from teachx.data.base import ImageDataset, Split
from teachx.data.loading import BatchIterator
from teachx.data.transforms import Augment, normalize
from teachx.errors import CheckpointError, ConfigError
from teachx.models.base import tell_input_normalization
from teachx.training.checkpoint import (
    load_checkpoint,
    load_state_into,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from teachx.utils import distributed as dist_utils
from teachx.config.train import TrainConfig
from teachx.training.schedule import lr_at
from teachx.utils.io import write_json_atomic
from teachx.utils.runtime import adapt_threads, configure_threads, tune_cpu_allocator
from teachx.utils.seeding import choose_device


class Task(Protocol):
    """What is trained and how its loss is computed."""

    model: nn.Module

    def maps_for(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Spatial targets aligned with the images (augmented together with them), or None."""

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, maps: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
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


def _epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """Seed of random stream ``stream`` in ``epoch`` on ``rank`` (rank 0 = the single-process seed)."""
    return (seed * 1_000_003 + epoch * 9_973 + stream * 7_919 + rank * 104_729) % (2**63 - 1)


class _MethodDispatch(nn.Module):
    """Lets DDP run any forward-like method of ``model`` (e.g. IMPACTX's ``forward_all``).

    DDP only prepares its gradient all-reduce when the call goes through ``DDP.forward``, which
    calls ``self.module(...)``; this module turns ``_method=name`` into ``model.name(...)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, _method: str = "forward", **kwargs: Any) -> Any:
        if _method == "forward":
            return self.model(*args, **kwargs)
        return getattr(self.model, _method)(*args, **kwargs)


class _DDPModelView:
    """Stands in for ``task.model`` while the task computes its loss under DDP.

    ``view(x)`` and ``view.forward_all(x)`` (and any name in the model's optional
    ``ddp_forward_methods``) go through DDP; every other attribute is the model's own. The task's
    loss must call the model once per step (DDP pairs each forward with one backward).
    """

    def __init__(self, ddp: nn.Module, model: nn.Module):
        self._ddp = ddp
        self._model = model
        self._methods = {"forward", "forward_all", *getattr(model, "ddp_forward_methods", ())}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    @property
    def unwrapped(self) -> nn.Module:
        """The model itself: for passes that must not go through DDP (no gradient all-reduce)."""
        return self._model

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            return lambda *args, **kwargs: self._ddp(*args, _method=name, **kwargs)
        return getattr(self._model, name)


def _has_unused_parameters(task: "Task", x: torch.Tensor, y: torch.Tensor, maps: Optional[torch.Tensor]) -> bool:
    """Does the task's loss leave some trainable parameter without a gradient?

    DDP needs ``find_unused_parameters=True`` exactly then (e.g. IMPACTX with lambda = 0 never
    runs its decoder). Probed with one small forward/backward in training mode; the RNG and the
    buffers (BatchNorm statistics) are restored, so the run is unaffected.
    """
    model = task.model
    params = [p for p in task.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            loss = task.loss(x, y, maps)[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    except Exception:  # noqa: BLE001 - cannot tell: let DDP search every step
        return True
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    return any(g is None for g in grads)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen; unfreeze a part of the model")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
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
        x = x.float().div_(255.0)  # augment in [0, 1] pixel space (zero padding = black), then normalise
        if maps is not None:
            x, maps = plan.augment(x, generator, maps)
        else:
            x = plan.augment(x, generator)
    return normalize(x, plan.mean, plan.std), maps


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
        distributed: Optional[bool] = None,
        find_unused_parameters: Optional[bool] = None,
    ):
        """``distributed``: None = use the torch.distributed process group when one with more than
        one process is up (every rank must then call :meth:`fit`), False = train alone.
        ``find_unused_parameters``: passed to DDP; None = probe the task once (see
        :func:`_has_unused_parameters`)."""
        self.task, self.plan, self.cfg = task, plan, cfg
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.device = choose_device(str(device)) if not isinstance(device, torch.device) else device
        self.meta = dict(meta or {})
        self.log = log
        self.on_epoch_start = on_epoch_start
        self.distributed = distributed
        self.find_unused_parameters = find_unused_parameters
        self.ckpt_dir = self.out_dir / "checkpoints"

    def _world(self) -> tuple[int, int]:
        """(rank, world_size) this fit runs with."""
        if self.distributed is False:
            return 0, 1
        dist_utils.init_distributed()  # no-op unless launched by torchrun; idempotent
        if self.distributed and not dist_utils.is_distributed():
            raise ConfigError(
                "Trainer(distributed=True) needs a torchrun launch with more than one process; launch with --nproc N"
            )
        return dist_utils.rank(), dist_utils.world_size()

    # -- public ---------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        tune_cpu_allocator()  # large CPU speed-up, no effect on results (see teachx.utils.runtime)
        configure_threads(self.cfg.threads)  # train.threads / $TEACHX_THREADS / the CPUs this process may use
        cfg, task = self.cfg, self.task
        rank, world = self._world()
        main = rank == 0
        log = self.log if main else (lambda msg: None)
        device = dist_utils.device_for(self.device) if world > 1 else self.device
        self.device = device
        model = task.model
        tell_input_normalization(model, self.plan.mean, self.plan.std)  # B-cos networks encode the raw image
        model.to(device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            model.to(memory_format=fmt)
        opt = make_optimizer(cfg, task.parameters())
        batch_size = cfg.batch_size // world  # per rank: the global batch stays cfg.batch_size
        if batch_size < 1:
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} is smaller than the {world} processes; use a batch size >= the process count"
            )
        if world > 1 and cfg.batch_size % world:
            log(
                f"train.batch_size={cfg.batch_size} is not divisible by {world} processes: the global batch is {batch_size * world}"
            )
        train_it = BatchIterator(
            self.plan.dataset.train,
            self.plan.train_idx,
            batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
            rank=rank,
            world_size=world,
        )
        steps_per_epoch = len(train_it)
        if steps_per_epoch == 0:
            raise ConfigError("the training split is empty; use more training images or a smaller validation fraction")
        history: list[dict[str, Any]] = []
        start_epoch, best_val, best_epoch, resumed_from = 0, -math.inf, -1, None
        last_path = self.ckpt_dir / "last.safetensors"
        best_path = self.ckpt_dir / "best.safetensors"
        if resume and last_path.exists():  # every rank loads the same checkpoint (rank 0 wrote it, then a barrier)
            # verified: damaged weights are never trained on, nor mistaken for a diverged run
            ck = load_checkpoint(last_path, fix=f"delete '{self.ckpt_dir}' to train this model again from the start")
            if ck.meta.get("kind") != self.meta.get("kind"):
                raise CheckpointError(
                    f"'{last_path}' holds a {ck.meta.get('kind')} checkpoint, not {self.meta.get('kind')}; use a new run directory"
                )
            load_state_into(model, ck.group("model"), f"checkpoint '{last_path}'")
            optimizer_from_flat(opt, ck.group("optim"), ck.meta["optimizer"])
            history = ck.meta["history"]
            start_epoch = ck.meta["epoch"] + 1
            best_val, best_epoch = ck.meta["best_val"], ck.meta["best_epoch"]
            resumed_from = start_epoch
            if start_epoch < cfg.epochs:
                log(f"resuming from epoch {start_epoch} ({last_path})")
        ddp = self._wrap_ddp(train_it, device) if (world > 1 and start_epoch < cfg.epochs) else None
        writer = self._tensorboard() if main else None
        amp_dtype, scaler = self._amp()
        t_start = time.perf_counter() - sum(h.get("seconds", 0.0) for h in history)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            if epoch > start_epoch:  # the default thread count follows how busy other processes keep our CPUs
                old, new, others = adapt_threads()
                if new != old:
                    log(
                        f"threads {old} -> {new}: other processes kept {others:.1f} of this process's CPUs busy (fix it with train.threads)"
                    )
            if self.on_epoch_start is not None:
                self.on_epoch_start(epoch)
            torch.manual_seed(_epoch_seed(self.seed, epoch, 0, rank))  # dropout etc.
            gen = torch.Generator(device="cpu").manual_seed(_epoch_seed(self.seed, epoch, 1, rank))
            train_it.set_epoch(epoch)
            model.train()
            sums = {"loss": 0.0, "correct": 0.0, "n": 0.0}
            extra_sums: dict[str, float] = {}
            bar = _progress(train_it, cfg.progress and main, f"epoch {epoch + 1}/{cfg.epochs}")
            for i, (xb, yb, ib) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                lr = lr_at(cfg, step, steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                maps = task.maps_for(ib)
                x, maps = prepare_batch(xb, self.plan, device, maps, gen)
                x = x.contiguous(memory_format=fmt)
                y = yb.to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), self._through(ddp):
                    loss, logits, extra = task.loss(x, y, maps)
                finite = bool(torch.isfinite(loss))
                if world > 1:  # all ranks stop together, none is left waiting in the gradient all-reduce
                    finite = dist_utils.all_reduce_sum(torch.tensor([0.0 if finite else 1.0])).item() == 0.0
                if not finite:
                    raise ConfigError(
                        f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower train.lr or enable train.grad_clip"
                    )
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
            if world > 1:
                sums, extra_sums = _all_reduce_sums(sums, extra_sums)
                dist_utils.broadcast_buffers(
                    model
                )  # rank 0's BatchNorm statistics everywhere: what is validated = what is saved
            val = evaluate(
                task,
                self.plan,
                self.plan.dataset.train,
                self.plan.val_idx,
                cfg.eval_batch_size,
                device,
                amp_dtype,
                shard=world > 1,
            )
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
            if val["n"] == 0:  # nothing to validate on (data.val_fraction=0): the latest epoch is the one kept
                score = float(epoch + 1)
            else:
                score = record["val_acc"] if cfg.select == "val_acc" else -record["val_loss"]
            improved = score > best_val
            if improved:
                best_val, best_epoch = score, epoch + 1
            if main:
                # best before last: a process killed between the two resumes from the previous epoch
                # and repeats this one (same result); the other way round, 'last' would claim a best
                # epoch whose checkpoint was never written
                if improved:
                    self._save(best_path, opt, epoch, history, best_val, best_epoch, with_optim=False)
                self._save(last_path, opt, epoch, history, best_val, best_epoch, with_optim=True)
                write_json_atomic(self.out_dir / "history.json", history)
                if writer is not None:
                    for k, v in record.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
            dist_utils.barrier()  # the checkpoint is on disk before any rank moves on (or exits)
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} | {seconds:.1f}s"
                + (" *" if improved else "")
            )
        if writer is not None:
            writer.close()
        if not best_path.exists():
            raise CheckpointError(
                f"no best checkpoint in '{self.ckpt_dir}' although training finished; re-run the same command with --redo for this stage"
            )
        return TrainResult(
            best_path,
            last_path,
            history,
            best_epoch,
            best_val,
            time.perf_counter() - t_start,
            resumed_from,
            extra={"world_size": world, "per_rank_batch_size": batch_size},
        )

    # -- internals ------------------------------------------------------------------------
    def _wrap_ddp(self, train_it: BatchIterator, device: torch.device) -> nn.Module:
        """DDP around the task's model (via :class:`_MethodDispatch`), deciding ``find_unused_parameters``."""
        from torch.nn.parallel import DistributedDataParallel

        model = self.task.model
        find_unused = self.find_unused_parameters
        if find_unused is None:
            xb, yb, ib = next(
                iter(BatchIterator(self.plan.dataset.train, self.plan.train_idx[:4], 4, shuffle=False, seed=0))
            )
            maps = self.task.maps_for(ib)
            x, maps = prepare_batch(xb, self.plan, device, maps)
            was_training = model.training
            model.train()
            find_unused = _has_unused_parameters(self.task, x, yb.to(device), maps)
            model.train(was_training)
            # every rank must pass the same flag to DDP
            find_unused = dist_utils.all_reduce_sum(torch.tensor([float(find_unused)])).item() > 0
        device_ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        # 1-channel conv weights (MNIST-like inputs) get gradients whose size-1 dimension has another
        # stride than DDP's bucket view: harmless (DDP copies), but warned about on every rank.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
        return DistributedDataParallel(
            _MethodDispatch(model), device_ids=device_ids, find_unused_parameters=find_unused
        )

    @contextlib.contextmanager
    def _through(self, ddp: Optional[nn.Module]):
        """While computing the loss, ``task.model`` calls go through DDP (so gradients are synchronised)."""
        if ddp is None:
            yield
            return
        model = self.task.model
        self.task.model = _DDPModelView(ddp, model)  # type: ignore[assignment]
        try:
            yield
        finally:
            self.task.model = model

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


def _all_reduce_sums(sums: dict[str, float], extra_sums: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Epoch sums over all ranks (float64, keys in a fixed order on every rank)."""
    keys = sorted(extra_sums)
    t = torch.tensor([sums["loss"], sums["correct"], sums["n"], *(extra_sums[k] for k in keys)], dtype=torch.float64)
    t = dist_utils.all_reduce_sum(t).tolist()
    return {"loss": t[0], "correct": t[1], "n": t[2]}, dict(zip(keys, t[3:]))


declare_measure("test_accuracy", "The share of test images whose predicted class is the true class.", True)
declare_measure("class_accuracy", "For one class, the share of its test images that the model assigns to it.", True)


@torch.no_grad()
def evaluate(
    task: Task,
    plan: DataPlan,
    split: Split,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    amp_dtype=None,
    shard: bool = False,
    confusion: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy of ``task.model`` on ``split[indices]`` (no augmentation).

    ``confusion=True`` adds ``confusion``: the (classes x classes) counts as nested lists, row = true class,
    column = predicted class (scikit-learn's convention), for the report's per-class accuracy.

    ``shard=True`` in a distributed run is a collective call: rank r evaluates ``indices[r::W]``
    (no padding, so nothing is counted twice) and the sums are all-reduced, so every rank returns
    the figures of the whole of ``indices``. The model must be the same on every rank.
    """
    model = task.model
    was_training = model.training
    model.eval()
    world = dist_utils.world_size() if shard else 1
    if world > 1:
        indices = np.asarray(indices)[dist_utils.rank() :: world]
    total, correct, n = 0.0, 0, 0
    counts: Optional[torch.Tensor] = None
    for xb, yb, _ in BatchIterator(split, indices, batch_size, shuffle=False, seed=0):
        x, _ = prepare_batch(xb, plan, device)
        y = yb.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        total += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.shape[0]
        if confusion:
            k = logits.shape[1]
            batch = torch.bincount(y.long() * k + logits.argmax(1), minlength=k * k).view(k, k).cpu().double()
            counts = batch if counts is None else counts + batch
    model.train(was_training)
    if world > 1:
        total, correct, n = dist_utils.all_reduce_sum(
            torch.tensor([total, float(correct), float(n)], dtype=torch.float64)
        ).tolist()
        correct, n = int(round(correct)), int(round(n))
        if confusion:  # every rank holds a model of the same classes; a rank without images sends zeros
            k = getattr(model, "num_classes", None) or (counts.shape[0] if counts is not None else 0)
            counts = dist_utils.all_reduce_sum(counts if counts is not None else torch.zeros(k, k, dtype=torch.float64))
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0}
    out: dict[str, Any] = {"loss": total / n, "acc": correct / n, "n": n}
    if confusion and counts is not None:
        out["confusion"] = counts.round().long().tolist()
    return out


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
