"""A tiny study end to end: baseline reuse across arms, resume without training, statistics vs scipy."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from conftest import TEACHX, invoke_study, teachx_env, teachx_main

from teachx.errors import ConfigError
from teachx.studies.runner import run_study
from teachx.studies.spec import BASELINE, load_study
from teachx.training.methods import impactx_options
from teachx.training.trainer import Trainer


def make_zip(path: Path) -> Path:
    """4 classes, bright quadrant = class, low contrast so accuracies differ between seeds."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 24), ("test", 16)):
            for c, name in enumerate(["tl", "tr", "bl", "br"]):
                for i in range(n):
                    a = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8)
                    r, q = divmod(c, 2)
                    a[r * 16 : r * 16 + 16, q * 16 : q * 16 + 16] += 25
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="PNG")
                    zf.writestr(f"{split}/{name}/{i}.png", buf.getvalue())
    return path


RUN = """
data:
  name: imagefolder:{zip}
  hflip: false
  val_fraction: 0.2
model:
  backbone: lenet5
train:
  epochs: 2
  batch_size: 32
  lr: 0.003
teacher:
  method: gradient_x_input
  batch_size: 64
"""

#: teacher.faith_images for the runs and studies whose map-quality faithfulness block is not what a test checks, or
#: only for its summaries: the block (built-in and reference maps scored on the model) takes most of a tiny unit's
#: time when it scores every test image (the default, 256, is more than this data set's 64)
FEW_FAITH_IMAGES = "teacher.faith_images=8"
#: RUN with FEW_FAITH_IMAGES
RUN_FEW_FAITH = RUN + "  faith_images: 8\n"

STUDY = (
    RUN_FEW_FAITH
    + """
study:
  n_seeds: 3
  arms:
    impactx: {{}}
    lambda0: {{impactx.lam: 0}}
    shuffled: {{impactx: {{maps: shuffled}}}}
  eval: {{faithfulness: true, n_images: 12, steps: 4, examples: 2}}
"""
)


def tiny_study(root: Path) -> dict:
    """Run the study in ``root``, twice (the second resumes); conftest's session-scoped ``study_dir`` fixture
    calls it once for this module and tests/test_report.py, which read its outputs."""
    torch.set_num_threads(1)
    z = make_zip(root / "tiny.zip")
    cfg = root / "study.yaml"
    cfg.write_text(STUDY.format(zip=z))
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(root / "cache"))
    fits: list[str] = []
    original = Trainer.fit

    def counting_fit(self, *a, **k):
        fits.append(self.meta.get("kind", "?") if hasattr(self, "meta") else "?")
        return original(self, *a, **k)

    mp.setattr(Trainer, "fit", counting_fit)
    lines: list[str] = []
    spec = load_study(str(cfg), ["study.n_seeds=2"])  # override of the study section: 2 seeds
    first = run_study(spec, root / "out", lines.append)
    n_first = len(fits)
    second_lines: list[str] = []
    second = run_study(load_study(str(cfg), ["study.n_seeds=2"]), root / "out", second_lines.append)
    mp.undo()
    return {
        "root": root,
        "cfg": cfg,
        "first": first,
        "second": second,
        "fits_first": n_first,
        "fits_total": len(fits),
        "kinds": fits,
        "lines": lines,
        "second_lines": second_lines,
    }


@pytest.mark.slow
def test_baseline_trained_once_per_seed_and_shared(study_dir):
    # 2 seeds x (1 baseline + 3 IMPACTX arms); the baseline (also the teacher) is shared by all arms
    assert study_dir["fits_first"] == 2 * 4
    assert study_dir["kinds"][: study_dir["fits_first"]].count("classifier") == 2
    data = study_dir["first"].data
    rows = {r["arm"]: r for r in data["rows"]}
    base_units = set(rows[BASELINE]["units"])
    assert len(base_units) == 2
    for arm in ("impactx", "lambda0", "shuffled"):
        assert {data["units"][k]["baseline_unit"] for k in rows[arm]["units"]} == base_units
        assert {data["units"][k]["teacher_unit"] for k in rows[arm]["units"]} == base_units
    assert sum(1 for u in data["units"].values() if u["kind"] == "classifier") == 2


@pytest.mark.slow
def test_resume_does_no_training(study_dir):
    assert study_dir["fits_total"] == study_dir["fits_first"]  # second invocation: no Trainer.fit at all
    assert study_dir["second"].trained == 0
    assert all("(cached)" in ln for ln in study_dir["second_lines"] if ln.startswith("["))
    assert study_dir["second"].data["rows"] == study_dir["first"].data["rows"]
    el = study_dir["second"].data["elapsed"]  # spans both invocations: from the first unit to the last record
    assert el["seconds"] > 0 and el["first_unit_created"] < el["last_record_written"]


