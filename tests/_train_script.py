"""Trains a small LeNet-5 on synthetic data; used by test_trainer.py in a subprocess (to kill -9 it)."""

import sys
import time

import numpy as np
import torch

from teachx.data.base import ImageDataset, Split
from teachx.data.transforms import Augment
from teachx.models import build_model
from teachx.config.train import TrainConfig
from teachx.training.trainer import ClassifierTask, DataPlan, Trainer


def synthetic_dataset(n_train: int = 192, n_test: int = 64, seed: int = 0) -> ImageDataset:
    """Class = which quadrant is bright, plus noise: learnable, small, deterministic."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 80, (n, 16, 16, 1)).astype(np.uint8)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 2)
            x[i, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8, 0] += 150
        return Split(x, y.astype(np.int64))

    return ImageDataset(
        "synthetic", ["tl", "tr", "bl", "br"], make(n_train), make(n_test), (0.3,), (0.25,), hflip=False
    )  # flips would swap quadrant labels


class SlowTask(ClassifierTask):
    def __init__(self, model, delay):
        super().__init__(model)
        self.delay = delay

    def loss(self, x, y, maps):
        time.sleep(self.delay)
        return super().loss(x, y, maps)


def main(out: str, epochs: int, delay: float) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = synthetic_dataset()
    plan = DataPlan(ds, np.arange(160), np.arange(160, 192), Augment(crop_padding=2, hflip=False))
    model = build_model("lenet5", 1, 4, (16, 16))
    cfg = TrainConfig(epochs=epochs, batch_size=32, optimizer="adam", lr=3e-3, schedule="cosine", progress=False)
    res = Trainer(
        SlowTask(model, delay), plan, cfg, out, seed=1, device="cpu", meta={"kind": "classifier"}, log=lambda s: None
    ).fit()
    print(res.best_epoch, res.history[-1]["val_acc"])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
