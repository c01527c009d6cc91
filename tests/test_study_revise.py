"""Reveal-to-Revise in a study (``study.revise``): each seed's baseline revealed without annotations, corrected
along the concept it found, and compared with its baseline per test split and with the annotated oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from teachx.errors import ConfigError

pytest.importorskip("sklearn")

BASE = (
    "data: {name: bundled, train_size: 400, artefact: {kind: frame, classes: [2], p: 0.5}}\n"
    "model: {backbone: lenet5}\ntrain: {epochs: 2, batch_size: 64}\nmethod: {name: baseline}\n"
)


def _study(tmp_path: Path, study: str, base: str = BASE) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(base + study)
    return path


@pytest.mark.parametrize(
    "study, fragment",
    [
        ("study: {arms: {}, revise: {methods: [pclarcc]}}", "unknown correction 'pclarcc'"),
        ("study: {arms: {}, revise: {methods: []}}", "study.revise.methods must be a non-empty list"),
        ("study: {arms: {}, revise: {methods: [pclarc, pclarc]}}", "names a correction twice"),
        ("study: {arms: {}, revise: {methods: [pclarc], oracle: rrr}}", "study.revise.oracle 'rrr' is not an arm"),
        ("study: {arms: {}, revise: {methods: [pclarc], options: {pclarc: {train.epochs: 1}}}}", "trains nothing"),
        ("study: {arms: {}, revise: {methods: [pclarc], options: {rrclarc: {}}}}", "is not in study.revise.methods"),
        (
            "study: {arms: {}, revise: {methods: [rrclarc], options: {rrclarc: {data.train_size: 10}}}}",
            "study.revise.options.rrclarc",
        ),
        (
            "study: {arms: {}, revise: {methods: [rrclarc], options: {rrclarc: {method.options.lamb: 1}}}}",
            "lamb",
        ),
        ("study: {arms: {}, revise: {methods: [rrclarc], colour: red}}", "unknown option 'study.revise.colour'"),
        ("study: {arms: {}, revise: {methods: [rrclarc], cav: linear}}", "study.revise.cav must be pattern"),
        ("study: {arms: {ceiling: {}}, ceiling: {data.artefact.p: 0}}", "study arm name 'ceiling' is reserved"),
        ("study: {arms: {}, revise: {methods: [rrclarc], concepts: [guessed]}}", "unknown source 'guessed'"),
    ],
)
def test_bad_revise_sections_are_one_line_errors(tmp_path, study, fragment):
    from teachx.studies.spec import load_study

    with pytest.raises(ConfigError) as err:
        load_study(str(_study(tmp_path, study)))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_revise_needs_an_artefact_benchmark(tmp_path):
    from teachx.studies.spec import load_study

    base = "data: {name: bundled, train_size: 400}\nmodel: {backbone: lenet5}\nmethod: {name: baseline}\n"
    with pytest.raises(ConfigError, match="study.revise corrects the artefact that reveal finds"):
        load_study(str(_study(tmp_path, "study: {arms: {}, revise: {methods: [pclarc]}}", base)))


def test_revise_turns_the_reveal_on_and_keeps_other_studies_as_they_were(tmp_path):
    from dataclasses import replace

    from teachx.runs.reveal_benchmark import RevealSettings
    from teachx.studies.spec import load_study, revision_key

    spec = load_study(str(_study(tmp_path, "study: {arms: {}, revise: {methods: [pclarc, rrclarc]}}")))
    assert spec.eval.reveal == RevealSettings()  # the concepts come from the baselines' reveal
    assert spec.revise_rows == {"reveal+pclarc": "pclarc", "reveal+rrclarc": "rrclarc"}
    assert "revise" in spec.to_dict() and "revise" in spec.section()
    plain = load_study(str(_study(tmp_path, "study: {arms: {}}")))
    assert "revise" not in plain.to_dict() and plain.revise_rows == {}
    revise = spec.revise
    revealed = revise.concept_key("revealed", RevealSettings())
    # a correction fits its concept on the top group itself: growing it for the reveal's CAV changes nothing
    assert revise.concept_key("revealed", replace(RevealSettings(), refine=0)) == revealed
    keys = {
        revision_key("c-1", revealed, "rrclarc", []),
        revision_key("c-2", revealed, "rrclarc", []),
        revision_key("c-1", revise.concept_key("revealed", RevealSettings(cav="svm")), "rrclarc", []),
        revision_key("c-1", revealed, "aclarc", []),
        revision_key("c-1", revealed, "rrclarc", ["method.options.lam=100"]),
    }
    # an annotated concept does not depend on how the reveal is set; both depend on the correction's layer and CAV
    assert revise.concept_key("annotated", RevealSettings()) == revise.concept_key(
        "annotated", RevealSettings(cav="svm")
    )
    assert revise.concept_key("annotated", RevealSettings()) != revealed
    assert replace(revise, cav="logistic").concept_key("revealed", RevealSettings()) != revealed
    assert len(keys) == 5 and all(k.startswith("r-") for k in keys)


def _p_clarc_reference(model: torch.nn.Module, layer: str, v: np.ndarray, z_clean: float):
    """P-ClArC written out for this test: the layer's output a (N, C) or (N, C, H, W) becomes
    a + (z_clean - v . maxpool(a)) v, the same shift at every position."""
    unit = torch.as_tensor(v / np.linalg.norm(v), dtype=torch.float32)

    def hook(module, inputs, out):
        pooled = out if out.dim() == 2 else out.flatten(2).max(2).values
        shift = (z_clean - pooled @ unit)[:, None] * unit[None, :]
        return out + (shift if out.dim() == 2 else shift[:, :, None, None])

    return dict(model.named_modules())[layer].register_forward_hook(hook)


@pytest.mark.slow
def test_a_revise_study_corrects_each_seeds_baseline_and_compares_it(tmp_path, monkeypatch, capsys):
    from teachx.data.artefacts import ground_truth
    from teachx.runs.plan import make_plan
    from teachx.runs.stages import load_stage_model
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study
    from teachx.training.concepts import load_concept

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = _study(
        tmp_path,
        "study:\n  n_seeds: 2\n"
        "  arms: {oracle: {method.name: rrr, data.artefact.oracle_masks: true}}\n  ceiling: {data.artefact.p: 0}\n"
        "  eval: {reveal: {teacher: gradient}}\n"
        "  revise: {methods: [pclarc, rrclarc, rrr_revealed], options: {rrclarc: {train.epochs: 1},\n"
        "           rrr_revealed: {train.epochs: 1}}, oracle: oracle, localise: 50,\n"
        "           concepts: [revealed, annotated]}\n",
    )
    spec = load_study(str(cfg))
    res = run_study(spec, tmp_path / "out", lambda line: None)
    rows = {r["arm"]: r for r in res.data["rows"]}
    assert list(rows) == [
        "baseline",
        "oracle",
        "ceiling",
        "reveal+pclarc",
        "reveal+rrclarc",
        "reveal+rrr_revealed",
        "annotated+pclarc",
        "annotated+rrclarc",
        "annotated+rrr_revealed",
    ]
    units = res.data["units"]
    base = rows["baseline"]
    # every row has the accuracy per split and the gradient's share on the (framed) artefact
    for r in rows.values():
        assert set(r["test_splits"]) == {"clean", "attacked", "ch"}
        assert r["shortcut"]["gradient"]["mean"] > 0 and r["shortcut"]["area"]["mean"] > 0
    # the ceiling: a baseline per seed trained on the regime's benchmark with no poisoned image (p: 0 on top of it)
    for key in rows["ceiling"]["units"]:
        unit_cfg = json.loads((tmp_path / "out" / "units" / key / "unit.json").read_text())["config"]
        assert unit_cfg["data"]["artefact"]["p"] == 0 and units[key]["kind"] == "classifier"
    ceiling_acc = rows["ceiling"]["test_acc"]
    assert rows["ceiling"]["vs_baseline"]["mean_diff"] == pytest.approx(
        np.mean(np.subtract(ceiling_acc, base["test_acc"]))
    )
    for arm in ("oracle", "ceiling", "reveal+pclarc", "reveal+rrclarc"):
        row = rows[arm]
        mine = [units[k]["test_splits"]["attacked"]["acc"] for k in row["units"]]
        theirs = [units[k]["test_splits"]["attacked"]["acc"] for k in base["units"]]
        got = row["splits_vs_baseline"]["attacked"]
        assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(mine, theirs)))
        if np.std(np.subtract(mine, theirs)) > 0:
            assert got["p_ttest"] == pytest.approx(stats.ttest_rel(mine, theirs).pvalue)
        oracle = [units[k]["test_splits"]["attacked"]["acc"] for k in rows["oracle"]["units"]]
        span = np.mean(oracle) - np.mean(theirs)
        if arm != "oracle" and abs(span) > 1e-12:
            assert row["gap_recovered"]["attacked"] == pytest.approx((np.mean(mine) - np.mean(theirs)) / span)
    # the corrections: each seed's unit names its baseline; with a concept, P-ClArC's accuracy is the written-out
    # projection's on the same baseline, and RR-ClArC fine-tuned only the dense layers of that baseline
    ucfg = spec.config("all", None, 0)
    plan = make_plan(ucfg, progress=False)
    ds = plan.dataset
    assert any(units[k]["revision"]["concept"].get("name") for k in rows["reveal+pclarc"]["units"])
    for s, key in enumerate(rows["reveal+pclarc"]["units"]):
        unit = units[key]
        assert unit["kind"] == "revision" and unit["baseline_unit"] == base["units"][s]
        rev = unit["revision"]
        if not rev["concept"].get("name"):
            assert rev["notes"] and unit["test_acc"] == pytest.approx(units[base["units"][s]]["test_acc"])
            continue
        concept = load_concept(tmp_path / "out" / rev["concept"]["file"])
        model = load_stage_model(tmp_path / "out" / "units" / base["units"][s])
        assert rev["before"]["test_acc"] == pytest.approx(units[base["units"][s]]["test_acc"])
        handle = _p_clarc_reference(model, concept.layer, concept.cav, concept.z_clean)
        attacked = ground_truth(ds).test_splits["attacked"]
        x = torch.from_numpy(np.array(attacked.images)).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(plan.mean)[:, None, None], torch.tensor(plan.std)[:, None, None]
        with torch.no_grad():
            pred = model((x - mean) / std).argmax(1).numpy()
        handle.remove()
        acc = float((pred == np.asarray(attacked.labels)).mean())
        assert unit["test_splits"]["attacked"]["acc"] == pytest.approx(acc, abs=1e-9)
    for s, key in enumerate(rows["reveal+rrclarc"]["units"]):
        rev = units[key]["revision"]
        if not rev["concept"].get("name"):
            continue
        before = load_stage_model(tmp_path / "out" / "units" / base["units"][s]).state_dict()
        after = load_stage_model(tmp_path / "out" / "units" / key / "model").state_dict()
        conv = [k for k in before if k.startswith("body") and k.endswith("weight")]
        assert conv and all(torch.equal(before[k], after[k]) for k in conv)  # features frozen (the R2R recipe)
        assert any(not torch.equal(before[k], after[k]) for k in before if k not in conv)
        assert rev["train"]["seconds"] > 0 and rev["after"]["sensitivity"] is not None
    # RRR on the revealed masks: the concept carries the masks of the best-scoring images (at most study.revise.localise)
    for s, key in enumerate(rows["reveal+rrr_revealed"]["units"]):
        rev = units[key]["revision"]
        if not rev["concept"].get("name"):
            continue
        concept = load_concept(tmp_path / "out" / rev["concept"]["file"])
        masks, where = concept.arrays["masks"], concept.arrays["localised"]
        assert masks.shape[1:] == tuple(ds.image_size) and 0 < len(where) <= 50 and masks.any()
        scores_of = dict(zip(np.sort(np.asarray(plan.train_idx)).tolist(), range(len(plan.train_idx))))
        assert len(set(where.tolist())) == len(where) and all(int(i) in scores_of for i in where)
        before = load_stage_model(tmp_path / "out" / "units" / base["units"][s]).state_dict()
        after = load_stage_model(tmp_path / "out" / "units" / key / "model").state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("body"))  # freeze: none
    # the images localised: the concept's own group first (for the annotated reference: the true carriers), then the
    # rest of its class by CAV score, never another class's images (the CAV separates the group within its class)
    labels, truth = np.asarray(ds.train.labels), ground_truth(ds).train_poisoned
    in_split = np.sort(np.asarray(plan.train_idx))
    for row in ("reveal+rrr_revealed", "annotated+rrr_revealed"):
        for s, key in enumerate(rows[row]["units"]):
            rev = units[key]["revision"]
            if not rev["concept"].get("name"):
                continue
            where = load_concept(tmp_path / "out" / rev["concept"]["file"]).arrays["localised"]
            assert (labels[where] == 2).all()
            if row.startswith("annotated"):
                carriers = in_split[truth[in_split] & (labels[in_split] == 2)]
                k = min(len(carriers), len(where))
                assert np.array_equal(where[:k], carriers[:k])
    # the annotated reference: the pattern CAV of the true labels, computed here from the layer's output
    for s, key in enumerate(rows["annotated+pclarc"]["units"]):
        rev = units[key]["revision"]
        concept = load_concept(tmp_path / "out" / rev["concept"]["file"])
        model = load_stage_model(tmp_path / "out" / "units" / base["units"][s])
        truth = ground_truth(ds).train_poisoned
        labels = np.asarray(ds.train.labels)
        shirts = np.sort(np.asarray(plan.train_idx))
        shirts = shirts[labels[shirts] == 2]
        grabbed = []
        handle = dict(model.named_modules())[concept.layer].register_forward_hook(lambda m, i, o: grabbed.append(o))
        x = torch.from_numpy(np.array(ds.train.images[shirts])).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(plan.mean)[:, None, None], torch.tensor(plan.std)[:, None, None]
        with torch.no_grad():
            model((x - mean) / std)
        handle.remove()
        a = grabbed[0] if grabbed[0].dim() == 2 else grabbed[0].flatten(2).max(2).values
        a = a.numpy().astype(np.float64)
        diff = a[truth[shirts]].mean(0) - a[~truth[shirts]].mean(0)
        assert float(np.dot(diff / np.linalg.norm(diff), concept.cav)) == pytest.approx(1.0, abs=1e-5)
        assert rows["annotated+pclarc"]["revision"]["concept_source"] == "annotated"
    # `teachx study --status` knows the correction units by the runner's keys
    from teachx.studies.status import study_status

    status = study_status(load_study(str(cfg)), tmp_path / "out")
    rev_units = [u for u in status.units if u.unit.kind == "revision"]
    assert {u.unit.key for u in rev_units} == {k for r in rows.values() if r["kind"] == "revision" for k in r["units"]}
    assert all(u.state == "done" for u in rev_units) and status.seconds_left() == 0
    # `teachx serve` lists the fine-tuned corrections as models of their own; a post-hoc one says where its numbers are
    from teachx.service.catalog import discover

    (study_entry,) = discover([tmp_path / "out"])
    by_role = {}
    for m in study_entry.models:
        by_role.setdefault(m.role, []).append(m)
    for m in by_role["reveal+rrclarc"]:
        unit = units[m.name]
        if unit["revision"]["concept"].get("name"):
            assert m.error is None and m.checkpoint.is_file() and m.test_acc == pytest.approx(unit["test_acc"])
    assert all("post-hoc correction" in m.error for m in by_role["reveal+pclarc"])
    # resumed: nothing is made again
    made = sorted((tmp_path / "out" / "units").glob("r-*/revision.json"))
    stamps = [f.stat().st_mtime_ns for f in made]
    again = run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)
    assert again.trained == 0 and [f.stat().st_mtime_ns for f in made] == stamps
    # a damaged correction record is an error that names the fix, never a number
    from teachx.errors import TeachxError

    made[0].write_text(made[0].read_text().replace('"method"', '"methot"', 1))
    with pytest.raises(TeachxError, match="revision"):
        run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)
    made[0].unlink()  # the fix: delete it and run again (the correction is made anew)
    run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)
    assert made[0].is_file()
    # the documentation's table (scripts/study_table.py) lists every row's per-split comparison
    import runpy

    table = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "study_table.py"))
    table["main"](str(tmp_path / "out" / "study.json"))
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("| all | reveal+rrclarc |"))
    cmp = rows["reveal+rrclarc"]["splits_vs_baseline"]["attacked"]
    assert f"{100 * cmp['mean_diff']:+.1f}" in line
    from teachx.reporting.report import write_report

    _, md = write_report(tmp_path / "out")
    text = Path(md).read_text()
    assert "Corrections and other arms against the baseline on the attacked test split" in text
    assert "reveal+rrclarc" in text
    assert "splits.png" in text and (Path(md).parent / "report_files" / "splits.png").stat().st_size > 1000


def test_the_shipped_revise_study_keeps_its_unit_keys_and_adds_impactx_cleaned():
    """The shipped study's baselines, ceilings and oracles keep the keys they always had (their directories resume);
    its corrections are keyed by their concept, which carries the masks its mask-reading methods (rrr_revealed,
    impactx_cleaned) need, and so by how those masks are chosen (``CONCEPT_MASKS_VERSION``: the group first, then
    its class); along the grown group (``group: grown``) the revealed rows differ from the top group's, the annotated
    ones do not; impactx_cleaned's units train anew with the study's own epochs and learning rate."""
    import hashlib
    from dataclasses import replace

    from teachx.studies.spec import load_study, planned_units

    def digest(keys) -> tuple[int, str]:
        keys = sorted(keys)
        return len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    spec = load_study("study-r2r-revise-fashion-mnist")
    assert spec.revise.group == "grown"
    units = planned_units(spec)
    assert digest(u.key for u in units if u.kind != "revision") == (75, "5eb966dfa6979e54")
    assert digest(u.key for u in units) == (375, "3f531d4ffb59b155")
    top = replace(spec, revise=replace(spec.revise, group="top"))
    top_units = planned_units(top)
    annotated = {u.key for u in units if u.arm.startswith("annotated+")}
    revealed = {u.key for u in units if u.arm.startswith("reveal+")}
    assert len(annotated) == len(revealed) == 150
    assert annotated <= {u.key for u in top_units} and not revealed & {u.key for u in top_units}
    new = [u for u in units if u.config.method.name == "impactx_cleaned"]
    assert len(new) == 5 * 5 * 2 and {u.arm for u in new} == {"reveal+impactx_cleaned", "annotated+impactx_cleaned"}
    assert all(u.kind == "revision" and u.config.train.epochs == 10 and u.config.train.lr == 0.002 for u in new)
    assert spec.revise.masks() == spec.revise.localise


@pytest.mark.slow
def test_a_revise_study_trains_impactx_on_cleaned_teacher_maps(tmp_path, monkeypatch):
    """``study.revise.methods: [impactx_cleaned]``: rows reveal+ and annotated+, each unit IMPACTX trained with the
    study's settings on the teacher maps of its baseline, cleaned inside the concept's localised masks; `--status`
    knows the units; a re-run reads them back."""
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study
    from teachx.studies.status import study_status

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = _study(
        tmp_path,
        "study:\n  n_seeds: 1\n  arms: {}\n  eval: {reveal: {teacher: gradient}}\n"
        "  revise: {methods: [impactx_cleaned], options: {impactx_cleaned: {train.epochs: 1}}, localise: 30,\n"
        "           concepts: [revealed, annotated]}\n",
    )
    res = run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)
    rows = {r["arm"]: r for r in res.data["rows"]}
    assert list(rows) == ["baseline", "reveal+impactx_cleaned", "annotated+impactx_cleaned"]
    units = res.data["units"]
    trained = 0
    for row in ("reveal+impactx_cleaned", "annotated+impactx_cleaned"):
        (key,) = rows[row]["units"]
        rev = units[key]["revision"]
        assert set(units[key]["test_splits"]) == {"clean", "attacked", "ch"}
        if not rev["concept"].get("name"):  # the reveal found no usable group: the baseline as it is
            continue
        trained += 1
        stage = json.loads((tmp_path / "out" / "units" / key / "model" / "stage.json").read_text())
        assert stage["method"] == "impactx_cleaned" and len(stage["history"]) == 1
        assert 0 < stage["concept"]["n_masks"] <= 30 and rev["after"]["tcav"] is None
        assert rev["train"]["test_acc"] == pytest.approx(units[key]["test_acc"])
    assert trained  # the annotated concept always has images with and without the artefact
    cleaned = (
        [d for d in (tmp_path / "cache" / "maps").iterdir() if "derived_from" in (d / "meta.json").read_text()]
        if (tmp_path / "cache" / "maps").is_dir()
        else []
    )
    assert len(cleaned) == trained
    status = study_status(load_study(str(cfg)), tmp_path / "out")
    rev_units = [u for u in status.units if u.unit.kind == "revision"]
    assert len(rev_units) == 2 and all(u.state == "done" and u.epochs == 1 for u in rev_units)
    again = run_study(load_study(str(cfg)), tmp_path / "out", lambda line: None)
    assert again.trained == 0


def test_dry_run_says_which_concept_each_correction_row_follows(tmp_path):
    """`--dry-run` tells a revealed row (the concept the reveal finds) from an annotated one (the CAV of the true
    carriers, which reads the annotations), and writes nothing."""
    from conftest import invoke_study

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    res = invoke_study(
        str(repo / "studies" / "study-r2r-revise-fm-cpu.yaml"),
        "--out",
        out,
        "--dry-run",
        "study.revise.methods=[pclarc]",
    )
    assert res.exit_code == 0, res.output
    lines = {ln.split(":")[0].strip(): ln for ln in res.output.splitlines() if ln.strip().startswith("arm=")}
    assert "the concept the baseline's reveal finds" in lines["arm=reveal+pclarc"]
    assert "truly carry the artefact" in lines["arm=annotated+pclarc"]
    assert "reveal finds" not in lines["arm=annotated+pclarc"]
    assert lines["arm=reveal+pclarc"].endswith("the top group of the poisoned class)")
    assert not out.exists()
    grown = invoke_study(
        str(repo / "studies" / "study-r2r-revise-fm-cpu.yaml"),
        "--out",
        out,
        "--dry-run",
        "study.revise.methods=[pclarc]",
        "study.revise.group=grown",
    )
    assert grown.exit_code == 0, grown.output
    assert "the top group of the poisoned class grown against the other classes)" in grown.output
    assert not out.exists()


def test_a_concept_fitted_on_the_grown_group_has_its_own_key_and_needs_a_growing_reveal(tmp_path):
    """study.revise.group=grown: the revealed concept is fitted on the reveal's grown group, so its key depends on
    how many rounds the reveal grows it (and differs from the top group's); annotated concepts are unaffected;
    without a reveal that grows, one line names the fix."""
    from dataclasses import replace

    from teachx.runs.reveal_benchmark import RevealSettings
    from teachx.studies.spec import load_study

    top = load_study(str(_study(tmp_path, "study: {arms: {}, revise: {methods: [pclarc]}}"))).revise
    grown = load_study(str(_study(tmp_path, "study: {arms: {}, revise: {methods: [pclarc], group: grown}}"))).revise
    settings = RevealSettings()
    assert settings.refine > 0  # the study reveal grows its top group by default
    assert grown.concept_key("revealed", settings) != top.concept_key("revealed", settings)
    assert grown.concept_key("revealed", settings) != grown.concept_key("revealed", replace(settings, refine=2))
    assert grown.concept_key("annotated", settings) == top.concept_key("annotated", settings)
    with pytest.raises(ConfigError, match=r"study.eval.reveal.refine"):
        load_study(
            str(
                _study(
                    tmp_path,
                    "study: {arms: {}, eval: {reveal: {refine: 0}}, revise: {methods: [pclarc], group: grown}}",
                )
            )
        )
    with pytest.raises(ConfigError, match="study.revise.group must be top or grown"):
        load_study(str(_study(tmp_path, "study: {arms: {}, revise: {methods: [pclarc], group: all}}")))
