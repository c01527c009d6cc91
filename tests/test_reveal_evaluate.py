"""A reveal measured against an artefact benchmark's ground truth: the scores checked by hand and against a
second AUROC implementation, and `teachx reveal` on a real artefact benchmark writing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import teachx_main

from teachx.reveal.base import CandidateGroup, RevealResult
from teachx.reveal.cav import auroc as mann_whitney
from teachx.reveal.evaluate import MATCH, concept_evaluation, detection

pytest.importorskip("sklearn")


def _result(indices, groups, scores) -> RevealResult:
    idx = np.asarray(indices)
    return RevealResult(
        method="spray",
        indices=idx,
        scores=np.asarray(scores, float),
        labels=np.zeros(len(idx), int),
        embedding=np.zeros((len(idx), 2)),
        groups=tuple(CandidateGroup(g, tuple(m), tuple(m[:1]), 1.0 / (r + 1)) for r, (g, m) in enumerate(groups)),
    )


def test_detection_by_hand():
    # 10 images (dataset indices 100..109); the artefact is on 100..103
    idx = list(range(100, 110))
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    # ranked: group 7 (104, 105, 106: no artefact), then group 3 (100, 101, 102, 107), then group 5 (the rest)
    groups = [(7, [104, 105, 106]), (3, [100, 101, 102, 107]), (5, [103, 108, 109])]
    scores = [0.9, 0.8, 0.7, 0.1, 0.95, 0.5, 0.4, 0.3, 0.2, 0.0]
    d = detection(_result(idx, groups, scores), truth, label=2)
    assert (d.n_images, d.n_artefact, d.label) == (10, 4, 2)
    assert (d.top.group, d.top.rank, d.top.size, d.top.precision, d.top.recall) == (7, 1, 3, 0.0, 0.0)
    assert not d.top_is_artefact
    assert (d.best.group, d.best.rank) == (3, 2)
    assert d.best.precision == pytest.approx(3 / 4) and d.best.recall == pytest.approx(3 / 4)
    assert d.best.f1 == pytest.approx(0.75) and d.best.is_artefact
    assert d.auroc == pytest.approx(mann_whitney(np.asarray(scores), truth))  # a second implementation
    # average precision by hand: ranks of the artefact images by score: 2 (0.9), 3 (0.8), 4 (0.7), 9 (0.1)
    assert d.average_precision == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 9) / 4)
    assert "the top group is not the artefact" in d.line() and "best match group 3 (rank 2" in d.line()
    rec = d.to_dict()
    assert rec["top_is_artefact"] is False and rec["best"]["f1"] == pytest.approx(0.75)
    json.dumps(rec)  # a plain record
    assert detection(_result(idx, groups, scores), np.zeros(10, bool), label=2) is None  # no artefact in the class
    with pytest.raises(ValueError, match="ground truth for 3 images"):
        detection(_result(idx, groups, scores), truth[:3], label=2)
    assert MATCH == 0.5


def test_concept_evaluation_by_hand():
    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.2
    scores = truth * 1.0 + rng.normal(0, 0.6, 200)
    pred = np.zeros((3, 4, 4), bool)
    true = np.zeros((3, 4, 4), np.uint8)
    pred[0, :2, :2] = True
    true[0, :2, :2] = 1  # IoU 1
    pred[1, :2, :2] = True
    true[1, :2, :4] = 1  # IoU 4 / 8
    pred[2] = True  # an image without the artefact: left out
    c = concept_evaluation(scores, truth, pred, true, np.array([True, True, False]))
    assert c.n_images == 200 and c.n_artefact == int(truth.sum())
    assert c.retrieval_auroc == pytest.approx(mann_whitney(scores, truth))
    assert c.localisation_iou == pytest.approx((1 + 0.5) / 2) and c.n_localised_artefact == 2
    placeless = concept_evaluation(scores, truth)  # a colour shift has no place: no IoU
    assert placeless.localisation_iou is None and "mask IoU" not in placeless.line()
    assert concept_evaluation(scores, np.zeros(200, bool)).retrieval_auroc is None


@pytest.mark.slow
def test_reveal_on_an_artefact_benchmark_reports_against_its_ground_truth(tmp_path, capsys, monkeypatch):
    """The bundled Fashion-MNIST with a dark frame on half of class 2's training images: `teachx reveal` prints
    and records how its groups and its concept did against the ground truth, with the numbers an independent
    computation from the saved records and the benchmark's truth gives."""
    from teachx.data.artefacts import ground_truth
    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir, read_class, read_concept, read_evaluation

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code, out, err = teachx_main(
        capsys,
        "train",
        "--out",
        run,
        "-q",
        "data.artefact.kind=frame",
        "data.artefact.classes=[2]",
        "data.artefact.p=0.5",
        "data.train_size=800",
        "train.epochs=3",
    )
    assert code == 0, err
    former = ("--method", "spray", "--features", "layer", "--rank", "method")  # what the study below repeats
    code, out, err = teachx_main(capsys, "reveal", run, *former, "--class", "2", "--teacher", "gradient", "-q")
    assert code == 0, err
    assert "benchmark ground truth (for evaluation only, never read by the method)" in out
    plan = make_plan(_check_run_dir(run), progress=False)
    truth = ground_truth(plan.dataset)
    rec = read_class(run, "spray", 2)
    poisoned = truth.train_poisoned[rec.result.indices]
    saved = read_evaluation(run, "spray")["classes"]["2"]
    assert saved["n_artefact"] == int(poisoned.sum()) > 0 and saved["n_images"] == len(rec.result.indices)
    top = rec.result.groups[0]
    inside = np.isin(rec.result.indices, top.members)
    assert saved["top"]["precision"] == pytest.approx((inside & poisoned).sum() / inside.sum())
    assert saved["top"]["recall"] == pytest.approx((inside & poisoned).sum() / poisoned.sum())
    assert saved["auroc"] == pytest.approx(mann_whitney(rec.result.scores, poisoned))
    code, out, err = teachx_main(
        capsys, "reveal", run, *former, "--class", "2", "--teacher", "gradient", "--concept", "top", "-q"
    )
    assert code == 0, err
    assert "CAV retrieval AUROC" in out and "mask IoU" in out
    concept = read_concept(next((run / "reveal" / "concepts").glob("*.json")))
    gt = concept.record["ground_truth"]
    assert gt["retrieval_auroc"] == pytest.approx(mann_whitney(concept.scores, truth.train_poisoned[concept.indices]))
    loc = truth.train_poisoned[concept.localised]
    if loc.any():
        p, t = concept.masks[loc].astype(bool), truth.train_masks[concept.localised][loc] != 0
        inter, union = (p & t).sum((1, 2)), (p | t).sum((1, 2))
        assert gt["localisation_iou"] == pytest.approx(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())
    # the same pipeline without a person in the loop (what a study measures per unit), with the settings of
    # `teachx reveal` (the method's own groups and ranking, the raw activations of one layer, the group not grown),
    # gives the same numbers
    import torch

    from teachx.runs.reveal import _classifier_checkpoint, find_classifier
    from teachx.runs.reveal_benchmark import RevealSettings, reveal_benchmark
    from teachx.runs.stages import load_stage_model

    model = load_stage_model(_classifier_checkpoint(find_classifier(run)).parent.parent)
    bench = reveal_benchmark(
        _check_run_dir(run),
        plan,
        model,
        torch.device("cpu"),
        RevealSettings(
            method="spray",
            options={},
            teacher="gradient",
            layer="body",
            rank="method",
            standardise=False,
            cav="pattern",
            refine=0,
        ),
    )
    assert list(bench.classes) == ["2"]
    assert bench.classes["2"]["detection"] == saved
    got = bench.classes["2"]["concept"]
    assert got["retrieval_auroc"] == pytest.approx(gt["retrieval_auroc"])
    assert got["localisation_iou"] == pytest.approx(gt["localisation_iou"])
    head = bench.headline()
    assert head["detection_auroc"] == pytest.approx(saved["auroc"]) and head["top_is_artefact"] in (0.0, 1.0)
    assert set(bench.seconds) == {"maps", "reveal", "retrieval", "localisation"}


