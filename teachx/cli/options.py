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
