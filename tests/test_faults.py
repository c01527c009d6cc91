"""Fault injection through the command line, as a user's machine meets it.

- ``kill -9`` (and Ctrl-C) at chosen points of every stage -- baseline training, teacher-map
  generation, IMPACTX training, evaluation -- then the same command again: the final results equal
  an uninterrupted run's and no temporary file is left. The points are deterministic, not timed:
  ``tests/_fault_hook/sitecustomize.py`` (on the subprocess's PYTHONPATH) fires at the N-th write
  of a given file, after its temporary file is complete and before the rename, or at the N-th batch
  of teacher maps; it also injects the OSErrors of a full or read-only file system.
- Real read-only and full file systems (tmpfs in a private mount namespace; skipped where the
  machine cannot make one, the injected ones above always run).
- Directories teachx did not make: never deleted, not even with ``--overwrite``; inside a teachx
  run directory ``--overwrite`` removes only what teachx wrote.
- A re-run with nothing to do keeps the recorded measurements; a copied run (or one re-run from another
  working directory) uses its own files; presentation options (``--quiet``) are not part of a run's
  identity.
- Image-decoding workers end with their parent when it is killed.

Tiny settings (200 bundled images, 2 epochs, Gradient x Input): the whole file runs in about a
minute and a half of CPU time, most of it interpreter and torch start-up of the subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TEACHX, run_teachx

from teachx.errors import RunDirError

HOOK = Path(__file__).parent / "_fault_hook"
CONFIG = "data:\n  name: bundled\n"
TINY = [
    "data.train_size=200",
    "train.epochs=2",
    "train.batch_size=32",
    "teacher.method=gradient_x_input",
    "teacher.batch_size=64",
    "teacher.eval_images=100",
    # the faithfulness block on all 100 eval images: on 8, the resumed chain's self-agreement (corr_self) differed from
    # the uninterrupted run's in the eighth significant digit, and this test asks for identical numbers
]
RESUME_HINT = "run the same command again to resume"
#: what legitimately differs between two runs of the same config: time, threads, and the digests over them
MEASURED = {
    "stage_seconds",
    "wall_seconds",
    "torch_threads",
    "seconds",
    "seconds_per_epoch",
    "baseline_seconds_per_epoch",
    "impactx_seconds_per_epoch",
    "method_seconds_per_epoch",
    "digest",
    "timings",
    "created",
}


def fault_env(cache: Path, fault: str | None = None) -> dict[str, str | None]:
    """What a `teachx` process under the fault hook gets over this environment: its cache, one thread, the hook
    on PYTHONPATH, and TEACHX_FAULT set to ``fault`` (or removed)."""
    return {
        "TEACHX_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "TEACHX_FAULT": fault or None,
        "PYTHONPATH": os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p),
    }


def teachx(*args, cwd, cache, fault=None, timeout=600):
    # a shell without job control starts background jobs (`pytest ... &`) with SIGINT ignored, and children inherit
    # that: Python then never raises KeyboardInterrupt; the Ctrl-C faults need the default disposition back
    return run_teachx(
        *args,
        cwd=cwd,
        env=fault_env(cache, fault),
        timeout=timeout,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def one_line_error(res, *fragments) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("teachx: error:"), err
    for f in fragments:
        assert f in err, (f, err)
    return err


TAKEOVER = "which is no longer running; taking it over"


def took_over(res) -> subprocess.CompletedProcess:
    """``res`` without the warning of a run that took over the lock a killed run left (which it must show)."""
    first, _, rest = res.stderr.partition("\n")
    assert first.startswith("teachx: warning: run directory") and TAKEOVER in first, res.stderr[-3000:]
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout, rest)


def resumed(res, stage: str) -> bool:
    """Whether the run's log says ``stage`` continued from its epoch-1 checkpoint."""
    return any(
        line.startswith("resuming from epoch 1 (") and f"{stage}/checkpoints" in line
        for line in res.stdout.splitlines()
    )