def test_the_reveal_setting_keeps_every_other_study_key():
    """study.eval.reveal has a key of its own: adding it changes no method unit's evaluation key; it changes with
    its settings and with the reveal algorithms' version."""
    from dataclasses import replace

    from teachx.config.schema import RunConfig
    from teachx.runs.reveal_benchmark import RevealSettings
    from teachx.studies.spec import EvalSpec, eval_key, reveal_key

    cfg = RunConfig()
    assert eval_key(cfg, EvalSpec()) == eval_key(cfg, EvalSpec(reveal=RevealSettings()))
    assert reveal_key(RevealSettings()) != reveal_key(replace(RevealSettings(), teacher="gradient"))
    # the default grows the top group: a reveal made without growing is never read back as the default's; one
    # made with refine 0 keeps the key it had before growing existed, and the former refitting's (refine 2) not
    assert reveal_key(RevealSettings()) != reveal_key(replace(RevealSettings(), refine=0))
    assert reveal_key(replace(RevealSettings(), refine=2)) != "5b1a391309de"
    # the masks changed (contrasted with the least-like images): every reveal file is made again, while the key
    # without the masks, which a correction's concept depends on, is the one a reveal with refine 0 had before
    assert reveal_key(replace(RevealSettings(), refine=0), masks=False) == "b228e06e204e"
    assert reveal_key(replace(RevealSettings(), refine=0)) != "b228e06e204e"
    assert (
        reveal_key(RevealSettings()) != "869248e08236" and reveal_key(RevealSettings(), masks=False) == "869248e08236"
    )
    # the grown set's retrieving CAV is now fitted against the other classes too: a grown reveal's file is made
    # again, while the groups-only key and a reveal without growing (the same CAV as before) keep theirs
    assert reveal_key(RevealSettings()) != "71b54816ada0"
    assert reveal_key(replace(RevealSettings(), refine=0)) == "2bbc1b79736b"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "study.eval.reveal.rank=silhouette",
            "unknown study.eval.reveal.rank 'silhouette'; valid: specificity, method",
        ),
        ("study.eval.reveal.latent=maps", "unknown study.eval.reveal.latent 'maps'; valid: activations, relevances"),
        (
            "study.eval.reveal.refine=-1",
            "study.eval.reveal.refine is -1; pass a number of rounds, 0 or more (0: the top group alone), "
            "e.g. study.eval.reveal.refine=5",
        ),
    ],
)
def test_a_bad_reveal_setting_is_one_line_before_anything_is_written(tmp_path, capsys, override, message):
    code, out, err = teachx_main(capsys, "study", "study-r2r-fashion-mnist", "--out", tmp_path / "s", "-q", override)
    assert code == 2 and err.strip() == f"teachx: error: {message}"
    assert not (tmp_path / "s").exists()