@pytest.mark.slow
def test_progress_lines(study_dir):
    unit_lines = [ln for ln in study_dir["lines"] if ln.startswith("[")]
    assert len(unit_lines) == 8 and unit_lines[0].startswith("[1/8] regime=all arm=baseline seed=0")
    assert any("Does the gain come from the explanations?" in ln for ln in study_dir["lines"])


@pytest.mark.slow
def test_pvalues_equal_scipy_on_stored_accuracies(study_dir):
    data = json.loads((study_dir["root"] / "out" / "study.json").read_text())
    rows = {r["arm"]: r for r in data["rows"]}
    units = data["units"]
    for arm in ("impactx", "lambda0", "shuffled"):
        accs = [units[k]["test_acc"] for k in rows[arm]["units"]]
        assert accs == rows[arm]["test_acc"]
        base = [units[k]["test_acc"] for k in rows[BASELINE]["units"]]
        _check(rows[arm]["vs_baseline"], accs, base)
        mean = np.mean(accs)
        assert rows[arm]["summary"]["mean"] == pytest.approx(mean)
        assert rows[arm]["summary"]["std"] == pytest.approx(np.std(accs, ddof=1))
    ctrl = rows["lambda0"]["test_acc"]
    for arm in ("impactx", "shuffled"):
        _check(rows[arm]["vs_control"], rows[arm]["test_acc"], ctrl)
    assert "vs_control" not in rows["lambda0"]
    assert {v["arm"] for v in data["verdicts"]} == {"impactx", "shuffled"} and all(
        v["regime"] == "all" for v in data["verdicts"]
    )
    # map quality and faithfulness were collected per unit
    mq = rows["impactx"]["map_quality"]
    assert {"corr", "corr_mean_map", "r2_vs_mean_map"} <= set(mq)
    # the built-in maps' faithfulness to the IMPACTX model itself, summarised over seeds from each unit's block
    blocks = [units[k]["map_quality"]["faithfulness"] for k in rows["impactx"]["units"]]
    assert mq["corr_self"]["mean"] == pytest.approx(np.mean([b["corr_self"] for b in blocks]))
    assert mq["pixel_flipping_morf.built_in"]["mean"] == pytest.approx(
        np.mean([b["auc"]["pixel_flipping_morf"]["built_in"] for b in blocks])
    )
    sets = rows["impactx"]["faithfulness"]
    assert {"built_in", "teacher_post_hoc", "random", "teacher_on_baseline", "random_on_baseline"} <= set(sets)
    assert len(sets["built_in"]["pixel_flipping_morf"]["curve"]) == 5