def temp_files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.name.endswith(".tmp")]


def strip_measured(obj):
    if isinstance(obj, dict):
        return {k: strip_measured(v) for k, v in obj.items() if k not in MEASURED}
    if isinstance(obj, list):
        return [strip_measured(v) for v in obj]
    return obj


def snapshot(run: Path) -> dict:
    """Everything a run decided (numbers, histories, weights), without what it measured."""
    from safetensors.numpy import load_file

    snap = {"results": strip_measured(json.loads((run / "results.json").read_text()))}
    for stage in ("baseline", "impactx"):
        snap[stage] = strip_measured(json.loads((run / stage / "stage.json").read_text()))
        for name in ("best", "last"):
            snap[f"{stage}/{name}"] = load_file(str(run / stage / "checkpoints" / f"{name}.safetensors"))
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), np.ndarray):
            assert a[key].keys() == b[key].keys(), key
            for t in a[key]:
                assert np.array_equal(a[key][t], b[key][t]), (key, t)
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, made with a relative --out (as a user types it)."""
    root = tmp_path_factory.mktemp("faults")
    (root / "c.yaml").write_text(CONFIG)
    (root / "a").mkdir()
    res = teachx("run", "../c.yaml", "--out", "run", "-q", *TINY, cwd=root / "a", cache=root / "cache-ref")
    assert res.returncode == 0, res.stderr[-3000:]
    return {"root": root, "run": root / "a" / "run", "snap": snapshot(root / "a" / "run")}


# -- kill -9, Ctrl-C and failed writes at every stage ---------------------------------------------


@pytest.mark.slow
def test_killed_or_failing_anywhere_resumes_to_the_same_result(reference):
    root = reference["root"]
    out, cache = root / "chain", root / "cache-chain"

    def step(fault, rc, where=out):
        res = teachx("run", "c.yaml", "--out", where, "-q", *TINY, cwd=root, cache=cache, fault=fault)
        assert res.returncode == rc, (fault, res.returncode, res.stdout[-2000:], res.stderr[-3000:])
        return res

    # baseline: killed while writing epoch 2's checkpoint (epoch 1's is on disk, a temp file is left)
    step(f"kill:{out}/baseline/checkpoints/last.safetensors:2", -signal.SIGKILL)
    assert temp_files(out / "baseline" / "checkpoints"), "the fault did not land inside the checkpoint write"
    # teacher maps: killed in the middle of generation; the baseline resumed from epoch 1 before that
    res = step("kill:maps:2", -signal.SIGKILL)
    assert resumed(res, "baseline") and "[baseline] test accuracy" in res.stdout
    took_over(res)  # the lock the killed run left
    # IMPACTX: a full disk at its first checkpoint: one line naming the file and the fix, nothing half-written
    one_line_error(
        took_over(step(f"oserror:{out}/impactx/checkpoints/last.safetensors:1:ENOSPC", 2)),
        "no space left",
        str(Path("impactx") / "checkpoints" / "last.safetensors"),
        RESUME_HINT,
    )
    assert not temp_files(out, cache)
    # IMPACTX: Ctrl-C between epochs: the resume hint, no traceback
    res = step(f"int-after:{out}/impactx/checkpoints/last.safetensors:1", 130)
    assert "Traceback" not in res.stderr and RESUME_HINT in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    # evaluation: killed while writing results.json; IMPACTX resumed from epoch 1 before that
    res = step(f"kill:{out}/results.json:1", -signal.SIGKILL)
    assert resumed(res, "impactx")
    assert not (out / "results.json").exists()
    # the run finished in a copy of its directory, the original's checkpoints destroyed: the copy uses its own files
    copy = root / "chain-copy"
    shutil.copytree(out, copy)
    for p in out.rglob("*.safetensors"):
        p.write_bytes(b"destroyed")
    took_over(step(None, 0, where=copy))  # the killed run's lock was copied too
    assert_same(snapshot(copy), reference["snap"])
    assert not temp_files(copy, cache), temp_files(copy, cache)
    stages = json.loads((copy / "results.json").read_text())["stage_seconds"]
    assert set(stages) == {"baseline", "maps", "impactx", "evaluation"} and all(v > 0 for v in stages.values()), stages


@pytest.mark.slow
def test_killed_between_a_stage_and_its_record_resumes_to_the_same_result(reference):
    """kill -9 after a stage's checkpoints are written and before its record is (the baseline's, then
    IMPACTX's): the lock the killed run left is taken over with a warning, the stage is finished from
    its checkpoints, and the run ends as an uninterrupted one, every record bound to its config."""
    from teachx.runs.rundir import RUN_LOCK, run_config_hash

    root = reference["root"]
    out, cache = root / "between", root / "cache-between"
    for fault in (f"kill:{out}/baseline/stage.json:1", f"kill:{out}/impactx/stage.json:1", None):
        res = teachx("run", "c.yaml", "--out", out, "-q", *TINY, cwd=root, cache=cache, fault=fault)
        assert res.returncode == (-signal.SIGKILL if fault else 0), (fault, res.returncode, res.stderr[-3000:])
        if fault and "baseline" in fault:
            assert (out / "baseline" / "checkpoints" / "best.safetensors").exists() and not (
                out / "baseline" / "stage.json"
            ).exists()
            assert json.loads((out / RUN_LOCK).read_text())["pid"] > 0  # left by the killed process
        else:
            took_over(res)
    assert not (out / RUN_LOCK).exists() and not temp_files(out, cache)
    assert_same(snapshot(out), reference["snap"])
    bound = run_config_hash(out)
    assert json.loads((out / "results.json").read_text())["config_hash"] == bound
    assert all(
        json.loads((out / s / "stage.json").read_text())["config_hash"] == bound for s in ("baseline", "impactx")
    )


def test_killed_between_the_best_and_last_checkpoint_writes(tmp_path, monkeypatch):
    """An epoch that improves writes two checkpoints; dying between them must not leave a run whose
    'last' is newer than its 'best' (then a later epoch that does not improve finds no best, or an
    older one). The epochs here cannot improve on the first one (the learning rate is ~0)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _train_script import synthetic_dataset

    from teachx.models import build_model
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer

    class Killed(BaseException):
        pass

    def fit(out, die_after_first_save=False):
        import torch

        torch.manual_seed(0)
        plan = DataPlan(synthetic_dataset(64, 16), np.arange(48), np.arange(48, 64), None)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-30, schedule="constant", progress=False)
        trainer = Trainer(
            ClassifierTask(build_model("lenet5", 1, 4, (16, 16))),
            plan,
            cfg,
            out,
            seed=1,
            device="cpu",
            meta={"kind": "classifier"},
            log=lambda s: None,
        )
        if die_after_first_save:
            save = Trainer._save

            def save_then_die(self, *a, **k):
                save(self, *a, **k)
                raise Killed()

            monkeypatch.setattr(Trainer, "_save", save_then_die)
        try:
            return trainer.fit()
        finally:
            monkeypatch.undo()

    ref = fit(tmp_path / "ref")
    with pytest.raises(Killed):
        fit(tmp_path / "run", die_after_first_save=True)
    res = fit(tmp_path / "run")
    assert res.best_epoch == ref.best_epoch == 1
    from safetensors.numpy import load_file

    a, b = (load_file(str(d / "checkpoints" / "best.safetensors")) for d in (tmp_path / "ref", tmp_path / "run"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_failed_writes_are_one_line_and_leave_nothing_behind(tmp_path, monkeypatch):
    """In-process injection (runs everywhere): a read-only location at the first write of a new run
    directory leaves no directory; safetensors' own I/O error (a full disk) names the checkpoint."""
    import errno

    import torch
    from safetensors import SafetensorError

    from teachx.errors import OutputError
    from teachx.runs import rundir
    from teachx.runs.recovery import prepare_run_dir
    from teachx.training import checkpoint

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with monkeypatch.context() as m:
        m.setattr(rundir, "write_json_atomic", read_only)
        with pytest.raises(
            OutputError, match=r"cannot write '.*\.teachx-run': read-only file system; choose another location"
        ):
            prepare_run_dir(tmp_path / "new" / "run", _cfg(), "run")
    assert not (tmp_path / "new" / "run").exists()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OutputError, match=r"cannot write '.*ck\.safetensors': no space left on the device; free space"):
        checkpoint.save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(2)}, {})
    assert not temp_files(tmp_path)