def test_the_study_reveal_asks_for_six_groups_only_from_methods_that_take_them():
    """Six groups by default (the SpRAy methods take n_groups); a method without that option (outliers) gets its
    own defaults instead of failing after the baselines are trained; explicit options are kept, and bad ones
    fail when the settings are made."""
    from teachx.errors import ConfigError
    from teachx.runs.reveal_benchmark import RevealSettings

    assert RevealSettings().method_options() == {"n_groups": 6}
    assert RevealSettings(method="spray").method_options() == {"n_groups": 6}
    assert RevealSettings(method="outliers").method_options() == {}
    assert RevealSettings(options={}).method_options() == {}
    assert RevealSettings(options={"n_groups": 3}).method_options() == {"n_groups": 3}
    with pytest.raises(ConfigError, match="bad options for reveal method 'outliers'"):
        RevealSettings(method="outliers", options={"n_groups": 2})
    with pytest.raises(ConfigError, match="unknown reveal method 'spary'"):
        RevealSettings(method="spary")


@pytest.mark.slow
def test_a_baselines_only_study_reveals_every_baseline(tmp_path, monkeypatch):
    """`study.arms: {}` trains the regimes' baselines only; with study.eval.reveal each baseline's unannotated
    reveal is scored once (resumed from its file) and summarised per regime, next to the accuracy per test split."""
    import torch

    from teachx.runs.reveal_benchmark import RevealSettings, reveal_benchmark
    from teachx.runs.stages import load_stage_model
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "data: {name: bundled, train_size: 400, artefact: {kind: frame, classes: [2], p: 0.5}}\n"
        "model: {backbone: lenet5}\ntrain: {epochs: 1, batch_size: 64}\nmethod: {name: baseline}\n"
        "study: {n_seeds: 2, arms: {}, eval: {reveal: {teacher: gradient}}}\n"
    )
    spec = load_study(str(cfg))
    assert spec.arms == {} and spec.control is None
    res = run_study(spec, tmp_path / "out", lambda line: None)
    rows = res.data["rows"]
    assert [r["arm"] for r in rows] == ["baseline"]
    row = rows[0]
    assert set(row["test_splits"]) == {"clean", "attacked", "ch"}
    assert set(row["reveal"]) >= {"top_is_artefact", "detection_auroc", "retrieval_auroc"}
    units = res.data["units"]
    for s, key in enumerate(row["units"]):
        saved = units[key]["reveal"]
        assert units[key]["test_splits"]["ch"]["acc"] == pytest.approx(row["test_acc"][s])
        # the saved numbers are the benchmark function's on the unit's own classifier
        from teachx.runs.plan import make_plan

        ucfg = spec.config("all", None, spec.seeds[s])
        again = reveal_benchmark(
            ucfg,
            make_plan(ucfg, progress=False),
            load_stage_model(tmp_path / "out" / "units" / key),
            torch.device("cpu"),
            RevealSettings(teacher="gradient"),
        )
        assert saved["headline"] == pytest.approx(again.headline())
    means = [units[k]["reveal"]["headline"]["detection_auroc"] for k in row["units"]]
    assert row["reveal"]["detection_auroc"]["mean"] == pytest.approx(np.mean(means))
    files = sorted((tmp_path / "out" / "units").glob("*/reveal-*.json"))
    assert len(files) == 2
    stamp = [f.stat().st_mtime_ns for f in files]
    run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)  # resumed: read back, not made again
    assert [f.stat().st_mtime_ns for f in files] == stamp
    from teachx.reporting.report import write_report

    _, md = write_report(tmp_path / "out")
    text = Path(md).read_text()
    assert "Did the model learn the artefact?" in text and "Reveal without annotations" in text


