"""Running on a cluster: study workers and multi-node runs submitted through submitit.

``teachx study CONFIG --out DIR --launcher submitit --workers N`` submits N worker jobs (a SLURM job
array, at most ``study.launcher.max_running`` at once). Each worker runs the ordinary study loop,
``teachx study CONFIG --out DIR`` in worker mode, against the shared study directory: units and map
stores are file-locked, so the workers split the units between them without a coordinator; a worker
that finds every remaining unit in progress elsewhere stops, and the one that finishes the last unit
writes ``study.json`` and the report.

``teachx train|run ... --launcher submitit --nodes N --gpus-per-node G`` submits one job of N nodes
with G tasks each (``--nproc`` tasks on CPU nodes); every task exports the torch.distributed
environment that SLURM and submitit provide and runs the same command, which then joins the process
group exactly as under ``--nproc`` (NCCL on GPUs, gloo on CPUs).

Pre-emption and time limits: a job that SLURM signals before killing it is requeued by submitit
(:meth:`_Command.checkpoint`), and the requeued command resumes -- a run or a study unit continues
from its last saved epoch, and the lock left by its earlier run is taken over at once
(:mod:`teachx.utils.locking`). submitit's local executor (``study.launcher.cluster: local``) runs
the same code path as real processes on this machine, without a scheduler.

submitit is an optional dependency: ``pip install 'teachx[cluster]'``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from teachx.errors import ConfigError, CorruptionError
from teachx.runs.rundir import LAUNCHER_DIR
from teachx.studies.spec import LauncherSpec
from teachx.utils.io import read_trusted_json, write_json_atomic

JOBS_FILE = "jobs.json"
#: options of the submitting command that its jobs must not see (they would submit again)
_LAUNCH_OPTIONS = {"--launcher": 1, "--workers": 1, "--nodes": 1, "--gpus-per-node": 1, "--slurm": 1, "--nproc": 1}
#: file systems that every node of a cluster sees (the study directory must be on one when workers run on several nodes)
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.glusterfs", "glusterfs", "wekafs")
#: file systems that exist on one machine only
PRIVATE_FS = ("tmpfs", "ramfs", "devtmpfs")


def require_submitit() -> Any:
    """The submitit module, or one line saying how to install it."""
    try:
        import submitit  # lazy: an optional dependency
    except ImportError:
        raise ConfigError(
            "--launcher submitit needs the submitit package: pip install 'teachx[cluster]' (or pip install submitit)"
        ) from None
    return submitit


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's own options (``--launcher X``, ``--workers N``, ...): what a job runs."""
    out: list[str] = []
    skip = 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _LAUNCH_OPTIONS:
            skip = 0 if "=" in a else _LAUNCH_OPTIONS[name]
            continue
        out.append(a)
    return out


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    """``--slurm KEY=VALUE`` items as study.launcher keys (partition=gpu, time_min=600, mem_gb=32, ...)."""
    from teachx.config.loader import parse_override  # lazy: CLI start-up

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--slurm '{item}' must be KEY=VALUE, e.g. --slurm partition=gpu --slurm time_min=600")
        keys, value = parse_override(item)
        if len(keys) == 2 and keys[0] == "extra":
            out.setdefault("extra", {})[keys[1]] = value
        elif len(keys) == 1:
            out[keys[0]] = value
        else:
            raise ConfigError(f"--slurm '{item}': name one launcher key, e.g. partition=gpu or extra.constraint=a100")
    return out


def launcher_spec(values: dict[str, Any], where: str = "--slurm") -> LauncherSpec:
    from teachx.config.loader import from_dict  # lazy: CLI start-up

    return from_dict(LauncherSpec, values, where)


