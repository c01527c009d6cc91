"""Shared fixtures: a small seeded CNN shaped like a teachx Backbone, and seeded inputs; the one way tests
run the `teachx` command line (``run_teachx`` in a subprocess, ``teachx_main`` and ``invoke_study`` in-process)
and the ``isolated_dirs`` fixture. Test modules import the helpers with ``from conftest import ...`` (pytest puts
tests/ on sys.path, as for ``from test_faults import ...``).

Kept tiny (16x16 images, a few channels) because the test machine is shared; seeded with a
local generator so fixtures never disturb (or depend on) the global RNG state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Optional

import pytest
import torch
from torch import nn

from teachx.models.base import Backbone
from teachx.utils.runtime import available_cpus

# a fixed thread count for every test and the teachx processes tests start: the adaptive default
# (teachx.utils.runtime.configure_threads) may change float rounding between a run and its resume
os.environ.setdefault("TEACHX_THREADS", str(available_cpus()))

#: the `teachx` command as a user runs it, with this interpreter (and so this checkout, through PYTHONPATH)
TEACHX = [sys.executable, "-m", "teachx"]

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


# -- the command line --------------------------------------------------------------------------------------


def teachx_env(env: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, str]:
    """This process's environment with ``env`` laid over it (a None value removes that variable): what a
    `teachx` subprocess gets, so it loads this checkout and its thread settings unless a test says otherwise."""
    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = str(value)
    return full


def run_teachx(
    *args: Any, cwd=None, env: Optional[Mapping[str, Optional[str]]] = None, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess:
    """`python -m teachx ARGS` in a subprocess, as a user runs it: text stdout/stderr captured, ``env`` laid over
    this environment (see ``teachx_env``); other keyword arguments go to ``subprocess.run``."""
    return subprocess.run(
        [*TEACHX, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=teachx_env(env),
        timeout=timeout,
        **kwargs,
    )


def teachx_main(capsys: pytest.CaptureFixture, *args: Any) -> tuple[Any, str, str]:
    """The `teachx` entry point in this process (a subprocess costs seconds): (exit code, stdout, stderr) of this
    call alone; the code is 0 when it returns without exiting."""
    from teachx.cli.main import main

    capsys.readouterr()
    code: Any = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def invoke_study(*args: Any, env: Optional[Mapping[str, Optional[str]]] = None):
    """`teachx study ARGS` through click's CliRunner in this process (no capsys needed): a click ``Result``."""
    import click
    from click.testing import CliRunner

    from teachx.cli.study import register

    group = click.Group()
    register(group)
    return CliRunner().invoke(group, ["study", *map(str, args)], env=env)


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> dict:
    """The tiny study of tests/test_study.py, run once per session (about 30 s): test_study.py and test_report.py
    read its outputs."""
    from test_study import tiny_study

    return tiny_study(tmp_path_factory.mktemp("study"))


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch) -> None:
    """TEACHX_DATA and TEACHX_CACHE under tmp_path: nothing read from or written to the user's data and cache.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("isolated_dirs")``."""
    monkeypatch.setenv("TEACHX_DATA", str(tmp_path / "data_home"))
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache_home"))