# -- re-runs, moved and copied runs -----------------------------------------------------------------


@pytest.mark.slow
def test_noop_rerun_from_another_directory_keeps_the_measurements(reference):
    """The reference run was made with a relative --out; run again from another working directory
    (nothing to do): it finds its own checkpoints, and results.json keeps what the run measured."""
    root, run = reference["root"], reference["run"]
    before = (run / "results.json").read_bytes()
    for stage in ("baseline", "impactx"):
        assert not Path(json.loads((run / stage / "stage.json").read_text())["checkpoint"]).is_absolute()
    res = teachx("run", "c.yaml", "--out", "a/run", "-q", *TINY, cwd=root, cache=root / "cache-ref")
    assert res.returncode == 0 and res.stdout.count("complete, skipped") == 2, res.stderr[-2000:]
    assert "[evaluation] nothing was re-run: results.json is kept" in res.stdout
    assert (run / "results.json").read_bytes() == before  # timings, threads, wall time: the run's, not the no-op's


def test_stage_checkpoint_of_records_written_by_older_teachx(tmp_path):
    """Older records hold the path as typed (absolute, or relative to the old working directory):
    the stage's own file of that name is used, never another run's."""
    from teachx.runs.recovery import stage_checkpoint

    stage = tmp_path / "copy" / "baseline"
    for recorded in (
        "/somewhere/else/run/baseline/checkpoints/best.safetensors",
        "run/baseline/checkpoints/best.safetensors",
        "checkpoints/best.safetensors",
    ):
        assert stage_checkpoint(stage, {"checkpoint": recorded}) == stage / "checkpoints" / "best.safetensors"


