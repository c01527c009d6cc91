"""Click options that several commands share, declared once so that their names, help and types stay alike.

Each helper returns a decorator; the run commands (train, run, demo) take :func:`run_options` whole.
The help texts are module constants so that tests and other commands can refer to them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

NPROC_HELP = (
    "Run in N processes (one per GPU, or CPU processes) under torchrun; the global batch stays train.batch_size."
)
OVERWRITE_HELP = (
    "Replace a teachx run directory made with another config: only the files teachx wrote there are removed; "
    "a directory teachx did not make is never touched."
)
WAIT_HELP = (
    "When another teachx process is writing in the run directory, wait until it has finished (then resume, or "
    "overwrite with --overwrite) instead of stopping with an error."
)
REDO_HELP = (
    "Discard this stage of the run directory and train it again (repeatable), e.g. after a corrupted checkpoint; "
    "the method stage is named after method.name (impactx by default); redoing the teacher also redoes the method "
    "stage, which learnt from it."
)
QUIET_HELP = "No progress bars."


def out_option(help: str, *, required: bool = True, **kwargs: Any) -> Callable[[F], F]:
    """``--out/-o DIR``: a folder by default; ``kwargs`` go to :func:`click.option` (type, default, ...)."""
    kwargs.setdefault("type", click.Path(file_okay=False))
    return click.option("--out", "-o", "out", required=required, help=help, **kwargs)


def quiet_option(help: str = QUIET_HELP) -> Callable[[F], F]:
    """``--quiet/-q``."""
    return click.option("--quiet", "-q", is_flag=True, help=help)


def wait_option(help: str = WAIT_HELP) -> Callable[[F], F]:
    """``--wait``: wait for another teachx process that holds the directory instead of stopping."""
    return click.option("--wait", is_flag=True, help=help)


def run_options(redo: Sequence[str], redo_help: str) -> Callable[[F], F]:
    """``--overwrite --quiet --nproc --redo --wait`` of a command that trains in a run directory (in this order).

    ``redo`` are the stages --redo accepts, ``redo_help`` its help.
    """
    decorators = [
        click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP),
        quiet_option(),
        click.option("--nproc", type=click.IntRange(min=1), default=None, help=NPROC_HELP),
        click.option("--redo", type=click.Choice(list(redo)), multiple=True, help=redo_help),
        wait_option(),
    ]

    def apply(f: F) -> F:
        for d in reversed(decorators):  # as if written one above the other: --help lists them in this order
            f = d(f)
        return f

    return apply


LAUNCHER_HELP = (
    "local: run here. submitit: submit the command as one job (SLURM, or a local process with --slurm cluster=local) "
    "of --nodes nodes, one process per GPU (--gpus-per-node) or --nproc processes per CPU node, joined by "
    "torch.distributed; the run resumes when the job is requeued."
)


def launcher_options() -> Callable[[F], F]:
    """``--launcher --nodes --gpus-per-node --slurm`` of a command that can run as a cluster job (train, run)."""
    decorators = [
        click.option(
            "--launcher",
            type=click.Choice(["local", "submitit"]),
            default="local",
            show_default=True,
            help=LAUNCHER_HELP,
        ),
        click.option(
            "--nodes",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Nodes of the job (--launcher submitit).",
        ),
        click.option(
            "--gpus-per-node",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="GPUs per node, one process each (--launcher submitit); 0: CPU nodes with --nproc processes each.",
        ),
        click.option(
            "--slurm",
            "slurm",
            multiple=True,
            metavar="KEY=VALUE",
            help="Job resources as study.launcher keys (repeatable): partition=gpu, time_min=600, mem_gb=32, "
            "cpus_per_worker=8, account=..., qos=..., cluster=local, extra.constraint=a100.",
        ),
    ]

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply
