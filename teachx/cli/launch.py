"""Multi-process launch: ``teachx ... --nproc N`` re-runs the same command under torchrun.

The parent process only launches; the N workers (``python -m teachx <same arguments>``) each see
the torchrun environment, join the process group (:func:`teachx.utils.distributed.init_distributed`)
and run the command collectively. ``--nproc`` is removed from the workers' arguments and the
workers never re-launch, so there is no recursion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional, Sequence

from teachx.errors import ConfigError
from teachx.utils import distributed as dist_utils

NPROC_OPTION = "--nproc"


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what the workers get)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == NPROC_OPTION:
            skip = True
            continue
        if a.startswith(NPROC_OPTION + "="):
            continue
        out.append(a)
    return out


def should_relaunch(nproc: Optional[int]) -> bool:
    """True in the launching process of a multi-process run (not inside a torchrun worker)."""
    return (
        nproc is not None
        and nproc > 1
        and "TORCHELASTIC_RUN_ID" not in os.environ
        and not dist_utils.launched_distributed()
    )


def torchrun_command(
    nproc: int, argv: Sequence[str], module: str = "teachx", python: Optional[str] = None
) -> list[str]:
    """The torchrun command line that runs ``python -m <module> <argv>`` in ``nproc`` processes on this node."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={int(nproc)}",
        "-m",
        module,
        *strip_nproc(argv),
    ]


def relaunch_with_torchrun(nproc: int, argv: list[str], module: str = "teachx") -> int:
    """Run the current teachx command (``argv``, without the program name) in ``nproc`` processes.

    Blocks until torchrun returns and gives its exit code (the caller exits with it). On CUDA
    each process takes one GPU, so ``nproc`` may not exceed the visible GPUs; on CPU the processes
    share the cores, and each gets ``OMP_NUM_THREADS = cores // nproc`` unless that is already set.
    """
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {nproc} but only {torch.cuda.device_count()} GPU(s) are visible; use --nproc <= {torch.cuda.device_count()}"
        )
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = torchrun_command(nproc, argv, module)
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers and tears them down
        return 130


def launch_or_join(nproc: Optional[int], argv: Optional[Sequence[str]] = None) -> dist_utils.DistInfo:
    """First call of a command that takes ``--nproc``: one line does the right thing everywhere.

    In the launching process with ``nproc > 1`` it runs the command under torchrun and exits with
    torchrun's exit code (it does not return). In a torchrun worker it joins the process group; in a
    plain run it is a no-op. Returns where this process stands.
    """
    if should_relaunch(nproc):
        sys.exit(relaunch_with_torchrun(int(nproc), list(sys.argv[1:] if argv is None else argv)))  # type: ignore[arg-type]
    return dist_utils.init_distributed()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (every process prints in a single-process run)."""
    if dist_utils.is_main():
        print(*args, **kwargs)


def echo0(message: str = "", err: bool = False) -> None:
    """``click.echo`` on rank 0 only: pass it as the ``log`` of pipeline stages."""
    if dist_utils.is_main():
        import click

        click.echo(message, err=err)
