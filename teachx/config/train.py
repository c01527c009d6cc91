"""Training hyper-parameters shared by the baseline (teacher) and IMPACTX trainers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from teachx.errors import ConfigError


@dataclass
class TrainConfig:
    """How a model is optimised. Defaults suit small 32x32 CNNs trained on CPU."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # training images per optimiser step (global: split across --nproc processes)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"  # sgd | adam | adamw
    lr: float = 1e-3  # peak learning rate (the schedule scales it)
    momentum: float = 0.9  # SGD momentum (sgd only)
    nesterov: bool = False  # Nesterov momentum (sgd only)
    weight_decay: float = 0.0  # L2 penalty (adamw: decoupled weight decay)
    schedule: Literal["constant", "cosine", "step", "multistep", "onecycle"] = (
        "cosine"  # learning-rate schedule over the epochs
    )
    warmup_epochs: float = 0.0  # linear warm-up, in (fractional) epochs
    step_size: int = 30  # schedule=step: epochs between decays
    gamma: float = 0.1  # step/multistep decay factor
    milestones: list[int] = field(default_factory=list)  # schedule=multistep: epochs at which lr is multiplied by gamma
    label_smoothing: float = 0.0  # cross-entropy label smoothing in [0, 1)
    grad_clip: Optional[float] = None  # max global grad norm
    amp: bool = True  # mixed precision, on CUDA only (bf16 where supported, else fp16 + scaler)
    eval_batch_size: int = 512  # images per batch for validation and test (no gradients)
    select: Literal["val_acc", "val_loss"] = "val_acc"  # which validation figure picks the best checkpoint
    # NHWC activations: faster convolutions and max pooling with CPU oneDNN kernels (see
    # bench/bench_cpu_tuning.py for the measured effect); the same values up to float rounding
    channels_last: bool = False
    tensorboard: bool = False  # also write TensorBoard logs into the stage directory
    progress: bool = True  # progress bars (the CLI's --quiet turns them off)
    threads: Optional[int] = (
        None  # torch threads per process; default: $TEACHX_THREADS, else $OMP_NUM_THREADS, else the CPUs available to the process
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("train.batch_size and train.eval_batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1 (or null for the default), got {self.threads}")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("train.schedule=multistep needs train.milestones (e.g. [30, 60])")
