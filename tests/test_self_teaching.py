"""Self-teaching: the target maps are re-made from the model being trained every K epochs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from teachx.errors import ConfigError
from teachx.training.methods import ImpactxOptions, impactx_options
from teachx.models.impactx import build_impactx
from teachx.teachers import build as build_teacher
from teachx.teachers.store import fill_store, open_store
from teachx.training.impactx import ImpactxTask, MapSource
from teachx.training.self_teaching import SelfTeaching

N, SHAPE = 24, (1, 32, 32)


def _setup(tmp_path, every=2):
    torch.manual_seed(0)
    model = build_impactx("lenet5", 3, 4, (32, 32), decoder="paper")
    images = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(N) % 4
    gxi = build_teacher("gradient_x_input")
    calls: list[int] = []

    def explain(m, idx):
        calls.append(len(idx))
        idx = torch.as_tensor(idx)
        return gxi.attribute(m, images[idx], labels[idx]).sum(1, keepdim=True)

    teacher_store = open_store(tmp_path / "teacher", {"t": 1}, N, SHAPE, log=lambda m: None)
    fill_store(teacher_store, np.arange(N), lambda idx: torch.ones(len(idx), *SHAPE), 8, progress=False)
    train_idx = np.arange(0, N, 2)  # odd indices play the validation images: never explained
    task = ImpactxTask(model, MapSource(teacher_store, "teacher", train_idx, 0), lam=1.0)

    def hook():
        return SelfTeaching(
            task, explain, train_idx, N, SHAPE, every, tmp_path / "self", {"m": 1}, 0, 5, log=lambda m: None
        )

    return model, task, explain, train_idx, calls, hook


def test_refresh_schedule_and_maps_equal_the_models_own_explanations(tmp_path):
    model, task, explain, train_idx, calls, hook = _setup(tmp_path, every=2)
    st = hook()
    teacher_source = task.source
    st(0)
    st(1)
    assert task.source is teacher_source and not calls  # epochs [0, K): the teacher's maps
    with torch.no_grad():
        for p in model.parameters():  # the model "trains": its explanations change
            p.add_(0.01 * torch.randn_like(p))
    reference = explain(model.eval(), train_idx)
    calls.clear()
    model.train()
    st(2)
    assert model.training  # the refresh explains in eval mode and restores the mode
    assert task.source is not teacher_source and sum(calls) == train_idx.size
    got = task.source(torch.as_tensor(train_idx))
    torch.testing.assert_close(
        got, reference.to(torch.float16).float(), rtol=0, atol=2e-3 * float(reference.abs().max())
    )
    st(3)
    assert sum(calls) == train_idx.size  # no refresh inside a period


def test_resume_in_a_period_reads_that_periods_maps_and_old_refreshes_are_deleted(tmp_path):
    model, task, explain, train_idx, calls, hook = _setup(tmp_path, every=2)
    hook()(2)
    first = task.source(torch.as_tensor(train_idx)).clone()
    pointer = json.loads((tmp_path / "self" / "current.json").read_text())
    assert pointer["epoch"] == 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    calls.clear()
    hook()(3)  # a new process resumes at epoch 3: the refresh of epoch 2 is read, not redone
    assert not calls
    torch.testing.assert_close(task.source(torch.as_tensor(train_idx)), first)
    hook()(4)  # the next refresh explains the moved model and removes the old store
    assert sum(calls) == train_idx.size
    dirs = [d for d in (tmp_path / "self").iterdir() if d.is_dir()]
    assert len(dirs) == 1 and dirs[0].name == json.loads((tmp_path / "self" / "current.json").read_text())["dir"]
    assert not torch.equal(task.source(torch.as_tensor(train_idx)), first)


def test_config_validation():
    with pytest.raises(ConfigError, match="maps=teacher"):
        ImpactxOptions(self_teach_every=2, maps="shuffled").validate()
    with pytest.raises(ConfigError, match=">= 0"):
        ImpactxOptions(self_teach_every=-1).validate()
    ImpactxOptions(self_teach_every=3).validate()


def test_default_design_self_teaches_with_gradient_x_input_and_the_paper_does_not():
    """The default decoder's maps are re-made from the model being trained every epoch (gradient x input);
    impactx.decoder=paper alone is still the paper's method; a period given without a method keeps the
    teacher method, as before the default existed; controls without trained teacher maps never self-teach."""
    from teachx.config.loader import from_dict
    from teachx.config.schema import RunConfig

    def st(impactx):
        ic = impactx_options(from_dict(RunConfig, {"impactx": impactx}))
        return ic.self_teach_every, ic.self_teach_method

    assert st({}) == (1, "gradient_x_input")
    assert st({"decoder": "paper"}) == (0, "teacher")
    assert st({"self_teach_every": 5}) == (5, "teacher")
    assert st({"self_teach_every": 0}) == (0, "teacher")
    assert st({"self_teach_every": 2, "self_teach_method": "lrp"}) == (2, "lrp")
    assert st({"self_teach_method": "integrated_gradients"}) == (1, "integrated_gradients")
    assert st({"lam": 0}) == (0, "teacher") and st({"maps": "shuffled"}) == (0, "teacher")


def _tiny_config(tmp_path, **sections):
    from teachx.config.schema import RunConfig
    from teachx.config.loader import from_dict
    from tests.test_study import make_zip

    z = make_zip(tmp_path / "tiny.zip")
    data = {
        "data": {"name": f"imagefolder:{z}", "hflip": False, "val_fraction": 0.2},
        "model": {"backbone": "lenet5"},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.003, "progress": False},
        # faith_images: the evaluation's faithfulness block (not checked here) on 8 test images, not all 64
        "teacher": {
            "method": "gradient_x_input",
            "batch_size": 64,
            "maps_dir": str(tmp_path / "maps"),
            "faith_images": 8,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(RunConfig, data, "config")


@pytest.mark.slow
def test_pipeline_self_teaching_records_refreshes(tmp_path, monkeypatch):
    from teachx.runs.pipeline import run_pipeline

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path, impactx={"self_teach_every": 1})
    run_pipeline(cfg, tmp_path / "run", log=lambda m: None, progress=False, figures=False)
    stage = json.loads((tmp_path / "run" / "impactx" / "stage.json").read_text())
    assert [r["epoch"] for r in stage["self_teaching"]] == [1, 2]
    assert json.loads((tmp_path / "run" / "impactx" / "self_maps" / "current.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_pipeline_self_teaching_with_its_own_method(tmp_path, monkeypatch):
    """impactx.self_teach_method: the refreshes use that method (unsmoothed), not the teacher's."""
    from teachx.runs.pipeline import run_pipeline

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = _tiny_config(
        tmp_path,
        teacher={"method": "saliency", "smooth": 1.0},
        impactx={"self_teach_every": 2, "self_teach_method": "gradient_x_input"},
    )
    run_pipeline(cfg, tmp_path / "run", log=lambda m: None, progress=False, figures=False)
    stage = json.loads((tmp_path / "run" / "impactx" / "stage.json").read_text())
    assert [r["epoch"] for r in stage["self_teaching"]] == [2]
    material = json.loads((tmp_path / "run" / "impactx" / "self_maps" / "current.json").read_text())["material"]
    assert material["teacher"] == "gradient_x_input" and material["smooth"] == 0.0


@pytest.mark.slow
def test_teacher_seed_trains_one_separate_teacher(tmp_path, monkeypatch):
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import separate_teacher, teacher_training
    from teachx.runs.recovery import stage_checkpoint

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path, teacher={"seed": 7}, train={"epochs": 1})
    tcfg, backbone, _ = teacher_training(cfg)
    assert separate_teacher(cfg) and tcfg.seed == 7 and cfg.seed == 0 and backbone == "lenet5"
    out = run_pipeline(cfg, tmp_path / "run", log=lambda m: None, progress=False, figures=False)
    base = json.loads((tmp_path / "run" / "baseline" / "stage.json").read_text())
    teacher = json.loads((tmp_path / "run" / "teacher" / "stage.json").read_text())
    assert stage_checkpoint(tmp_path / "run" / "teacher", teacher) != stage_checkpoint(
        tmp_path / "run" / "baseline", base
    )
    assert out.results["teacher_test_acc"] == teacher["test_acc"]
    same = _tiny_config(tmp_path, teacher={"seed": 0})
    assert not separate_teacher(same)  # the teacher seed equals the run seed: the baseline is the teacher