def file_system_type(path: Path) -> Optional[str]:
    """The type of the file system ``path`` is on (from /proc/mounts: the longest mount point above it), or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path = path.resolve()
    best, kind = -1, None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) > best:
            best, kind = len(point), parts[2]
    return kind


def check_shared(directory: Path, cluster: str, warn: Callable[[str], None]) -> None:
    """Refuse a directory that workers on other nodes cannot see; warn when that cannot be told."""
    if cluster != "slurm":
        return
    kind = file_system_type(directory)
    if kind in PRIVATE_FS:
        raise ConfigError(
            f"'{directory}' is on {kind}, which only this machine sees; workers on other nodes need a shared "
            "file system: give --out a folder on one (NFS, Lustre, GPFS, BeeGFS, CephFS)"
        )
    if kind is not None and kind not in SHARED_FS:
        warn(
            f"warning: '{directory}' is on a {kind} file system, which is usually a local disk; workers on other "
            "nodes must see the same directory (NFS, Lustre, GPFS, BeeGFS, CephFS)"
        )


def _cluster(spec: LauncherSpec) -> str:
    if spec.cluster != "auto":
        return spec.cluster
    return "slurm" if shutil.which("sbatch") else "local"


def check_launcher(spec: LauncherSpec) -> str:
    """Before anything is written: submitit is installed and the chosen cluster can be reached from here."""
    require_submitit()
    cluster = _cluster(spec)
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError(
            "cannot submit to slurm from this machine (no sbatch/srun found); submit from a SLURM login node, or run "
            "the workers here with study.launcher.cluster=local (--slurm cluster=local for a run)"
        )
    return cluster


def make_executor(
    folder: Path, spec: LauncherSpec, *, name: str, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 0
) -> Any:
    """A submitit executor for ``spec`` (SLURM or local), its logs in ``folder``; bad options in one line."""
    submitit = require_submitit()
    cluster = _cluster(spec)
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as exc:  # e.g. cluster: slurm on a machine without srun
        raise ConfigError(
            f"cannot submit to {cluster} from this machine ({str(exc).splitlines()[0]}); submit from a SLURM login "
            "node, or run the workers here with study.launcher.cluster=local (--slurm cluster=local for a run)"
        ) from None
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(spec.time_min),
        "nodes": int(nodes),
        "tasks_per_node": int(tasks_per_node),
        "cpus_per_task": int(spec.cpus_per_worker),
        "gpus_per_node": int(gpus_per_node),
    }
    if spec.mem_gb is not None:
        params["mem_gb"] = spec.mem_gb
    slurm = {
        "slurm_partition": spec.partition,
        "slurm_account": spec.account,
        "slurm_qos": spec.qos,
        "slurm_array_parallelism": spec.max_running,
        "slurm_setup": list(spec.setup) or None,
        "slurm_additional_parameters": dict(spec.extra) or None,
    }
    params.update({k: v for k, v in slurm.items() if v is not None})
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"submitit refused the launcher options: {str(exc).splitlines()[0]}") from None
    return executor


# -- what a job runs ----------------------------------------------------------------------------------


@dataclass
class _Command:
    """The teachx command a job task runs (in a fresh interpreter, with the job's environment).

    ``distributed``: export torch.distributed's variables from the job (rank, world size, master
    address) first, so that the command joins one process group across the job's tasks. submitit
    requeues the job with the same command when SLURM signals pre-emption or the time limit
    (:meth:`checkpoint`); teachx resumes where the killed run stopped.
    """

    argv: list[str]
    distributed: bool = False
    threads: Optional[int] = None
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> int:
        env = dict(os.environ, **self.env)
        if self.distributed:
            import submitit  # lazy: only inside a submitit job

            dist = submitit.helpers.TorchDistributedEnvironment()
            env.update(
                MASTER_ADDR=str(dist.master_addr),
                MASTER_PORT=str(dist.master_port),
                RANK=str(dist.rank),
                WORLD_SIZE=str(dist.world_size),
                LOCAL_RANK=str(dist.local_rank),
                LOCAL_WORLD_SIZE=str(dist.local_world_size),
            )
        if self.threads:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
            env.setdefault("TEACHX_THREADS", str(self.threads))
        rc = subprocess.call([sys.executable, "-m", "teachx", *self.argv], env=env)
        if rc != 0:
            raise RuntimeError(f"teachx {' '.join(self.argv)} exited with status {rc} (see this job's log)")
        return rc

    def checkpoint(self) -> Any:
        import submitit  # lazy: only inside a submitit job

        return submitit.helpers.DelayedSubmission(self)


# -- the record of submitted jobs ------------------------------------------------------------------


@dataclass
class JobRecord:
    """One submitted job: its scheduler id, what it runs and where its log is."""

    job_id: str
    role: str  # "worker 3" or "run"
    cluster: str
    submitted: str
    log: str


@dataclass
class LaunchRecord:
    """Every job a launcher submitted for one study or run directory (``launcher/jobs.json``)."""

    jobs: list[JobRecord] = field(default_factory=list)

    @staticmethod
    def path(directory: Path) -> Path:
        return Path(directory) / LAUNCHER_DIR / JOBS_FILE

    @classmethod
    def read(cls, directory: Path) -> "LaunchRecord":
        p = cls.path(directory)
        if not p.exists():
            return cls()
        data = read_trusted_json(
            p, f"delete '{p}' to forget the submitted jobs (the study's units are not affected)", "job record"
        )
        try:
            return cls([JobRecord(**j) for j in data["jobs"]])
        except (KeyError, TypeError) as exc:
            raise CorruptionError(
                f"'{p}' is not a teachx job record ({exc}); delete it to forget the old jobs"
            ) from None

    def write(self, directory: Path) -> None:
        write_json_atomic(self.path(directory), {"jobs": [asdict(j) for j in self.jobs]}, digest=True)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_state(job: JobRecord, folder: Path) -> str:
    """The scheduler's state of ``job`` (RUNNING, PENDING, COMPLETED, FAILED, ...), UNKNOWN where it cannot be asked."""
    try:
        submitit = require_submitit()
    except ConfigError:
        return "UNKNOWN (submitit not installed)"
    try:
        if job.cluster == "slurm":
            return str(submitit.SlurmJob(folder=str(folder), job_id=job.job_id).state)
        from teachx.utils.locking import process_alive

        pid = int(job.job_id.split("_")[0])
        result = submitit.core.utils.JobPaths(folder, job_id=job.job_id, task_id=0).result_pickle
        if result.exists():
            return "FINISHED"
        return "RUNNING" if process_alive(pid) else "STOPPED"
    except Exception:  # noqa: BLE001 -- a status display never fails on the scheduler's account
        return "UNKNOWN"


