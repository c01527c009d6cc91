"""`teachx reveal` on tiny trained runs: one-line errors for bad input with nothing written, and end to end on
a dataset with a planted artefact in part of one class (tests/_reveal_fixtures.py): the artefact group is
ranked first, and its concept retrieves the artefact images with a high AUROC and localises the artefact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from _reveal_fixtures import artefact_in, make_artefact_zip  # noqa: E402
from conftest import teachx_main  # noqa: E402

#: the options of the former default: SpRAy on the LRP maps, ranked by its own suspicion score
FORMER = ("--method", "spray", "--features", "layer", "--rank", "method")

TRAIN = [
    "model.backbone=lenet5",
    "train.epochs=4",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.progress=false",
    "data.hflip=false",
    "teacher.method=lrp",
]


def _train(out: Path, zip_path: Path, *extra: str) -> Path:
    from teachx.cli.main import main

    try:
        main(["train", "--out", str(out), "-q", f"data.name=imagefolder:{zip_path}", *TRAIN, *extra])
    except SystemExit as exc:  # pragma: no cover - a failed training fails every test here
        assert exc.code == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A trained run on the planted-artefact data, and one trained on 24 images (8 per class: too few)."""
    root = tmp_path_factory.mktemp("reveal")
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(root / "cache"))
    try:
        zip_path = make_artefact_zip(root / "art.zip")
        run = _train(root / "run", zip_path)
        small = _train(root / "small", zip_path, "data.train_size=27", "train.epochs=1")
    finally:
        mp.undo()
    return {"run": run, "small": small, "root": root}


