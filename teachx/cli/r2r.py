"""`teachx reveal` and `teachx revise`: the Reveal-to-Revise life cycle on a run directory (find a shortcut
without annotations, name it as a concept; correct the classifier along it and measure before and after).

``register(cli)`` adds both commands to the main click group (called from ``teachx.cli.main``); their work lives
in :mod:`teachx.runs.reveal` and :mod:`teachx.runs.revise`, imported lazily for start-up time.
"""

from __future__ import annotations

from typing import Optional

import click

from teachx.cli.options import quiet_option, wait_option
from teachx.errors import ConfigError

#: the corrections `teachx revise --method` takes: ``teachx.runs.revise.revise_methods()``, written out so that
#: `teachx --help` does not import torch (a test checks that the two agree)
REVISE_METHODS = ["pclarc", "rclarc", "rrclarc", "aclarc", "rrr_revealed", "impactx_cleaned"]


def register(cli: click.Group) -> None:
    cli.add_command(reveal)
    cli.add_command(revise)


def _say(line: str) -> None:
    click.echo(line, err=True)


def _require_run_dir(run_dir: str) -> None:
    """A one-line error, before anything is held or written, for a folder that is no teachx run directory."""
    from teachx.runs.rundir import run_dir_kind  # lazy: CLI start-up

    if run_dir_kind(run_dir) != "teachx":
        raise ConfigError(
            f"'{run_dir}' is not a teachx run directory; pass the --out folder of `teachx train`, `teachx run` or `teachx demo`"
        )


@click.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@click.option(
    "--method",
    default="spray",
    show_default=True,
    help="Reveal method: spray (spectral clustering of attribution maps), spray_latent (of a layer's pooled "
    "activations) or outliers (Local Outlier Factor scores of the maps).",
)
@click.option(
    "--layer",
    default=None,
    help="The layer (as in model.named_modules()) for activations and CAVs; default: the last feature maps.",
)
@click.option(
    "--teacher",
    default=None,
    help="The attribution method for the maps (`teachx teachers`; default: the run's teacher.method), or 'builtin': "
    "the built-in maps of the run's IMPACTX or ABN model, which is then the model analysed.",
)
@click.option(
    "--class",
    "classes",
    type=click.IntRange(min=0),
    multiple=True,
    help="Only this class (repeatable); default: every class.",
)
@click.option(
    "--concept",
    default=None,
    metavar="GROUP|top|INDICES",
    help="Fit a concept for one --class: a group number from its ranking, 'top' for the most suspicious group, "
    "or 2 or more training-image indices separated by commas; the CAV, the images that carry it and their "
    "artefact masks are saved in reveal/concepts/.",
)
@click.option("--name", default=None, help="Name of the saved concept (default: class<C>-group<G> or class<C>-marked).")
@click.option(
    "--cav",
    "cav_kind",
    type=click.Choice(["pattern", "svm", "logistic"]),
    default="pattern",
    show_default=True,
    help="Concept direction: the pattern (signal) CAV, or a linear SVM's or logistic regression's weights.",
)
@click.option(
    "--localise",
    "localise_with",
    type=click.Choice(["lrp", "gradient"]),
    default="lrp",
    show_default=True,
    help="How the concept is traced back to the pixels: LRP from the layer, or gradient x input.",
)
@click.option(
    "--latent",
    type=click.Choice(["activations", "relevances"]),
    default="activations",
    show_default=True,
    help="What spray_latent reads of --layer: the pooled activations, or the layer's LRP relevances for the class.",
)
@quiet_option()
@wait_option()
def reveal(
    run_dir: str,
    method: str,
    layer: Optional[str],
    teacher: Optional[str],
    classes: tuple[int, ...],
    concept: Optional[str],
    name: Optional[str],
    cav_kind: str,
    localise_with: str,
    latent: str,
    quiet: bool,
    wait: bool,
) -> None:
    """Look for shortcuts of a run's trained classifier, class by class.

    Per class it groups the training images by how the model explains them and ranks the groups most
    suspicious first (small, tight groups far from the rest), into RUN_DIR/reveal/. With --concept it fits
    a concept direction (CAV) for a group, finds every training image that carries it and masks where.
    Run again, it resumes.
    """
    from teachx.runs.reveal import reveal_run  # lazy: CLI start-up
    from teachx.runs.rundir import hold_run_dir  # lazy: CLI start-up

    _require_run_dir(run_dir)
    with hold_run_dir(run_dir, wait, _say):
        for line in reveal_run(
            run_dir,
            method=method,
            layer=layer,
            teacher=teacher,
            classes=list(classes) or None,
            concept=concept,
            name=name,
            cav_kind=cav_kind,
            localise_with=localise_with,
            latent=latent,
            progress=not quiet,
            log=click.echo,
        ):
            click.echo(line)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE ...]")
@click.option(
    "--concept", required=True, help="The concept `teachx reveal --concept ... --name NAME` saved in the run."
)
@click.option(
    "--method",
    type=click.Choice(REVISE_METHODS),
    default="rrclarc",
    show_default=True,
    help="pclarc / rclarc: project the layer's activations along the concept (rclarc: only where its score says the "
    "artefact is), no training; rrclarc / aclarc / rrr_revealed: fine-tune the classifier (RR-ClArC's gradient penalty, "
    "A-ClArC's augmentation, RRR's input-gradient penalty inside the artefact masks reveal localised) for a few epochs "
    "at a tenth of the run's learning rate; impactx_cleaned: train IMPACTX anew, with the run's training settings, "
    "towards the teacher's maps of the classifier with the artefact reveal localised zeroed in them.",
)
@quiet_option()
@wait_option()
def revise(run_dir: str, overrides: tuple[str, ...], concept: str, method: str, quiet: bool, wait: bool) -> None:
    """Correct a classifier for a concept `teachx reveal` found; measure before and after.

    teachx revise RUN_DIR --concept NAME [--method rrclarc] [KEY=VALUE ...]. The KEY=VALUE options set the
    fine-tuning (train.epochs, train.lr, method.options.lam, ...). Accuracy (on an artefact benchmark: on
    its clean, attacked and ch test splits), the gradient's share on the artefact and the model's
    sensitivity along the concept are measured before and after, into RUN_DIR/revise/.
    """
    from teachx.runs.revise import revise_run  # lazy: CLI start-up
    from teachx.runs.rundir import hold_run_dir  # lazy: CLI start-up

    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"unexpected argument '{o}': give RUN_DIR, then KEY=VALUE options")
    _require_run_dir(run_dir)
    with hold_run_dir(run_dir, wait, _say):
        for line in revise_run(run_dir, concept, method, list(overrides), log=click.echo, progress=not quiet):
            click.echo(line)
