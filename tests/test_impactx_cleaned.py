"""``impactx_cleaned``: IMPACTX towards the teacher's maps with the artefact the concept localised zeroed. The cleaned
maps against a reference written out here, their store (a key of its own, digest-verified, the teacher's left as
it was), and concepts of other data or models refused in one line. Training and resuming are the shared method
contract's (tests/test_methods.py); `teachx revise` and a study run it in tests/test_revise.py and
tests/test_study_revise.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import teachx_main
from test_methods import _concept_baseline, _disk_store, _masked_dataset, _Store

from teachx.errors import ConfigError, CorruptionError
from teachx.training.methods.impactx_options import OPTION_NAMES, impactx_options

#: the training images the concept localised, in no particular order (as Reveal stores them)
LOCALISED = np.array([7, 0, 33, 12, 80])


def _setup(tmp_path: Path, localised=LOCALISED, mask_size: int = 12, channels: int = 2, **impactx):
    """The tiny shortcut data, a baseline and its concept carrying random masks of ``localised``, and a teacher map
    store on disk of ``channels``-channel maps; returns (method, context, masks, the teacher's maps as stored)."""
    from teachx.config.schema import MethodConfig, RunConfig
    from teachx.data.transforms import Augment
    from teachx.training.concepts import Concept, load_concept, save_concept
    from teachx.training.methods import MethodContext, build_method
    from teachx.training.trainer import DataPlan

    ds = _masked_dataset()
    plan = DataPlan(ds, np.arange(80), np.arange(80, 96), Augment(crop_padding=1, hflip=False))
    baseline, path = _concept_baseline(ds, tmp_path)
    masks = np.random.default_rng(1).random((len(localised), mask_size, mask_size)) < 0.3
    concept = load_concept(path)
    with_masks = Concept(**{**concept.__dict__, "arrays": {"masks": masks, "localised": np.asarray(localised)}})
    cpath = save_concept(with_masks, tmp_path / "cleaning", overwrite=True)
    fake = _Store(len(ds.train), 12)
    fake.maps = torch.randn(len(ds.train), channels, 12, 12, generator=torch.Generator().manual_seed(5))
    store = _disk_store(fake, tmp_path / "maps")
    cfg = RunConfig()
    cfg.model.backbone = "lenet5"
    cfg.method = MethodConfig("impactx_cleaned", {"concept": str(cpath), **impactx})
    m = build_method(cfg)
    ctx = MethodContext(cfg, plan, torch.device("cpu"), store, None, lambda s: None, baseline_model=lambda: baseline)
    return m, ctx, masks, np.array(store.maps)


def test_cleaned_maps_are_the_teachers_outside_the_masks_and_zero_inside(tmp_path):
    """Every channel of a localised image's map is zero inside its mask and the teacher's value outside; every other
    image's map is the teacher's, bit for bit; the task trains towards exactly these maps."""
    from teachx.teachers.store import read_store

    m, ctx, masks, teacher = _setup(tmp_path)
    m.check_data(ctx.plan)
    task = m.task(m.build_model(ctx), ctx)
    cleaned = task.source.store
    expect = teacher.copy()  # the reference: the teacher's maps, written over image by image
    for row, i in enumerate(LOCALISED):
        for c in range(teacher.shape[1]):
            expect[i, c][masks[row]] = 0
    got = np.array(cleaned.maps)
    assert got.dtype == teacher.dtype and np.array_equal(got, expect)
    others = np.setdiff1d(np.arange(len(teacher)), LOCALISED)
    assert np.array_equal(got[others], teacher[others])
    for row, i in enumerate(LOCALISED):
        assert not got[i][:, masks[row]].any() and np.array_equal(got[i][:, ~masks[row]], teacher[i][:, ~masks[row]])
    idx = torch.tensor([0, 1, 7, 33, 50])
    assert torch.equal(task.maps_for(idx), torch.from_numpy(expect[idx.numpy()]).float())
    # a store of its own next to the teacher's, which is left as it was (and still verifies)
    assert cleaned.key != ctx.train_maps.key and cleaned.path.parent == ctx.train_maps.path.parent
    assert cleaned.meta["material"]["derived_from"] == ctx.train_maps.key
    assert np.array_equal(np.array(read_store(ctx.train_maps.path).maps), teacher)
    assert np.array_equal(np.array(read_store(cleaned.path).maps), expect)
    # `teachx cache list` tells the two apart
    from teachx.utils.cache_admin import scan

    listed = {e.key: e.description for e in scan(tmp_path)}
    assert "zeroed inside the artefact masks of 5 localised training images" in listed[cleaned.path.name]
    assert f"from store {ctx.train_maps.path.name}" in listed[cleaned.path.name]
    assert "derived" not in listed[ctx.train_maps.path.name]


class _Refresh:
    """Stands for self-teaching's hook: from epoch 1 on, the task reads the given maps instead of the teacher's."""

    def __init__(self, task, maps: torch.Tensor):
        self.task, self.initial, self.maps, self.refreshes = task, task.source, maps, [{"epoch": 1}]

    def __call__(self, epoch: int) -> None:
        self.task.source = self.initial if epoch == 0 else (lambda idx: self.maps[idx])


def test_self_taught_maps_are_cleaned_too(tmp_path):
    """Self-teaching re-explains the training images with the model being trained: its maps are cleaned the same
    way as they are read, and the hook still reports its refreshes."""
    m, ctx, masks, _ = _setup(tmp_path)
    assert impactx_options(m.cfg).self_teach_every  # the default decoder self-teaches
    own = torch.randn(len(ctx.plan.dataset.train), 2, 12, 12, generator=torch.Generator().manual_seed(9))
    ctx.self_teaching = lambda task, out_dir: _Refresh(task, own)
    task = m.task(m.build_model(ctx), ctx)
    hook = m.epoch_hook(task, ctx, tmp_path / "stage")
    assert hook.refreshes == [{"epoch": 1}]
    initial = task.maps_for(torch.arange(20))
    hook(1)
    expect = own.clone()
    for row, i in enumerate(LOCALISED):
        expect[i][:, torch.from_numpy(masks[row])] = 0
    idx = torch.tensor([0, 3, 7, 12, 33, 80])
    assert torch.equal(task.maps_for(idx), expect[idx])
    hook(2)  # a later refresh: cleaned as well
    assert torch.equal(task.maps_for(idx), expect[idx])
    hook(0)
    assert torch.equal(task.maps_for(torch.arange(20)), initial)


def test_the_cleaned_store_is_reused_verified_and_keyed_by_the_masks(tmp_path):
    m, ctx, masks, _ = _setup(tmp_path)
    model = m.build_model(ctx)
    first = m.task(model, ctx).source.store
    lines: list[str] = []
    ctx.log = lines.append
    again = m.task(model, ctx).source.store
    assert again.path == first.path and not any("derived" in line for line in lines)  # read back, not made again
    # other masks: another store, the first one untouched
    other, octx, _, _ = _setup(tmp_path / "b", localised=np.array([1, 2]))
    assert other.task(other.build_model(octx), octx).source.store.key != first.key
    # a damaged row is found by its digest: an error naming the store and the fix, never a wrong map in training
    maps = np.load(first.path / "maps.npy", mmap_mode="r+")
    maps[LOCALISED[0], 0, 0, 0] += 1
    maps.flush()
    del maps
    with pytest.raises(CorruptionError, match="fail their digest"):
        m.task(model, ctx)


def test_concepts_of_other_data_or_models_and_bad_settings_are_one_line_errors(tmp_path):
    from teachx.training.concepts import Concept, load_concept, save_concept
    from teachx.training.methods import build_method

    def refused(method, ctx, fragment: str, build: bool = False) -> None:
        with pytest.raises(ConfigError) as err:
            method.build_model(ctx) if build else method.check_data(ctx.plan)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)

    m, ctx, _, _ = _setup(tmp_path / "small", mask_size=8)  # masks of images of another size
    refused(m, ctx, "masks of 8x8 pixels but the images are 12x12")
    m, ctx, _, _ = _setup(tmp_path / "far", localised=np.array([0, 500]))  # of training images this split lacks
    refused(m, ctx, "up to index 500, but the training split has 96")
    m, ctx, _, _ = _setup(tmp_path / "ok")
    bare = load_concept(m.opts["concept"])  # no masks at all
    path = save_concept(Concept(**{**bare.__dict__, "arrays": {}}), tmp_path / "bare")
    m.cfg.method.options = {"concept": str(path)}
    nomasks = build_method(m.cfg)
    refused(nomasks, ctx, "teachx revise RUN_DIR --concept NAME --method impactx_cleaned")
    # fitted on another model: refused before anything is trained
    other = torch.nn.Sequential(torch.nn.Flatten())
    m, ctx, _, _ = _setup(tmp_path / "model")
    ctx.baseline_model = lambda: other
    refused(m, ctx, "was computed on another model", build=True)
    m, ctx, _, _ = _setup(tmp_path / "lam", lam=0.0)
    refused(m, ctx, "impactx.lam=0.0 reads no map")