@pytest.fixture
def run_copy(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained run, so that each test starts without reveal/."""
    monkeypatch.setenv("TEACHX_CACHE", str(trained["root"] / "cache"))
    dest = tmp_path / "run"
    shutil.copytree(trained["run"], dest)
    return dest


def _labels(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training indices, labels, images) of the run's training split."""
    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir

    plan = make_plan(_check_run_dir(run), progress=False)
    return np.sort(plan.train_idx), np.asarray(plan.dataset.train.labels), plan.dataset.train.images


def assert_one_line_error(code, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("teachx: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_is_one_line_and_writes_nothing(run_copy, trained, capsys, tmp_path):
    idx, labels, _ = _labels(run_copy)
    a0 = idx[labels[idx] == 0][:3].tolist()
    a1 = idx[labels[idx] == 1][:1].tolist()
    no_classifier = tmp_path / "untrained"
    no_classifier.mkdir()
    for f in (".teachx-run", "config.yaml"):
        shutil.copy(run_copy / f, no_classifier / f)
    cases = [
        ((run_copy, "--layer", "body.9"), ("unknown layer 'body.9'", "valid layers: body.0,", "neck.1")),
        ((no_classifier,), ("has no trained classifier", "teachx train --out")),
        ((trained["small"], "--class", "1"), ("class 1", "training images", "needs at least 12", "--class")),
        ((run_copy, "--class", "0", "--concept", f"{a0[0]},"), ("at least 2 samples",)),
        ((run_copy, "--class", "0", "--concept", f"{a0[0]},{a0[0]}"), ("at least 2 samples",)),
        ((run_copy, "--class", "0", "--concept", ",".join(map(str, a0 + a1))), ("mixes classes", "class 1")),
        ((run_copy, "--class", "0", "--concept", "7"), ("class 0 has no group 7", "its groups are")),
        ((run_copy, *FORMER, "--class", "0", "--concept", "7"), ("class 0 has no group 7", "its groups are 0, 1")),
        ((run_copy, "--method", "outliers", "--rank", "specificity"), ("--rank specificity", "--rank method")),
        ((run_copy, "--features", "stacks"), ("'stacks' is not one of 'stack', 'layer'",)),
        ((run_copy, "--class", "0", "--concept", "abc"), ("--concept abc", "e.g. --concept 4,17,23")),
        ((run_copy, "--concept", "top"), ("exactly one --class",)),
        ((run_copy, "--method", "sprey"), ("unknown reveal method 'sprey'", "did you mean 'spray'")),
        ((run_copy, "--class", "5"), ("--class 5", "3 classes")),
        ((tmp_path / "nowhere",), ("not a teachx run directory",)),
        ((run_copy, "--teacher", "builtin"), ("no finished IMPACTX or ABN model", "--teacher")),
        ((run_copy, "--teacher", "shapp"), ("unknown teacher 'shapp'",)),
    ]
    for args, fragments in cases:
        code, _, err = teachx_main(capsys, "reveal", *args, "-q")
        assert_one_line_error(code, err, *fragments)
        for d in (run_copy, no_classifier, trained["small"]):
            assert not (d / "reveal").exists(), (args, list((d / "reveal").rglob("*")))
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_reveal_ranks_the_planted_artefact_first_and_retrieves_it(run_copy, capsys):
    from teachx.reveal.cav import auroc
    from teachx.runs.reveal import read_class, read_concept

    code, out, err = teachx_main(capsys, "reveal", run_copy, *FORMER, "-q")
    assert code == 0, err
    assert out.count("class ") >= 3 and "most suspicious first" in out
    idx, labels, images = _labels(run_copy)
    truth = artefact_in(images)
    assert truth[idx].sum() >= 15 and not truth[idx][labels[idx] != 0].any()  # planted in class 0 only
    rec = read_class(run_copy, "spray", 0)
    top = np.asarray(rec.result.groups[0].members)
    planted = idx[(labels[idx] == 0) & truth[idx]]
    hits = np.isin(top, planted).sum()
    assert hits >= 0.9 * len(planted) and hits >= 0.8 * len(top), (rec.result.groups, planted)
    for c in range(3):  # the typed record on disk, with its digest, arrays and figure
        rec_json = json.loads((run_copy / "reveal" / "spray" / f"class_{c}.json").read_text())
        assert "features" not in rec_json["settings"]  # the former settings: records made before them resume
        assert rec_json["digest"].startswith("sha256:") and rec_json["ranking"][0] == rec_json["groups"][0]["group"]
        assert (run_copy / "reveal" / "spray" / f"class_{c}.png").stat().st_size > 5000
    # the latent methods as before (one layer, the method's own ranking): on the layer's activations, and on its
    # relevances for the class
    for latent in ("activations", "relevances"):
        code, _, err = teachx_main(
            capsys,
            "reveal",
            run_copy,
            "--class",
            "0",
            "--method",
            "spray_latent",
            "--latent",
            latent,
            "--features",
            "layer",
            "--rank",
            "method",
            "--replace",
            "-q",
        )
        assert code == 0, err
        lat = read_class(run_copy, "spray_latent", 0)
        assert lat.settings["latent"] == latent
        assert np.isin(np.asarray(lat.result.groups[0].members), planted).sum() >= 0.8 * len(planted)
    # resumable: the same command skips every class
    code, out, _ = teachx_main(capsys, "reveal", run_copy, *FORMER, "-q")
    assert code == 0 and out.count("done, skipped") == 3
    # the defaults of this version on a folder the former ones wrote: refused with the options that resume it
    code, _, err = teachx_main(capsys, "reveal", run_copy, "--method", "spray", "--class", "1", "-q")
    assert_one_line_error(
        code,
        err,
        "reveal/spray' holds a reveal made with other settings (features layer, now stack; rank method, now "
        "specificity)",
        "pass --features layer --rank method --layer body --teacher lrp to add to it",
        "--replace",
    )
    assert '"features"' not in (run_copy / "reveal" / "spray" / "class_1.json").read_text()
    # the concept of the top group: a CAV that retrieves the artefact images among all training images
    code, out, err = teachx_main(
        capsys, "reveal", run_copy, *FORMER, "--class", "0", "--concept", "top", "--name", "tag", "-q"
    )
    assert code == 0, err
    assert "concept 'tag'" in out
    concept = read_concept(run_copy / "reveal" / "concepts" / "tag.json")
    assert concept.layer == "body" and concept.cav_kind == "pattern" and concept.label == 0
    assert len(concept.model_digest) == 64 and concept.checkpoint == "checkpoints/best.safetensors"
    assert np.array_equal(concept.indices, idx) and abs(np.linalg.norm(concept.cav) - 1) < 1e-9
    assert auroc(concept.scores, truth[concept.indices]) > 0.95
    # localised where the artefact is: in an artefact image the heatmap peaks at the top-left corner (pointing
    # game) and is denser there than elsewhere, and the mask covers the corner
    loc = concept.localised
    assert truth[loc].sum() >= 0.9 * truth[idx].sum()
    heat = np.clip(concept.heatmaps.astype(np.float64), 0, None)[truth[loc]]
    peak = heat.reshape(len(heat), -1).argmax(1)
    assert ((peak // 32 < 10) & (peak % 32 < 10)).mean() >= 0.9
    density = heat[:, :10, :10].mean((1, 2)) / np.maximum(heat.mean((1, 2)), 1e-12)
    assert np.median(density) > 1.5
    assert concept.masks[truth[loc]][:, :10, :10].any((1, 2)).mean() >= 0.9
    # a concept whose arrays changed is refused with the way forward
    from teachx.errors import CorruptionError

    npz_c = run_copy / "reveal" / "concepts" / "tag.npz"
    good = npz_c.read_bytes()
    npz_c.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptionError, match="tag.npz.*--concept again"):
        read_concept(run_copy / "reveal" / "concepts" / "tag.json")
    npz_c.write_bytes(good)
    # the same name again replaces the concept, and says so
    code, out, _ = teachx_main(
        capsys, "reveal", run_copy, *FORMER, "--class", "0", "--concept", "top", "--name", "tag", "-q"
    )
    assert code == 0 and "notice: replacing the concept 'tag'" in out and "done, skipped" in out
    # a damaged arrays file is refused in one line
    npz = run_copy / "reveal" / "spray" / "class_0.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    code, _, err = teachx_main(capsys, "reveal", run_copy, *FORMER, "--class", "0", "-q")
    assert_one_line_error(code, err, "class_0.npz", "run the same `teachx reveal` again")
    # reveal/ is teachx's own: --overwrite (remove_owned) clears it with the rest, a user's file in it is kept
    from teachx.runs.rundir import remove_owned

    (run_copy / "reveal" / "notes.txt").write_text("mine")
    assert remove_owned(run_copy) == [run_copy / "reveal" / "notes.txt"]
    assert sorted(p.name for p in (run_copy / "reveal").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_builtin_maps_of_an_impactx_run(trained, tmp_path, capsys, monkeypatch):
    """--teacher builtin: the IMPACTX model of a `teachx run` is analysed through its own maps."""
    monkeypatch.setenv("TEACHX_CACHE", str(trained["root"] / "cache"))
    from teachx.cli.main import main

    out = tmp_path / "irun"
    overrides = [f"data.name=imagefolder:{trained['root'] / 'art.zip'}", *TRAIN, "train.epochs=1"]
    try:
        main(["run", "--out", str(out), "-q", *overrides])
    except SystemExit as exc:
        assert exc.code == 0
    code, text, err = teachx_main(
        capsys, "reveal", out, "--method", "spray", "--teacher", "builtin", "--class", "1", "-q"
    )
    assert code == 0, err
    rec = json.loads((out / "reveal" / "spray" / "class_1.json").read_text())
    assert rec["settings"]["teacher"] == "builtin" and rec["settings"]["model"].startswith("impactx/")
    assert "class 1 (b)" in text


@pytest.mark.slow
def test_default_groups_on_every_layer_ranks_by_specificity_and_fits_the_concept_at_one(run_copy, capsys):
    """The default reveal is a study's: spray_latent on every nonlinearity's pooled activations, the groups ranked
    by specificity; its concept is one layer's direction (the classifier's input features, or --layer), which
    `teachx revise` can correct along. A reveal made with other settings is never mixed with it."""
    from teachx.reveal.cav import auroc
    from teachx.runs.reveal import read_class, read_concept

    code, out, err = teachx_main(capsys, "reveal", run_copy, "-q")
    assert code == 0, err
    assert out.count("most specific to the class first") == 3 and "specificity 1.000" in out
    idx, labels, images = _labels(run_copy)
    truth = artefact_in(images)
    planted = idx[(labels[idx] == 0) & truth[idx]]
    rec = read_class(run_copy, "spray_latent", 0)
    s = rec.settings
    assert s["features"] == "stack" and s["rank"] == "specificity" and s["layer"] is None
    assert s["layers"] == ["body.1", "body.4", "neck.2", "neck.4"] and s["options"]["n_groups"] == 6
    assert rec.activations.shape == (len(rec.result.indices), 6 + 16 + 120 + 84)
    top = rec.result.groups[0]
    assert top.score == top.parts["specificity"] and all(0 <= g.score <= 1 for g in rec.result.groups)
    assert np.isin(planted, top.members).all()  # every artefact image in the top group
    # the concept of the top group: one layer's direction, the classifier's input features by default
    code, out, err = teachx_main(capsys, "reveal", run_copy, "--class", "0", "--concept", "top", "--name", "t", "-q")
    assert code == 0 and "done, skipped" in out and "CAV at neck" in out, err
    concept = read_concept(run_copy / "reveal" / "concepts" / "t.json")
    assert concept.layer == "neck" and concept.cav.shape == (84,)
    assert concept.record["reveal"]["features"] == "stack"
    assert auroc(concept.scores, truth[concept.indices]) > 0.8
    # or at the layer --layer names, from the same saved groups
    code, out, err = teachx_main(
        capsys, "reveal", run_copy, "--class", "0", "--layer", "body.4", "--concept", "top", "--name", "t4", "-q"
    )
    assert code == 0 and "done, skipped" in out, err
    assert read_concept(run_copy / "reveal" / "concepts" / "t4.json").cav.shape == (16,)
    # --refine grows the concept's images from the group before the CAV is fitted, and says so
    code, out, err = teachx_main(
        capsys, "reveal", run_copy, "--class", "0", "--concept", "top", "--refine", "5", "--name", "g", "-q"
    )
    assert code == 0 and f"grown from {top.size})" in out, (out, err)
    grown = read_concept(run_copy / "reveal" / "concepts" / "g.json")
    assert grown.record["grown"] == {"rounds": 5, "from": top.size, "to": len(grown.members)}
    # here the top group holds every artefact image and more clean ones: the grown set is purer
    assert truth[grown.members].mean() > truth[np.asarray(top.members)].mean() + 0.2
    assert auroc(grown.scores, truth[grown.indices]) > 0.8
    assert "grown" not in read_concept(run_copy / "reveal" / "concepts" / "t.json").record
    # `teachx report` shows it as saved: the score named a specificity, the concept at its one layer
    code, _, err = teachx_main(capsys, "report", run_copy)
    assert code == 0, err
    md = (run_copy / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| spray_latent | 0 (a) |"))
    assert "every nonlinearity (body.1, body.4, neck.2, neck.4) | specificity |" in row, row
    assert f"group {top.group}: {top.size} images" in row and row.endswith(f"| {top.score:.3f} |"), row
    assert "Specificity: how well the direction" in md and "Suspicion score" not in md
    assert "| t | 0 (a) | group" in md and "| neck | pattern |" in md and "| body.4 | pattern |" in md
    # the method's own ranking on the same folder: refused in one line, nothing changed, until --replace
    before = {p: p.read_bytes() for p in (run_copy / "reveal" / "spray_latent").iterdir()}
    code, _, err = teachx_main(capsys, "reveal", run_copy, "--class", "0", "--rank", "method", "-q")
    assert_one_line_error(
        code,
        err,
        "other settings (rank specificity, now method)",
        "pass --features stack --rank specificity to",
        "--replace",
    )
    assert {p: p.read_bytes() for p in (run_copy / "reveal" / "spray_latent").iterdir()} == before
    # --replace with a concept the new reveal does not have: one line, and the saved reveal still there
    code, _, err = teachx_main(
        capsys, "reveal", run_copy, "--class", "0", "--rank", "method", "--replace", "--concept", "9", "-q"
    )
    assert_one_line_error(code, err, "class 0 has no group 9")
    assert {p: p.read_bytes() for p in (run_copy / "reveal" / "spray_latent").iterdir()} == before
    code, out, err = teachx_main(capsys, "reveal", run_copy, "--class", "0", "--rank", "method", "--replace", "-q")
    assert code == 0 and "most suspicious first" in out, err
    assert sorted(p.name for p in (run_copy / "reveal" / "spray_latent").iterdir()) == [
        "class_0.json",
        "class_0.npz",
        "class_0.png",
    ]
    rec = read_class(run_copy, "spray_latent", 0)
    assert rec.settings["rank"] == "method" and "specificity" not in rec.result.groups[0].parts
    code, _, err = teachx_main(capsys, "report", run_copy)
    assert code == 0 and "| specificity |" not in (md := (run_copy / "report.md").read_text()), err
    assert "| suspicion score |" in md and "Suspicion score: the reveal method's own ranking score" in md
    # on these three classes, apart in every unit, each specificity is 0 or 1 and the merge took in clean groups;
    # the method's own ranking on the same stack isolates the artefact (what the reveal guide says)
    top = np.asarray(rec.result.groups[0].members)
    hits = np.isin(top, planted).sum()
    assert hits >= 0.9 * len(planted) and hits >= 0.8 * len(top), (rec.result.groups, planted)
