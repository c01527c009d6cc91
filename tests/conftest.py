"""Shared fixtures: a small seeded CNN shaped like a teachx Backbone, and seeded inputs; the one way tests
run the `teachx` command line (``run_teachx`` in a subprocess, ``teachx_main`` and ``invoke_study`` in-process)
and the ``isolated_dirs`` fixture. Test modules import the helpers with ``from conftest import ...`` (pytest puts
tests/ on sys.path, as for ``from test_faults import ...``).

Kept tiny (16x16 images, a few channels) because the test machine is shared; seeded with a
local generator so fixtures never disturb (or depend on) the global RNG state.

Parallel runs (pytest-xdist, ``pytest -n 2 --dist loadgroup`` as in the README): each worker gets its share of the
CPUs as its thread count and its own TEACHX_CACHE folder; the tests sharing an expensive fixture go to one worker
(``xdist_group``, set here from the fixtures they use); a test marked ``alone`` runs while no other test does.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import nn

from teachx.models.base import Backbone
from teachx.utils.runtime import available_cpus

#: "gw0", "gw1", ... in a pytest-xdist worker; None in a plain (one-process) run
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

if XDIST_WORKER:
    # the workers share the CPUs: each gets its share as its thread count (2 CPUs, -n 2: one each), and so do the
    # teachx processes its tests start, so that the workers do not oversubscribe the machine
    _share = max(1, available_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("TEACHX_THREADS", str(_share))
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["TEACHX_THREADS"])
    torch.set_num_threads(int(os.environ["TEACHX_THREADS"]))
    if os.environ.get("TEACHX_CACHE"):  # no test sees cache entries that another worker is writing
        os.environ["TEACHX_CACHE"] = os.path.join(os.environ["TEACHX_CACHE"], XDIST_WORKER)

# a fixed thread count for every test and the teachx processes tests start: the adaptive default
# (teachx.utils.runtime.configure_threads) may change float rounding between a run and its resume
os.environ.setdefault("TEACHX_THREADS", str(available_cpus()))

TESTS = Path(__file__).resolve().parent

#: tests that build the same expensive fixtures through a shared helper rather than a fixture: node id prefix ->
#: the group of the module whose fixture that helper also builds
SHARED_BUILDS = {
    "tests/test_serve_browser.py::": "test_serve.py",
    "tests/test_serve_batching.py::test_the_service_coalesces_uncached_built_in_maps": "test_serve.py",
    "tests/test_serve_reveal_browser.py::": "test_serve_reveal.py",
}


def pytest_configure(config: pytest.Config) -> None:
    if not XDIST_WORKER and getattr(config.option, "numprocesses", None):  # the xdist controller, before its workers
        # the run's folder for the workers' groups and the lock that lets a test run alone
        os.environ["TEACHX_TEST_XDIST"] = tempfile.mkdtemp(prefix="teachx-test-xdist-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not XDIST_WORKER and "TEACHX_TEST_XDIST" in os.environ:
        shutil.rmtree(os.environ.pop("TEACHX_TEST_XDIST"), ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test that uses a module- or session-scoped fixture of tests/ joins that fixture's group, so that under
    ``--dist loadgroup`` one worker builds it once (as a one-process run does) instead of every worker again.

    A worker also writes the groups to the run's folder for the scheduler (``pytest_xdist_make_scheduler``): xdist
    passes a group to its scheduler as a suffix of the test's node id, which pytest 9 no longer lets it change."""
    groups: dict[str, str] = {}
    for item in items:
        group = next((g for prefix, g in SHARED_BUILDS.items() if item.nodeid.startswith(prefix)), None)
        marked = item.get_closest_marker("xdist_group")
        group = group or (str(marked.args[0]) if marked and marked.args else None) or _shared_fixture(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item.nodeid] = group
    folder = os.environ.get("TEACHX_TEST_XDIST")
    if XDIST_WORKER and folder and os.path.isdir(folder):
        tmp = os.path.join(folder, f"groups-{XDIST_WORKER}.tmp")
        with open(tmp, "w") as f:
            json.dump(groups, f)
        os.replace(tmp, os.path.join(folder, f"groups-{XDIST_WORKER}.json"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadgroup``: xdist's scheduling by group, with the groups the workers wrote (above)."""
    folder = os.environ.get("TEACHX_TEST_XDIST")
    if config.getvalue("dist") != "loadgroup" or not folder:
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FixtureGroups(LoadGroupScheduling):
        groups: Optional[dict[str, str]] = None

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # the group xdist put into the node id, where it could
            if scope != nodeid:
                return scope
            if self.groups is None:  # read once every worker has collected, when scheduling starts
                self.groups = {}
                for path in sorted(Path(folder).glob("groups-*.json")):
                    self.groups.update(json.loads(path.read_text()))
            return self.groups.get(nodeid, nodeid)

    return FixtureGroups(config, log)


def _shared_fixture(item: pytest.Item) -> Optional[str]:
    """The group of the first module- or session-scoped fixture of tests/ the test uses: the module that defines it
    (a module-scoped one) or its name (a session-scoped one); None if it uses none."""
    info = getattr(item, "_fixtureinfo", None)
    for name in info.names_closure if info else ():
        for fixturedef in info.name2fixturedefs.get(name, ())[-1:]:
            scope = str(getattr(fixturedef.scope, "value", fixturedef.scope))
            try:
                path = Path(inspect.getfile(fixturedef.func)).resolve()
            except TypeError:
                continue
            if scope in ("module", "session") and path.parent == TESTS:
                return path.name if scope == "module" else name
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]):
    with _turn(item.get_closest_marker("alone") is not None):
        return (yield)


@contextlib.contextmanager
def _turn(alone: bool) -> Iterator[None]:
    """Under pytest-xdist, a shared lock on the run's lock file for each test and an exclusive one for a test marked
    ``alone``; a gate taken first keeps a stream of shared holders from starving the exclusive one."""
    folder = os.environ.get("TEACHX_TEST_XDIST")
    if not XDIST_WORKER or not folder or not os.path.isdir(folder):
        yield
        return
    import fcntl

    with open(os.path.join(folder, "gate"), "a") as gate, open(os.path.join(folder, "lock"), "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
