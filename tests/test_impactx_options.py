"""IMPACTX's options are its method options (``method.options``), typed (``impactx_options``); the ``impactx:``
section they were written in before is still read everywhere, and study unit keys and run-directory hashes of
the same settings are those teachx made before the move (the values pinned here were computed by it)."""

from __future__ import annotations

import pytest
import yaml

from conftest import run_teachx, teachx_main
from teachx.config.loader import dump_yaml
from teachx.errors import ConfigError
from teachx.runs.resolve import resolve_config
from teachx.runs.rundir import RUN_MARKER, config_hash, prepare_run_dir, run_dir_kind
from teachx.studies.spec import load_study, planned_units, unit_key
from teachx.training.methods import OPTION_NAMES, ImpactxOptions, impactx_options

#: the hashes and keys pinned below were computed with exactly this list: kept apart from the like lists of other
#: test files, which may change (test_cli_user_path.py scores fewer faithfulness images)
TINY = [
    "data.train_size=200",
    "train.epochs=1",
    "train.batch_size=64",
    "teacher.background_size=4",
    "teacher.eval_images=20",
    "teacher.batch_size=64",
]

#: the config.yaml the teachx before the move wrote for ``teachx run TINY impactx.lam=0.5 impactx.decoder=paper``
OLD_CONFIG_YAML = """\
command: run
seed: 0
device: auto
data: {name: bundled, root: null, download: false, val_fraction: 0.1, train_size: 200,
  split_seed: 0, augment: true, crop_padding: 4, hflip: null, image_size: null, channels: null,
  test_fraction: null, test_seed: null, shortcut: null, shortcut_train: confounded,
  shortcut_size: 4, shortcut_seed: 0, artefact: null}
model:
  backbone: lenet5
  options: {}
train:
  epochs: 1
  batch_size: 64
  optimizer: adam
  lr: 0.001
  momentum: 0.9
  nesterov: false
  weight_decay: 0.0
  schedule: cosine
  warmup_epochs: 0.0
  step_size: 30
  gamma: 0.1
  milestones: []
  label_smoothing: 0.0
  grad_clip: null
  amp: true
  eval_batch_size: 512
  select: val_acc
  channels_last: false
  tensorboard: false
  progress: true
  threads: null
teacher:
  method: deepshap
  options: {}
  background_size: 4
  target: label
  reduce: sum
  normalize: maxabs
  smooth: 0.0
  checkpoint: null
  backbone: null
  backbone_options: {}
  seed: null
  training: {}
  batch_size: 64
  eval_images: 20
  faith_images: 256
  maps_dir: null
impactx: {lam: 0.5, maps: teacher, lep_backbone: null, m_init: fresh, m_frozen: false,
  decoder_width: 32, decoder_scale: 2, classifier_hidden: 0, map_size: null, self_teach_every: 0,
  self_teach_method: teacher, decoder: paper, per_class: false, additive_reference: 0.0,
  map_loss: mse, map_target_pool: 1, decoder_reads_m: false, faith_weight: 0.0, faith_patch: 4,
  faith_samples: 2}
method:
  name: impactx
  options: {}
"""

#: overrides -> (run-directory config hash, study unit key), as the teachx before the move computed them
PINNED = {
    (*TINY, "impactx.lam=0.5", "impactx.decoder=paper"): ("03ead8bd1e92c658", "x-90063159a38d635e"),
    ("method.name=rrr",): ("402cccb46e2051c0", "m-296bf49ccdbace51"),
    (
        "method.name=impactx_cleaned",
        "method.options.concept=c.json",
        "impactx.lam=2",
        "impactx.decoder=unet",
    ): ("4fde5d6dc435e8e4", "m-a250a3aa84529650"),
    ("impactx.decoder=additive", "impactx.map_loss=rank", "impactx.self_teach_every=2"): (
        "367b74d235c72720",
        "x-2d75c9bd1c785d8b",
    ),
}


def _respelt(overrides: tuple[str, ...]) -> list[str]:
    return [o.replace("impactx.", "method.options.", 1) if o.startswith("impactx.") else o for o in overrides]


def _hash(cfg) -> str:
    return config_hash({"command": "run", **cfg.to_dict()})


@pytest.mark.parametrize("overrides", list(PINNED))
def test_both_spellings_resolve_alike_and_keep_the_keys_and_hashes_of_before(overrides):
    """impactx.KEY and method.options.KEY give the same typed options, the same written config, and the unit key
    and run-directory hash that the same settings had before IMPACTX's options moved to method.options."""
    old, new = resolve_config(None, list(overrides)), resolve_config(None, _respelt(overrides))
    assert impactx_options(old) == impactx_options(new) and isinstance(impactx_options(new), ImpactxOptions)
    assert old.to_dict() == new.to_dict() and "impactx" not in new.to_dict()
    assert (_hash(old), unit_key(old)) == (_hash(new), unit_key(new)) == PINNED[overrides]


