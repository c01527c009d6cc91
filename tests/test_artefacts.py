"""R2R artefact benchmarks: the poisoned fraction, the kinds and their masks, the clean / attacked / ch test
splits, the evaluation-only ground truth, the cache, the data.artefact config keys and test accuracy per split.

Synthetic data only (tiny in-memory datasets, the bundled subset for the end-to-end run); the checks compare
the images before and after, not the builder's own bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_teachx, teachx_main

from teachx.data import ImageDataset, Split, apply_artefact
from teachx.data.artefacts import (
    ARTEFACTS,
    FONT,
    TEST_SPLITS,
    ground_truth,
    has_ground_truth,
    poisoned_count,
    text_bitmap,
    unit_of,
)
from teachx.errors import ConfigError

K = 5
PLACED = ("timestamp", "bandaid", "frame")

pytestmark = pytest.mark.usefixtures("isolated_dirs")  # TEACHX_DATA and TEACHX_CACHE under tmp_path


def fake_dataset(n_train=103, n_test=57, channels=3, size=32, classes=K, seed=0) -> ImageDataset:
    """Random uint8 images with unbalanced labels (class sizes differ); arrays read-only like a mapped cache."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8),
        rng.integers(0, classes, n_train).astype(np.int64),
        rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
        rng.integers(0, classes, n_test).astype(np.int64),
    ]
    for a in arrays:
        a.setflags(write=False)
    return ImageDataset(
        name="fake",
        class_names=[f"c{i}" for i in range(classes)],
        train=Split(*arrays[:2]),
        test=Split(*arrays[2:]),
        mean=(0.5,) * channels,
        std=(0.29,) * channels,
        hflip=True,
    )


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W): 1 where any channel differs."""
    return (np.asarray(before) != np.asarray(after)).any(axis=-1).astype(np.uint8)


def build(ds, kind="timestamp", tmp_path=None, **kw):
    kw = {"classes": [1], "p": 0.3, "seed": 0, **kw}
    return apply_artefact(ds, kind, progress=False, cache_dir=tmp_path, **kw)


# ----------------------------------------------------------------------------- poisoning


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 1.0])
def test_exactly_round_p_n_of_each_named_class_is_poisoned_and_the_rest_is_untouched(tmp_path, p):
    ds = fake_dataset(n_train=240)
    out = build(ds, "bandaid", tmp_path, classes=[0, 3], p=p)
    gt = ground_truth(out)
    labels = np.asarray(ds.train.labels)
    diff = changed(ds.train.images, out.train.images).any(axis=(1, 2))
    assert np.array_equal(diff, gt.train_poisoned)  # the recorded images are the changed ones
    for c in range(K):
        n = int((labels == c).sum())
        want = int(np.floor(p * n + 0.5)) if c in (0, 3) else 0
        assert int(gt.train_poisoned[labels == c].sum()) == max(want, 1 if c in (0, 3) else 0), (c, n)
    untouched = ~gt.train_poisoned
    assert np.array_equal(np.asarray(out.train.images)[untouched], np.asarray(ds.train.images)[untouched])
    assert np.array_equal(out.train.labels, ds.train.labels)


def test_poisoned_count_rounds_half_up_and_keeps_at_least_one():
    assert [poisoned_count(0.25, n) for n in (10, 6, 2, 1, 0)] == [3, 2, 1, 1, 0]  # 2.5 -> 3, 1.5 -> 2, 0.5 -> 1
    assert poisoned_count(0.01, 20) == 1 and poisoned_count(1.0, 7) == 7


def test_p_zero_is_the_clean_ceiling_with_the_same_test_splits(tmp_path):
    ds = fake_dataset()
    clean = build(ds, tmp_path=tmp_path, p=0.0, test="attacked")
    poisoned = ground_truth(build(ds, tmp_path=tmp_path, p=0.5, test="attacked"))
    gt = ground_truth(clean)
    assert not gt.train_poisoned.any() and np.array_equal(clean.train.images, ds.train.images)
    assert np.array_equal(gt.test_splits["ch"].images, ds.test.images)  # poisoned as in training: not at all
    # the attacked split is the poisoned benchmark's own, image for image
    assert np.array_equal(gt.test_splits["attacked"].images, poisoned.test_splits["attacked"].images)
    assert np.array_equal(clean.test.images, poisoned.test_splits["attacked"].images)


def test_a_larger_p_keeps_the_images_a_smaller_one_chose(tmp_path):
    ds = fake_dataset()
    small = ground_truth(build(ds, tmp_path=tmp_path, p=0.2)).train_poisoned
    large = ground_truth(build(ds, tmp_path=tmp_path, p=0.6)).train_poisoned
    assert small.sum() < large.sum() and not (small & ~large).any()


# ----------------------------------------------------------------------------- kinds and masks


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28), (3, 96)])
@pytest.mark.parametrize("kind", PLACED)
def test_masks_are_exactly_the_changed_pixels(tmp_path, kind, channels, size):
    ds = fake_dataset(n_train=40, n_test=12, channels=channels, size=size)
    out = build(ds, kind, tmp_path, p=0.5, oracle_masks=True)
    gt = ground_truth(out)
    assert gt.has_place and out.extra["artefact"]["has_place"] is True
    train_diff = changed(ds.train.images, out.train.images)
    assert np.array_equal(gt.train_masks, train_diff) and np.array_equal(out.train.masks, train_diff)
    assert train_diff[gt.train_poisoned].reshape(int(gt.train_poisoned.sum()), -1).any(axis=1).all()
    attacked = gt.test_splits["attacked"]
    assert np.array_equal(attacked.masks, changed(ds.test.images, attacked.images))
    assert attacked.masks.reshape(len(attacked), -1).any(axis=1).all()  # every test image carries it


def test_timestamp_is_bright_font_digits_in_a_corner():
    assert unit_of((28, 28)) == unit_of((32, 32)) == 1 and unit_of((96, 96)) == 2 and unit_of((224, 224)) == 4
    assert text_bitmap("1:23").shape == (5, 13) and text_bitmap("12:34", 2).shape == (10, 34)
    assert text_bitmap("8").sum() == sum(row.count("1") for row in FONT["8"])
    ds = fake_dataset(n_train=30, n_test=40, size=32)
    gt = ground_truth(build(ds, "timestamp", classes=[0], p=1.0))
    attacked = gt.test_splits["attacked"]
    for img, mask in zip(attacked.images, attacked.masks):
        rows, cols = np.nonzero(mask)
        top, left = rows.min(), cols.min()
        assert rows.max() - top < 5 and cols.max() - left < 13  # within one 13x5 "H:MM" box
        assert (top <= 2 or rows.max() >= 32 - 3) and (left <= 2 or cols.max() >= 32 - 3)  # in a corner
        assert (img[mask.astype(bool)] >= 230).all()  # bright strokes


def test_frame_is_dark_and_at_the_border():
    ds = fake_dataset(n_train=10, n_test=20, size=32)
    attacked = ground_truth(build(ds, "frame", classes=[0], p=1.0)).test_splits["attacked"]
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    centre_disc = (ys - 16) ** 2 + (xs - 16) ** 2 <= (0.92 * 16) ** 2
    inner = centre_disc & (ys > 1) & (ys < 31) & (xs > 1) & (xs < 31)
    for img, mask in zip(attacked.images, attacked.masks):
        assert not (mask.astype(bool) & inner).any()
        values = img[mask.astype(bool)]
        assert (values == values[0, 0]).all() and 16 <= values[0, 0] < 48  # one dark grey on every channel


def test_bandaid_lies_inside_the_image_at_many_places_and_angles():
    ds = fake_dataset(n_train=10, n_test=50, size=32)
    attacked = ground_truth(build(ds, "bandaid", classes=[0], p=1.0)).test_splits["attacked"]
    areas = attacked.masks.reshape(50, -1).sum(axis=1)
    assert (areas > 15).all() and (areas < 0.25 * 32 * 32).all()
    centres = np.array([np.argwhere(m).mean(axis=0) for m in attacked.masks])
    assert centres.std(axis=0).min() > 3  # not one fixed place


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_shift_changes_every_pixel_and_has_no_place(tmp_path, channels):
    ds = fake_dataset(n_train=60, n_test=20, channels=channels)
    tint = np.array((255, 196, 128) if channels == 3 else (255,))
    out = build(ds, "colour_shift", tmp_path, p=0.5, oracle_masks=True)
    gt = ground_truth(out)
    assert (
        gt.has_place is False and out.extra["artefact"]["has_place"] is False and "no place" in out.extra["notices"][-1]
    )
    for split_masks in [gt.train_masks, out.train.masks, *(s.masks for s in gt.test_splits.values())]:
        assert not np.asarray(split_masks).any()
    before = np.asarray(ds.train.images)[gt.train_poisoned]
    after = np.asarray(out.train.images)[gt.train_poisoned]
    movable = (before != tint).any(axis=-1)  # a pixel already of the tint's colour has nowhere to go
    assert np.array_equal(changed(before, after).astype(bool), movable) and movable.mean() > 0.99
    shift = after.astype(int) - before.astype(int)
    assert (np.sign(shift) == np.sign(tint - before.astype(int))).all()  # towards the tint


# ----------------------------------------------------------------------------- test splits


@pytest.mark.parametrize("kind", sorted(ARTEFACTS.names()))
def test_the_three_test_splits(tmp_path, kind):
    ds = fake_dataset(n_test=90)
    out = build(ds, kind, tmp_path, classes=[2, 4], p=0.4)
    gt = ground_truth(out)
    splits = gt.test_splits
    assert set(splits) == set(TEST_SPLITS)
    source = np.asarray(ds.test.images)
    assert np.array_equal(splits["clean"].images, source)
    every = changed(source, splits["attacked"].images).any(axis=(1, 2))
    assert every.all()  # the artefact in every test image of every class
    labels = np.asarray(ds.test.labels)
    for c in range(K):
        n = int((labels == c).sum())
        assert int(gt.test_poisoned[labels == c].sum()) == (poisoned_count(0.4, n) if c in (2, 4) else 0)
    ch = np.asarray(splits["ch"].images)
    assert np.array_equal(ch[gt.test_poisoned], np.asarray(splits["attacked"].images)[gt.test_poisoned])
    assert np.array_equal(ch[~gt.test_poisoned], source[~gt.test_poisoned])
    for split in splits.values():
        assert np.array_equal(split.labels, ds.test.labels)
    assert np.array_equal(splits["ch"].masks, splits["attacked"].masks * gt.test_poisoned[:, None, None])


@pytest.mark.parametrize("test", TEST_SPLITS)
def test_ds_test_is_the_chosen_split_and_masks_stay_hidden_without_the_oracle(tmp_path, test):
    ds = fake_dataset()
    out = build(ds, tmp_path=tmp_path, test=test)
    assert np.array_equal(out.test.images, ground_truth(out).test_splits[test].images)
    assert out.train.masks is None and out.test.masks is None and not out.has_masks
    assert out.extra["artefact"]["test"] == test and f"that of the {test} test split" in out.extra["notices"][-1]
    oracle = build(ds, tmp_path=tmp_path, test=test, oracle_masks=True)
    assert oracle.has_masks and np.array_equal(oracle.test.masks, ground_truth(out).test_splits[test].masks)


def test_ground_truth_is_only_on_artefact_benchmarks():
    ds = fake_dataset()
    assert not has_ground_truth(ds)
    with pytest.raises(ValueError, match="not an artefact benchmark"):
        ground_truth(ds)
    out = build(ds)
    assert has_ground_truth(out) and "GroundTruth" not in repr(out)
    assert "train_poisoned" not in json.dumps(out.extra)  # the metadata carries settings, not which images


# ----------------------------------------------------------------------------- determinism and cache


def test_deterministic_in_the_seed(tmp_path):
    ds = fake_dataset()
    a = build(ds, "bandaid", tmp_path / "a", seed=3)
    b = build(ds, "bandaid", tmp_path / "b", seed=3)
    c = build(ds, "bandaid", tmp_path / "c", seed=4)
    ga, gb, gc = ground_truth(a), ground_truth(b), ground_truth(c)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(ga.train_poisoned, gb.train_poisoned)
    for name in TEST_SPLITS:
        assert np.array_equal(ga.test_splits[name].images, gb.test_splits[name].images)
    assert not np.array_equal(ga.train_poisoned, gc.train_poisoned)
    assert not np.array_equal(ga.test_splits["attacked"].images, gc.test_splits["attacked"].images)


def test_cache_is_content_hashed_memory_mapped_and_verified(tmp_path):
    ds = fake_dataset()
    first = build(ds, "timestamp", tmp_path)
    entry = Path(first.extra["cache_path"])
    assert {"train_poisoned.npy", "test_attacked_images.npy", "test_ch_images.npy"} <= {
        p.name for p in entry.glob("*.npy")
    }
    second = build(ds, "timestamp", tmp_path)
    assert second.extra["cache_path"] == str(entry)
    assert isinstance(second.train.images, np.memmap)
    assert isinstance(ground_truth(second).test_splits["attacked"].images, np.memmap)
    other_content = fake_dataset(seed=1)
    assert build(other_content, "timestamp", tmp_path).extra["cache_path"] != str(entry)
    assert build(ds, "timestamp", tmp_path, p=0.5).extra["cache_path"] != str(entry)
    reference = np.array(ground_truth(second).test_splits["attacked"].images)
    del first, second
    path = entry / "test_attacked_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"corrupted \(test_attacked_images.npy does not match its digest\)"):
        third = build(ds, "timestamp", tmp_path)
    assert np.array_equal(ground_truth(third).test_splits["attacked"].images, reference)


def test_cache_admin_lists_artefact_entries_as_data(tmp_path):
    from teachx.utils import cache_admin

    build(fake_dataset(), "frame", tmp_path)
    (entry,) = [e for e in cache_admin.scan(tmp_path) if e.kind == "data"]
    assert "test_poisoned.npy" in entry.files and not cache_admin.foreign(tmp_path)


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"kind": "sticker"}, "data.artefact.kind: unknown artefact 'sticker'"),
        ({"classes": [7]}, "data.artefact.classes [7] are not classes of 'fake'"),
        ({"classes": []}, "data.artefact.classes must be a non-empty list"),
        ({"classes": [0, 1, 2, 3, 4]}, "names every class"),
        ({"p": -0.1}, "data.artefact.p must be a fraction in [0, 1]"),
        ({"p": 1.5}, "data.artefact.p must be a fraction in [0, 1]"),
        ({"seed": -1}, "data.artefact.seed must be an integer >= 0"),
        ({"test": "dirty"}, "data.artefact.test must be one of ch, clean, attacked"),
    ],
)
def test_bad_options_are_one_line_config_errors(kw, fragment):
    kw = {"kind": "timestamp", **kw}
    with pytest.raises(ConfigError) as err:
        build(fake_dataset(), **kw)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_too_small_images_and_stacked_artefacts_are_refused():
    with pytest.raises(ConfigError, match="at least 16x16"):
        build(fake_dataset(size=12))
    with pytest.raises(ConfigError, match="already carries an artefact"):
        build(build(fake_dataset()))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data.artefact.kind=sticker"], "data.artefact.kind: unknown artefact 'sticker'"),
        (["data.artefact.classes=[0]"], "data.artefact.kind is required"),
        (["data.artefact.kind=frame", "data.artefact.p=-1"], "data.artefact.p must be a fraction in [0, 1]"),
        (["data.artefact.kind=frame", "data.artefact.p=2"], "data.artefact.p must be a fraction in [0, 1]"),
        (["data.artefact.kind=frame", "data.artefact.classes=[-1]"], "data.artefact.classes must be distinct"),
        (["data.artefact.kind=frame", "data.artefact.classes=[1, 1]"], "data.artefact.classes must be distinct"),
        (["data.artefact.kind=frame", "data.artefact.test=noisy"], "data.artefact.test must be one of"),
        (["data.artefact.kind=frame", "data.artefact.size=3"], "unknown option 'data.artefact.size'"),
        (["data.artefact.kind=frame", "data.shortcut=swatch"], "drop data.shortcut"),
        (["data.artefact.kind=frame", "data.name=decoy-mnist"], "data.name=mnist"),
    ],
)
def test_bad_artefact_config_exits_2_with_one_line(capsys, args, fragment):
    code, _, err = teachx_main(capsys, "config", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teachx: error:") and fragment in lines[0], err


def test_class_index_beyond_the_dataset_fails_on_load_with_one_line(capsys, tmp_path):
    code, _, err = teachx_main(
        capsys, "train", "--out", tmp_path / "r", "data.artefact.kind=frame", "data.artefact.classes=[12]"
    )
    assert code == 2 and "data.artefact.classes [12] are not classes of 'bundled'" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_config_shows_the_artefact_keys(capsys):
    code, out, err = teachx_main(capsys, "config", "data.artefact.kind=band-aid", "data.artefact.p=0.1")
    assert code == 0, err
    assert "artefact: {classes: [0], kind: bandaid, oracle_masks: false, p: 0.1, seed: 0, test: ch}" in out, out


# ----------------------------------------------------------------------------- records and runs


def test_stage_and_run_records_carry_test_splits_only_when_there():
    from teachx.runs.records import RunResults, StageRecord

    plain = StageRecord(test_acc=0.5, head={"backbone": "lenet5"})
    assert "test_splits" not in plain.to_dict()
    splits = {name: {"acc": 0.5, "loss": 1.0, "n": 10} for name in TEST_SPLITS}
    record = StageRecord(test_acc=0.5, head={"backbone": "lenet5"}, test_splits=splits)
    written = record.to_dict()
    assert list(written)[-1] == "test_splits" and StageRecord.from_dict(written) == record
    assert "test_splits" not in RunResults().to_dict()
    run = RunResults(test_splits={"baseline": splits})
    assert RunResults.from_dict(run.to_dict()).test_splits == {"baseline": splits}


def test_make_plan_applies_the_artefact():
    from teachx.runs.plan import data_summary, make_plan
    from teachx.runs.resolve import resolve_config

    cfg = resolve_config(
        overrides=["data.artefact.kind=timestamp", "data.artefact.classes=[0, 2]", "data.artefact.p=0.1"]
    )
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    assert ds.name == "bundled+timestamp" and has_ground_truth(ds) and not ds.has_masks
    assert ground_truth(ds).poisoned_per_class(ds.train.labels) == {c: 40 if c in (0, 2) else 0 for c in range(10)}
    assert plan.augment is not None and plan.augment.hflip  # the dataset's own choice, as in R2R
    notice = data_summary(plan, cfg)["notices"][-1]
    assert notice.startswith("timestamp artefact in 40 of the 400 training images of T-shirt/top; 40 of the 400"), (
        notice
    )


@pytest.mark.slow
def test_teachx_train_reports_accuracy_on_every_test_split(tmp_path):
    out = tmp_path / "r"
    res = run_teachx(
        "train",
        "--out",
        out,
        "data.artefact.kind=bandaid",
        "data.artefact.classes=[1]",
        "data.artefact.p=0.5",
        "data.artefact.test=attacked",
        "data.train_size=300",
        "train.epochs=1",
        "train.batch_size=64",
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    stage = json.loads((out / "stage.json").read_text())
    assert set(results["test_splits"]) == set(TEST_SPLITS) and results["test_splits"] == stage["test_splits"]
    assert results["test_acc"] == results["test_splits"]["attacked"]["acc"]
    assert all(row["n"] == 1000 for row in results["test_splits"].values())
    assert "bandaid artefact" in res.stdout and "attacked" in res.stdout.splitlines()[-1]


def test_run_summary_prints_the_accuracy_of_every_test_split(capsys, tmp_path):
    from teachx.cli.main import _print_summary

    row = {"acc": 0.5, "loss": 1.0, "n": 10}
    res = {
        "dataset": "fake+frame",
        "backbone": "lenet5",
        "teacher": "deepshap",
        "epochs": 1,
        "baseline_test_acc": 0.5,
        "wall_seconds": 1.0,
        "test_splits": {"baseline": {"ch": row, "clean": {**row, "acc": 0.75}, "attacked": {**row, "acc": 0.25}}},
    }
    _print_summary(res, tmp_path)
    assert "test accuracy by split (baseline): ch 0.5000, clean 0.7500, attacked 0.2500" in capsys.readouterr().out


@pytest.mark.parametrize("predicted", [1, 0])
def test_artefact_splits_measure_accuracy_and_the_share_called_a_poisoned_class(predicted):
    import torch
    from torch import nn

    from teachx.runs.stages import artefact_splits
    from teachx.training.trainer import ClassifierTask, DataPlan

    class Constant(nn.Module):  # always the class ``predicted``
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), predicted), K).float() + 0 * x.sum()

    ds = build(fake_dataset(n_test=90), "frame", classes=[1], p=0.5)
    plan = DataPlan(ds, np.arange(len(ds.train)), np.arange(0))
    got = artefact_splits(ClassifierTask(Constant()), plan, 32, torch.device("cpu"))
    labels = np.asarray(ds.test.labels)
    for name in TEST_SPLITS:
        assert got[name]["n"] == 90 and got[name]["acc"] == pytest.approx((labels == predicted).mean())
        assert got[name]["called_poisoned"] == (1.0 if predicted == 1 else 0.0)
    assert (
        artefact_splits(ClassifierTask(Constant()), DataPlan(fake_dataset(), np.arange(3), np.arange(0)), 32, None)
        is None
    )


@pytest.mark.slow
def test_teachx_run_reports_every_test_split_per_model(tmp_path):
    out = tmp_path / "r"
    res = run_teachx(
        "run",
        "--out",
        out,
        "data.artefact.kind=frame",
        "data.artefact.classes=[2]",
        "data.train_size=200",
        "train.epochs=1",
        "method.name=baseline",
        "teacher.method=gradient",
        "teacher.eval_images=50",
        "teacher.faith_images=0",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["test_splits"]["baseline"]) == set(TEST_SPLITS)
    assert results["baseline_test_acc"] == results["test_splits"]["baseline"]["ch"]["acc"]
    assert "test accuracy by split (baseline): ch" in res.stdout
