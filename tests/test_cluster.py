"""Studies and runs through submitit: its local executor (real worker processes, the same code path as
SLURM without the scheduler), the sbatch script a config gives, and the locks that let workers on
several nodes, and requeued jobs, share one directory."""

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
import torch

from conftest import TEACHX, invoke_study, teachx_env, teachx_main
from test_study import RUN_FEW_FAITH, make_zip

from teachx.errors import ConfigError
from teachx.studies.runner import run_study
from teachx.studies.spec import LauncherSpec, load_study
from teachx.training.checkpoint import load_checkpoint
from teachx.utils import locking

submitit = pytest.importorskip("submitit")
from teachx.cli import cluster  # noqa: E402

STUDY = """
study:
  n_seeds: 2
  arms:
    impactx: {{}}
    lambda0: {{impactx.lam: 0}}
  launcher: {{cluster: local, time_min: 20}}
"""


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A tiny dataset, a run config on it and a study config of it."""
    root = tmp_path_factory.mktemp("cluster")
    z = make_zip(root / "tiny.zip")
    cfg, run = root / "study.yaml", root / "run.yaml"
    cfg.write_text(RUN_FEW_FAITH.format(zip=z) + STUDY.format())
    run.write_text(RUN_FEW_FAITH.format(zip=z))
    return {"root": root, "cfg": cfg, "run": run}


@pytest.fixture(scope="module")
def tiny(configs):
    """The study and its in-process reference (the ordinary runner, one process)."""
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(configs["root"] / "cache-ref"))
    ref = run_study(load_study(str(configs["cfg"])), configs["root"] / "ref", lambda line: None)
    mp.undo()
    return {**configs, "ref": ref}


def _timeless(value):
    """A record without what differs between any two runs of the same training: times, paths, digests."""
    if isinstance(value, dict):
        return {
            k: _timeless(v)
            for k, v in value.items()
            if "second" not in k and k not in ("digest", "checkpoint", "best_checkpoint", "started", "finished")
        }
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _units(out: Path) -> dict[str, dict]:
    """Each unit's training record (stage.json), timeless."""
    return {p.parent.name: _timeless(json.loads(p.read_text())) for p in sorted((out / "units").glob("*/stage.json"))}