def status_lines(directory: Path) -> list[str]:
    """One line per submitted job, for ``teachx study --status``."""
    record = LaunchRecord.read(directory)
    folder = Path(directory) / LAUNCHER_DIR / "logs"
    return [
        f"  job {j.job_id} ({j.role}, {j.cluster}, submitted {j.submitted}): {job_state(j, folder)}; log {j.log}"
        for j in record.jobs
    ]


# -- submitting ---------------------------------------------------------------------------------------


def submit_study(
    argv: Sequence[str],
    out: Path,
    spec: LauncherSpec,
    workers: int,
    log: Callable[[str], None],
) -> tuple[str, list[Any]]:
    """Submit ``workers`` worker jobs of the study command ``argv`` for the study directory ``out``.

    Returns the cluster kind and the submitted submitit jobs.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    cluster = _cluster(spec)
    check_shared(out, cluster, log)
    folder = out / LAUNCHER_DIR / "logs"
    executor = make_executor(folder, spec, name=f"teachx-study-{out.name}", gpus_per_node=spec.gpus_per_worker)
    command = _Command([*strip_launch_options(argv), "--worker"], threads=spec.cpus_per_worker)
    try:
        with executor.batch():
            jobs = [executor.submit(command) for _ in range(workers)]
    except Exception as exc:  # noqa: BLE001 -- sbatch's refusal (bad partition, account, ...) in one line
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"the scheduler refused the study's jobs: {str(exc).strip().splitlines()[-1]}") from None
    record = LaunchRecord.read(out)
    when = _now()
    for i, job in enumerate(jobs):
        record.jobs.append(JobRecord(str(job.job_id), f"worker {i}", cluster, when, str(job.paths.stdout)))
    record.write(out)
    return cluster, jobs


def tasks_per_node(nodes: int, gpus_per_node: int, nproc: Optional[int]) -> int:
    """Processes per node of a run's job: one per GPU, else ``--nproc`` (1 by default)."""
    if nodes < 1 or gpus_per_node < 0:
        raise ConfigError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {nodes} and {gpus_per_node}")
    if gpus_per_node and nproc and nproc != gpus_per_node:
        raise ConfigError(
            f"--nproc {nproc} and --gpus-per-node {gpus_per_node} disagree: each GPU runs one process; give one of them"
        )
    return gpus_per_node or nproc or 1


def submit_run(
    argv: Sequence[str],
    out: Path,
    spec: LauncherSpec,
    nodes: int,
    gpus_per_node: int,
    nproc: Optional[int],
    log: Callable[[str], None],
) -> tuple[str, Any]:
    """Submit one job of ``nodes`` x tasks that runs the train/run command ``argv`` as one distributed run."""
    tasks = tasks_per_node(nodes, gpus_per_node, nproc)
    cluster = _cluster(spec)
    if nodes > 1:
        check_shared(out, cluster, log)
    folder = out / LAUNCHER_DIR / "logs"
    executor = make_executor(
        folder, spec, name=f"teachx-run-{out.name}", nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus_per_node
    )
    world = nodes * tasks
    command = _Command(
        strip_launch_options(argv),
        distributed=world > 1,
        threads=max(1, spec.cpus_per_worker) if not gpus_per_node else None,
    )
    try:
        job = executor.submit(command)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"the scheduler refused the run's job: {str(exc).strip().splitlines()[-1]}") from None
    record = LaunchRecord.read(out)
    record.jobs.append(
        JobRecord(str(job.job_id), f"run on {nodes} node(s) x {tasks} task(s)", cluster, _now(), str(job.paths.stdout))
    )
    record.write(out)
    return cluster, job


def wait_for(jobs: Sequence[Any], log: Callable[[str], None], poll: float = 2.0) -> bool:
    """Wait until every job has ended (local executor); True when all of them succeeded."""
    ok = True
    for job in jobs:
        while not job.done():
            time.sleep(poll)
        try:
            job.results()  # every task's (a distributed run has one per process)
        except Exception as exc:  # noqa: BLE001 -- the job's own error, reported with its log
            ok = False
            log(
                f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}; log {job.paths.stderr}"
            )
    return ok


def sbatch_text(
    spec: LauncherSpec,
    folder: Path,
    *,
    name: str = "teachx",
    nodes: int = 1,
    tasks_per_node: int = 1,
    gpus_per_node: int = 0,
) -> str:
    """The sbatch script submitit would submit for ``spec`` (``--dry-run`` and tests; works without SLURM:
    only the check that ``srun`` exists is skipped, the parameters go through :func:`make_executor` as for a real job)."""
    from unittest import mock

    submitit = require_submitit()
    spec = LauncherSpec(**{**asdict(spec), "cluster": "slurm"})
    with mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        auto = make_executor(
            folder, spec, name=name, nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node
        )
    return auto._executor._make_submission_file_text("python -u -m submitit.core._submit", "%j")
