"""The path a pip-installed user walks (issue 11, items 13-15 and 17).

Shipped example configs usable by name, `teachx run` from defaults, every option described
(`teachx config --describe`, `teachx teachers`, `teachx models`), `explain RUN_DIR`, complete
`--help` summaries, and `teachx cache list|clean`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import run_teachx, teachx_main
from test_cli import assert_one_line_error

SHIPPED = (
    "cifar10-lenet5",
    "cifar10-lenet5-baseline",
    "cifar10-bcos-lenet5",
    "study-cifar10-lenet5",
    "study-decoy-fashion-mnist",
    "demo",
)
TINY = [
    "data.train_size=200",
    "train.epochs=1",
    "train.batch_size=64",
    "teacher.background_size=4",
    "teacher.eval_images=20",
    "teacher.faith_images=8",  # the evaluation's faithfulness block on 8 of them (on all 20 it takes most of the run)
    "teacher.batch_size=64",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """`teachx run` with no CONFIG at all: defaults (bundled data, LeNet-5, DeepSHAP) + KEY=VALUE."""
    root = tmp_path_factory.mktemp("tiny")
    env = {"TEACHX_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    res = run_teachx("run", "--out", root / "run", "-q", *TINY, env=env)
    return {"root": root, "run": root / "run", "cache": root / "cache", "env": env, "res": res}


# ------------------------------------------------------------------ 13: shipped configs, run from defaults


@pytest.mark.slow
def test_run_needs_no_config(tiny_run):
    res = tiny_run["res"]
    assert res.returncode == 0, res.stderr
    assert (tiny_run["run"] / "impactx" / "checkpoints" / "best.safetensors").exists()
    assert "data.train_size" not in res.stderr


def test_config_list_shows_every_shipped_config_with_its_header(tmp_path):
    res = run_teachx("config", "--list", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name in SHIPPED:
        row = next((ln for ln in lines if ln.split() and ln.split()[0] == name), None)
        assert row is not None, (name, res.stdout)
        assert len(row.split()) > 2, row  # the one-line header follows the name
    assert any("IMPACTX on CIFAR-10" in ln for ln in lines)


# the `teachx config` and `teachx study` tests below run the command in this process (a subprocess costs seconds of
# start-up each); test_config_list_shows_every_shipped_config_with_its_header and tests/test_study.py run real ones


@pytest.mark.parametrize("name", ["cifar10-lenet5", "cifar10-lenet5.yaml"])
def test_shipped_config_usable_by_name_anywhere(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # tmp_path: no configs/ folder here
    out = _config_main(capsys, name, "train.epochs=3")
    assert "imagefolder:../shared/data/cifar10-jpg.zip" in out and "epochs: 3" in out


def test_a_local_file_wins_over_a_shipped_name(tmp_path, capsys, monkeypatch):
    (tmp_path / "demo.yaml").write_text("train:\n  epochs: 7\n")
    monkeypatch.chdir(tmp_path)
    assert "epochs: 7" in _config_main(capsys, "demo.yaml")


@pytest.mark.parametrize("cmd", [("config",), ("run", "--out", "{tmp}/r"), ("study", "--out", "{tmp}/s")])
def test_unknown_config_name_lists_the_shipped_ones(tmp_path, capsys, monkeypatch, cmd):
    args = [cmd[0], "cifar10-lenet"] + [a.format(tmp=tmp_path) for a in cmd[1:]]
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(_completed(args, *teachx_main(capsys, *args)), "cifar10-lenet", *SHIPPED)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_study_accepts_a_shipped_study_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = teachx_main(capsys, "study", "study-cifar10-lenet5", "--out", tmp_path / "s", "--dry-run")
    assert code == 0, err
    assert "units" in out and "gradcam" in out


def test_repo_has_one_copy_of_the_example_configs():
    repo = Path(__file__).resolve().parents[1]
    assert not list((repo / "configs").glob("*.yaml")), "example configs live in teachx/configs/ only"
    readme = (repo / "README.md").read_text()
    assert "configs/" not in readme.replace("teachx/configs/", ""), "README commands must use shipped config names"


# ------------------------------------------------------------------ 14: every option has a description


def _sections():
    from teachx.config.schema import RunConfig
    from teachx.studies.spec import EvalSpec

    out = {"": RunConfig, "study.eval": EvalSpec}
    for f in dataclasses.fields(RunConfig):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = f.default_factory
    return out


def test_every_config_option_has_a_description():
    """A new option without a `# description` (or field(metadata={'help': ...})) fails here."""
    from teachx.utils.docs import option_docs

    missing = []
    for section, cls in _sections().items():
        docs = option_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if isinstance(f.default_factory, type) else None):
                continue  # a section, described by its own fields
            if not docs.get(f.name, "").strip():
                missing.append(f"{section + '.' if section else ''}{f.name}")
    assert not missing, f"options without a description: {missing}"


def test_every_study_key_has_a_description():
    from teachx.studies.spec import STUDY_KEYS

    assert {"seeds", "n_seeds", "arms", "regimes", "control", "eval", "alpha", "arm_regimes"} <= set(STUDY_KEYS)
    assert all(isinstance(v, str) and v.strip() for v in STUDY_KEYS.values())


def test_config_describe_shows_every_option_with_its_meaning(capsys):
    out = _config_main(capsys, "--describe")
    assert re.search(r"^\s+lam: 1\.0\s+# weight of the explanation loss", out, re.M), out
    assert re.search(r"^\s+val_fraction: 0\.1\s+# ", out, re.M)
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            if section == "study.eval":
                assert re.search(rf"^#\s+{f.name}: .*\S", out, re.M), f.name
            elif not dataclasses.is_dataclass(f.default_factory if isinstance(f.default_factory, type) else None):
                line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{f.name}:")), "")
                assert "#" in line and line.split("#", 1)[1].strip(), (section, f.name, line)
    assert "arm_regimes" in out  # study keys are described too


def test_config_describe_output_is_a_valid_config(tmp_path, capsys):
    described = tmp_path / "described.yaml"
    described.write_text(_config_main(capsys, "--describe", "train.epochs=3"))
    assert _config_main(capsys, described) == _config_main(capsys, "train.epochs=3")


def _config_main(capsys, *args: Any) -> str:
    """`teachx config ARGS` in this process (one subprocess per shipped config would be slow): its stdout."""
    code, out, err = teachx_main(capsys, "config", *args)
    assert code == 0, err
    return out


def _completed(args: Sequence[Any], code: Any, out: str, err: str) -> subprocess.CompletedProcess:
    """``teachx_main``'s result in the shape ``run_teachx`` returns, for ``assert_one_line_error``."""
    return subprocess.CompletedProcess(list(args), code, out, err)


