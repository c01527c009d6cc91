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
    default="spray_latent",
    show_default=True,
    help="Reveal method: spray_latent (spectral clustering of the pooled activations --features names), spray (of "
    "the attribution maps) or outliers (Local Outlier Factor scores of the maps).",
)
@click.option(
    "--features",
    type=click.Choice(["stack", "layer"]),
    default="stack",
    show_default=True,
    help="What the groups are found on (spray_latent) and ranked on (--rank specificity). stack: the pooled "
    "activations of every nonlinearity side by side, each unit standardised over the class, which finds artefacts "
    "at any depth. layer: the raw pooled activations of --layer alone, as before.",
)
@click.option(
    "--rank",
    type=click.Choice(["specificity", "method"]),
    default=None,
    help="How the groups are ranked. specificity: the class is split in six groups, ranked by how well each "
    "group's concept sets it apart from the other classes' images (an artefact is what they lack), and the top "
    "group takes in the next ones that are as specific. method: the method's own suspicion score and number of "
    "groups, as before. Default: specificity for spray and spray_latent, method for outliers.",
)
@click.option(
    "--layer",
    default=None,
    help="The one layer (as in model.named_modules()) a concept's CAV, retrieval and localisation use, and with "
    "--features layer also the layer grouped on. Default: the classifier's input features with --features stack "
    "(where `teachx revise` corrects), the last feature maps with --features layer.",
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
    help="Fit a concept for one --class: a group number from its ranking, 'top' for the top-ranked group, "
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
    "--refine",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="ROUNDS",
    help="Grow the concept's images before its CAV is fitted, for at most this many rounds: a CAV of the images "
    "against the other classes' images scores the class, and the high part of a split of the scores is the next "
    "set. A clustering group often holds one piece of an artefact (a timestamp in one corner); growing finds the "
    "rest. A study's reveal grows 5 rounds. 0: the group or marked images alone.",
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
    help="What spray_latent groups on: the pooled activations, or the LRP relevances for the class (of the "
    "layers --features names).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Remove this method's earlier reveal made with other settings (options, defaults or model) and reveal "
    "anew; without it such a reveal is kept and the command stops.",
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
    features: str,
    rank: Optional[str],
    replace: bool,
    refine: int,
    quiet: bool,
    wait: bool,
) -> None:
    """Look for shortcuts of a run's trained classifier, class by class.

    Per class it groups the training images by how the model represents them and ranks the groups by how
    specific their shared feature is to them against the other classes (a shortcut is what the rest of the
    data lacks), into RUN_DIR/reveal/. With --concept it fits a concept direction (CAV) for a group at one
    layer, finds every training image that carries it and masks where. Run again, it resumes.

    The former default, SpRAy on the attribution maps ranked by its own suspicion score, is
    --method spray --features layer --rank method.
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
            features=features,
            rank=rank,
            replace=replace,
            refine=refine,
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
