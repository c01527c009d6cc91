"""`teachx revise` on a tiny run with a planted artefact (tests/_reveal_fixtures.py): the concept `teachx reveal`
saved drives a post-hoc and a fine-tuning correction, measured before and after with numbers checked against
a second computation; bad input is one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from _reveal_fixtures import make_artefact_zip  # noqa: E402
from conftest import teachx_main  # noqa: E402

TRAIN = [
    "model.backbone=lenet5",
    "train.epochs=4",
    "train.batch_size=32",
    "train.lr=0.003",
    "data.hflip=false",
    "teacher.method=lrp",
]


@pytest.fixture(scope="module")
def revealed(tmp_path_factory):
    """A trained run on the planted-artefact data with the concept of class 0's top group saved as 'tag'."""
    from teachx.cli.main import main

    root = tmp_path_factory.mktemp("revise")
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(root / "cache"))
    try:
        z = make_artefact_zip(root / "art.zip")
        for argv in (
            ["train", "--out", str(root / "run"), "-q", f"data.name=imagefolder:{z}", *TRAIN],
            ["reveal", str(root / "run"), "--class", "0", "--concept", "top", "--name", "tag", "-q"],
        ):
            try:
                main(argv)
            except SystemExit as exc:  # pragma: no cover - a failed set-up fails every test here
                assert exc.code == 0
    finally:
        mp.undo()
    return root