def test_a_run_with_a_concept_of_other_data_exits_2_in_one_line_before_writing(tmp_path, capsys):
    m, _, _, _ = _setup(tmp_path)  # masks of 12x12 images; the bundled data's are larger
    out = tmp_path / "run"
    code, _, err = teachx_main(
        capsys, "run", "--out", out, "-q", "method.name=impactx_cleaned", f"method.options.concept={m.opts['concept']}"
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("teachx: error: "), err
    assert "masks of 12x12 pixels" in lines[0] and "make the concept on this run's data" in lines[0]
    assert not out.exists()


def test_options_are_the_concept_and_impactx_keys():
    from teachx.runs.resolve import resolve_config
    from teachx.training.methods import build_method, method_of_model
    from teachx.training.methods.impactx import Impactx

    cfg = resolve_config(None, ["method.name=impactx_cleaned", "method.options.concept=c.json", "method.options.lam=2"])
    assert cfg.method.options["concept"] == "c.json" and impactx_options(cfg).lam == 2.0  # IMPACTX's options too
    assert set(cfg.method.options) == {"concept", *OPTION_NAMES} and build_method(cfg).opts == cfg.method.options
    same = resolve_config(None, ["method.name=impactx_cleaned", "method.options.concept=c.json", "impactx.lam=2"])
    assert same.method.options == cfg.method.options  # impactx.KEY is the same option
    with pytest.raises(ConfigError, match="needs method.options.concept=PATH"):
        resolve_config(None, ["method.name=impactx_cleaned"])
    with pytest.raises(ConfigError, match="concept is an option of"):
        resolve_config(None, ["method.options.concept=c.json"])  # IMPACTX itself reads no concept
    assert method_of_model("impactx") is Impactx  # its checkpoints are IMPACTX models: served as IMPACTX's


def test_teachx_revise_lists_every_correction():
    from teachx.cli.r2r import REVISE_METHODS
    from teachx.runs.revise import revise_methods

    assert sorted(REVISE_METHODS) == sorted(revise_methods()) and "impactx_cleaned" in REVISE_METHODS


def test_revise_options_set_the_runs_impactx_keys():
    """`teachx revise --method impactx_cleaned method.options.KEY=V`: the run's saved IMPACTX options are the
    starting point and KEY replaces its value (not a second, conflicting one); the record names what was set;
    the run's epochs and learning rate are kept (IMPACTX is trained anew, no fine-tuning recipe)."""
    from teachx.runs.resolve import resolve_config
    from teachx.runs.revise import recipe_config

    run = resolve_config(None, ["method.name=baseline", "train.epochs=7", "train.lr=0.01"])
    assert impactx_options(run).self_teach_every == 1  # resolved from the default decoder
    tuned, options = recipe_config(
        run, "impactx_cleaned", Path("c.json"), ["method.options.self_teach_every=0", "method.options.lam=2"]
    )
    assert impactx_options(tuned).self_teach_every == 0 and impactx_options(tuned).lam == 2.0
    assert tuned.method.options["concept"] == "c.json"
    assert options == {"self_teach_every": 0, "lam": 2.0, "train.epochs": 7, "train.lr": 0.01}
    with pytest.raises(ConfigError, match="did you mean 'method.options.lam'"):
        recipe_config(run, "impactx_cleaned", Path("c.json"), ["method.options.lamb=2"])
    fine, _ = recipe_config(run, "rrclarc", Path("c.json"), ["method.options.lam=3"])
    assert fine.method.options["lam"] == 3 and fine.train.epochs == 5 and fine.train.lr == pytest.approx(0.001)
