"""The `teachx` command line. Every user-fixable problem ends as one line on stderr and exit code 2.

Why one file of over 500 lines: the commands' click declarations (options and their help text)
are kept together so that the command line reads as one (the options several commands share are declared
once, in ``teachx.cli.options``); each command's work lives in the layers below, imported lazily for start-up time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import click

from teachx.cli.options import REDO_HELP, launcher_options, out_option, run_options, wait_option
from teachx.errors import ConfigError, TeachxError
from teachx.utils.numbers import number

#: the stages --redo accepts: ``teachx.runs.recovery.STAGES``, written out so that `teachx --help` does
#: not import torch (a test checks that the two agree)
RUN_STAGES = (
    "baseline",
    "teacher",
    "abn",
    "aclarc",
    "impactx",
    "impactx_cleaned",
    "reldrop",
    "rrclarc",
    "rrr",
    "rrr_revealed",
    "saliency_guided",
)
#: set by the process that holds a run directory's lock for the torchrun workers it starts (--nproc)
HELD_ENV = "TEACHX_RUN_DIR_HELD"
RUN_OUT_HELP = "Run directory (resumed if it holds the same config)."


EPILOG = """\b
Examples:
  teachx demo                                   # bundled data, LeNet-5, SHAP teacher, baseline vs IMPACTX
  teachx datasets                               # which datasets are known and present
  teachx run --out runs/x train.epochs=5 teacher.method=lrp   # defaults (bundled data) + overrides
  teachx config --list                          # the shipped configs, usable by name
  teachx train cifar10-lenet5-baseline --out runs/base train.epochs=5
  teachx run cifar10-lenet5 --out runs/impactx impactx.lam=0.5 teacher.method=lrp
  teachx explain runs/impactx cat.png --out maps/   # built-in maps of the run's IMPACTX model
  teachx reveal runs/base --class 3                 # candidate shortcuts of class 3, ranked
  teachx config --describe                      # every option, its default and what it means
  teachx study study-cifar10-lenet5 --out runs/study --seeds 5   # seeds, ablations, p-values
  teachx report runs/study                      # self-contained HTML + Markdown report
  teachx cache list                             # decoded datasets and teacher maps on disk
"""


def _split_args(args: tuple[str, ...]) -> tuple[Optional[str], list[str]]:
    """[CONFIG] [KEY=VALUE ...]: one optional YAML path, then overrides."""
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a  # `train.epochs` without =VALUE: find_config says that the value is missing
        else:
            from teachx.config.schema import missing_value  # lazy: CLI start-up

            raise missing_value(a) or ConfigError(
                f"unexpected argument '{a}': give one CONFIG file and then KEY=VALUE overrides"
            )
    return config, overrides


def command_summary(cmd: click.Command) -> str:
    """What `teachx --help` lists for a command: its short_help, else its docstring's first paragraph, whole."""
    if cmd.short_help:
        return " ".join(cmd.short_help.split())
    return " ".join((cmd.help or "").split("\n\n")[0].split())