def _weights(unit: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(next((unit / "checkpoints").glob("best*.safetensors"))).group("model")


@pytest.mark.slow
def test_two_local_workers_give_the_in_process_records(tiny, capsys):
    """`--launcher submitit --workers 2` (local executor): every unit trained once, by one of the two
    workers, with the records and weights of the in-process runner; the job record and logs are in the study."""
    out = tiny["root"] / "launched"
    res = invoke_study(
        tiny["cfg"],
        "--out",
        out,
        "--launcher",
        "submitit",
        "--workers",
        "2",
        env={"TEACHX_CACHE": str(tiny["root"] / "cache-launched"), "OMP_NUM_THREADS": "1"},
    )
    assert res.exit_code == 0, res.output
    assert "submitted 2 worker job(s) (local)" in res.output
    ref, got = _units(tiny["root"] / "ref"), _units(out)
    assert got.keys() == ref.keys() and len(got) == 6
    assert got == ref
    for key in ref:
        a, b = _weights(out / "units" / key), _weights(tiny["root"] / "ref" / "units" / key)
        assert all(torch.equal(a[k], b[k]) for k in a)
    data = json.loads((out / "study.json").read_text())
    assert [r["test_acc"] for r in data["rows"]] == [r["test_acc"] for r in tiny["ref"].data["rows"]]
    logs = sorted((out / "launcher" / "logs").glob("*_0_log.out"))
    assert len(logs) == 2
    trained = [sum("(trained" in ln for ln in p.read_text().splitlines()) for p in logs]
    assert sum(trained) == 6 and all(t > 0 for t in trained)  # each unit once, and both workers worked
    record = cluster.LaunchRecord.read(out)
    assert [j.role for j in record.jobs] == ["worker 0", "worker 1"]
    code, text, err = teachx_main(capsys, "study", "--out", out, "--status")
    assert code == 0, err
    assert text.count(": FINISHED; log ") == 2 and "6 of 6 units done" in text


@pytest.mark.slow
def test_a_killed_worker_resumes_its_unit_when_resubmitted(tiny):
    """Kill the only worker in the middle of a unit; the same command again resumes that unit from its
    last epoch (its lock, left by the dead worker, is taken over) and ends with the in-process numbers."""
    out = tiny["root"] / "killed"
    env = teachx_env({"TEACHX_CACHE": str(tiny["root"] / "cache-killed"), "OMP_NUM_THREADS": "1"})
    cmd = [*TEACHX, "study", str(tiny["cfg"]), "--out", str(out), "--launcher", "submitit", "--workers", "1"]
    overrides = ["train.epochs=12", "study.n_seeds=1"]
    cmd += overrides
    ref = _study_ref(tiny, overrides)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    victim = None
    while (
        time.time() < deadline and victim is None
    ):  # an IMPACTX unit (~0.5 s an epoch) with a saved epoch, not finished
        for unit in (out / "units").glob("x-*") if (out / "units").is_dir() else []:
            if (unit / "checkpoints" / "last.safetensors").exists() and not (unit / "stage.json").exists():
                victim = unit
                break
        time.sleep(0.2)
    assert victim is not None, "no unit reached a saved epoch in time"
    job = cluster.LaunchRecord.read(out).jobs[0]
    _kill_tree(int(job.job_id))
    first.kill()
    first.communicate(timeout=60)
    assert (victim / ".lock").exists()  # left behind by the killed worker
    saved = load_checkpoint(victim / "checkpoints" / "last.safetensors").meta["history"]
    assert 1 <= len(saved) < 12
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    history = json.loads((victim / "stage.json").read_text())["history"]
    assert len(history) == 12
    # resumed, not retrained: the epochs saved before the kill keep their records, measured times included
    assert history[: len(saved)] == saved
    assert _units(out) == ref
    assert len(cluster.LaunchRecord.read(out).jobs) == 2  # the killed worker and the one that finished


def _study_ref(tiny, overrides: list[str]) -> dict[str, dict]:
    out = tiny["root"] / ("ref-" + "-".join(o.replace("=", "") for o in overrides))
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(tiny["root"] / "cache-ref2"))
    run_study(load_study(str(tiny["cfg"]), overrides), out, lambda line: None)
    mp.undo()
    return _units(out)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (the worker job and the teachx it runs)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_two_process_run_through_the_launcher_equals_nproc_2(configs, tmp_path):
    """`teachx train --launcher submitit --nproc 2` (one local job, two tasks joined by gloo) trains the
    weights `teachx train --nproc 2` (torchrun) trains."""
    cfg = configs["run"]
    env = teachx_env({"TEACHX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    base = [*TEACHX, "train", str(cfg), "--nproc", "2", "-q"]
    torchrun = subprocess.run([*base, "--out", str(tmp_path / "torchrun")], env=env, capture_output=True, text=True)
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    launched = subprocess.run(
        [*base, "--out", str(tmp_path / "launched"), "--launcher", "submitit", "--slurm", "cluster=local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "submitted job" in launched.stdout
    a = load_checkpoint(tmp_path / "torchrun" / "checkpoints" / "last.safetensors").group("model")
    b = load_checkpoint(tmp_path / "launched" / "checkpoints" / "last.safetensors").group("model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "torchrun" / "history.json").read_text())
    hb = json.loads((tmp_path / "launched" / "history.json").read_text())
    assert [r["val_acc"] for r in ha] == [r["val_acc"] for r in hb]
    logs = sorted((tmp_path / "launched" / "launcher" / "logs").glob("*_log.out"))
    assert len(logs) == 2  # one per task
    assert "global_rank=1(2)" in "".join(p.read_text() for p in logs)


def test_the_sbatch_script_carries_the_study_launcher_options(tmp_path):
    spec = LauncherSpec(
        cluster="slurm",
        partition="gpu",
        gpus_per_worker=1,
        cpus_per_worker=8,
        mem_gb=32,
        time_min=600,
        account="proj",
        qos="high",
        max_running=4,
        setup=["module load cuda"],
        extra={"constraint": "a100"},
    )
    text = cluster.sbatch_text(spec, tmp_path, gpus_per_node=spec.gpus_per_worker)
    lines = {ln.strip() for ln in text.splitlines()}
    for expected in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=600",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "module load cuda",
    ):
        assert expected in lines, (expected, text)
    assert any(ln.startswith("#SBATCH --signal=USR2@") for ln in lines)  # pre-emption warning: requeue
    multi = cluster.sbatch_text(LauncherSpec(cluster="slurm"), tmp_path, nodes=4, tasks_per_node=8, gpus_per_node=8)
    assert "#SBATCH --nodes=4" in multi and "#SBATCH --ntasks-per-node=8" in multi


def test_study_launcher_keys_are_checked_and_never_part_of_unit_keys(configs, tmp_path):
    tiny = configs
    from teachx.studies.spec import unit_key

    spec = load_study(str(tiny["cfg"]))
    assert spec.launcher.cluster == "local" and spec.launcher.time_min == 20
    other = load_study(str(tiny["cfg"]), ["study.launcher.partition=gpu", "study.launcher.cpus_per_worker=4"])
    assert other.launcher.partition == "gpu"
    for arm in spec.arms:
        assert unit_key(spec.config("all", arm, 0)) == unit_key(other.config("all", arm, 0))
    with pytest.raises(
        ConfigError, match=r"unknown option 'study.launcher.partiton'.*did you mean 'study.launcher.partition'"
    ):
        load_study(str(tiny["cfg"]), ["study.launcher.partiton=gpu"])
    with pytest.raises(ConfigError, match="study.launcher.cluster must be auto, slurm or local"):
        load_study(str(tiny["cfg"]), ["study.launcher.cluster=pbs"])


def test_bad_launcher_input_is_one_line(configs, tmp_path, monkeypatch, capsys):
    tiny = configs
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))

    def one_line(*args) -> str:
        code, out, err = teachx_main(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (code, out, err)
        return err

    run = ["train", tiny["run"], "--launcher", "submitit"]
    assert "unknown option '--slurm.partiton'" in one_line(*run, "--out", tmp_path / "r", "--slurm", "partiton=gpu")
    assert "--slurm 'partition' must be KEY=VALUE" in one_line(*run, "--out", tmp_path / "r", "--slurm", "partition")
    assert "cannot submit to slurm from this machine" in one_line(
        *run, "--out", tmp_path / "r", "--slurm", "cluster=slurm"
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "was not made by teachx" in one_line(*run, "--out", foreign, "--slurm", "cluster=local")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # nothing written into it
    err = one_line(*run, "--out", tmp_path / "r2", "--nproc", "2", "--gpus-per-node", "4")
    assert "--nproc 2 and --gpus-per-node 4 disagree" in err
    # submitit missing: say which extra installs it
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert "pip install 'teachx[cluster]'" in one_line(*run, "--out", tmp_path / "r3")
    assert not (tmp_path / "r3").exists()
    assert "pip install 'teachx[cluster]'" in one_line(
        "study", tiny["cfg"], "--out", tmp_path / "s", "--launcher", "submitit"
    )
    assert not (tmp_path / "s").exists()


def test_a_private_file_system_is_refused_for_slurm_workers(tmp_path, monkeypatch):
    assert cluster.file_system_type(Path("/proc/self")) == "proc"  # read from /proc/mounts
    monkeypatch.setattr(cluster, "file_system_type", lambda p: "tmpfs")
    with pytest.raises(ConfigError, match="is on tmpfs, which only this machine sees"):
        cluster.check_shared(tmp_path, "slurm", print)
    said: list[str] = []
    monkeypatch.setattr(cluster, "file_system_type", lambda p: "ext4")
    cluster.check_shared(tmp_path, "slurm", said.append)
    assert said and "usually a local disk" in said[0]
    said.clear()
    monkeypatch.setattr(cluster, "file_system_type", lambda p: "nfs4")
    cluster.check_shared(tmp_path, "slurm", said.append)
    cluster.check_shared(tmp_path, "local", said.append)
    assert not said


def test_launcher_options_do_not_reach_the_jobs():
    argv = ["study", "s.yaml", "--launcher", "submitit", "--workers=3", "--out", "d", "--slurm", "partition=gpu"]
    assert cluster.strip_launch_options(argv) == ["study", "s.yaml", "--out", "d"]
    assert cluster.strip_launch_options(["train", "--nproc", "2", "--nodes", "2", "--gpus-per-node=4", "-q"]) == [
        "train",
        "-q",
    ]


# -- locks shared by workers on several nodes, and by requeued jobs ---------------------------------


def _foreign_lock(path: Path, **extra) -> None:
    path.write_text(json.dumps({"pid": 1, "host": "another-node", "since": time.time(), **extra}))


def test_a_lock_of_an_earlier_run_of_this_job_is_taken_over(tmp_path, monkeypatch):
    lock = tmp_path / "unit.lock"
    job = {"id": "4242_3", "rank": "0", "restart": "0"}
    _foreign_lock(lock, job=job, heartbeat_s=30)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "4250")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(locking.Busy):  # the same run of the job: a live holder (e.g. another process of it)
        with locking.file_lock(lock, wait=False):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the lock is the killed run's
    taken: list[dict] = []
    with locking.file_lock(lock, wait=False, on_stale=taken.append):
        mine = json.loads(lock.read_text())
        assert mine["job"] == {"id": "4242_3", "rank": "0", "restart": "1"}
    assert taken and taken[0]["host"] == "another-node"


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path, monkeypatch):
    lock = tmp_path / "unit.lock"
    _foreign_lock(lock, heartbeat_s=30)
    with pytest.raises(locking.Busy):
        with locking.file_lock(lock, wait=False):
            pass
    old = time.time() - locking.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    assert locking.held_by(lock) is None
    with locking.file_lock(lock, wait=False):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    _foreign_lock(lock)  # an older teachx's lock (no heartbeat): never guessed stale
    os.utime(lock, (old, old))
    assert locking.held_by(lock) is not None


def test_a_held_lock_keeps_beating(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.05)
    lock = tmp_path / "unit.lock"
    with locking.file_lock(lock, wait=False):
        os.utime(lock, (1.0, 1.0))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5
    assert not lock.exists()
