"""Config resolution: defaults <- YAML <- overrides, strict keys, one-line errors."""

from __future__ import annotations

import pytest

from teachx.errors import ConfigError
from teachx.config.schema import RunConfig
from teachx.runs.resolve import resolve_config
from teachx.config.loader import dump_yaml, from_dict, to_dict
from teachx.training.methods import ImpactxOptions, impactx_options


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ntrain:\n  epochs: 7\n  lr: 0.01\nmodel:\n  backbone: mobilenet\n")
    cfg = resolve_config(str(p), ["train.epochs=2", "teacher.method=lrp", "impactx.lam=0.5", "data.hflip=false"])
    assert cfg.seed == 3 and cfg.train.epochs == 2 and cfg.train.lr == 0.01
    assert cfg.model.backbone == "mobilenet" and cfg.teacher.method == "lrp"
    assert impactx_options(cfg).lam == 0.5 and cfg.data.hflip is False
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched default


def test_round_trip_through_yaml(tmp_path):
    cfg = resolve_config(None, ["train.milestones=[3, 6]", "train.schedule=multistep", "model.options={alpha: 0.5}"])
    p = tmp_path / "r.yaml"
    p.write_text(dump_yaml(cfg.to_dict()))
    again = resolve_config(str(p))
    assert to_dict(again) == to_dict(cfg)
    assert again.train.milestones == [3, 6] and again.model.options == {"alpha": 0.5}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.optimizer=adamx", "'adam'"),
        ("train.epochs=abc", "expected an integer"),
        ("train.epochs=0", "must be >= 1"),
        ("impactx.lam=-1", "must be >= 0"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("train.schedule=multistep", "milestones"),
        ("impactx.m_frozen=true", "m_init=teacher"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_options_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as exc:
        resolve_config(None, [override])
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.epoch=3",
            "unknown option 'train.epoch' (did you mean 'train.epochs'?); valid options in 'train': epochs,",
        ),
        ("seeed=1", "unknown option 'seeed' (did you mean 'seed'?); valid top-level keys: seed, device, data,"),
        ("data.nme=x", "unknown option 'data.nme' (did you mean 'data.name'?); valid options in 'data': name,"),
        ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
        ("method.options.lamm=1", "method.options.lamm"),
    ],
)
def test_errors_name_keys_as_the_user_types_them(override, message):
    """A key is named as it is written on the command line or in the YAML file (train.epoch), never with an
    internal prefix (config.train.epoch), in every section and in the suggestion."""
    with pytest.raises(ConfigError) as exc:
        resolve_config(None, [override, "method.name=rrr"] if override.startswith("method.") else [override])
    assert message in str(exc.value) and "config." not in str(exc.value)


def test_study_unit_errors_name_keys_as_typed(tmp_path):
    from teachx.studies.spec import load_study

    p = tmp_path / "s.yaml"
    p.write_text("study:\n  arms: {a: {train.epoch: 3}}\n")
    with pytest.raises(
        ConfigError,
        match=r"study arm 'a', regime 'all': unknown option 'train\.epoch' \(did you mean 'train\.epochs'\?\)",
    ):
        load_study(str(p))
    with pytest.raises(
        ConfigError,
        match=r"unknown option 'study\.n_seed' \(did you mean 'study\.n_seeds'\?\); valid options in 'study'",
    ):
        load_study(str(p), ["study.n_seed=2"])
    with pytest.raises(
        ConfigError, match=r"unknown option 'study\.eval\.step' \(did you mean 'study\.eval\.steps'\?\)"
    ):
        load_study(str(p), ["study.arms={a: {}}", "study.eval.step=2"])


@pytest.mark.parametrize("args", [["train.epochs"], ["demo", "train.epochs"], ["seed"], ["study.n_seeds"]])
def test_a_key_without_value_says_the_value_is_missing(tmp_path, monkeypatch, args):
    """`teachx config train.epochs` (=VALUE forgotten) is not an unknown config file: the value is missing."""
    from teachx.cli.main import _split_args

    monkeypatch.chdir(tmp_path)
    key = args[-1]
    with pytest.raises(ConfigError) as exc:
        path, overrides = _split_args(tuple(args))
        resolve_config(path, overrides)
    assert str(exc.value) == f"'{key}' has no value; write {key}=VALUE (no spaces around '=')"


def test_a_study_section_is_not_a_run_config():
    with pytest.raises(ConfigError, match="belongs to `teachx study` configs"):
        resolve_config("paper-cifar10-lenet5")


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(str(tmp_path / "list.yaml"))


def test_from_dict_types():
    from teachx.config.train import TrainConfig

    cfg = from_dict(TrainConfig, {"epochs": 3.0, "lr": 1, "grad_clip": None})
    assert cfg.epochs == 3 and isinstance(cfg.lr, float) and cfg.grad_clip is None
    with pytest.raises(ConfigError, match="true or false"):
        from_dict(TrainConfig, {"amp": "yes"})


# -- the shipped configs: what a user starts from, and how `teachx config --list` describes them --------


def test_shipped_run_configs_use_the_default_design_and_paper_configs_say_so():
    """A run config a user starts from trains the default built-in-map design; a config that pins the paper's
    decoder anywhere (its base or an arm) says "paper" in its name or its description."""
    import re

    from teachx.config.shipped import header, is_study, shipped_configs

    default = ImpactxOptions().decoder
    for name, path in shipped_configs().items():
        text = path.read_text()
        if not is_study(path) and not name.startswith("paper-"):
            assert impactx_options(resolve_config(str(path), [])).decoder == default, name
        if re.search(r"decoder\s*[:=]\s*paper", text):
            assert name.startswith("paper-") or "paper" in header(path), name


def test_shipped_descriptions_are_whole_sentences_that_list_wraps_rather_than_cuts():
    import re

    from teachx.cli.describe import list_shipped
    from teachx.config.shipped import header, shipped_configs

    configs = shipped_configs()
    for name, path in configs.items():
        text = header(path)
        assert text[:1].isupper() or text.startswith("`"), (name, text)
        assert text.endswith((".", "?")), (name, text)  # a whole sentence, not cut off
        assert text.count("(") == text.count(")"), (name, text)
        assert not re.search(r"#\d|\bissues?\b|2-core|pilot's best", text, re.I), (name, text)
    listing = list_shipped(columns=100).splitlines()
    assert all(len(line) <= 100 for line in listing), max(listing, key=len)
    for name, path in configs.items():  # each description appears whole, wrapped onto the lines below its name
        start = next(i for i, ln in enumerate(listing) if ln.split()[:1] == [name])
        words = listing[start].split()[2:]
        for line in listing[start + 1 :]:
            if not line.startswith(" " * 10):
                break
            words += line.split()
        assert " ".join(words) == " ".join(header(path).split()), name