def _teachx_here(capsys, *args: Any) -> subprocess.CompletedProcess:
    """`teachx ARGS` in this process, as ``run_teachx`` returns it: the explain tests below but
    test_explain_accepts_a_run_dir (a real process) run it so, sparing a start-up of torch and shap each."""
    return _completed(args, *teachx_main(capsys, *args))


def test_config_prints_every_shipped_config(tmp_path, capsys, monkeypatch):
    """Every config `teachx config --list` lists prints, a study one with its resolved study: section, and the
    printed file (plain or --describe) reads back as the same config."""
    import yaml

    from teachx.config.shipped import is_study, shipped_configs

    monkeypatch.chdir(tmp_path)
    table = _config_main(capsys, "--list").split("\n\n")[0].splitlines()[1:]  # the rows up to the examples
    listed = [ln.split()[0] for ln in table if not ln.startswith("   ")]  # wrapped descriptions go on indented lines
    assert sorted(listed) == sorted(shipped_configs())
    for name in listed:
        out = _config_main(capsys, name)
        data = yaml.safe_load(out)
        assert {"data", "model", "train", "teacher", "method"} <= set(data) and "impactx" not in data, name
        if is_study(shipped_configs()[name]):
            assert set(data["study"]) == {
                "seeds",
                "arms",
                "regimes",
                "control",
                "controls",
                "eval",
                "alpha",
                "arm_regimes",
                "launcher",
                "ceiling",
                "revise",
            }, name
            assert data["study"]["launcher"]["cluster"] == "auto", name  # where --launcher submitit runs workers
            assert set(data["study"]["eval"]) == {
                "faithfulness",
                "n_images",
                "steps",
                "patch_size",
                "examples",
                "reveal",
            }, name
        else:
            assert "study" not in data, name
        (tmp_path / "printed.yaml").write_text(out)
        assert _config_main(capsys, tmp_path / "printed.yaml") == out, name
        (tmp_path / "described.yaml").write_text(_config_main(capsys, "--describe", name))
        assert _config_main(capsys, tmp_path / "described.yaml") == out, name


