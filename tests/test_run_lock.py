"""One writer per run directory, and results bound to the config that made them.

- A run directory is held (``.teachx-lock``, the file lock the studies use) by the process writing in
  it: a second `teachx run` on the same --out, with or without --overwrite, is refused with a line
  naming the holder and changes nothing; with --wait it waits and then finishes, its config and
  results agreeing. A lock of a dead process is taken over with a warning (tests/test_faults.py
  kills a run with ``kill -9`` and runs it again).
- Every stage record and results.json carry the hash of the config's identity; a directory whose
  records disagree with its config.yaml is refused with the --redo that fixes it; records of an
  older teachx (no hash) are taken as they are.

The first process is held at a fixed point by the fault hook (``stop``: SIGSTOP after a file is
written), not by timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teachx.errors import RunDirError
from teachx.runs.rundir import RUN_LOCK, hold_run_dir, remove_owned, run_dir_kind

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TEACHX, teachx_env  # noqa: E402
from test_faults import fault_env, one_line_error, teachx  # noqa: E402

TINY = [
    "data.train_size=200",
    "train.batch_size=32",
    "teacher.method=gradient_x_input",
    "teacher.batch_size=64",
    "teacher.eval_images=100",
    "teacher.faith_images=8",  # the evaluation's faithfulness block on 8 of them (on all 100 it takes most of a run)
]


def _lock_record(pid: int, host: str | None = None, command: str = "teachx run --out x") -> str:
    return json.dumps({"command": command, "pid": pid, "host": host or socket.gethostname(), "since": time.time()})


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (to show nothing changed)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the lock, in-process ---------------------------------------------------------------------------


def test_a_held_run_directory_is_refused_naming_its_holder(tmp_path):
    run = tmp_path / "run"
    with hold_run_dir(run, log=lambda m: None):
        held = json.loads((run / RUN_LOCK).read_text())
        assert held["pid"] == os.getpid() and held["command"].startswith("teachx")
        assert run_dir_kind(run) == "empty"  # a run being started is not somebody else's directory
        with pytest.raises(
            RunDirError,
            match=rf"run directory '{run}' is in use by 'teachx.*' \(pid {os.getpid()} on "
            rf"{socket.gethostname()}, since \d\d:\d\d:\d\d\); wait for it to finish, or pass --wait",
        ):
            with hold_run_dir(run, log=lambda m: None):
                pass
        (run / "config.yaml").write_text("command: run\n")
        assert remove_owned(run) == [] and (run / RUN_LOCK).is_file()  # --overwrite keeps the lock it works under
    assert not run.exists()  # made for the lock, and empty again


def test_a_fresh_directory_made_for_the_lock_goes_again_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError):
        with hold_run_dir(tmp_path / "new" / "run", log=lambda m: None):
            raise ValueError("e.g. a data error before anything is written")
    assert not (tmp_path / "new" / "run").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not made by teachx"):  # refused before a lock is written into it
        with hold_run_dir(mine, log=lambda m: None):
            pass
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_stale_and_foreign_host_locks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_LOCK).write_text(_lock_record(_dead_pid(), command="teachx run --out run train.epochs=3"))
    said: list[str] = []
    with hold_run_dir(run, log=said.append):
        assert json.loads((run / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert (
        len(said) == 1
        and said[0].startswith("teachx: warning: run directory")
        and "'teachx run --out run train.epochs=3'" in said[0]
    )
    assert "no longer running; taking it over" in said[0]
    (run / RUN_LOCK).write_text(_lock_record(1, host="other-machine"))
    with pytest.raises(RunDirError, match=r"pid 1 on other-machine.*another machine.*--wait.*delete '.*\.teachx-lock'"):
        with hold_run_dir(run, log=said.append):
            pass
    assert (run / RUN_LOCK).exists()  # respected, not taken over


# -- binding results to their config ---------------------------------------------------------------


def test_config_hash_is_the_identity_and_ignores_presentation(tmp_path):
    from teachx.runs.resolve import resolve_config
    from teachx.runs.recovery import check_bound, prepare_run_dir
    from teachx.runs.rundir import config_hash, run_config_hash
    from teachx.utils.io import write_json_atomic

    cfg = resolve_config(None, ["train.epochs=3"])
    h = config_hash({"command": "run", **cfg.to_dict()})
    cfg.train.progress, cfg.teacher.batch_size = False, 7  # --quiet, and a neutral key
    assert config_hash({"command": "run", **cfg.to_dict()}) == h
    assert config_hash({"command": "run", "train": {"epochs": 3}}) == h  # only what differs from the defaults
    assert config_hash({"command": "run", "train": {"epochs": 2}}) != h
    assert config_hash({"command": "demo", "train": {"epochs": 3}}) != h
    run = prepare_run_dir(tmp_path / "run", resolve_config(None, ["train.epochs=3"]), "run")
    assert run_config_hash(run) == h
    (run / "baseline").mkdir()
    write_json_atomic(run / "baseline" / "stage.json", {"test_acc": 0.5}, digest=True)  # an older teachx: no hash
    check_bound(run, h)
    (run / "impactx").mkdir()
    other = config_hash({"command": "run", "train": {"epochs": 2}})
    write_json_atomic(run / "impactx" / "stage.json", {"test_acc": 0.5, "config_hash": other}, digest=True)
    with pytest.raises(
        RunDirError, match=r"the impactx stage was made with another config than its config\.yaml.*--redo impactx$"
    ):
        check_bound(run, h)


# -- real processes ------------------------------------------------------------------------------------


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _until(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _agree(run: Path) -> dict:
    """config.yaml, every stage record and results.json describe the same run."""
    from teachx.runs.rundir import run_config_hash

    results = json.loads((run / "results.json").read_text())
    bound = run_config_hash(run)
    assert bound and results["config_hash"] == bound
    for stage in ("baseline", "impactx"):
        assert json.loads((run / stage / "stage.json").read_text())["config_hash"] == bound, stage
    assert f"epochs: {results['epochs']}\n" in (run / "config.yaml").read_text()
    assert not (run / RUN_LOCK).exists()
    return results


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_second_run_while_the_first_trains_is_refused_or_waits(tmp_path):
    """The issue's reproduction: `teachx run --out same train.epochs=3 &` and, while it trains, the same
    --out with train.epochs=2 (with and without --overwrite) or the identical command."""
    cache, out = tmp_path / "cache", tmp_path / "same"
    first = subprocess.Popen(
        [*TEACHX, "run", "--out", "same", "-q", *TINY, "train.epochs=3"],
        cwd=tmp_path,
        env=teachx_env(fault_env(cache, f"stop-after:{out}/baseline/stage.json:1")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _until(
            lambda: _state(first.pid) == "T" or first.poll() is not None, "the first run to reach its baseline record"
        )
        assert first.poll() is None, first.communicate()
        before = _files(out)
        for extra in (["train.epochs=2"], ["train.epochs=2", "--overwrite"], ["train.epochs=3"]):
            res = teachx("run", "--out", "same", "-q", *TINY, *extra, cwd=tmp_path, cache=cache)
            one_line_error(
                res,
                "run directory 'same' is in use by 'teachx run --out same -q",
                f"(pid {first.pid} on {socket.gethostname()}, since ",
                "wait for it to finish, or pass --wait",
            )
        assert _files(out) == before  # nothing changed, nothing removed
        waiter_err = tmp_path / "waiter.err"
        with open(waiter_err, "w") as err:
            waiter = subprocess.Popen(
                [*TEACHX, "run", "--out", "same", "-q", *TINY, "train.epochs=2", "--overwrite", "--wait"],
                cwd=tmp_path,
                env=teachx_env(fault_env(cache)),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        _until(
            lambda: "waiting until it is free" in waiter_err.read_text() or waiter.poll() is not None,
            "the second run to wait",
        )
        assert waiter.poll() is None, waiter_err.read_text()
        assert _files(out) == before
        os.kill(first.pid, signal.SIGCONT)
        out1, err1 = first.communicate(timeout=600)
        assert first.returncode == 0, err1[-3000:]
        assert "IMPACTX  test accuracy" in out1
        out2, _ = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, waiter_err.read_text()[-3000:]
    finally:
        for p in (first, locals().get("waiter")):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert (
        "in use by 'teachx run --out same" in waiter_err.read_text() and "[baseline] training" in out2
    )  # after the first, from scratch
    assert _agree(out)["epochs"] == 2
    # the identical command later: the run is its own, nothing is trained again
    res = teachx("run", "--out", "same", "-q", *TINY, "train.epochs=2", "--wait", cwd=tmp_path, cache=cache)
    assert res.returncode == 0 and res.stdout.count("complete, skipped") == 2 and res.stderr == "", res.stderr[-2000:]


@pytest.mark.slow
def test_records_that_disagree_with_config_yaml_are_refused(tmp_path):
    """A run whose config.yaml was edited (train.epochs 1 -> 2): its stages, trained for 1 epoch, are
    refused with the --redo that fixes it; the report refuses its results.json; --redo trains again."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    res = teachx("run", "--out", "run", "-q", *TINY, "train.epochs=1", cwd=tmp_path, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _agree(run)["epochs"] == 1
    text = (run / "config.yaml").read_text()
    assert "  epochs: 1\n" in text
    (run / "config.yaml").write_text(text.replace("  epochs: 1\n", "  epochs: 2\n"))
    before = _files(run)
    res = teachx("run", "--out", "run", "-q", *TINY, "train.epochs=2", cwd=tmp_path, cache=cache)
    one_line_error(
        res,
        "run directory 'run': the baseline and impactx stages were made with another config than its config.yaml",
        "re-run the same command with --redo baseline --redo impactx",
    )
    res = teachx("report", "run", cwd=tmp_path, cache=cache)
    one_line_error(res, "results.json' was made with another config than", "re-run the `teachx run` command")
    assert _files(run) == before
    res = teachx("run", "--out", "run", "-q", *TINY, "train.epochs=2", "--redo", "baseline", cwd=tmp_path, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _agree(run)["epochs"] == 2
    assert len(json.loads((run / "baseline" / "stage.json").read_text())["history"]) == 2