@pytest.mark.slow
def test_the_grown_concept_retrieves_against_every_other_image_and_localises_within_its_class(tmp_path, monkeypatch):
    """With growing (the default), the concept that scores every training image is a logistic CAV of the grown
    set against all the other images (the rest of its class and the other classes), recomputed here from the
    stacked features; the masks are traced from the first layer's part of the CAV against the rest of the class
    alone, with the class's images that CAV scores lowest as references."""
    import torch

    import teachx.runs.reveal_benchmark as rb
    from teachx.data.artefacts import ground_truth
    from teachx.data.transforms import normalize
    from teachx.reveal.cav import fit_cav
    from teachx.reveal.features import LayerStack, check_layers, layer_shapes, stacked_activations
    from teachx.reveal.localise import reference_indices
    from teachx.runs.plan import make_plan
    from teachx.runs.stages import load_stage_model
    from teachx.runs.teacher import as_nchw
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "data: {name: bundled, train_size: 400, artefact: {kind: frame, classes: [2], p: 0.5}}\n"
        "model: {backbone: lenet5}\ntrain: {epochs: 1, batch_size: 64}\nmethod: {name: baseline}\n"
        "study: {n_seeds: 1, arms: {}}\n"
    )
    spec = load_study(str(cfg))
    res = run_study(spec, tmp_path / "out", lambda line: None)
    key = res.data["rows"][0]["units"][0]
    ucfg = spec.config("all", None, spec.seeds[0])
    plan = make_plan(ucfg, progress=False)
    model = load_stage_model(tmp_path / "out" / "units" / key).eval()
    traced: dict = {}
    real_masks = rb.concept_masks

    def spy(model, batches, indices, references, layer, cav, *rest):
        traced.update(references=np.asarray(references), direction=np.asarray(cav))
        return real_masks(model, batches, indices, references, layer, cav, *rest)

    monkeypatch.setattr(rb, "concept_masks", spy)
    bench = rb.reveal_benchmark(ucfg, plan, model, torch.device("cpu"), rb.RevealSettings(teacher="gradient"))
    concept = bench.classes["2"]["concept"]
    grown = bench.grown_groups["2"]

    ds = plan.dataset
    train_idx = np.sort(np.asarray(plan.train_idx))
    labels = np.asarray(ds.train.labels)[train_idx]

    def batch(idx):
        return normalize(as_nchw(ds.train.images[idx]), plan.mean, plan.std)

    shapes = layer_shapes(model, batch(train_idx[:1]))
    layers = check_layers(None, model, shapes)
    raw = stacked_activations(model, batch, train_idx, layers, 128)
    in_class = labels == 2
    stack = LayerStack.fit(layers, [shapes[n][0] for n in layers], raw[in_class])
    x = stack.transform(raw)
    concept_rows = np.isin(train_idx, grown)
    everything = fit_cav(x, concept_rows, "logistic")
    truth = ground_truth(ds).train_poisoned[train_idx]
    assert concept["retrieval_auroc"] == pytest.approx(mann_whitney(everything.scores(x), truth), abs=1e-6)
    within = fit_cav(x[in_class], concept_rows[in_class], "logistic")
    assert np.allclose(traced["direction"], stack.part(within.direction, 0)[1], atol=1e-6)
    expected = reference_indices(within.scores(x[in_class]), train_idx[in_class])
    assert sorted(traced["references"].tolist()) == sorted(expected.tolist())