def test_research_study_configs_live_in_studies_and_run_by_path(tmp_path, capsys, monkeypatch):
    """The package ships what users start from; this project's research studies are in the repository's
    studies/ folder, not shipped (no name shared with a shipped config), each listed in studies/README.md, and
    each runs by its path from the repository: `teachx config studies/NAME.yaml` prints its study: section and
    `teachx study studies/NAME.yaml --out DIR --dry-run` plans its units, writing nothing."""
    import yaml

    from teachx.config.shipped import is_study, shipped_configs

    repo = Path(__file__).resolve().parents[1]
    studies = sorted((repo / "studies").glob("*.yaml"))
    assert studies, "the research studies live in studies/"
    readme = (repo / "studies" / "README.md").read_text()
    shipped = shipped_configs()
    monkeypatch.chdir(repo)
    for path in studies:
        rel = f"studies/{path.name}"
        assert path.stem not in shipped, f"{path.stem} is both shipped and a research study"
        assert f"`{path.name}`" in readme, f"studies/README.md does not list {path.name}"
        assert is_study(path), rel
        data = yaml.safe_load(_config_main(capsys, rel))
        assert data["study"]["arms"] or data["study"].get("revise"), rel  # arms, or corrections of the baselines
        out = tmp_path / path.stem
        code, text, err = teachx_main(capsys, "study", rel, "--out", out, "--dry-run")
        assert code == 0 and re.match(r"\d+ units:", text), (rel, err or text)
        assert not out.exists(), rel
    # what users start from stays in the package
    for name in ("demo", "cifar10-lenet5", "study-cifar10-lenet5", "study-decoy-fashion-mnist", "paper-cifar10-lenet5"):
        assert name in shipped, name
    assert not [n for n in shipped if n.startswith("study-builtin-maps") or n.endswith("-cpu")]


