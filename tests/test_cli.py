"""The command line as a user meets it: help, bad input (one line, exit 2, nothing written), a full run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_teachx, teachx_main


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("teachx: error:"), err
    for f in fragments:
        assert f in err, (f, err)


def _here(capsys: pytest.CaptureFixture, *args) -> subprocess.CompletedProcess:
    """`teachx ARGS` in this process (``teachx_main``), shaped as ``run_teachx`` returns it."""
    return subprocess.CompletedProcess(list(args), *teachx_main(capsys, *args))


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory) -> Path:
    """A tiny class-per-folder dataset (zip with train/ and test/): bright quadrant = class."""
    import zipfile

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    zpath = root / "tiny.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, n in (("train", 40), ("test", 12)):
            for c, name in enumerate(["tl", "tr", "bl", "br"]):
                for i in range(n):
                    a = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
                    r, q = divmod(c, 2)
                    a[r * 16 : r * 16 + 16, q * 16 : q * 16 + 16] += 160
                    p = root / f"{split}_{name}_{i}.png"
                    Image.fromarray(a).save(p)
                    zf.write(p, f"{split}/{name}/{i}.png")
    return zpath


def test_help_lists_commands_and_examples():
    res = run_teachx("--help")
    assert res.returncode == 0
    for cmd in ("demo", "run", "train", "explain", "datasets", "config"):
        assert cmd in res.stdout
    assert "Examples:" in res.stdout


@pytest.mark.slow
def test_datasets_command():
    res = run_teachx("datasets")
    assert res.returncode == 0 and "bundled" in res.stdout and "present" in res.stdout and "cifar10" in res.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("train", "--out", "{tmp}/r", "data.name=cifar1O"), ("unknown dataset", "cifar10")),
        (("train", "--out", "{tmp}/r", "model.backbone=lenett"), ("unknown backbone", "lenet5")),
        (
            ("train", "--out", "{tmp}/r", "train.epoch=2"),
            ("unknown option 'train.epoch'", "did you mean 'train.epochs'"),
        ),
        (("train", "--out", "{tmp}/r", "train.epochs"), ("'train.epochs' has no value; write train.epochs=VALUE",)),
        (
            ("run", "demo", "train.epochs", "--out", "{tmp}/r"),
            ("'train.epochs' has no value; write train.epochs=VALUE",),
        ),
        (("train", "--out", "{tmp}/r", "train.optimizer=rmsprop"), ("train.optimizer",)),
        (("train", "--out", "{tmp}/r", "teacher.method=shapp"), ()),
        (("run", "{tmp}/missing.yaml", "--out", "{tmp}/r"), ("not found",)),
        (("train", "--out", "{tmp}/r", "--bogus"), ("--bogus",)),
        (("train", "--out", "{tmp}/r", "data.name=imagefolder:{tmp}/nowhere"), ("nowhere",)),
        (("explain", "{tmp}/none.safetensors", "x.png", "--out", "{tmp}/e"), ("does not exist",)),
        (("frobnicate",), ("frobnicate",)),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, fragments):
    # in this process (a `teachx` subprocess costs seconds of start-up each); the test below runs one in a real one
    assert_one_line_error(_here(capsys, *[a.format(tmp=tmp_path) for a in args]), *fragments)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_bad_input_in_a_real_process_is_one_line_exit_2_nothing_written(tmp_path):
    """The same as a user's shell meets it: exit status 2 and one line on stderr from `python -m teachx`."""
    res = run_teachx("train", "--out", tmp_path / "r", "data.name=cifar1O")
    assert_one_line_error(res, "unknown dataset", "cifar10")
    assert res.stdout == "" and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_explain_resume_and_no_overwrite(tmp_path, image_zip, capsys, monkeypatch):
    cache = tmp_path / "cache"
    env = {"TEACHX_CACHE": str(cache)}
    common = [
        f"data.name=imagefolder:{image_zip}",
        "model.backbone=lenet5",
        "train.epochs=2",
        "train.batch_size=32",
        "teacher.background_size=8",
        "teacher.batch_size=32",
        "teacher.faith_images=8",  # the evaluation's faithfulness block (DeepSHAP on every test image: most of a run)
        "data.hflip=false",
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.003\n")
    out = tmp_path / "run"
    res = run_teachx("run", cfg, "--out", out, "-q", *common, env=env)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("dataset", "backbone", "teacher", "baseline_test_acc", "impactx_test_acc", "epochs", "wall_seconds"):
        assert key in results
    assert results["epochs"] == 2 and results["teacher"] == "deepshap"
    assert (out / "figures" / "examples.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().count("lr: 0.003") >= 1
    # same command again: every stage is skipped
    again = run_teachx("run", cfg, "--out", out, "-q", *common, env=env)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 2, again.stdout
    assert "maps for" not in again.stdout  # stored maps reused
    # a different config into the same directory is refused, and nothing is changed
    before = (out / "results.json").read_bytes()
    # the refusals below run in this process (a subprocess starts torch each): run and explain ran in real ones
    monkeypatch.setenv("TEACHX_CACHE", str(cache))
    clash = _here(capsys, "run", cfg, "--out", out, "-q", *common, "impactx.lam=0.5")
    assert_one_line_error(clash, "different config", "--overwrite")
    assert (out / "results.json").read_bytes() == before
    # explain arbitrary images (one of another size: resized with a notice)
    img = tmp_path / "big.png"
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(img)
    ck = out / "impactx" / "checkpoints" / "best.safetensors"
    ex = run_teachx("explain", ck, img, "--out", tmp_path / "maps")
    assert ex.returncode == 0, ex.stderr
    assert "resized" in ex.stdout and (tmp_path / "maps" / "big_impactx.png").exists()
    # a baseline checkpoint is not an IMPACTX model; a text file is not an image
    bad = _here(capsys, "explain", out / "baseline" / "checkpoints" / "best.safetensors", img, "--out", tmp_path / "m2")
    assert_one_line_error(bad, "not an IMPACTX or ABN model")
    txt = tmp_path / "notes.png"
    txt.write_text("hello")
    bad2 = _here(capsys, "explain", ck, txt, "--out", tmp_path / "m3")
    assert_one_line_error(bad2, "not a readable image")
    assert not (tmp_path / "m3").exists()
    # a corrupted checkpoint
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(ck.read_bytes()[:100])
    assert_one_line_error(_here(capsys, "explain", broken, img, "--out", tmp_path / "m4"), "corrupted")