# -- directories teachx did not make --------------------------------------------------------------


def _cfg(*extra):
    from teachx.runs.resolve import resolve_config

    return resolve_config(None, [*TINY, *extra])


@pytest.mark.slow
def test_overwrite_never_deletes_a_foreign_directory(tmp_path, reference):
    from teachx.runs.recovery import prepare_run_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.yaml").write_text("lr: 0.1\n")  # a config.yaml, but not teachx's
    for overwrite in (False, True):
        with pytest.raises(RunDirError) as err:
            prepare_run_dir(mine, _cfg(), "run", overwrite)
        assert "--overwrite" not in str(err.value) and "not made by teachx" in str(err.value)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "thesis.tex"]
    # through the command line
    res = teachx(
        "run",
        reference["root"] / "c.yaml",
        "--out",
        mine,
        "-q",
        "--overwrite",
        *TINY,
        cwd=tmp_path,
        cache=tmp_path / "cache",
    )
    err = one_line_error(res, "not made by teachx")
    assert "--overwrite" not in err and (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_only_what_teachx_wrote(tmp_path):
    from teachx.runs.recovery import prepare_run_dir
    from teachx.utils.io import _HOST

    run = prepare_run_dir(tmp_path / "run", _cfg(), "run")
    ours = [
        "results.json",
        "timings.json",
        "figures/examples.png",
        "baseline/stage.json",
        "baseline/history.json",
        "baseline/checkpoints/best.safetensors",
        "baseline/checkpoints/best.json",
        "impactx/tensorboard/events.out.tfevents.1.host",
        f"impactx/self_maps/{'a1' * 10}/maps.npy",
        "impactx/self_maps/current.json",
        f"impactx/checkpoints/.last.safetensors.{_HOST}-1.x.tmp",
    ]
    users = ["notes.md", "baseline/my-analysis.ipynb", "figures/for-the-paper.pdf", "impactx/self_maps/keep/me.txt"]
    for rel in ours + users:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(rel)
    (run / "link").symlink_to(tmp_path / "elsewhere")
    logged: list[str] = []
    with pytest.raises(RunDirError, match="different config.*train.epochs.*--overwrite"):
        prepare_run_dir(run, _cfg("train.epochs=3"), "run")
    prepare_run_dir(run, _cfg("train.epochs=3"), "run", overwrite=True, log=logged.append)
    for rel in users:
        assert (run / rel).read_text() == rel, rel
    assert (run / "link").is_symlink()
    for rel in ours:
        assert not (run / rel).exists(), rel
    assert "epochs: 3" in (run / "config.yaml").read_text() and (run / ".teachx-run").is_file()
    assert logged and "kept 5 entries" in logged[0] and "notes.md" in logged[0]


def test_redo_discards_only_what_teachx_wrote_in_the_stage(tmp_path):
    from teachx.runs.recovery import prepare_run_dir, redo_stages

    cfg = _cfg()
    run = prepare_run_dir(tmp_path / "run", cfg, "run")
    for rel in (
        "baseline/stage.json",
        "baseline/checkpoints/best.safetensors",
        "impactx/history.json",
        "results.json",
        "baseline/my-notes.md",
        "impactx/checkpoints/mine.txt",
    ):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(rel)
    redo_stages(run, cfg, ["baseline"], log=lambda m: None)  # the baseline is the teacher: IMPACTX is redone too
    assert (run / "baseline" / "my-notes.md").exists() and (run / "impactx" / "checkpoints" / "mine.txt").exists()
    assert not any(
        (run / rel).exists()
        for rel in ("baseline/stage.json", "baseline/checkpoints", "impactx/history.json", "results.json")
    )


def test_presentation_options_are_not_part_of_a_run(tmp_path):
    from teachx.runs.recovery import prepare_run_dir
    from teachx.config.loader import dump_yaml

    run = prepare_run_dir(tmp_path / "run", _cfg(), "run")
    text = (run / "config.yaml").read_text()
    quiet = _cfg("train.tensorboard=true", "teacher.batch_size=7")
    quiet.train.progress = False  # what --quiet does
    assert prepare_run_dir(run, quiet, "run") == run
    assert (run / "config.yaml").read_text() == text  # the saved config is the run's own
    with pytest.raises(RunDirError, match="train.lr"):
        prepare_run_dir(run, _cfg("train.lr=0.5"), "run")
    # a run directory made by the previous teachx (no marker; config.yaml as it wrote it, with --quiet)
    old = tmp_path / "old"
    (old / "baseline").mkdir(parents=True)
    (old / "config.yaml").write_text(dump_yaml({"command": "run", **quiet.to_dict()}))
    assert prepare_run_dir(old, _cfg(), "run") == old and (old / ".teachx-run").is_file()


def test_study_never_replaces_a_users_study_yaml(tmp_path):
    from teachx.studies.runner import prepare_study_dir
    from teachx.studies.spec import StudySpec

    spec = StudySpec({}, [0], {"impactx": {}}, {"all": {}})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "study.yaml").write_text("study:\n  n_seeds: 3\n")  # the user's own study config
    with pytest.raises(RunDirError, match="not a teachx study directory"):
        prepare_study_dir(mine, spec)
    assert (mine / "study.yaml").read_text() == "study:\n  n_seeds: 3\n"
    # a study directory of an older teachx (its resolved study.yaml, no marker) is still resumed
    made = prepare_study_dir(tmp_path / "s", spec)
    (made / ".teachx-study").unlink()
    (made / "units").mkdir()
    assert prepare_study_dir(made, spec) == made and (made / ".teachx-study").is_file()