@pytest.mark.parametrize("cmd", ["config", "study"])
def test_a_research_study_by_name_points_to_its_path(tmp_path, capsys, monkeypatch, cmd):
    """`teachx study study-builtin-maps-core` from a checkout's root (the name it shipped under before): one line
    that names the path to pass, exit 2, nothing made."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "studies").mkdir()
    shutil.copy(repo / "studies" / "study-builtin-maps-core.yaml", tmp_path / "studies")
    monkeypatch.chdir(tmp_path)
    args = ["study-builtin-maps-core"] + (["--out", str(tmp_path / "s"), "--dry-run"] if cmd == "study" else [])
    code, out, err = teachx_main(capsys, cmd, *args)
    assert code == 2 and not out and not (tmp_path / "s").exists(), (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teachx: error: "), err
    assert "not shipped" in err and "studies/study-builtin-maps-core.yaml" in err, err
    code, out, err = teachx_main(capsys, cmd, "studies/study-builtin-maps-core.yaml", *args[1:])
    assert code == 0, err


def test_config_prints_a_user_study_with_defaults_and_describes_its_keys(tmp_path, capsys, monkeypatch):
    from teachx.studies.spec import STUDY_KEYS

    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        "train:\n  epochs: 2\nstudy:\n  n_seeds: 3\n  arms:\n    impactx: {}\n    lambda0: {impactx.lam: 0}\n"
    )
    monkeypatch.chdir(tmp_path)
    printed = _config_main(capsys, cfg, "study.alpha=0.01", "train.lr=0.5")
    study = printed[printed.index("\nstudy:\n") :]
    for line in (
        "  seeds: [0, 1, 2]",
        "    impactx: {}",
        "    lambda0: {impactx.lam: 0}",
        "  regimes:\n    all: {}",
        "  control: lambda0",
        "  alpha: 0.01",
        "  arm_regimes: {}",
        "  eval: {faithfulness: false, n_images: 256,",
    ):
        assert line in study, (line, study)
    assert "epochs: 2" in printed and "lr: 0.5" in printed
    described = _config_main(capsys, "--describe", cfg)
    for key, meaning in STUDY_KEYS.items():
        if key != "n_seeds":  # resolved into seeds
            assert re.search(rf"^  {key}:.*# {re.escape(meaning)}$", described, re.M), key
    assert re.search(r"^    steps: 16\s+# pixel-flipping steps", described, re.M)
    bad = ("config", cfg, "study.alfa=0.1")
    assert_one_line_error(
        _completed(bad, *teachx_main(capsys, *bad)), "unknown option 'study.alfa' (did you mean 'study.alpha'?)"
    )


def test_every_teacher_and_backbone_option_is_described():
    from teachx.models import MODELS
    from teachx.teachers import TEACHERS
    from teachx.utils.docs import callable_options

    missing = []
    for registry in (TEACHERS, MODELS):
        for name in registry.names():
            for opt in callable_options(registry.get(name)):
                if not opt.help.strip():
                    missing.append(f"{name}.{opt.name}")
    assert not missing, f"options without a description: {missing}"


@pytest.mark.slow
def test_teachers_and_models_commands_show_options():
    t = run_teachx("teachers")
    assert t.returncode == 0, t.stderr
    assert re.search(r"composite\s*=\s*'?epsilon_plus_flat'?.*\S", t.stdout), t.stdout
    assert re.search(r"steps\s*=\s*32\s+\S", t.stdout), t.stdout
    assert "teacher.options." in t.stdout  # how to set them
    m = run_teachx("models")
    assert m.returncode == 0, m.stderr
    assert re.search(r"alpha\s*=\s*1\.0\s+.*width", m.stdout), m.stdout
    assert re.search(r"depth\s*=\s*20\s+\S", m.stdout), m.stdout
    assert "model.options." in m.stdout


# ------------------------------------------------------------------ 15: explain RUN_DIR; --help summaries


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 120, np.uint8)).save(img)
    return img


@pytest.mark.slow
def test_explain_accepts_a_run_dir(tiny_run, tmp_path):
    ex = run_teachx("explain", tiny_run["run"], _image(tmp_path), "--out", tmp_path / "maps")
    assert ex.returncode == 0, ex.stderr
    assert (tmp_path / "maps" / "x_impactx.png").exists()


@pytest.mark.slow
def test_explain_accepts_a_study_unit_dir(tiny_run, tmp_path, capsys):
    unit = tmp_path / "study" / "units" / "abc123"
    shutil.copytree(tiny_run["run"] / "impactx" / "checkpoints", unit / "checkpoints")
    (unit / "unit.json").write_text(json.dumps({"key": "abc123", "kind": "impactx", "config": {}}))
    ex = _teachx_here(capsys, "explain", unit, _image(tmp_path), "--out", tmp_path / "maps")
    assert ex.returncode == 0, ex.stderr
    assert (tmp_path / "maps" / "x_impactx.png").exists()


@pytest.mark.slow
def test_explain_run_dir_without_impactx_says_what_to_pass(tiny_run, tmp_path, capsys):
    trained = tmp_path / "trainonly"
    shutil.copytree(tiny_run["run"] / "baseline", trained / "baseline")
    shutil.copy(tiny_run["run"] / "config.yaml", trained / "config.yaml")
    res = _teachx_here(capsys, "explain", trained, _image(tmp_path), "--out", tmp_path / "maps")
    assert_one_line_error(res, "no IMPACTX", "teachx run")
    assert not (tmp_path / "maps").exists()
    classifier_unit = tmp_path / "units" / "k1"
    shutil.copytree(tiny_run["run"] / "baseline" / "checkpoints", classifier_unit / "checkpoints")
    (classifier_unit / "unit.json").write_text(json.dumps({"key": "k1", "kind": "classifier", "config": {}}))
    assert_one_line_error(
        _teachx_here(capsys, "explain", classifier_unit, _image(tmp_path), "--out", tmp_path / "maps"), "classifier"
    )


@pytest.mark.slow
def test_explain_again_replaces_its_own_output_and_keeps_foreign_files(tiny_run, tmp_path, capsys, monkeypatch):
    """A second `teachx explain` into the same folder replaces what the first wrote (no _1 copies, no stale
    faithfulness.json); files teachx did not write there, or changed since, are kept untouched."""
    monkeypatch.setenv("TEACHX_CACHE", str(tiny_run["cache"]))
    img = _image(tmp_path)
    out = tmp_path / "maps"
    first = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", out, "--faithfulness", "--steps", "4")
    assert first.returncode == 0, first.stderr
    assert {"x_impactx.png", "x_deepshap.png", "faithfulness.json", "trust.json"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    (out / "x_impactx_1.png").write_bytes(b"my own picture")  # a name teachx might pick: still not teachx's
    (out / "x_deepshap.png").write_bytes(b"edited by the user")  # written by teachx, changed since: now the user's
    again = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "replaced 3 file(s) an earlier `teachx explain` wrote" in again.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".teachx-explain.json",
        "notes.txt",
        "trust.json",
        "x_deepshap.png",
        "x_impactx.png",
        "x_impactx_1.png",
    ], names
    assert (out / "notes.txt").read_text() == "mine" and (out / "x_impactx_1.png").read_bytes() == b"my own picture"
    assert (out / "x_deepshap.png").read_bytes() == b"edited by the user"
    assert Image.open(out / "x_impactx.png").size[0] > 28  # the new overlay
    third = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", out)
    assert third.returncode == 0 and sorted(p.name for p in out.iterdir()) == names


@pytest.mark.slow
def test_explain_trust_threshold_and_method_options(tiny_run, tmp_path, capsys, monkeypatch):
    """--trust-threshold sets where images are flagged (every image's correlation is below 1), --trust-method lrp
    compares with LRP instead of gradient x input, and a threshold outside [-1, 1] is one line, nothing written."""
    monkeypatch.setenv("TEACHX_CACHE", str(tiny_run["cache"]))
    img = _image(tmp_path)
    res = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", tmp_path / "a", "--trust-threshold", "1")
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "a" / "trust.json").read_text())
    assert rec["threshold"] == 1.0 and rec["images"][0]["disagrees"] is True and rec["disagreeing"] == 1
    assert "DISAGREES (below 1)" in res.stdout and "1 of 1 image(s) have a built-in map that disagrees" in res.stdout
    res = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", tmp_path / "b", "--trust-method", "lrp")
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "b" / "trust.json").read_text())
    assert rec["method"] == "lrp" and "this model's LRP" in rec["measure"] and -1 <= rec["images"][0]["trust"] <= 1
    res = _teachx_here(capsys, "explain", tiny_run["run"], img, "--out", tmp_path / "c", "--trust-threshold", "2")
    assert_one_line_error(res, "--trust-threshold")
    assert not (tmp_path / "c").exists()


def _tiny_method_run(root: Path, *overrides: str) -> Path:
    """An in-process `teachx run` on the bundled data with TINY settings and ``overrides`` (no figures: the tests
    read its checkpoints)."""
    from teachx.runs.resolve import resolve_config
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.recovery import prepare_run_dir

    cfg = resolve_config(None, [*TINY, "train.threads=1", *overrides])
    run_pipeline(cfg, prepare_run_dir(root, cfg, "run"), log=lambda _m: None, progress=False, figures=False)
    return root


@pytest.mark.slow
def test_explain_abn_and_per_class_maps(tmp_path, capsys, monkeypatch):
    """`teachx explain` on an ABN run draws ABN's attention map, and on a per-class IMPACTX run the map of
    --class K (each the model's own forward_all map); --class on a model without per-class maps, or out of
    range, is one line and exit 2, with nothing written."""
    import torch

    from teachx.runs import explain as ex
    from teachx.runs import figures

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    drawn = []
    monkeypatch.setattr(
        figures,
        "save_overlay",
        lambda path, img, m, title="": drawn.append((Path(path), m.clone(), title)) or Path(path),
    )
    img = _image(tmp_path)
    x_u8 = torch.from_numpy(np.asarray(Image.open(img))[None, None].copy())

    abn_run = _tiny_method_run(tmp_path / "abn", "method.name=abn")
    lines = list(ex.explain_images(str(abn_run), [str(img)], str(tmp_path / "maps")))
    model, meta = ex.load_impactx(abn_run)
    assert type(model).__name__ == "ABN" and any(line.endswith("x_abn.png") for line in lines)
    from teachx.data.transforms import normalize

    with torch.no_grad():
        logits, expected = model.forward_all(normalize(x_u8, tuple(meta["mean"]), tuple(meta["std"])))
    assert torch.allclose(drawn[-1][1], expected[0])
    # ABN's trust value: its attention map vs its own gradient x input, computed here with autograd and numpy
    trust = json.loads((tmp_path / "maps" / "trust.json").read_text())
    x = normalize(x_u8, tuple(meta["mean"]), tuple(meta["std"])).requires_grad_(True)
    k = int(logits.argmax(1))
    (grad,) = torch.autograd.grad(model(x)[0, k], x)
    direct = np.corrcoef(expected[0].sum(0).flatten().numpy(), (grad * x).detach()[0].sum(0).flatten().numpy())[0, 1]
    row = trust["images"][0]
    assert trust["model"] == "abn" and row["explained_class"] == k and row["trust"] == pytest.approx(direct, abs=1e-5)
    assert row["disagrees"] == (direct < 0.0) and trust["threshold"] == 0.0

    pc_run = _tiny_method_run(
        tmp_path / "pc", "impactx.decoder=unet_input", "impactx.per_class=true", "impactx.map_loss=pearson"
    )
    model, meta = ex.load_impactx(pc_run)
    x = normalize(x_u8, tuple(meta["mean"]), tuple(meta["std"]))
    for k in (0, 3):
        lines = list(ex.explain_images(str(pc_run), [str(img)], str(tmp_path / "maps"), cls=k))
        with torch.no_grad():
            expected = model.explain(x, torch.tensor([k]))[0]
        assert torch.allclose(drawn[-1][1], expected, atol=1e-6) and any(
            line.endswith(f"x_impactx_class{k}.png") for line in lines
        )
        assert drawn[-1][2].endswith(f"map of {meta['class_names'][k]}")
    with torch.no_grad():
        assert not torch.allclose(model.explain(x, torch.tensor([0])), model.explain(x, torch.tensor([3])))

    monkeypatch.undo()  # the real figures again
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    res = _teachx_here(capsys, "explain", abn_run, img, "--out", tmp_path / "m2", "--class", "1")
    assert_one_line_error(res, "one built-in map shared by all classes", "drop --class")
    res = _teachx_here(capsys, "explain", pc_run, img, "--out", tmp_path / "m2", "--class", "10")
    assert_one_line_error(res, "--class 10", "10 classes")
    assert not (tmp_path / "m2").exists()


def _morf_reference(model, x, target, relevance, steps):
    """MoRF AUC of one image, written out: zero the ``floor(k * F / steps)`` most relevant pixels (every
    channel) for k = 0..steps, the softmax probability of ``target`` after each, trapezoid over [0, 1]."""
    import torch

    order = torch.argsort(relevance.flatten(), descending=True)
    n, scores = order.numel(), []
    for k in range(steps + 1):
        xk = x.clone().reshape(x.shape[0], -1)
        xk[:, order[: (k * n) // steps]] = 0.0
        with torch.no_grad():
            scores.append(float(model(xk.reshape(1, *x.shape)).double().softmax(1)[0, target]))
    return sum((scores[k] + scores[k + 1]) / 2 for k in range(steps)) / steps


@pytest.mark.slow
def test_explain_faithfulness_titles_each_panel_with_the_map_it_shows(tiny_run, tmp_path, monkeypatch):
    """`teachx explain --faithfulness` draws two overlays per image: the model's built-in map, titled so, and the
    teacher method applied post hoc, titled with the method's name, never "built-in map"."""
    from teachx.runs import explain as ex
    from teachx.runs import figures

    monkeypatch.setenv("TEACHX_CACHE", str(tiny_run["cache"]))
    titles: dict[str, str] = {}

    def keep(fig, path, dpi):
        titles[Path(path).name] = fig.axes[1].get_title()
        figures._plt().close(fig)
        return Path(path)

    monkeypatch.setattr(figures, "_save", keep)
    list(
        ex.explain_images(
            str(tiny_run["run"]), [str(_image(tmp_path))], str(tmp_path / "maps"), faithfulness=True, steps=4
        )
    )
    assert titles == {"x_impactx.png": "built-in map", "x_deepshap.png": "deepshap map (post hoc)"}


@pytest.mark.slow
def test_explain_faithfulness_scores_the_maps_on_the_model_itself(tiny_run, tmp_path, capsys, monkeypatch):
    """`teachx explain --faithfulness`: the run's teacher (DeepSHAP, background from the run's training data) applied
    post hoc to the IMPACTX model, an overlay of it, and per image MoRF AUCs equal to a pixel-flipping loop written out
    here, the built-in map's correlation with the post-hoc map, and the means, in faithfulness.json."""
    import torch

    from teachx.data.transforms import normalize
    from teachx.runs import explain as ex
    from teachx.runs.evaluation import post_hoc_maps
    from teachx.runs.plan import make_plan

    rng = np.random.default_rng(3)
    imgs = []
    for i in range(2):
        imgs.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(imgs[-1])
    out = tmp_path / "faith"
    res = run_teachx(
        "explain", tiny_run["run"], *imgs, "--out", out, "--faithfulness", "--steps", "8", env=tiny_run["env"]
    )
    assert res.returncode == 0, res.stderr
    rec = json.loads((out / "faithfulness.json").read_text())
    assert rec["teacher_method"] == "deepshap" and rec["explained"] == "predicted" and rec["steps"] == 8
    assert sorted(p.name for p in out.iterdir()) == [
        ".teachx-explain.json",
        "faithfulness.json",
        "im0_deepshap.png",
        "im0_impactx.png",
        "im1_deepshap.png",
        "im1_impactx.png",
        "trust.json",
    ]
    assert "MoRF AUC (lower = more faithful): built-in" in res.stdout and "mean over 2 image(s)" in res.stdout

    monkeypatch.setenv("TEACHX_CACHE", str(tiny_run["cache"]))
    model, meta = ex.load_impactx(tiny_run["run"])
    x = normalize(
        torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in imgs])[:, None].copy()),
        tuple(meta["mean"]),
        tuple(meta["std"]),
    )
    with torch.no_grad():
        logits, built_in = model.forward_all(x)
    pred = logits.argmax(1)
    cfg = ex.run_config_of(ex.find_impactx_checkpoint(tiny_run["run"]))
    post = post_hoc_maps(cfg, make_plan(cfg, progress=False), model, x, pred, torch.device("cpu"))
    for i, row in enumerate(rec["images"]):
        assert row["predicted"] == row["explained_class"] == int(pred[i])
        auc = row["auc"]["pixel_flipping_morf"]
        assert auc["built_in"] == pytest.approx(_morf_reference(model, x[i], int(pred[i]), built_in[i], 8), abs=1e-6)
        assert auc["teacher_post_hoc"] == pytest.approx(
            _morf_reference(model, x[i], int(pred[i]), post[i], 8), abs=1e-5
        )
        assert row["corr_self"] == pytest.approx(
            float(np.corrcoef(built_in[i].flatten(), post[i].flatten())[0, 1]), abs=1e-5
        )
    # the trust signal: the built-in map vs the model's own gradient x input, both channel-summed, per image
    trust = json.loads((out / "trust.json").read_text())
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, pred[:, None]).sum(), xg)
    gxi = (grad * x).sum(1)
    for i, (row, faith_row) in enumerate(zip(trust["images"], rec["images"])):
        direct = float(np.corrcoef(built_in[i].sum(0).flatten(), gxi[i].flatten())[0, 1])
        assert row["trust"] == pytest.approx(direct, abs=1e-5) and faith_row["trust"] == row["trust"]
        assert row["disagrees"] == (direct < 0.0) and row["explained_class"] == int(pred[i])
    assert trust["method"] == "gradient_x_input" and trust["disagreeing"] == sum(
        r["disagrees"] for r in trust["images"]
    )
    assert "built-in map vs this model's gradient × input (Pearson correlation, channels summed)" in res.stdout
    mean = rec["mean"]["auc"]["pixel_flipping_morf"]
    assert mean["built_in"] == pytest.approx(
        np.mean([r["auc"]["pixel_flipping_morf"]["built_in"] for r in rec["images"]])
    )
    assert set(mean) == {"built_in", "teacher_post_hoc", "random"}

    again = _teachx_here(capsys, "explain", tiny_run["run"], imgs[0], "--out", out, "--faithfulness")
    assert again.returncode == 0, again.stderr  # the earlier output is replaced, not copied next to it
    assert sorted(p.name for p in out.iterdir()) == [
        ".teachx-explain.json",
        "faithfulness.json",
        "im0_deepshap.png",
        "im0_impactx.png",
        "trust.json",
    ]
    assert len(json.loads((out / "faithfulness.json").read_text())["images"]) == 1
    alone = tmp_path / "alone.safetensors"  # a checkpoint outside its run: no teacher config, no background
    shutil.copy(tiny_run["run"] / "impactx" / "checkpoints" / "best.safetensors", alone)
    assert_one_line_error(
        _teachx_here(capsys, "explain", alone, imgs[0], "--out", tmp_path / "f2", "--faithfulness"),
        "--faithfulness needs the run",
        "study unit",
    )
    assert not (tmp_path / "f2").exists()
    too_many = _teachx_here(
        capsys, "explain", tiny_run["run"], imgs[0], "--out", tmp_path / "f3", "--faithfulness", "--steps", "5000"
    )
    assert_one_line_error(too_many, "steps=5000", "784")
    assert not (tmp_path / "f3").exists()


