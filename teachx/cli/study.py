"""`teachx study` and `teachx report`: seeds, ablations, statistics and the HTML/Markdown report.

``register(cli)`` adds both commands to the main click group (called from ``teachx.cli.main``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from teachx.cli.options import out_option, quiet_option, wait_option
from teachx.errors import ConfigError


def register(cli: click.Group) -> None:
    cli.add_command(study)
    cli.add_command(report)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", metavar="CONFIG", required=False)
@click.argument("overrides", nargs=-1)
@out_option("Study directory (resumed: complete units are skipped).")
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(min=1),
    default=None,
    help="Use seeds 0..N-1 (overrides study.seeds / study.n_seeds).",
)
@click.option(
    "--faithfulness", is_flag=True, help="Also compute MoRF/LeRF AUCs per unit (same as study.eval.faithfulness=true)."
)
@click.option(
    "--report/--no-report",
    "with_report",
    default=True,
    show_default=True,
    help="Write report.html and report.md at the end.",
)
@click.option("--dry-run", is_flag=True, help="Print the units that would run, then stop.")
@click.option(
    "--status",
    is_flag=True,
    help="Show where the study in --out stands (done, training, interrupted, "
    "not started; accuracy so far; time left), without training or writing anything.",
)
@click.option(
    "--launcher",
    type=click.Choice(["local", "submitit"]),
    default="local",
    show_default=True,
    help="local: this process runs the units. submitit: submit --workers worker jobs (SLURM, or local processes "
    "with study.launcher.cluster=local) that share the study directory; the study.launcher.* keys set their resources.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker jobs to submit with --launcher submitit (each runs one unit at a time).",
)
@click.option("--worker", "worker", is_flag=True, hidden=True)  # set by the launcher for the jobs it submits
@quiet_option("One line per unit and the summary: no progress bars or stage logs.")
def study(
    config: Optional[str],
    overrides: tuple[str, ...],
    out: str,
    n_seeds: Optional[int],
    faithfulness: bool,
    with_report: bool,
    dry_run: bool,
    status: bool,
    launcher: str,
    workers: int,
    worker: bool,
    quiet: bool,
) -> None:
    """Seeds x arms x regimes with paired statistics.

    teachx study CONFIG [KEY=VALUE ...] --out DIR. CONFIG is a run config with a `study:` section
    (seeds, arms, optional regimes): a file or a shipped study's name (`teachx config --list`);
    KEY=VALUE overrides change the base config, or the study with `study.KEY=VALUE`.
    `teachx study [CONFIG] --out DIR --status` shows where the study in DIR stands (without CONFIG: the
    study DIR records). `--launcher submitit --workers N` runs the units in N jobs on a SLURM cluster.
    """
    from teachx.studies.runner import run_study  # lazy: CLI start-up
    from teachx.runs.revise import POST_HOC  # lazy: CLI start-up
    from teachx.studies.spec import BASELINE, load_study  # lazy: CLI start-up

    for o in overrides:
        if "=" not in o:
            from teachx.config.schema import missing_value  # lazy: CLI start-up

            raise missing_value(o) or ConfigError(
                f"unexpected argument '{o}': give one CONFIG file and then KEY=VALUE overrides"
            )
    if config is not None and "=" in config and not Path(config).exists():  # `teachx study K=V --out DIR`: no CONFIG
        overrides, config = (config, *overrides), None
    if config is None and not status:
        raise ConfigError("missing CONFIG: give a study config file or a shipped study's name (`teachx config --list`)")
    if status:
        _status(config, list(overrides), n_seeds, Path(out))
        return
    ov = list(overrides) + (["study.eval.faithfulness=true"] if faithfulness else [])
    spec = load_study(config, ov, n_seeds)
    if dry_run:
        rows = [None, *spec.arms, *spec.extra_rows]
        n = sum(spec.runs(regime, arm) for regime in spec.regimes for arm in rows) * len(spec.seeds)
        click.echo(
            f"{n} units: regimes {list(spec.regimes)} x arms {[BASELINE, *spec.arms, *spec.extra_rows]} x seeds "
            f"{spec.seeds}; control: {spec.control}"
        )
        for regime in spec.regimes:
            for arm in (a for a in spec.arms if spec.runs(regime, a)):
                cfg = spec.config(regime, arm, spec.seeds[0])
                from teachx.training.methods import build_method  # lazy: CLI start-up

                method = build_method(cfg)
                what = method.arm_text()
                click.echo(
                    f"  regime={regime} arm={arm}: {what} teacher={cfg.teacher.method}"
                    f" teacher_backbone={cfg.teacher.backbone or cfg.model.backbone} train_size={cfg.data.train_size}"
                    + (f" teacher_training={cfg.teacher.training}" if cfg.teacher.training else "")
                )
        if spec.ceiling:
            click.echo(f"  arm=ceiling: a baseline trained with {spec.ceiling} on top of each regime's settings")
        for row, m in spec.revise_rows.items():
            from teachx.training.methods import METHODS  # lazy: CLI start-up

            how = (
                "post hoc"
                if m in POST_HOC
                else "fine-tuned with the R2R recipe"
                if METHODS.get(m).fine_tunes_baseline
                else "trained anew with the run's training settings"
            )
            opts = " ".join((spec.revise.items(m) if spec.revise else []))
            group = (
                "the top group of the poisoned class grown against the other classes"
                if spec.revise and spec.revise.group == "grown"
                else "the top group of the poisoned class"
            )
            along = (
                "the CAV of the training images that truly carry the artefact (it reads the annotations: a reference)"
                if spec.revise and spec.revise.source(row) == "annotated"
                else "the concept the baseline's reveal finds"
                f" ({spec.eval.reveal.method if spec.eval.reveal else ''}, {group})"
            )
            click.echo(f"  arm={row}: {m} ({how}{', ' + opts if opts else ''}) along {along}")
        if launcher == "submitit":
            from teachx.cli.cluster import sbatch_text  # lazy: CLI start-up

            click.echo(f"\nthe sbatch script of each of the {workers} worker job(s) on SLURM:")
            folder = Path(out).absolute() / "launcher" / "logs"
            click.echo(sbatch_text(spec.launcher, folder, gpus_per_node=spec.launcher.gpus_per_worker))
        return
    if launcher == "submitit":
        argv = ["study", str(Path(config).absolute()) if Path(config).is_file() else config, *ov, "--out"]
        argv += [str(Path(out).absolute()), "--quiet"] + (["--seeds", str(n_seeds)] if n_seeds else [])
        _submit(spec, out, workers, argv + ([] if with_report else ["--no-report"]))
        return
    res = run_study(spec, out, click.echo, progress=not quiet, verbose=not quiet, worker=worker)
    if res is None:  # a worker that left the last units to the workers running them
        return
    click.echo(f"\nstudy.json: {res.path} ({res.trained} models trained by this invocation)")
    if with_report:
        from teachx.reporting.report import write_report  # lazy: CLI start-up

        html_path, md_path = write_report(res.path.parent)
        click.echo(f"report: {html_path} and {md_path}")


def _submit(spec, out: str, workers: int, argv: list[str]) -> None:
    """`teachx study ... --launcher submitit`: prepare the study directory, submit the worker jobs (each runs ``argv``)."""
    from teachx.cli.cluster import check_launcher, submit_study, wait_for  # lazy: CLI start-up
    from teachx.studies.runner import prepare_study_dir  # lazy: CLI start-up

    check_launcher(spec.launcher)
    directory = prepare_study_dir(Path(out), spec)  # refused here, before any job starts, if it is not a study's
    cluster, jobs = submit_study(argv, directory, spec.launcher, workers, _say)
    ids = ", ".join(str(j.job_id) for j in jobs)
    click.echo(f"submitted {len(jobs)} worker job(s) ({cluster}): {ids}; logs in {directory / 'launcher' / 'logs'}")
    if cluster != "local":
        click.echo(f"watch it with: teachx study --out {out} --status")
        return
    click.echo("waiting for the local workers (Ctrl-C stops waiting; the workers go on)")
    if not wait_for(jobs, _say):
        raise ConfigError(
            f"a worker failed (its log is named above); re-run the same command to resume the study in {out}"
        )
    click.echo(f"study.json: {directory / 'study.json'}")


def _say(line: str) -> None:
    click.echo(line, err=True)


def _status(config: Optional[str], overrides: list[str], n_seeds: Optional[int], out: Path) -> None:
    """`teachx study [CONFIG] --out DIR --status`: the units of CONFIG (default: the study DIR records) in DIR."""
    from teachx.studies.spec import load_study, load_study_dir  # lazy: CLI start-up
    from teachx.studies.status import status_lines, study_status  # lazy: CLI start-up

    if not (out / "units").is_dir():
        raise ConfigError(f"'{out}' holds no study units yet; start the study with the same command without --status")
    if config is None:
        if overrides or n_seeds:
            raise ConfigError(
                "--status without CONFIG reads the study that DIR records; give CONFIG to apply overrides or --seeds"
            )
        if not (out / "study.yaml").is_file():
            raise ConfigError(
                f"'{out}' has no study.yaml; give the study's CONFIG: teachx study CONFIG --out {out} --status"
            )
        spec = load_study_dir(out)
    else:
        spec = load_study(config, overrides, n_seeds)
    for line in status_lines(study_status(spec, out)):
        click.echo(line)
    from teachx.cli import cluster  # lazy: CLI start-up

    jobs = cluster.status_lines(out)
    if jobs:
        click.echo("submitted jobs:")
        for line in jobs:
            click.echo(line)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@out_option(
    "HTML file (the .md goes next to it); default RUN_DIR/report.html.",
    required=False,
    default=None,
    type=click.Path(dir_okay=False),
)
@wait_option(
    "When another teachx process is writing in the run directory, wait until it has "
    "finished instead of stopping with an error."
)
def report(run_dir: str, out: Optional[str], wait: bool) -> None:
    """Write an HTML + Markdown report of a run, demo or study."""
    from contextlib import ExitStack

    from teachx.runs.rundir import enclosing_run_dir, hold_run_dir  # lazy: CLI start-up
    from teachx.reporting.report import write_report  # lazy: CLI start-up

    def say(line: str) -> None:
        click.echo(line, err=True)

    with ExitStack() as held:  # the run read, and the run the report goes into: no process may change them meanwhile
        runs = {
            r.absolute(): r
            for r in (enclosing_run_dir(run_dir), enclosing_run_dir(Path(out).parent) if out else None)
            if r
        }
        for d in runs.values():
            held.enter_context(hold_run_dir(d, wait, say))
        html_path, md_path = write_report(run_dir, out)
    click.echo(f"report: {html_path} and {md_path}")