def _check(cmp, a, b):
    d = np.asarray(a) - np.asarray(b)
    assert cmp["differences"] == pytest.approx(d.tolist())
    if np.all(d == 0):
        assert cmp["p_ttest"] == 1.0 and cmp["p_wilcoxon"] == 1.0
        return
    if np.std(d) > 0:
        assert cmp["p_ttest"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert cmp["p_wilcoxon"] == pytest.approx(sps.wilcoxon(d).pvalue)


def test_study_config_errors(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("study:\n  arms:\n    a: {impactx.lamm: 0}\n")
    with pytest.raises(ConfigError, match="unknown option 'impactx.lamm' \\(did you mean 'impactx.lam'"):
        load_study(str(cfg))
    cfg.write_text("study:\n  arms:\n    baseline: {}\n")
    with pytest.raises(ConfigError, match="reserved"):
        load_study(str(cfg))
    cfg.write_text("study:\n  n_seed: 3\n")
    with pytest.raises(ConfigError, match="n_seeds"):
        load_study(str(cfg))
    cfg.write_text("model: {backbone: lenet5}\n")
    with pytest.raises(ConfigError, match="study"):
        load_study(str(cfg))
    cfg.write_text("study:\n  arms: {a: {}, b: {impactx.lam: 0.5}}\n  control: b\n")
    with pytest.raises(ConfigError, match="lam: 0"):
        load_study(str(cfg))


def test_regimes_and_seeds_parsing(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "study:\n  seeds: [3, 7]\n  arms: {x: {}, zero: {impactx.lam: 0}}\n"
        "  regimes:\n    - {name: small, data.train_size: 20}\n    - {data: {train_size: 40}}\n    - {}\n"
    )
    spec = load_study(str(cfg))
    assert spec.seeds == [3, 7] and spec.control == "zero"
    assert list(spec.regimes) == ["small", "train_size=40", "all"]
    c = spec.config("small", "zero", 7)
    assert c.seed == 7 and c.data.train_size == 20 and impactx_options(c).lam == 0
    assert load_study(str(cfg), n_seeds=4).seeds == [0, 1, 2, 3]


@pytest.mark.slow
def test_cached_study_cli(study_dir):
    """`teachx study` on the finished study: no training, report written, one line per unit."""
    res = invoke_study(
        study_dir["cfg"],
        "--out",
        study_dir["root"] / "out",
        "--seeds",
        "2",
        "-q",
        env={"TEACHX_CACHE": str(study_dir["root"] / "cache")},
    )
    assert res.exit_code == 0, res.output
    assert "0 models trained" in res.output and (study_dir["root"] / "out" / "report.html").exists()


@pytest.mark.slow
def test_two_processes_share_one_study(study_dir, tmp_path):
    """Two `teachx study` processes on one directory train every unit once, with the single-process numbers."""
    import subprocess

    env = teachx_env({"TEACHX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    cmd = [*TEACHX, "study", str(study_dir["cfg"]), "--out", str(tmp_path / "out"), "--seeds", "2", "-q", "--no-report"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trained = [ln for out in outs for ln in out.splitlines() if ln.startswith("[") and "(trained" in ln]
    assert len(trained) == 8  # 2 seeds x (baseline + 3 arms): each unit trained by exactly one process
    assert all(any("(trained" in ln for ln in out.splitlines()) for out in outs)  # both did some of the work
    assert not list((tmp_path / "out").rglob("*.lock")) and not list((tmp_path / "cache").rglob("*.lock"))
    data = json.loads((tmp_path / "out" / "study.json").read_text())
    single = study_dir["first"].data
    assert [r["test_acc"] for r in data["rows"]] == [r["test_acc"] for r in single["rows"]]


def test_unit_keys_hash_only_result_changing_non_default_values():
    """Adding an option with a behaviour-keeping default, or a display flag, must not change keys."""
    from dataclasses import replace

    from teachx.config.schema import RunConfig
    from teachx.studies.spec import _relevant, classifier_key, eval_key, EvalSpec, impactx_key
    from teachx.config.loader import from_dict

    # the paper's decoder was the default when these keys were first made: a config that names it hashes
    # nothing, so units trained under the old default keep their keys (_KEY_REFERENCE)
    base = from_dict(RunConfig, {"impactx": {"decoder": "paper"}})
    assert _relevant(base) == {}
    design = RunConfig()  # today's default design is hashed as what it is: the same key as when it was an option
    default_design = {
        "decoder": "unet_input",
        "per_class": True,
        "map_loss": "pearson",
        "decoder_width": 16,
        "decoder_reads_m": True,
        "self_teach_every": 1,
        "self_teach_method": "gradient_x_input",
    }
    explicit = from_dict(RunConfig, {"impactx": default_design})
    assert _relevant(design) == {"impactx": default_design}
    assert impactx_key(design) == impactx_key(explicit) != impactx_key(base)
    # the previous default design (unet_input, width 64, reading M, no self-teaching) hashes exactly what it hashed
    # when it was the default, and so does the one before it (width 32, not reading M)
    previous = from_dict(RunConfig, {"impactx": {"decoder_width": 64, "self_teach_every": 0}})
    assert _relevant(previous) == {
        "impactx": {
            "decoder": "unet_input",
            "per_class": True,
            "map_loss": "pearson",
            "decoder_width": 64,
            "decoder_reads_m": True,
        }
    }
    before = from_dict(
        RunConfig,
        {"impactx": {"decoder": "unet_input", "decoder_width": 32, "decoder_reads_m": False, "self_teach_every": 0}},
    )
    assert _relevant(before) == {"impactx": {"decoder": "unet_input", "per_class": True, "map_loss": "pearson"}}
    # other methods ignore impactx.*: their keys do not see the design default either
    rrr = from_dict(RunConfig, {"method": {"name": "rrr"}})
    assert "impactx" not in _relevant(rrr)
    quiet = replace(base, train=replace(base.train, progress=not base.train.progress, tensorboard=True))
    assert impactx_key(quiet) == impactx_key(base) and _relevant(quiet) == {}  # no empty 'train' section left
    assert classifier_key(quiet, "lenet5", {}) == classifier_key(base, "lenet5", {})
    assert eval_key(quiet, EvalSpec()) == eval_key(base, EvalSpec())
    # an explicit default value keys like the default itself; a real change gives a new key
    same = replace(base, method=replace(base.method, options={**base.method.options, "lam": 1}))
    assert impactx_key(same) == impactx_key(base)
    other = replace(base, method=replace(base.method, options={**base.method.options, "lam": 0.0}))
    assert impactx_key(other) != impactx_key(base) and _relevant(other) == {"impactx": {"lam": 0.0}}
    opts = replace(base, model=replace(base.model, options={"dropout": 0.1}))
    assert _relevant(opts) == {"model": {"options": {"dropout": 0.1}}}  # option dicts are hashed whole


PRIVILEGED = (
    RUN
    + """
study:
  n_seeds: 1
  arms:
    impactx: {{}}
    lambda0: {{impactx.lam: 0}}
    full_data_teacher: {{teacher.training: {{data.train_size: null}}}}
  regimes:
    - {{name: small, data.train_size: 40}}
    - {{name: full}}
  arm_regimes: {{full_data_teacher: [small]}}
"""
)


@pytest.mark.slow
def test_teacher_trained_on_more_data_and_arm_regimes(tmp_path, monkeypatch):
    """teacher.training: the small regime's teacher is the full split's model (trained once, shared);
    arm_regimes: the arm runs only where asked, and its maps are that teacher's maps of the small split."""
    torch.set_num_threads(1)
    z = make_zip(tmp_path / "tiny.zip")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(PRIVILEGED.format(zip=z))
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    fits: list[str] = []
    original = Trainer.fit
    monkeypatch.setattr(
        Trainer, "fit", lambda self, *a, **k: (fits.append(self.meta["kind"]), original(self, *a, **k))[1]
    )
    spec = load_study(str(cfg), ["train.epochs=1", "teacher.seed=0", FEW_FAITH_IMAGES])
    assert (
        spec.runs("small", "full_data_teacher")
        and not spec.runs("full", "full_data_teacher")
        and spec.runs("full", None)
    )
    data = run_study(spec, tmp_path / "out", lambda _l: None).data
    # 2 regimes x (baseline, impactx, lambda0) + the arm in 'small' only; its teacher is the 'full' baseline (seed 0)
    assert fits.count("classifier") == 2 and fits.count("impactx") == 5
    rows = {(r["regime"], r["arm"]): r for r in data["rows"]}
    assert ("full", "full_data_teacher") not in rows and ("small", "full_data_teacher") in rows
    units = data["units"]
    arm_unit = units[rows[("small", "full_data_teacher")]["units"][0]]
    full_base = rows[("full", BASELINE)]["units"][0]
    small_base = rows[("small", BASELINE)]["units"][0]
    assert arm_unit["teacher_unit"] == full_base and arm_unit["baseline_unit"] == small_base
    assert units[rows[("small", "impactx")]["units"][0]]["teacher_unit"] == small_base
    assert rows[("small", "full_data_teacher")]["teacher_test_acc"]["mean"] == units[full_base]["test_acc"]
    # the arm's maps: the full-data teacher explaining the small regime's training images
    from teachx.runs.plan import make_plan
    from teachx.runs.stages import load_classifier
    from teachx.runs.teacher import map_fn, make_teacher

    small_cfg = spec.config("small", "full_data_teacher", 0)
    plan = make_plan(small_cfg, progress=False)
    teacher = load_classifier(tmp_path / "out" / "units" / full_base / "checkpoints" / "best.safetensors", plan.dataset)
    expected = map_fn(
        small_cfg, plan, make_teacher(small_cfg, plan, torch.device("cpu")), plan.dataset.train, torch.device("cpu")
    )(teacher, plan.train_idx)
    stored = torch.from_numpy(np.load(Path(arm_unit["map_store"]["train"]) / "maps.npy")[plan.train_idx]).float()
    assert len(plan.train_idx) == 32  # 40 images minus the validation fifth
    torch.testing.assert_close(stored, expected.half().float(), rtol=0, atol=1e-3)  # the store keeps float16
    own = torch.from_numpy(
        np.load(Path(units[rows[("small", "impactx")]["units"][0]]["map_store"]["train"]) / "maps.npy")[plan.train_idx]
    ).float()
    assert (own - stored).abs().max() > 0.05  # the small regime's own teacher gives other maps


OWN_BASELINE = (
    RUN
    + """
study:
  n_seeds: 2
  arms:
    impactx: {{}}
    lambda0: {{impactx.lam: 0}}
    no_augment: {{data.augment: false, teacher.training: {{data.augment: true}}}}
    lambda0_no_augment: {{impactx.lam: 0, data.augment: false, teacher.training: {{data.augment: true}}}}
  controls: {{no_augment: lambda0_no_augment}}
"""
)


@pytest.mark.slow
def test_arm_with_its_own_baseline_and_control(tmp_path, monkeypatch):
    """Arms whose data differ from the regime's (here: no augmentation) get a baseline of their own, which the
    runner trains first; the plan (and so --status) lists it, and the teacher stays the regime's baseline, as
    teacher.training asks. study.controls pairs such an arm with the lambda=0 arm trained on the same data."""
    from teachx.studies.spec import planned_units
    from teachx.studies.status import study_status

    torch.set_num_threads(1)
    z = make_zip(tmp_path / "tiny.zip")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(OWN_BASELINE.format(zip=z))
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    spec = load_study(str(cfg), ["train.epochs=1", FEW_FAITH_IMAGES])
    plan = planned_units(spec)
    assert [(u.arm, u.seed) for u in plan[:5]] == [
        (BASELINE, 0),
        ("impactx", 0),
        ("lambda0", 0),
        (f"no_augment {BASELINE}", 0),
        ("no_augment", 0),
    ]
    assert len(plan) == 2 * 6 and plan[3].config.data.augment is False and plan[0].config.data.augment is True
    data = run_study(spec, tmp_path / "out", lambda _l: None).data
    assert {p.name for p in (tmp_path / "out" / "units").iterdir()} == {u.key for u in plan}
    rows = {r["arm"]: r for r in data["rows"]}
    arm = data["units"][rows["no_augment"]["units"][0]]
    assert arm["baseline_unit"] == plan[3].key and arm["teacher_unit"] == plan[0].key
    assert rows["no_augment"]["vs_baseline"]["baseline"].startswith("own")
    # each arm against its own control, paired by seed (scipy's paired t-test as the reference)
    acc = {a: rows[a]["test_acc"] for a in rows}
    for a, control in (("impactx", "lambda0"), ("no_augment", "lambda0_no_augment")):
        c = rows[a]["vs_control"]
        assert c["control"] == control and c["mean_diff"] == pytest.approx(np.mean(acc[a]) - np.mean(acc[control]))
        if len(set(np.subtract(acc[a], acc[control]))) > 1:
            assert c["p_ttest"] == pytest.approx(sps.ttest_rel(acc[a], acc[control]).pvalue)
    assert "vs_control" not in rows["lambda0_no_augment"]
    assert [v["control"] for v in data["verdicts"]] == ["lambda0", "lambda0_no_augment"]
    assert data["study"]["controls"] == {"no_augment": "lambda0_no_augment"}
    st = study_status(spec, tmp_path / "out")
    assert {u.state for u in st.units} == {"done"} and st.seconds_left() == 0


def test_teacher_training_and_arm_regimes_errors(tmp_path):
    from teachx.runs.resolve import resolve_config

    with pytest.raises(ConfigError, match="data.\\* or train.\\*"):
        resolve_config(overrides=["teacher.training={model.backbone: mobilenet}"])
    with pytest.raises(ConfigError, match="did you mean 'teacher.training.train.epochs'"):
        from teachx.runs.plan import teacher_training

        teacher_training(resolve_config(overrides=["teacher.training={train.epoch: 3}"]))
    cfg = tmp_path / "s.yaml"
    base = "study:\n  arms: {a: {}, zero: {impactx.lam: 0}}\n  regimes: [{name: r1, data.train_size: 20}, {name: r2}]\n"
    for extra, match in (
        ("  arm_regimes: {b: [r1]}\n", "'b' is not an arm"),
        ("  arm_regimes: {a: [r3]}\n", "'r3' is not a regime"),
        ("  arm_regimes: {zero: [r1]}\n", "where its control 'zero' does not"),
        ("  arm_regimes: {a: []}\n", "non-empty list"),
        ("  controls: {a: a}\n", "its own control"),
        ("  controls: {a: zer}\n", "'zer' is not a control arm \\(did you mean 'zero'"),
        ("  controls: {zero: a}\n", "'a' must be an IMPACTX arm with impactx.lam: 0"),
        ("  controls: [a]\n", "must map arm names"),
    ):
        cfg.write_text(base + extra)
        with pytest.raises(ConfigError, match=match):
            load_study(str(cfg))


def test_study_dir_race_with_a_starting_process(tmp_path):
    """A second process may see the first one's study.yaml temp file before the rename: not an error;
    any other content in a directory without study.yaml still is."""
    from teachx.errors import RunDirError
    from teachx.studies.runner import prepare_study_dir
    from teachx.studies.spec import StudySpec

    spec = StudySpec({}, [0], {"impactx": {}}, {"all": {}})
    out = tmp_path / "s"
    out.mkdir()
    (out / ".study.yaml.k2j3.tmp").write_text("")
    assert (prepare_study_dir(out, spec) / "study.yaml").exists()
    other = tmp_path / "o"
    other.mkdir()
    (other / "results.json").write_text("{}")
    with pytest.raises(RunDirError, match="not a teachx study directory"):
        prepare_study_dir(other, spec)


@pytest.mark.slow
def test_pipeline_trains_the_teacher_with_teacher_training(tmp_path, monkeypatch):
    """`teachx run` path: teacher.training makes a separate teacher trained on the full split."""
    from teachx.runs.resolve import resolve_config
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import separate_teacher

    torch.set_num_threads(1)
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    z = make_zip(tmp_path / "tiny.zip")
    cfg = resolve_config(
        overrides=[
            f"data.name=imagefolder:{z}",
            "data.hflip=false",
            "data.val_fraction=0.2",
            "data.train_size=40",
            "train.epochs=1",
            "train.batch_size=32",
            "teacher.method=gradient_x_input",
            "teacher.training={data.train_size: null}",
            "train.progress=false",
        ]
    )
    assert separate_teacher(cfg)
    lines: list[str] = []
    out = run_pipeline(cfg, tmp_path / "run", lines.append, progress=False, figures=False)
    trained = [ln for ln in lines if "training lenet5" in ln]
    assert any(ln.startswith("[baseline]") and "(32 images" in ln for ln in trained), trained  # 40 minus validation
    assert any(ln.startswith("[teacher]") and "(76 images" in ln for ln in trained), (
        trained
    )  # the full 96 minus validation
    assert (tmp_path / "run" / "teacher" / "stage.json").exists() and out.results["teacher_test_acc"] is not None


@pytest.mark.slow
def test_status_reads_what_the_workers_left(study_dir, tmp_path, capsys):
    """`teachx study --status` on a copy of the finished study, then with one unit in each state a worker
    can leave behind; the accuracies come from study.json, the time left from a closed form."""
    import os
    import shutil
    import socket

    from teachx.studies.status import STATES, status_lines, study_status

    out = tmp_path / "out"
    shutil.copytree(study_dir["root"] / "out", out)
    spec = load_study(str(study_dir["cfg"]), ["study.n_seeds=2"])
    data = study_dir["first"].data
    rows = {r["arm"]: r["units"] for r in data["rows"]}  # arm -> [seed 0 key, seed 1 key]

    st = study_status(spec, out)
    assert {u.unit.key for u in st.units} == set(data["units"]) and all(u.state == "done" for u in st.units)
    assert {u.unit.key: u.test_acc for u in st.units} == {k: v["test_acc"] for k, v in data["units"].items()}
    assert st.seconds_left() == 0

    def truncate(key: str, epochs: int) -> None:  # what a worker stopped after `epochs` epochs leaves
        d = out / "units" / key
        hist = json.loads((d / "stage.json").read_text())["history"]
        (d / "stage.json").unlink()
        (d / "history.json").write_text(json.dumps(hist[:epochs]))

    for f in (out / "units" / rows["impactx"][0]).glob("eval-*.json"):
        f.unlink()  # trained, not yet evaluated
    truncate(rows[BASELINE][1], 1)  # interrupted after epoch 1
    truncate(rows["lambda0"][1], 1)  # being trained by a live process (this one)
    (out / "units" / rows["lambda0"][1] / ".lock").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    )
    record = out / "units" / rows["impactx"][1] / "stage.json"
    rec = json.loads(record.read_text())
    rec["test_acc"] = 0.99  # a changed number under the old digest
    record.write_text(json.dumps(rec))
    shutil.rmtree(out / "units" / rows["shuffled"][1])  # not started

    st = study_status(spec, out)
    state = {u.unit.key: u for u in st.units}
    assert state[rows["impactx"][0]].state == "to evaluate"
    assert (state[rows[BASELINE][1]].state, state[rows[BASELINE][1]].epochs_done) == ("interrupted", 1)
    live = state[rows["lambda0"][1]]
    assert (live.state, live.epochs_done, live.holder["pid"]) == ("training", 1, os.getpid())
    damaged = state[rows["impactx"][1]]
    assert damaged.state == "damaged" and damaged.test_acc is None and "delete" in damaged.message
    assert state[rows["shuffled"][1]].state == "not started"
    assert {u.state for u in st.units} <= set(STATES)
    assert sorted(u.unit.arm for u in st.units if u.state == "done") == [BASELINE, "lambda0", "shuffled"]  # seed 0's

    rate = lambda key: data["units"][key]["seconds_per_epoch"]  # noqa: E731 (the finished seed of each arm)
    evaluation = lambda arm: data["units"][rows[arm][0]]["timings"]["evaluation"]  # noqa: E731
    any_eval = float(np.median([evaluation("lambda0"), evaluation("shuffled")]))  # impactx 0's evaluation was deleted
    expected = (
        1 * rate(rows[BASELINE][0])  # epochs left x the arm's per-epoch time (impactx 0 is trained) ...
        + 1 * rate(rows["lambda0"][0])
        + evaluation("lambda0")  # ... plus the evaluations to come
        + 2 * rate(rows["shuffled"][0])
        + evaluation("shuffled")
        + 2 * rate(rows["impactx"][0])
        + any_eval
        + any_eval
    )  # impactx: seed 1 to train, both to evaluate
    assert st.seconds_left() == pytest.approx(expected)

    text = "\n".join(status_lines(st))
    acc = 100 * data["units"][rows["shuffled"][0]]["test_acc"]
    assert f"shuffled         1/2 seeds  {acc:.1f}%" in text and "impactx          0/2 seeds  -" in text
    assert f"(pid {os.getpid()} on {socket.gethostname()})" in text and "epoch 1/2" in text

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, printed, _ = teachx_main(
        capsys, "study", str(study_dir["cfg"]), "--out", str(out), "--seeds", "2", "--status"
    )
    assert code == 0 and printed.splitlines() == status_lines(study_status(spec, out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # read only: nothing written, no lock taken
    code, recorded, _ = teachx_main(capsys, "study", "--out", str(out), "--status")  # the spec DIR records
    assert code == 0 and recorded == printed
    empty = tmp_path / "empty"
    code, printed, err = teachx_main(capsys, "study", str(study_dir["cfg"]), "--out", str(empty), "--status")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "without --status" in err and not empty.exists()


@pytest.mark.slow
def test_study_records_read_back_exactly(study_dir):
    """study.json read through the typed records writes the same JSON again: keys, their order, values."""
    from teachx.studies.records import StudyRecord
    from teachx.utils.io import read_trusted_json

    data = read_trusted_json(study_dir["second"].path, "re-run the study")
    assert json.dumps(StudyRecord.from_dict(data).to_dict()) == json.dumps(data)


def test_study_records_of_older_teachx_read():
    """Records that lack keys teachx writes today (older studies) read with their defaults; a method's own keys
    stay where they stood."""
    from teachx.studies.records import StudyRow, UnitRecord

    unit = UnitRecord.from_dict({"kind": "impactx", "lam": 1.0, "maps": "teacher", "seed": 0, "test_acc": 0.5})
    assert unit.method_fields == {"lam": 1.0, "maps": "teacher"} and unit.history == [] and unit.errors == []
    assert list(unit.to_dict())[:4] == ["kind", "lam", "maps", "seed"]
    evaluated = {**unit.to_dict(), "map_quality": {"corr": 0.1}, "errors": ["x"], "old_measure": 1}
    again = UnitRecord.from_dict(evaluated)
    assert again.map_quality == {"corr": 0.1} and again.errors == ["x"] and "old_measure" in again.evaluation
    assert json.dumps(again.to_dict()) == json.dumps(evaluated)
    row = StudyRow.from_dict({"regime": "all", "arm": "impactx", "seeds": [0], "units": ["x-1"], "lam": 0.0})
    assert row.kind is None and row.lam == 0.0 and row.vs_control is None and not row.is_baseline


@pytest.mark.parametrize(
    "name, n, digest",
    [
        ("study-builtin-maps.yaml", 219, "6b823d4c4f1e73a3"),  # the full grid: additive and unet_input arms
        ("study-builtin-maps-reads-m.yaml", 48, "3467726571394058"),  # self-teaching arms and the old default
        ("study-trustworthy-maps.yaml", 40, "d777e4bcec45246a"),  # its B-cos arm is now evaluated: the same keys
    ],
)
def test_shipped_built_in_map_studies_keep_their_unit_keys(name, n, digest):
    """Their units were trained under earlier defaults: a new default (here self-teaching and width 16 for the
    unet_input decoder) must leave every planned unit key as it was, so existing study directories resume."""
    import hashlib
    from pathlib import Path

    from teachx.studies.spec import load_study, planned_units

    spec = load_study(str(Path(__file__).resolve().parent.parent / "studies" / name))
    keys = sorted(u.key for u in planned_units(spec))
    assert len(keys) == n and hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == digest


@pytest.mark.slow
def test_abn_arm_is_evaluated_like_impactx(tmp_path, monkeypatch):
    """A study's ABN arm gets the built-in-map evaluation IMPACTX arms get: its attention map's faithfulness on
    the ABN model itself next to the best unsmoothed post-hoc map of the same model, per unit and summarised."""
    from teachx.runs.stages import load_stage_model

    torch.set_num_threads(1)
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    z = make_zip(tmp_path / "tiny.zip")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(
        RUN.format(zip=z)
        + "study:\n  n_seeds: 1\n  arms:\n    abn: {method.name: abn}\n"
        + "  eval: {faithfulness: true, n_images: 12, steps: 4, examples: 2}\n"
    )
    result = run_study(load_study(str(cfg)), tmp_path / "out", lambda s: None)
    rows = {r["arm"]: r for r in result.data["rows"]}
    (key,) = rows["abn"]["units"]
    block = result.data["units"][key]["map_quality"]["faithfulness"]
    best = block["best_post_hoc"]
    # the best reference is the lowest-MoRF of the unsmoothed post-hoc maps scored on the same images
    morfs = {
        k[len("post_hoc_") :]: v for k, v in block["auc"]["pixel_flipping_morf"].items() if k.startswith("post_hoc_")
    }
    assert best["method"] == min(morfs, key=morfs.get)
    assert best["morf_ratio"] == pytest.approx(block["auc"]["pixel_flipping_morf"]["built_in"] / morfs[best["method"]])
    mq = rows["abn"]["map_quality"]
    assert mq["best_post_hoc.morf_ratio"]["mean"] == pytest.approx(best["morf_ratio"])
    # the map scored is the ABN model's own attention map
    model = load_stage_model(tmp_path / "out" / "units" / key)
    assert hasattr(model, "forward_all") and model.explain(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_bcos_arm_is_evaluated_on_its_own_contributions(tmp_path, monkeypatch):
    """A study arm that trains a B-cos LeNet-5 as a plain classifier (method baseline, reusing its baseline unit)
    gets the evaluation of the arms with a built-in map: its own map, the contributions of the predicted class
    summed over channels, scored on the model next to the best unsmoothed post-hoc map of the same model, in an
    evaluation file of its own unit; the unit keys stay what the spec plans."""
    from teachx.data.transforms import normalize
    from teachx.runs.plan import make_plan
    from teachx.runs.stages import load_classifier
    from teachx.studies.spec import planned_units
    from teachx.studies.status import study_status

    torch.set_num_threads(1)
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    z = make_zip(tmp_path / "tiny.zip")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(
        RUN.format(zip=z).replace("epochs: 2", "epochs: 1")
        + "  faith_images: 8\n"  # teacher.faith_images: the map-quality block's faithfulness
        + "study:\n  n_seeds: 1\n  arms:\n    bcos: {method.name: baseline, model.backbone: bcos_lenet5}\n"
        + "  eval: {faithfulness: true, n_images: 12, steps: 4, examples: 4}\n"
    )
    spec = load_study(str(cfg))
    lines: list[str] = []
    result = run_study(spec, tmp_path / "out", lines.append)
    rows = {r["arm"]: r for r in result.data["rows"]}
    (key,) = rows["bcos"]["units"]
    assert any("arm=bcos " in line and "map_corr=" in line for line in lines)  # (its baseline trained in its job)
    assert {u.key for u in planned_units(spec)} == set(result.data["units"])
    unit = result.data["units"][key]
    assert unit["kind"] == "method" and unit["method"] == "baseline"
    block = unit["map_quality"]["faithfulness"]
    best = block["best_post_hoc"]
    morf = block["auc"]["pixel_flipping_morf"]
    references = {k[len("post_hoc_") :]: v for k, v in morf.items() if k.startswith("post_hoc_")}
    assert best["method"] == min(references, key=references.get)
    assert best["morf_ratio"] == pytest.approx(morf["built_in"] / references[best["method"]])
    assert rows["bcos"]["map_quality"]["best_post_hoc.morf_ratio"]["mean"] == pytest.approx(best["morf_ratio"])
    # the map scored is the baseline B-cos model's own: its contributions of the predicted class, summed
    plan = make_plan(spec.config(next(iter(spec.regimes)), "bcos", 0), progress=False)
    checkpoint = next((tmp_path / "out" / "units" / unit["baseline_unit"]).rglob("best.safetensors"))
    model = load_classifier(checkpoint, plan.dataset).eval()
    arrays = np.load(tmp_path / "out" / "units" / key / "examples.npz")
    x = normalize(torch.from_numpy(arrays["images"]), plan.mean, plan.std)
    predicted = model(x).argmax(1)
    expected = model.contributions(x, predicted).sum(1, keepdim=True)
    assert np.allclose(arrays["built_in"], expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # the evaluation is its own digest-verified file, read back (not redone) by a second run; status: done
    assert len(list((tmp_path / "out" / "units" / key).glob("eval-*.json"))) == 1
    lines.clear()
    again = run_study(spec, tmp_path / "out", lines.append)
    assert again.trained == 0 and again.data["units"][key]["map_quality"] == unit["map_quality"]
    assert any("arm=bcos " in line and "(cached)" in line for line in lines)
    assert all(u.state == "done" for u in study_status(spec, tmp_path / "out").units)
    # the report draws its examples like an IMPACTX arm's: input, teacher map, its own map, the teacher method on it
    from teachx.reporting.study_report import study_report

    page = study_report(tmp_path / "out")
    assert [n for n in page.figures if n.startswith("examples_")] == ["examples_all_bcos.png"]