class TeachxGroup(click.Group):
    """A click group whose command list shows each summary whole (wrapped), never cut off with '...'."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (name, command_summary(cmd))
            for name in self.list_commands(ctx)
            if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=TeachxGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="teachx")
def cli() -> None:
    """teachx: train models with teacher explanations (IMPACTX) and measure whether it helps."""


from teachx.cli.study import register as _register_study  # noqa: E402

_register_study(cli)

from teachx.cli.serve import register as _register_serve  # noqa: E402

_register_serve(cli)

from teachx.cli.cache import register as _register_cache  # noqa: E402
from teachx.cli.r2r import register as _register_r2r  # noqa: E402

_register_cache(cli)
_register_r2r(cli)


@cli.command()
def datasets() -> None:
    """List known datasets, where their files go, which are present."""
    from teachx.data import dataset_status  # lazy: CLI start-up

    rows = dataset_status()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "present" if r.get("present") else "missing"
        click.echo(f"{r['name']:<{w}}  {mark:<8} {r.get('description', '')}")
        for loc in r.get("locations", [])[:3]:
            click.echo(f"{'':<{w}}           {loc}")
    click.echo(
        "\nimagefolder:PATH loads class-per-folder images from a folder or a .zip (with train/ and test/ inside)."
    )


@cli.command()
def models() -> None:
    """List the built-in backbones and their options."""
    from teachx.cli.describe import describe_models  # lazy: CLI start-up

    click.echo(describe_models(), nl=False)


@cli.command()
def teachers() -> None:
    """List the explanation methods (teachers) and their options."""
    from teachx.cli.describe import describe_teachers  # lazy: CLI start-up

    click.echo(describe_teachers(), nl=False)


@cli.command()
@click.argument("name", required=False)
def methods(name: Optional[str]) -> None:
    """List the training methods (IMPACTX, ABN, RRR, ...) and their options.

    NAME: list that method alone, e.g. `teachx methods impactx`.
    """
    from teachx.cli.describe import describe_methods  # lazy: CLI start-up

    click.echo(describe_methods(name), nl=False)


@cli.command("config", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option(
    "--list",
    "list_",
    is_flag=True,
    help="List the configs shipped with teachx (usable by name wherever a CONFIG goes).",
)
@click.option(
    "--describe", is_flag=True, help="Annotate every option with what it means (the output is a valid config)."
)
def config_cmd(args: tuple[str, ...], list_: bool, describe: bool) -> None:
    """Print the resolved config; see also --list and --describe.

    teachx config [CONFIG] [KEY=VALUE ...]: defaults <- CONFIG (a file or a shipped name) <- overrides.
    A study config (`teachx study`) is printed with its study: section resolved too (every key, the
    defaults filled in); study.KEY=VALUE overrides change that section.
    """
    if list_:
        from teachx.cli.describe import list_shipped  # lazy: CLI start-up

        click.echo(list_shipped(), nl=False)
        return
    from teachx.config.loader import dump_yaml  # lazy: CLI start-up
    from teachx.runs.resolve import resolve_config  # lazy: CLI start-up

    path, overrides = _split_args(args)
    study = None
    if path is not None and _is_study_config(path):  # the run config its units start from, and the study: section
        from teachx.runs.resolve import study_base_config  # lazy: CLI start-up
        from teachx.studies.spec import load_study  # lazy: CLI start-up

        spec = load_study(path, overrides)
        cfg, study = study_base_config(spec.base), spec.section()
    else:
        cfg = resolve_config(path, overrides)
    if describe:
        from teachx.cli.describe import describe_config  # lazy: CLI start-up

        click.echo(describe_config(cfg, study), nl=False)
        return
    from teachx.cli.describe import annotate_resolved  # lazy: CLI start-up

    click.echo(
        annotate_resolved(dump_yaml(cfg.to_dict()), cfg), nl=False
    )  # "# resolved: ..." on values left to the dataset
    if study is not None:
        click.echo(dump_yaml({"study": study}), nl=False)


def _is_study_config(path: str) -> bool:
    """Whether CONFIG (a file or a shipped name) has a study: section."""
    from teachx.config.shipped import find_config, is_study  # lazy: CLI start-up

    return is_study(find_config(path))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@out_option(RUN_OUT_HELP)
@run_options(
    ["train"],
    "Discard the trained model in the run directory and train it again (e.g. after a corrupted checkpoint).",
)
@launcher_options()
def train(
    args: tuple[str, ...],
    out: str,
    overwrite: bool,
    quiet: bool,
    nproc: Optional[int],
    redo: tuple[str, ...],
    wait: bool,
    launcher: str,
    nodes: int,
    gpus_per_node: int,
    slurm: tuple[str, ...],
) -> None:
    """Train a baseline classifier.

    teachx train [CONFIG] [KEY=VALUE ...] --out DIR. CONFIG is a YAML file or a shipped config's
    name (`teachx config --list`); without one, the defaults (`teachx config --describe`) are used.
    """
    from teachx.runs.resolve import resolve_config  # lazy: CLI start-up

    path, overrides = _split_args(args)
    cfg = resolve_config(path, overrides)
    if launcher == "submitit":
        _submit_run("train", path, overrides, out, overwrite, redo, nodes, gpus_per_node, nproc, slurm)
        return
    with _holding(out, wait):
        _train(cfg, out, overwrite, quiet, nproc, redo)


def _train(cfg, out: str, overwrite: bool, quiet: bool, nproc: Optional[int], redo: tuple[str, ...]) -> None:
    """`teachx train` in its run directory, held by this process (or the launcher of its --nproc workers)."""
    from teachx.cli.launch import echo0  # lazy: CLI start-up
    from teachx.runs.plan import data_summary, log_data, make_plan  # lazy: CLI start-up
    from teachx.runs.recovery import (  # lazy: CLI start-up
        check_bound,
        prepare_run_dir,
        redo_hint,
        redo_stages,
        results_bound,
        stage_checkpoint,
        stage_done,
    )
    from teachx.runs.records import StageRecord, TrainResults  # lazy: CLI start-up
    from teachx.runs.stages import split_text, train_classifier  # lazy: CLI start-up
    from teachx.runs.rundir import run_config_hash  # lazy: CLI start-up
    from teachx.utils import distributed as dist_utils  # lazy: CLI start-up

    _, quiet = _join_processes(cfg, nproc, quiet)
    plan = dist_utils.main_first(make_plan, cfg, progress=not quiet)  # data problems surface before anything is written
    run_dir = dist_utils.on_main(prepare_run_dir, out, cfg, "train", overwrite)
    dist_utils.on_main(redo_stages, run_dir, cfg, redo, echo0)
    log_data(plan, cfg, echo0)  # what is trained on, augmentation included, and the dataset's notices
    t0 = time.perf_counter()
    bound = run_config_hash(run_dir)  # the stage record and results.json carry it
    with redo_hint(run_dir, "train"):  # a damaged checkpoint or record: "re-run ... with --redo train"
        check_bound(run_dir, bound, ("train",))
        todo = stage_done(run_dir) is None or results_bound(run_dir, bound) is None
        rec = train_classifier(cfg, plan, run_dir, cfg.model.backbone, cfg.model.options, echo0, bound)
    if todo:  # a re-run with nothing to do keeps the wall time the training measured
        stage = StageRecord.from_dict(rec)
        TrainResults(data_summary(plan, cfg), stage, time.perf_counter() - t0, bound or None).write(run_dir)
    by_split = split_text(rec.get("test_splits"))  # an artefact benchmark: ch, clean and attacked test splits
    echo0(f"test accuracy {number(rec['test_acc'])}{by_split}; best checkpoint {stage_checkpoint(run_dir, rec)}")
    dist_utils.shutdown()


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@out_option(RUN_OUT_HELP)
@run_options(RUN_STAGES, REDO_HELP)
@launcher_options()
def run(
    args: tuple[str, ...],
    out: str,
    overwrite: bool,
    quiet: bool,
    nproc: Optional[int],
    redo: tuple[str, ...],
    wait: bool,
    launcher: str,
    nodes: int,
    gpus_per_node: int,
    slurm: tuple[str, ...],
) -> None:
    """The whole pipeline: baseline -> teacher maps -> IMPACTX -> test.

    teachx run [CONFIG] [KEY=VALUE ...] --out DIR. CONFIG is a YAML file or a shipped config's name
    (`teachx config --list`); without one, the defaults (`teachx config --describe`: the bundled
    dataset, LeNet-5, a DeepSHAP teacher) and the KEY=VALUE overrides are used.
    """
    from teachx.runs.resolve import resolve_config  # lazy: CLI start-up

    path, overrides = _split_args(args)
    cfg = resolve_config(path, overrides)
    if launcher == "submitit":
        _submit_run("run", path, overrides, out, overwrite, redo, nodes, gpus_per_node, nproc, slurm)
        return
    with _holding(out, wait):
        _pipeline_command(cfg, out, "run", overwrite, quiet, nproc, redo)


def _submit_run(
    command: str,
    path: Optional[str],
    overrides: list[str],
    out: str,
    overwrite: bool,
    redo: tuple[str, ...],
    nodes: int,
    gpus_per_node: int,
    nproc: Optional[int],
    slurm: tuple[str, ...],
) -> None:
    """`teachx train|run ... --launcher submitit`: submit the command as one (multi-node) job; local jobs are waited for."""
    from teachx.cli.cluster import (  # lazy: CLI start-up
        check_launcher,
        launcher_spec,
        parse_slurm_options,
        require_submitit,
        submit_run,
        tasks_per_node,
        wait_for,
    )
    from teachx.runs.rundir import claim_for_job, unclaim  # lazy: CLI start-up

    require_submitit()
    spec = launcher_spec(parse_slurm_options(slurm))
    check_launcher(spec)
    tasks_per_node(nodes, gpus_per_node, nproc)  # checked before anything is written
    directory = Path(out).absolute()
    argv = [command] + ([str(Path(path).absolute()) if Path(path).is_file() else path] if path else [])
    argv += [*overrides, "--out", str(directory), "--quiet"] + (["--overwrite"] if overwrite else [])
    for stage in redo:
        argv += ["--redo", stage]
    made = claim_for_job(directory)  # a foreign folder, or one another process holds, is refused now, not in the job
    try:
        cluster, job = submit_run(argv, directory, spec, nodes, gpus_per_node, nproc, _say)
    except BaseException:
        unclaim(directory, made)  # nothing left behind by a submission that did not happen
        raise
    click.echo(f"submitted job {job.job_id} ({cluster}); log {job.paths.stdout}")
    if cluster != "local":
        click.echo(f"the run writes into {directory}; re-submit the same command to resume it")
        return
    if not wait_for([job], _say):
        raise ConfigError(
            f"the job failed (its log is named above); re-run the same command to resume the run in {out}"
        )
    click.echo(f"done: {directory}")


@cli.command()
@out_option("Run directory.", required=False, default="teachx-demo", show_default=True)
@run_options(RUN_STAGES, REDO_HELP)
@click.argument("overrides", nargs=-1)
def demo(
    out: str,
    overwrite: bool,
    quiet: bool,
    nproc: Optional[int],
    redo: tuple[str, ...],
    wait: bool,
    overrides: tuple[str, ...],
) -> None:
    """Bundled data, LeNet-5, SHAP teacher: baseline vs IMPACTX."""
    from importlib.resources import files

    from teachx.runs.resolve import resolve_config  # lazy: CLI start-up

    cfg_path = str(files("teachx") / "configs" / "demo.yaml")
    cfg = resolve_config(cfg_path, list(overrides))
    with _holding(out, wait):
        _pipeline_command(cfg, out, "demo", overwrite, quiet, nproc, redo)


#: `teachx explain --trust-method`: teachx.evaluation.builtin_maps.TRUST_METHODS written out (no torch import for --help)
TRUST_METHODS = ("gradient_x_input", "lrp")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint", metavar="RUN_DIR|CHECKPOINT", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@out_option(
    "Folder for the heatmap PNGs; what an earlier `teachx explain` wrote there is replaced, other files are kept."
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--class",
    "cls",
    type=click.IntRange(min=0),
    default=None,
    help="Per-class models (impactx.per_class): the map of this class, not the predicted one.",
)
@click.option(
    "--faithfulness",
    is_flag=True,
    help="Also the run's teacher method applied post hoc to this model, and pixel-flipping AUCs (MoRF, LeRF, "
    "insertion) of the built-in, post-hoc and a random map on this model (faithfulness.json).",
)
@click.option(
    "--steps", type=click.IntRange(min=2), default=16, show_default=True, help="Pixel-flipping steps (--faithfulness)."
)
@click.option(
    "--trust-method",
    type=click.Choice(TRUST_METHODS),
    default=TRUST_METHODS[0],
    show_default=True,
    help="The post-hoc map of this model (one backward pass) that each built-in map is compared with (trust.json).",
)
@click.option(
    "--trust-threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=0.0,
    show_default=True,
    help="Flag an image when its built-in map correlates below this with the post-hoc map: 0 is what a map "
    "unrelated to the model's gradient reaches on average.",
)
@wait_option(
    "When another teachx process is writing in the --out folder (or in the run directory "
    "it lies in), wait until it has finished instead of stopping with an error."
)
def explain(
    checkpoint: str,
    images: tuple[str, ...],
    out: str,
    device: str,
    cls: Optional[int],
    faithfulness: bool,
    steps: int,
    trust_method: str,
    trust_threshold: float,
    wait: bool,
) -> None:
    """Write built-in IMPACTX heatmap overlays (PNG) for image files.

    RUN_DIR is the --out folder of `teachx run` or `teachx demo` (its IMPACTX or ABN model is used), or
    an IMPACTX / ABN unit of a study (STUDY/units/KEY); CHECKPOINT such a .safetensors file.
    --faithfulness asks how faithful each built-in map is to the model that made it: it needs the run or
    unit (its config names the teacher method, and DeepSHAP's background comes from its training data).
    Every image also gets a trust value (trust.json): the correlation of its built-in map with the model's own
    gradient x input for the same class; images below --trust-threshold are flagged as disagreeing.
    """
    from teachx.runs.explain import explain_images  # lazy: CLI start-up
    from teachx.runs.rundir import enclosing_run_dir, hold_run_dir  # lazy: CLI start-up

    run_dir = enclosing_run_dir(out)  # PNGs written into a run directory: that run's lock, else the folder's own
    held = (
        hold_run_dir(run_dir, wait, _say)
        if run_dir is not None
        else hold_run_dir(out, wait, _say, what="output folder", foreign_ok=True)
    )
    with held:
        for line in explain_images(
            checkpoint,
            list(images),
            out,
            device,
            cls,
            faithfulness=faithfulness,
            steps=steps,
            trust_method=trust_method,
            trust_threshold=trust_threshold,
        ):
            click.echo(line)


def _say(line: str) -> None:
    click.echo(line, err=True)


@contextlib.contextmanager
def _holding(out: str, wait: bool) -> Iterator[None]:
    """Hold the run directory ``out`` for the whole command (:func:`teachx.runs.rundir.hold_run_dir`).

    With --nproc the launching process holds it for its torchrun workers (they are told so through the
    environment); workers started by a torchrun of the user's leave it to rank 0.
    """
    from teachx.runs.rundir import RUN_LOCK, hold_run_dir  # lazy: CLI start-up
    from teachx.utils.distributed import launched_distributed  # lazy: CLI start-up

    lock = str((Path(out) / RUN_LOCK).absolute())
    if launched_distributed() and (os.environ.get(HELD_ENV) == lock or os.environ.get("RANK", "0") != "0"):
        yield
        return
    with hold_run_dir(out, wait, _say):
        os.environ[HELD_ENV] = lock
        try:
            yield
        finally:
            os.environ.pop(HELD_ENV, None)


def _join_processes(cfg, nproc: Optional[int], quiet: bool) -> tuple[bool, bool]:
    """Start (or join) the processes of a --nproc run; returns (is_main, quiet): only rank 0 talks."""
    from teachx.cli.launch import launch_or_join  # lazy: CLI start-up

    is_main = launch_or_join(
        nproc
    ).is_main  # with --nproc N > 1 the launcher re-runs this command under torchrun and exits here
    quiet = quiet or not is_main
    if quiet:
        cfg.train.progress = False
    return is_main, quiet


def _pipeline_command(
    cfg, out: str, command: str, overwrite: bool, quiet: bool, nproc: Optional[int], redo: tuple[str, ...] = ()
) -> None:
    """`teachx run` and `teachx demo`: the whole pipeline in one run directory, then its summary."""
    from teachx.cli.launch import echo0  # lazy: CLI start-up
    from teachx.runs.pipeline import run_pipeline  # lazy: CLI start-up
    from teachx.runs.plan import make_plan  # lazy: CLI start-up
    from teachx.runs.recovery import prepare_run_dir, redo_stages  # lazy: CLI start-up
    from teachx.utils import distributed as dist_utils  # lazy: CLI start-up

    is_main, quiet = _join_processes(cfg, nproc, quiet)
    plan = dist_utils.main_first(make_plan, cfg, progress=not quiet)  # data problems surface before anything is written
    from teachx.training.methods import build_method  # lazy: CLI start-up

    build_method(cfg).check_data(
        plan
    )  # e.g. rrr with annotation masks on data without masks: before anything is trained
    run_dir = dist_utils.on_main(prepare_run_dir, out, cfg, command, overwrite)
    dist_utils.on_main(redo_stages, run_dir, cfg, redo, echo0)
    res = run_pipeline(cfg, run_dir, echo0, progress=not quiet, plan=plan).results
    if is_main:
        _print_summary(res, run_dir)
    dist_utils.shutdown()


def _print_summary(res: dict, run_dir: Path) -> None:
    click.echo("")
    click.echo(
        f"dataset {res['dataset']} | backbone {res['backbone']} | teacher {res['teacher']} | epochs {res['epochs']}"
    )
    click.echo(f"baseline test accuracy: {number(res['baseline_test_acc'])}")
    from teachx.training.methods import recorded_method

    method = recorded_method(res)
    if method is not None:  # a method this teachx knows (the record of another one: its accuracy alone)
        label, details = method.result_text(res)
        click.echo(
            f"{label:<8} test accuracy: {number(method.result_acc(res, 'test'))}"
            + (f"  ({details})" if details else "")
        )
    elif res.get("method_test_acc") is not None:
        click.echo(f"{res.get('method')} test accuracy: {number(res['method_test_acc'])}")
    for name, by_split in (res.get("test_splits") or {}).items():  # an artefact benchmark's three test splits
        if by_split:
            splits = ", ".join(f"{split} {number(row.get('acc'))}" for split, row in by_split.items())
            click.echo(f"test accuracy by split ({name}): {splits}")
    from teachx.runs.records import shortcut_shares

    for name, b in shortcut_shares(res.get("shortcut")).items():
        shares = ", ".join(
            f"{m} {number(getattr(b, m), 3)}" for m in ("gradient", "lrp", "built_in") if getattr(b, m) is not None
        )
        honest = (
            f"; honesty {number(b.honesty, 2)} (built-in ÷ gradient share: 1 shows the artefact as the gradient does, well below 1 hides it)"
            if b.honesty is not None
            else ""
        )
        click.echo(f"attribution on the artefact ({name}): {shares} (artefact area {number(b.area, 3)}){honest}")
    q = res.get("map_quality")
    if q:
        aug = (
            f"; under the training augmentation: {number(q['corr_mean_map_augmented'], 3)}"
            if "corr_mean_map_augmented" in q
            else ""
        )
        click.echo(
            f"built-in maps vs teacher on test: corr {number(q['corr'], 3)} (mean map: {number(q['corr_mean_map'], 3)}{aug}), R^2 vs mean map {number(q['r2_vs_mean_map'], 3)}"
            + (f" (scale-free: {number(q['r2_vs_mean_map_affine'], 3)})" if "r2_vs_mean_map_affine" in q else "")
        )
    click.echo(
        f"wall time {res['wall_seconds']:.1f}s; results in {run_dir / 'results.json'}, figures in {run_dir / 'figures'}"
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one-line errors, exit code 2, no traceback for problems the user can fix."""
    from teachx.utils.runtime import tune_cpu_allocator  # lazy: CLI start-up

    tune_cpu_allocator()
    try:
        cli.main(args=argv, prog_name="teachx", standalone_mode=False)
    except TeachxError as exc:
        from teachx.utils import distributed as dist_utils  # lazy: CLI start-up

        if dist_utils.is_main():  # every rank of a multi-process run hits the same error: say it once
            click.echo(f"teachx: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.NoSuchOption as exc:
        hint = f" (did you mean {', '.join(exc.possibilities)}?)" if exc.possibilities else ""
        click.echo(
            f"teachx: error: {exc.format_message()}{hint}; see 'teachx {exc.ctx.info_name if exc.ctx else ''} --help'".replace(
                "  ", " "
            ),
            err=True,
        )
        sys.exit(2)
    except click.exceptions.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "teachx"
        click.echo(f"teachx: error: {exc.format_message().rstrip('.')}; see '{cmd} --help'", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        from teachx.utils import distributed as dist_utils  # lazy: CLI start-up

        if dist_utils.is_main():
            click.echo(("\n" if isinstance(exc, KeyboardInterrupt) else "") + _interrupted(argv), err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:  # a write that no teachx code turned into a message (a lock file, a memory-mapped store)
        message = _os_error(exc)
        if message is None:
            raise
        click.echo(f"teachx: error: {message}", err=True)
        sys.exit(2)


#: commands whose work survives an interruption: run again, they resume
RESUMABLE = ("train", "run", "demo", "study", "reveal")


def _interrupted(argv: Optional[list[str]]) -> str:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if args and args[0] in RESUMABLE:
        return (
            "teachx: interrupted; run the same command again to resume "
            "(finished stages, checkpoints and teacher maps are kept)"
        )
    return "teachx: interrupted"


def _os_error(exc: OSError) -> Optional[str]:
    """One line for a file-system problem the user can fix (full, read-only, no permission), else None."""
    import errno

    from teachx.utils.io import blocking_file, output_error  # lazy: CLI start-up

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return str(output_error(exc))
    if exc.filename and blocking_file(exc, exc.filename) is not None:  # an output folder where a file is
        return str(output_error(exc))
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
        return (
            f"'{exc.filename}': permission denied; check its permissions or choose another location "
            "(--out; $TEACHX_CACHE for teacher maps and data caches)"
        )
    return None


if __name__ == "__main__":  # pragma: no cover
    main()