def test_report_never_replaces_a_file_it_did_not_write(tmp_path):
    from teachx.reporting.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("command: run\nseed: 0\n")
    (run / "results.json").write_text(json.dumps({"dataset": "tiny", "backbone": "lenet5", "baseline_test_acc": 0.5}))
    (tmp_path / "notes.md").write_text("my notes")
    with pytest.raises(RunDirError, match="not written by teachx"):
        write_report(run, tmp_path / "notes.html")  # its Markdown twin would be notes.md
    assert (tmp_path / "notes.md").read_text() == "my notes" and not (tmp_path / "notes.html").exists()
    write_report(run)
    write_report(run)  # its own report is replaced


# -- real read-only and full file systems -----------------------------------------------------------


def _private_mounts() -> str:
    """'' when this machine can mount a tmpfs in a private mount namespace, else why not."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    try:
        res = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare failed: {exc}"
    return (
        "" if res.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace: {res.stderr.strip()[:120]}"
    )


@pytest.mark.skipif(bool(_private_mounts()), reason=_private_mounts() or "-")
@pytest.mark.slow
def test_real_read_only_and_full_file_systems(tmp_path, reference):
    """--out on a read-only tmpfs; --out and the teacher-map cache on a 2 MB one, which holds the
    baseline's checkpoints but not the map store (a sparse memory-mapped store there would end in
    SIGBUS, not in a message, when the disk filled up under it)."""
    cfg = reference["root"] / "c.yaml"
    cases = {
        "read-only": ("mount -t tmpfs -o ro,size=64k tmpfs {mnt}", "{mnt}/run", "cache"),
        "full": ("mount -t tmpfs -o size=2m tmpfs {mnt}", "{mnt}/run", "{mnt}/cache"),
    }
    for name, (mount, out, cache) in cases.items():
        mnt = tmp_path / name.replace(" ", "-")
        mnt.mkdir()
        out, cache = (
            tmp_path / v.format(mnt=mnt) if "{mnt}" not in v else Path(v.format(mnt=mnt)) for v in (out, cache)
        )
        argv = " ".join(f"'{a}'" for a in [*TEACHX, "run", cfg, "--out", out, "-q", *TINY])
        script = f"""set -e
        {mount.format(mnt=mnt)}
        set +e
        TEACHX_CACHE='{cache}' OMP_NUM_THREADS=1 {argv} >'{tmp_path}/stdout' 2>'{tmp_path}/stderr'
        echo $? >'{tmp_path}/rc'
        find '{mnt}' -name '*.tmp' >'{tmp_path}/temps'
        """
        subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", textwrap.dedent(script)], check=True, timeout=600
        )
        res = subprocess.CompletedProcess(
            [], int((tmp_path / "rc").read_text()), (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
        )
        problem = "read-only file system" if name == "read-only" else "no space left"
        err = one_line_error(res, problem, str(mnt))
        assert RESUME_HINT in err or name == "read-only", err
        assert (tmp_path / "temps").read_text() == "", (name, (tmp_path / "temps").read_text())


# -- image decoding workers --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.slow
def test_image_decoding_workers_exit_with_a_killed_parent(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    script = textwrap.dedent(f"""
        import time
        from teachx.data import imagefolder as f, load_dataset
        f.PARALLEL_MIN_IMAGES = 0
        decode = f._decode_chunk
        def slow_chunk(*a, **k):  # the workers stay busy (module level: the pool pickles it by name)
            time.sleep(60)
            return decode(*a, **k)
        f._decode_chunk = slow_chunk
        load_dataset("imagefolder:{tmp_path / "imgs"}", workers=2, progress=False)
    """)
    env = {**os.environ, "TEACHX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        time.sleep(0.5)  # the pool's other worker
        workers = _children(proc.pid)
        assert workers, ("the decoding pool did not start", proc.poll())
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, workers)), "decoding workers outlived their killed parent"
    finally:
        proc.kill()
        for pid in _children(proc.pid) + [w for w in locals().get("workers", []) if _running(w)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