@pytest.mark.parametrize("columns", ["80", "60"])
def test_help_summaries_are_complete(columns):
    from teachx.cli.main import cli, command_summary

    res = run_teachx("--help", env={"COLUMNS": columns})
    assert res.returncode == 0, res.stderr
    listing = " ".join(res.stdout.split("Commands:")[1].split("Examples:")[0].split())
    summaries = {name: " ".join(command_summary(cmd).split()) for name, cmd in cli.commands.items()}
    for name, summary in summaries.items():
        assert summary and f"{name} {summary}" in listing, (name, summary, listing)
        assert len(summary) <= 90, (name, summary)  # a summary, not a paragraph
    # no '...' but the ones the summaries themselves hold (e.g. "[DIR ...]"): nothing was cut off
    assert listing.count("...") == sum(s.count("...") for s in summaries.values()), listing


# ------------------------------------------------------------------ 17: teachx cache list | clean


def _data_entry(cache: Path) -> Path:
    from teachx.data.cache import Decoded, cached_decode

    def decode():
        imgs = np.zeros((4, 8, 8, 1), np.uint8)
        return Decoded(imgs, np.arange(4) % 2, imgs[:2], np.arange(2), ["a", "b"])

    return Path(cached_decode("toyset", {"v": 1}, decode, cache_dir=cache).cache_path)