def test_a_yaml_file_may_use_either_spelling(tmp_path):
    section, options = tmp_path / "section.yaml", tmp_path / "options.yaml"
    section.write_text("impactx:\n  lam: 0.5\n  decoder: paper\n  maps: shuffled\n")
    options.write_text("method:\n  name: impactx\n  options: {lam: 0.5, decoder: paper, maps: shuffled}\n")
    a, b = resolve_config(str(section)), resolve_config(str(options))
    assert a.to_dict() == b.to_dict() and unit_key(a) == unit_key(b)
    ic = impactx_options(a)
    assert (ic.lam, ic.decoder, ic.maps, ic.per_class, ic.map_loss) == (0.5, "paper", "shuffled", False, "mse")
    assert tuple(a.method.options) == OPTION_NAMES  # every option stated, as teachx writes it


def test_written_config_reads_back_and_later_layers_replace_either_spelling(tmp_path):
    """A config.yaml of this teachx (method.options) takes impactx.KEY on the command line as a replacement, not a
    second value; choosing another method leaves IMPACTX's default options behind, as the impactx: section did."""
    written = tmp_path / "config.yaml"
    written.write_text(dump_yaml(resolve_config(None, ["impactx.decoder=paper"]).to_dict()))
    again = resolve_config(str(written), ["impactx.lam=0"])
    assert impactx_options(again).lam == 0 and impactx_options(again).decoder == "paper"
    old = tmp_path / "old.yaml"
    old.write_text("\n".join(ln for ln in OLD_CONFIG_YAML.splitlines() if not ln.startswith("command")))
    assert impactx_options(resolve_config(str(old), ["method.options.lam=2"])).lam == 2.0
    default = tmp_path / "default.yaml"
    default.write_text(dump_yaml(resolve_config(None, []).to_dict()))
    rrr = resolve_config(str(default), ["method.name=rrr", "method.options.lam=10"])
    assert rrr.method.options == {"lam": 10}
    with pytest.raises(ConfigError, match=r"impactx\.decoder_width is an option of method impactx, not of 'rrr'"):
        resolve_config(str(written), ["method.name=rrr"])  # the paper decoder would be ignored


@pytest.mark.parametrize(
    "where",
    [
        "cli",
        "file",
        "arm",
    ],
)
def test_two_spellings_of_one_option_with_two_values_are_one_line_errors(tmp_path, where):
    text = "impactx.lam and method.options.lam are the same option of method impactx"
    with pytest.raises(ConfigError) as err:
        if where == "cli":
            resolve_config(None, ["impactx.lam=1", "method.options.lam=2"])
        elif where == "file":
            path = tmp_path / "both.yaml"
            path.write_text("impactx: {lam: 1}\nmethod: {options: {lam: 2}}\n")
            resolve_config(str(path))
        else:
            path = tmp_path / "study.yaml"
            path.write_text("study:\n  arms: {a: {impactx.lam: 0, method.options.lam: 1}}\n")
            planned_units(load_study(str(path)))
    assert text in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_two_spellings_in_one_line_with_exit_2(capsys):
    code, out, err = teachx_main(capsys, "config", "impactx.lam=1", "method.options.lam=2")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and out == ""
    assert lines[0].startswith("teachx: error: ") and "same option of method impactx" in lines[0]


def test_a_study_keeps_its_keys_whichever_spelling_its_base_and_arms_use(tmp_path):
    """The keys (pinned: those of the teachx before the move) of a study whose base states IMPACTX's options and
    whose arms change them or choose another method, written in either spelling."""

    def keys(base: str, arm: str) -> list[str]:
        path = tmp_path / "study.yaml"
        path.write_text(
            f"data: {{name: bundled, train_size: 100}}\n{base}\nstudy:\n  seeds: [0]\n  arms: {{paper: {{{arm}decoder: "
            f"paper}}, lambda0: {{{arm}lam: 0, {arm}decoder: paper}}, rrr: {{method.name: rrr}}}}\n"
        )
        return [u.key for u in planned_units(load_study(str(path)))]

    pinned = ["c-93413468c53c3818", "x-a0b41d51951bdbdd", "x-12ee52c62e4a6798", "m-642dcb4603783dfe"]
    assert keys("impactx: {lam: 1.0, maps: teacher}", "impactx.") == pinned
    assert keys("method: {options: {lam: 1.0, maps: teacher}}", "method.options.") == pinned
    assert keys("impactx: {lam: 1.0, maps: teacher}", "method.options.") == pinned
    assert keys("method: {options: {lam: 1.0, maps: teacher}}", "impactx.") == pinned


