"""Shared fixtures: a small seeded CNN shaped like a teachx Backbone, and seeded inputs.

Kept tiny (16x16 images, a few channels) because the test machine is shared; seeded with a
local generator so fixtures never disturb (or depend on) the global RNG state.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from teachx.models.base import Backbone
from teachx.utils.runtime import available_cpus

# a fixed thread count for every test and the teachx processes tests start: the adaptive default
# (teachx.utils.runtime.configure_threads) may change float rounding between a run and its resume
os.environ.setdefault("TEACHX_THREADS", str(available_cpus()))

NUM_CLASSES = 5
INPUT_SHAPE = (6, 3, 16, 16)


class SmallCNN(Backbone):
    """conv-relu-maxpool-conv-relu | avgpool-flatten | linear; activations are modules, none re-used."""

    def __init__(self, in_channels: int = 3, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, 2 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)


def make_small_cnn(seed: int = 0, **kwargs) -> SmallCNN:
    """A seeded SmallCNN in eval mode; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(**kwargs)
    return model.eval()


def make_inputs(seed: int = 1, shape: tuple[int, ...] = INPUT_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small_cnn() -> SmallCNN:
    """Seeded SmallCNN (3 -> 5 classes), eval mode, with body/neck/classifier like a Backbone."""
    return make_small_cnn()


@pytest.fixture
def small_cnn_factory():
    """``make_small_cnn(seed=..., in_channels=..., num_classes=..., width=...)`` for tests needing several."""
    return make_small_cnn


@pytest.fixture
def inputs() -> torch.Tensor:
    """Seeded standard-normal batch (6, 3, 16, 16), float32."""
    return make_inputs()


@pytest.fixture
def targets() -> torch.Tensor:
    """Seeded class indices (6,) in [0, 5)."""
    return torch.randint(0, NUM_CLASSES, (INPUT_SHAPE[0],), generator=torch.Generator().manual_seed(2))