@pytest.fixture
def run_copy(revealed, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TEACHX_CACHE", str(revealed / "cache"))
    dest = tmp_path / "run"
    shutil.copytree(revealed / "run", dest)
    return dest


def _one_line(code, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("teachx: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def _accuracy(model: torch.nn.Module, run: Path) -> float:
    """Test accuracy by a plain forward pass over the run's test split (a second computation)."""
    from teachx.data.transforms import normalize
    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir
    from teachx.runs.teacher import as_nchw

    plan = make_plan(_check_run_dir(run), progress=False)
    ds = plan.dataset
    with torch.no_grad():
        logits = model.eval()(normalize(as_nchw(ds.test.images[:]), plan.mean, plan.std))
    return float((logits.argmax(1).numpy() == np.asarray(ds.test.labels)).mean())


@pytest.mark.slow
def test_post_hoc_and_fine_tuning_corrections_are_measured_before_and_after(run_copy, capsys):
    from teachx.runs.revise import read_revision
    from teachx.runs.stages import load_stage_model
    from teachx.training.clarc import attach, cav_scores
    from teachx.training.concepts import layer_module, load_concept

    stage = json.loads((run_copy / "stage.json").read_text())
    code, out, err = teachx_main(capsys, "revise", run_copy, "--concept", "tag", "--method", "pclarc", "-q")
    assert code == 0, err
    assert "before: test accuracy" in out and "after: test accuracy" in out
    rec = read_revision(run_copy / "revise" / "pclarc-tag" / "revision.json")
    assert rec.method == "pclarc" and rec.concept["name"] == "tag" and rec.train is None
    assert rec.before.test_acc == pytest.approx(stage["test_acc"])  # the baseline's own record
    concept = load_concept(run_copy / "revise" / "pclarc-tag" / "concept.json")
    model = load_stage_model(run_copy)
    assert rec.before.test_acc == pytest.approx(_accuracy(model, run_copy))
    with attach(model, concept, "project"):
        assert rec.after.test_acc == pytest.approx(_accuracy(model, run_copy))
        # P-ClArC's closed form: every image's CAV score at the layer is the clean images' mean score
        seen = []
        handle = layer_module(model, concept.layer).register_forward_hook(lambda m, a, o: seen.append(o))
        try:
            _accuracy(model, run_copy)
        finally:
            handle.remove()
    v = torch.as_tensor(concept.cav, dtype=torch.float32)
    z = cav_scores(seen[-1], v / v.norm())
    assert torch.allclose(z, torch.full_like(z, concept.z_clean), atol=1e-4)
    assert 0.0 <= rec.after.tcav <= 1.0 and rec.after.sensitivity >= 0
    # a fine-tuning correction: its stage, resumable; the sensitivity along the CAV goes down
    code, out, err = teachx_main(
        capsys,
        "revise",
        run_copy,
        "--concept",
        "tag",
        "--method",
        "rrclarc",
        "train.epochs=3",
        "method.options.lam=100",
        "-q",
    )
    assert code == 0, err
    tuned = read_revision(run_copy / "revise" / "rrclarc-tag" / "revision.json")
    fine = json.loads((run_copy / "revise" / "rrclarc-tag" / "model" / "stage.json").read_text())
    assert tuned.after.test_acc == pytest.approx(fine["test_acc"]) and len(fine["history"]) == 3
    assert tuned.options["train.epochs"] == 3 and tuned.options["lam"] == 100
    assert tuned.options["train.lr"] == pytest.approx(0.003 * 0.1)  # the recipe: a tenth of the run's rate
    assert tuned.after.sensitivity < tuned.before.sensitivity
    assert tuned.before == rec.before  # the same yardstick on the same baseline
    # again: the stage is complete and read back, the record the same numbers
    code, out, err = teachx_main(
        capsys,
        "revise",
        run_copy,
        "--concept",
        "tag",
        "--method",
        "rrclarc",
        "train.epochs=3",
        "method.options.lam=100",
        "-q",
    )
    assert code == 0 and "complete, skipped" in out, err
    assert read_revision(run_copy / "revise" / "rrclarc-tag" / "revision.json").after == tuned.after
    # the run's report shows both corrections, before and after
    from teachx.reporting.report import write_report

    _, md = write_report(run_copy)
    text = Path(md).read_text()
    assert "Corrections along revealed concepts" in text
    row = next(line for line in text.splitlines() if line.startswith("| rrclarc |"))
    assert f"{tuned.before.test_acc:.4f} → {tuned.after.test_acc:.4f}" in row
    assert any(line.startswith("| pclarc |") for line in text.splitlines())
    # `teachx serve` lists the fine-tuned classifier next to the run's own models (the post-hoc one has no weights)
    from teachx.service.catalog import discover

    (entry,) = discover([run_copy])
    (own,) = [m for m in entry.models if m.role == "baseline"]  # the `teachx train` classifier itself
    assert own.error is None and own.test_acc == pytest.approx(stage["test_acc"])
    fixed = [m for m in entry.models if m.role == "revision"]
    assert [m.name for m in fixed] == ["revise/rrclarc-tag"]
    assert fixed[0].error is None and fixed[0].test_acc == pytest.approx(fine["test_acc"])
    assert fixed[0].checkpoint.is_file() and fixed[0].checkpoint.is_relative_to(run_copy / "revise" / "rrclarc-tag")
    # --overwrite-style cleanup knows revise/: everything in it is teachx's
    from teachx.runs.rundir import RUN_LAYOUT, remove_owned

    kept = remove_owned(run_copy / "revise", RUN_LAYOUT["revise"])
    assert kept == [] and not any((run_copy / "revise").iterdir())


def test_bad_input_is_one_line_and_writes_nothing(run_copy, capsys, tmp_path):
    code, _, err = teachx_main(capsys, "revise", run_copy, "--concept", "tga")
    _one_line(code, err, "has no concept 'tga'", "saved concepts: tag", "did you mean 'tag'")
    code, _, err = teachx_main(capsys, "revise", run_copy, "--concept", "tag", "--method", "pclarc", "train.epochs=2")
    _one_line(code, err, "--method pclarc trains nothing")
    code, _, err = teachx_main(capsys, "revise", run_copy, "--concept", "tag", "data.train_size=10")
    _one_line(code, err, "takes train.* and method.options.* overrides")
    code, _, err = teachx_main(capsys, "revise", run_copy, "--concept", "tag", "method.options.lamda=3")
    _one_line(code, err, "lamda")
    code, _, err = teachx_main(capsys, "revise", tmp_path / "nothing", "--concept", "tag")
    _one_line(code, err, "is not a teachx run directory")
    # the classifier changed since the concept was fitted: refused, with the reveal command that fits it anew
    best, last = run_copy / "checkpoints" / "best.safetensors", run_copy / "checkpoints" / "last.safetensors"
    if best.read_bytes() == last.read_bytes():  # pragma: no cover - the last epoch was the best
        best.write_bytes(best.read_bytes() + b" ")
    else:
        shutil.copyfile(last, best)
    code, _, err = teachx_main(capsys, "revise", run_copy, "--concept", "tag")
    _one_line(code, err, "was fitted on other weights", "teachx reveal")
    assert not (run_copy / "revise").exists()


def _masked_gradient(model: torch.nn.Module, run: Path, indices: np.ndarray, masks: np.ndarray) -> float:
    """RRR's penalty over the given training images and masks (the mean over images of the squared input gradient
    of the summed log-probabilities inside the mask), computed here from the images on disk."""
    from teachx.data.transforms import normalize
    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir
    from teachx.runs.teacher import as_nchw

    plan = make_plan(_check_run_dir(run), progress=False)
    x = normalize(as_nchw(plan.dataset.train.images[indices]), plan.mean, plan.std).requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(model.eval()(x), 1).sum(), x)
    return float((g.pow(2) * torch.from_numpy(masks[:, None].astype(np.float32))).sum((1, 2, 3)).mean())


@pytest.mark.slow
def test_rrr_revealed_fine_tunes_with_the_masks_reveal_localised(run_copy, capsys):
    """`teachx revise --method rrr_revealed`: the correction concept carries the reveal concept's masks, the
    fine-tuning trains every layer, and the input gradient inside those masks falls."""
    from teachx.runs.reveal import read_concept
    from teachx.runs.revise import read_revision
    from teachx.runs.stages import load_stage_model
    from teachx.training.concepts import load_concept

    code, out, err = teachx_main(
        capsys, "revise", run_copy, "--concept", "tag", "--method", "rrr_revealed", "train.epochs=3", "-q"
    )
    assert code == 0, err
    folder = run_copy / "revise" / "rrr_revealed-tag"
    rec = read_revision(folder / "revision.json")
    assert rec.method == "rrr_revealed" and rec.options["train.epochs"] == 3
    saved = read_concept(run_copy / "reveal" / "concepts" / "tag.json")
    carried = load_concept(folder / "concept.json")
    assert np.array_equal(carried.arrays["masks"], saved.masks)
    assert np.array_equal(carried.arrays["localised"], saved.localised)
    stage = json.loads((folder / "model" / "stage.json").read_text())
    assert len(stage["history"]) == 3 and rec.after.test_acc == pytest.approx(stage["test_acc"])
    assert stage["method_options"]["freeze"] == "none" and stage["method_options"]["lam"] == 1000.0
    assert stage["concept"]["n_masks"] == len(saved.localised)
    base, fixed = load_stage_model(run_copy), load_stage_model(folder / "model")
    assert not torch.equal(fixed.body[0].weight, base.body[0].weight)  # freeze=none: the convolutions moved too
    before = _masked_gradient(base, run_copy, saved.localised, saved.masks)
    after = _masked_gradient(fixed, run_copy, saved.localised, saved.masks)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_impactx_cleaned_trains_anew_on_teacher_maps_without_the_localised_artefact(run_copy, capsys):
    """`teachx revise --method impactx_cleaned`: IMPACTX trained with the run's learning rate towards the run's
    teacher maps of the classifier, zeroed inside the masks reveal localised (a store of its own next to the
    teacher's, which stays as it was); measured before and after (no CAV measures on a model trained anew); run
    again, read back."""
    from teachx.runs.reveal import read_concept
    from teachx.runs.revise import read_revision
    from teachx.teachers.store import read_store

    code, out, err = teachx_main(
        capsys, "revise", run_copy, "--concept", "tag", "--method", "impactx_cleaned", "train.epochs=2", "-q"
    )
    assert code == 0, err
    folder = run_copy / "revise" / "impactx_cleaned-tag"
    rec = read_revision(folder / "revision.json")
    assert rec.method == "impactx_cleaned" and rec.options["train.epochs"] == 2
    assert rec.options["train.lr"] == pytest.approx(0.003)  # trained anew: the run's rate, not the recipe's tenth
    assert rec.after.tcav is None and rec.after.sensitivity is None and rec.before.tcav is not None
    stage = json.loads((folder / "model" / "stage.json").read_text())
    assert len(stage["history"]) == 2 and rec.after.test_acc == pytest.approx(stage["test_acc"])
    saved = read_concept(run_copy / "reveal" / "concepts" / "tag.json")
    assert stage["method"] == "impactx_cleaned" and stage["concept"]["n_masks"] == len(saved.localised)
    # the cleaned store and the teacher's, side by side in the cache
    import os

    stores = {}
    cache = Path(os.environ["TEACHX_CACHE"]) / "maps"
    for d in cache.iterdir():
        if (d / "meta.json").is_file():
            s = read_store(d)  # every finished row verified against its digest
            stores[s.key] = s
    cleaned = [s for s in stores.values() if "derived_from" in s.meta["material"]]
    assert cleaned, list(stores)
    c = next(s for s in cleaned if s.meta["material"]["derived_from"] in stores)
    teacher = stores[c.meta["material"]["derived_from"]]
    assert teacher.meta["material"]["split"] == "train" and teacher.meta["material"]["teacher"] == "lrp"
    got, orig = np.array(c.maps, dtype=np.float32), np.array(teacher.maps, dtype=np.float32)
    expect = orig.copy()
    for row, i in enumerate(saved.localised):
        expect[i][:, saved.masks[row]] = 0
    done = np.flatnonzero(np.asarray(teacher.done))
    assert np.array_equal(got[done], expect[done]) and not np.array_equal(expect[done], orig[done])
    code, out, err = teachx_main(
        capsys, "revise", run_copy, "--concept", "tag", "--method", "impactx_cleaned", "train.epochs=2", "-q"
    )
    assert code == 0 and "complete, skipped" in out, err
    assert read_revision(folder / "revision.json").after == rec.after
    # `teachx serve` lists it as the IMPACTX model it is, and loads it with its built-in map
    from teachx.service.loading import ModelStore

    store = ModelStore([run_copy])
    (entry,) = [m for m in store.entries.values() if m.role == "revision"]
    assert entry.kind == "impactx" and entry.error is None and entry.test_acc == pytest.approx(stage["test_acc"])
    loaded = store.loaded(entry.id)
    assert loaded.impactx and store.model_info(entry.id)["has_built_in"]