def test_cache_dirs_agree(monkeypatch, tmp_path):
    from teachx.utils.cache_admin import cache_root

    monkeypatch.delenv("TEACHX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "teachx" / "cache"
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and cache_root(tmp_path / "d") == tmp_path / "d"
    # the one root: decoded data (teachx.data.cache), teacher maps (the pipeline) and the service read it
    import teachx.data.cache as data_cache
    import teachx.runs.teacher as teacher
    import teachx.service.loading as service_loading

    assert data_cache.cache_root is teacher.cache_root is service_loading.cache_root is cache_root


@pytest.mark.slow
def test_cache_list_and_clean_only_what_teachx_made(tiny_run, tmp_path):
    from teachx.utils.locking import file_lock

    cache = tmp_path / "cache"
    shutil.copytree(tiny_run["cache"], cache)
    env = {"TEACHX_CACHE": str(cache)}
    data_entry = _data_entry(cache)
    stores = sorted(p for p in (cache / "maps").iterdir() if p.is_dir())
    assert len(stores) == 2
    # foreign things: a file, a folder, a folder with a meta.json teachx did not write
    (cache / "notes.txt").write_text("mine")
    (cache / "photos").mkdir()
    (cache / "photos" / "a.jpg").write_bytes(b"x" * 100)
    (cache / "maps" / "other").mkdir()
    (cache / "maps" / "other" / "meta.json").write_text('{"hello": 1}')

    ls = run_teachx("cache", "list", env=env)
    assert ls.returncode == 0, ls.stderr
    for s in stores:
        assert s.name in ls.stdout
    assert data_entry.name in ls.stdout and "toyset" in ls.stdout and "deepshap" in ls.stdout
    assert "total" in ls.stdout.lower()
    assert "photos" not in ls.stdout and "other" not in ls.stdout.split("total")[0]

    # nothing selected: an error saying what to select; a selection without --yes only shows
    assert_one_line_error(run_teachx("cache", "clean", env=env), "--all")
    dry = run_teachx("cache", "clean", "--all", env=env)
    assert dry.returncode == 0 and "--yes" in dry.stdout
    assert all(s.exists() for s in stores) and data_entry.exists()

    # --maps --yes, while another process holds the lock of one store: that one is kept
    locked, free = stores
    with file_lock(cache / "maps" / f"{locked.name}.lock", wait=False):
        res = run_teachx("cache", "clean", "--maps", "--yes", env=env)
    assert res.returncode == 0, res.stderr
    assert locked.exists() and (locked / "meta.json").exists() and not free.exists(), res.stdout
    assert "in use" in res.stdout and data_entry.exists()

    # a specific entry by (a prefix of) its key
    res = run_teachx("cache", "clean", data_entry.name[:12], "--yes", env=env)
    assert res.returncode == 0, res.stderr
    assert not data_entry.exists() and locked.exists()
    assert_one_line_error(run_teachx("cache", "clean", "zzzz", "--yes", env=env), "zzzz", "teachx cache list")

    # --all --yes: every teachx entry goes, foreign files stay
    res = run_teachx("cache", "clean", "--all", "--yes", env=env)
    assert res.returncode == 0, res.stderr
    assert not locked.exists()
    assert (cache / "notes.txt").read_text() == "mine" and (cache / "photos" / "a.jpg").exists()
    assert (cache / "maps" / "other" / "meta.json").exists()


def test_cache_clean_older_than(tmp_path):
    from teachx.utils.cache_admin import clean, scan, select

    old, new = _data_entry(tmp_path / "c"), None
    from teachx.data.cache import Decoded, cached_decode

    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    new = Path(
        cached_decode(
            "fresh",
            {"v": 2},
            lambda: Decoded(imgs, np.arange(2), imgs, np.arange(2), ["a", "b"]),
            cache_dir=tmp_path / "c",
        ).cache_path
    )
    past = time.time() - 40 * 86400
    for f in old.iterdir():
        os.utime(f, (past, past))
    entries = scan(tmp_path / "c")
    assert {e.path for e in entries} == {old, new}
    chosen = select(entries, older_than_days=30)
    assert [e.path for e in chosen] == [old]
    report = clean(chosen, dry_run=False)
    assert [r.entry.path for r in report if r.deleted] == [old]
    assert not old.exists() and new.exists()


# ------------------------------------------------------------------ output locations that cannot be made

UNDER_A_FILE = [
    ("train", "--out", "{f}/run", "train.epochs=1"),
    ("run", "--out", "{f}/a/b", "train.epochs=1"),
    ("demo", "--out", "{f}/run"),
    ("study", "study-cifar10-lenet5", "--out", "{f}/study"),
    ("report", "{run}", "--out", "{f}/report.html"),
    ("explain", "{run}", "{img}", "--out", "{f}/maps"),
    ("serve", "{run}", "--precompute", "--no-serve", "--cache-dir", "{f}/cache"),
    ("cache", "list", "--dir", "{f}/cache"),
    ("cache", "clean", "--all", "--yes", "--dir", "{f}/cache"),
]


@pytest.mark.parametrize("args", UNDER_A_FILE, ids=lambda a: "-".join(a[:2]))
@pytest.mark.slow
def test_an_output_location_under_a_file_is_one_line(tiny_run, tmp_path, args):
    """--out (or --cache-dir, --dir) below a regular file: one line naming the path and the file in the way,
    exit 2, no traceback, nothing made."""
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    img = _image(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_teachx(
        *[a.format(f=afile, run=tiny_run["run"], img=img) for a in args], cwd=tmp_path, env=tiny_run["env"]
    )
    assert_one_line_error(res, f"'{afile}' is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and afile.read_text() == "x\n"