def test_an_old_run_directory_is_resumed_with_its_hash(tmp_path):
    """The config.yaml of a run made before the move (its impactx: section) reads, hashes as it did (its stage
    records carry that hash) and is the same run as the same settings now: resumed, not refused."""
    old = yaml.safe_load(OLD_CONFIG_YAML)
    cfg = resolve_config(None, [*TINY, "method.options.lam=0.5", "method.options.decoder=paper"])
    saved = {"command": "run", **cfg.to_dict()}
    assert config_hash(old) == config_hash(saved) == PINNED[(*TINY, "impactx.lam=0.5", "impactx.decoder=paper")][0]
    for marked in (True, False):  # made by a teachx that marks its run directories, or an older one
        run = tmp_path / f"run-{marked}"
        run.mkdir()
        (run / "config.yaml").write_text(OLD_CONFIG_YAML)
        if marked:
            (run / RUN_MARKER).write_text("{}")
        assert run_dir_kind(run) == "teachx"
        assert prepare_run_dir(run, saved) == run and (run / "config.yaml").read_text() == OLD_CONFIG_YAML


def test_teachx_methods_impactx_lists_its_options_with_their_meaning(capsys):
    code, out, err = teachx_main(capsys, "methods", "impactx")
    assert code == 0, err
    assert "\nimpactx: " in out and "\nabn" not in out and "\nimpactx_cleaned" not in out
    for key in OPTION_NAMES:
        assert f"\n    {key} = " in out, key
    assert "lam = 1.0  # weight of the explanation loss" in out
    code, _, err = teachx_main(capsys, "methods", "impactxx")
    assert code == 2 and "did you mean 'impactx'" in err and len(err.strip().splitlines()) == 1


def test_describe_states_each_method_option_with_its_meaning(capsys):
    code, text, err = teachx_main(capsys, "config", "--describe", "impactx.lam=0.5")
    assert code == 0, err
    block = text.split("\nmethod:\n", 1)[1]
    assert block.startswith("  name: impactx") and "\n  options:" in block
    assert any(ln.startswith("    lam: 0.5") and "# weight of the explanation loss" in ln for ln in block.splitlines())
    assert "\nimpactx:" not in text


def test_a_saved_config_is_read_either_way_where_it_is_read_as_a_dict():
    """What reads a saved config.yaml as a plain dict (the service's model names, per-class maps) reads both."""
    from teachx.training.methods import recorded_config_method, saved_impactx_options

    old = yaml.safe_load(OLD_CONFIG_YAML)
    new = resolve_config(None, ["method.options.lam=0.5", "method.options.decoder=paper"]).to_dict()
    for config in (old, new):
        assert saved_impactx_options(config)["lam"] == 0.5
        assert recorded_config_method(config).model_label(config) == "IMPACTX (lambda=0.5)"
        assert recorded_config_method(config).per_class_maps(config) is False


@pytest.mark.slow
def test_a_run_whose_config_yaml_is_of_before_the_move_resumes_every_stage(tmp_path):
    """A run directory whose config.yaml has the impactx: section (the file the teachx before the move wrote for
    these settings) is resumed by the same command in either spelling: every stage skipped, nothing refused."""
    env = {"TEACHX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    first = run_teachx("run", "--out", run, "-q", *TINY, "impactx.lam=0.5", "impactx.decoder=paper", env=env)
    assert first.returncode == 0, first.stderr
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert "impactx" not in written and written["method"]["options"]["lam"] == 0.5
    (run / "config.yaml").write_text(OLD_CONFIG_YAML)  # as the teachx before the move left it
    for spelling in (
        ["impactx.lam=0.5", "impactx.decoder=paper"],
        ["method.options.lam=0.5", "method.options.decoder=paper"],
    ):
        again = run_teachx("run", "--out", run, "-q", *TINY, *spelling, env=env)
        assert again.returncode == 0 and again.stdout.count("complete, skipped") == 2, (again.stdout, again.stderr)
    assert (run / "config.yaml").read_text() == OLD_CONFIG_YAML
    clash = run_teachx("run", "--out", run, "-q", *TINY, "method.options.lam=0.7", "impactx.decoder=paper", env=env)
    assert clash.returncode == 2 and "method.options.lam: 0.5 there, 0.7 now" in clash.stderr, clash.stderr
