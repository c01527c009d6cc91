"""Shortcut ("decoy") benchmarks: the Decoy-MNIST swatch and the colour patch, their masks and cache,
the named decoy-* datasets, the data.shortcut* config keys and the wrong-reason score.

Synthetic data only (a tiny in-memory ImageDataset, or format-exact idx files in a tmp dir); the
references are written out here by hand (loops, the paper's formula), not taken from the builder.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency
from torch import nn

from conftest import teachx_main

from teachx.data import ImageDataset, Split, apply_shortcut, load_dataset
from teachx.data.shortcuts import SHORTCUTS, patch_palette, swatch_shades
from teachx.errors import ConfigError, DataError
from teachx.evaluation import METRICS, artefact_share, build_metric, wrong_reason_score
from teachx.teachers import build

H = W = 12
K = 10


pytestmark = pytest.mark.usefixtures("isolated_dirs")  # TEACHX_DATA and TEACHX_CACHE under tmp_path


def fake_dataset(n_train=600, n_test=600, channels=1, classes=K, seed=0) -> ImageDataset:
    """Random uint8 images with balanced labels; every array read-only like a memory-mapped cache."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (n_train, H, W, channels), dtype=np.uint8),
        np.arange(n_train, dtype=np.int64) % classes,
        rng.integers(0, 256, (n_test, H, W, channels), dtype=np.uint8),
        rng.permutation(np.arange(n_test) % classes),
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


def square_of(mask: np.ndarray, size: int) -> tuple[int, int]:
    """(row, col) of the top-left pixel of the single size x size square in ``mask``; asserts it is one."""
    rows, cols = np.nonzero(mask)
    r0, c0 = rows.min(), cols.min()
    expected = np.zeros_like(mask)
    expected[r0 : r0 + size, c0 : c0 + size] = 1
    assert np.array_equal(mask, expected), "mask is not one size x size square"
    return int(r0), int(c0)


def corner_of(mask: np.ndarray, size: int) -> int:
    r0, c0 = square_of(mask, size)
    assert r0 in (0, H - size) and c0 in (0, W - size), (r0, c0)
    return 2 * (r0 != 0) + (c0 != 0)


def artefact_values(split: Split, size: int) -> np.ndarray:
    """(N, C) the artefact's value per image, checking the whole square holds that one value."""
    out = []
    for img, mask in zip(np.asarray(split.images), np.asarray(split.masks)):
        r0, c0 = square_of(mask, size)
        square = img[r0 : r0 + size, c0 : c0 + size].reshape(-1, img.shape[-1])
        assert (square == square[0]).all()
        out.append(square[0])
    return np.array(out)


# ----------------------------------------------------------------------------- swatch (Decoy-MNIST)


def test_swatch_shades_follow_the_paper_and_stay_distinct():
    assert swatch_shades(10).tolist() == [255 - 25 * y for y in range(10)]
    for k in (2, 11, 12, 40, 251):
        shades = swatch_shades(k).astype(int)
        assert shades[0] == 255 and shades.min() >= 5 and len(set(shades.tolist())) == k
        assert np.all(np.diff(shades) < 0)
    assert swatch_shades(11)[-1] == 5 and swatch_shades(40)[-1] == 5  # evenly spread down to 5
    with pytest.raises(ConfigError, match="patch"):
        swatch_shades(252)


def test_swatch_codes_the_label_in_train_and_not_in_test(tmp_path):
    ds = fake_dataset()
    out = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    assert out.name == "fake+swatch" and out.has_masks and not ds.has_masks
    assert out.extra["shortcut"] == {"kind": "swatch", "train": "confounded", "size": 4, "seed": 0}
    train_shade = artefact_values(out.train, 4)[:, 0].astype(int)
    assert np.array_equal(train_shade, 255 - 25 * np.asarray(ds.train.labels))  # the paper's recipe
    test_shade = artefact_values(out.test, 4)[:, 0].astype(int)
    test_code = (255 - test_shade) // 25
    assert np.array_equal(255 - 25 * test_code, test_shade) and set(test_code.tolist()) == set(range(K))
    table = np.zeros((K, K), int)
    np.add.at(table, (np.asarray(ds.test.labels), test_code), 1)
    assert chi2_contingency(table).pvalue > 1e-3  # independent of the label
    assert np.trace(table) < 0.2 * len(test_code)  # ~1/10 agree by chance, not all


def test_swatch_changes_only_the_masked_pixels_and_corners_are_uniform(tmp_path):
    ds = fake_dataset(n_train=800, n_test=400)
    out = apply_shortcut(ds, "swatch", size=3, cache_dir=tmp_path, progress=False)
    for src, new in ((ds.train, out.train), (ds.test, out.test)):
        masks = np.asarray(new.masks)
        assert masks.dtype == np.uint8 and masks.shape == (len(src), H, W) and set(np.unique(masks)) == {0, 1}
        outside = masks[..., None] == 0
        assert np.array_equal(np.where(outside, new.images, 0), np.where(outside, src.images, 0))
        assert np.array_equal(np.asarray(new.labels), np.asarray(src.labels))
        corners = np.array([corner_of(m, 3) for m in masks])
        counts = np.bincount(corners, minlength=4)
        assert counts.min() > len(src) / 4 * 0.75, counts  # roughly uniform over the 4 corners


def test_rgb_swatch_is_grey(tmp_path):
    ds = fake_dataset(n_train=50, n_test=30, channels=3)
    out = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    values = artefact_values(out.train, 4)
    assert (values == values[:, :1]).all()
    assert np.array_equal(values[:, 0].astype(int), 255 - 25 * np.asarray(ds.train.labels))


# ----------------------------------------------------------------------------- train modes, determinism


def test_test_split_is_the_same_for_every_train_mode_and_clean_train_is_the_source(tmp_path):
    ds = fake_dataset(n_train=200, n_test=150)
    outs = {
        mode: apply_shortcut(ds, "swatch", train=mode, seed=3, cache_dir=tmp_path, progress=False)
        for mode in ("confounded", "clean", "random")
    }
    for mode in ("clean", "random"):
        assert np.array_equal(outs[mode].test.images, outs["confounded"].test.images)
        assert np.array_equal(outs[mode].test.masks, outs["confounded"].test.masks)
    clean = outs["clean"]
    assert clean.name == "fake+swatch(clean train)"
    assert np.array_equal(clean.train.images, ds.train.images)
    assert not np.asarray(clean.train.masks).any() and clean.train.masks.shape == (200, H, W)
    shades = artefact_values(outs["random"].train, 4)[:, 0].astype(int)
    assert (shades != 255 - 25 * np.asarray(ds.train.labels)).mean() > 0.7  # random, not the label's shade
    # normalisation statistics come from the new training images
    for out in outs.values():
        imgs = np.asarray(out.train.images) / 255.0
        assert out.mean[0] == pytest.approx(imgs.mean(), abs=1e-9) and out.std[0] == pytest.approx(imgs.std(), abs=1e-9)


def test_deterministic_in_the_seed_and_the_source_is_untouched(tmp_path):
    ds = fake_dataset(n_train=120, n_test=80)
    before = [np.array(a) for a in (ds.train.images, ds.test.images)]
    a = apply_shortcut(ds, "swatch", seed=5, cache_dir=tmp_path / "a", progress=False)
    b = apply_shortcut(ds, "swatch", seed=5, cache_dir=tmp_path / "b", progress=False)  # built again, elsewhere
    c = apply_shortcut(ds, "swatch", seed=6, cache_dir=tmp_path / "a", progress=False)
    for split in ("train", "test"):
        assert np.asarray(getattr(a, split).images).tobytes() == np.asarray(getattr(b, split).images).tobytes()
        assert np.asarray(getattr(a, split).masks).tobytes() == np.asarray(getattr(b, split).masks).tobytes()
        assert not np.array_equal(getattr(a, split).masks, getattr(c, split).masks)
    assert np.array_equal(before[0], ds.train.images) and np.array_equal(before[1], ds.test.images)
    assert ds.extra["hflip"] is True and a.hflip is False and a.extra["hflip"] is False


def test_bad_options_are_one_line_config_errors(tmp_path):
    ds = fake_dataset(n_train=20, n_test=20)
    for kwargs, fragment in (
        ({"kind": "blob"}, "valid shortcuts: patch, swatch"),
        ({"kind": "swatch", "train": "noisy"}, "confounded, clean, random"),
        ({"kind": "swatch", "size": 0}, ">= 1"),
        ({"kind": "swatch", "size": H + 1}, "does not fit"),
        ({"kind": "swatch", "seed": -1}, ">= 0"),
    ):
        with pytest.raises(ConfigError, match=fragment) as err:
            apply_shortcut(ds, cache_dir=tmp_path, progress=False, **kwargs)
        assert "\n" not in str(err.value)
    once = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already carries"):
        apply_shortcut(once, "swatch", cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- cache


def test_cache_round_trip_memory_maps_masks_and_detects_corruption(tmp_path):
    ds = fake_dataset(n_train=100, n_test=60)
    first = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    entry = Path(first.extra["cache_path"])
    assert {p.name for p in entry.glob("*.npy")} >= {"train_masks.npy", "test_masks.npy"}
    second = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    assert second.extra["cache_path"] == str(entry)
    for split in ("train", "test"):
        for field in ("images", "labels", "masks"):
            got = getattr(getattr(second, split), field)
            assert isinstance(got, np.memmap), (split, field)
            assert np.array_equal(got, getattr(getattr(first, split), field))
    reference = np.array(second.test.masks)
    del first, second
    path = entry / "test_masks.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last mask
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"corrupted \(test_masks.npy does not match its digest\)"):
        third = apply_shortcut(ds, "swatch", cache_dir=tmp_path, progress=False)
    assert np.array_equal(third.test.masks, reference)  # rebuilt from the source


def test_cache_admin_lists_and_cleans_entries_with_masks(tmp_path):
    from teachx.utils import cache_admin

    out = apply_shortcut(fake_dataset(n_train=20, n_test=10), "swatch", cache_dir=tmp_path, progress=False)
    (entry,) = [e for e in cache_admin.scan(tmp_path) if e.kind == "data"]
    assert entry.path == Path(out.extra["cache_path"]) and "fake_swatch" in entry.description
    assert {"train_masks.npy", "test_masks.npy"} <= set(entry.files)
    assert not cache_admin.foreign(tmp_path)


def test_entries_without_masks_still_load(tmp_path):
    """A decoded-array entry written before masks existed (four arrays only) loads as before."""
    from teachx.data.cache import Decoded, cached_decode

    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8),
        np.arange(5) % 2,
        rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8),
        np.arange(3) % 2,
    ]
    made = cached_decode("old", {"k": 1}, lambda: Decoded(*arrays, class_names=["a", "b"]), tmp_path)
    again = cached_decode("old", {"k": 1}, lambda: pytest.fail("decoded again"), tmp_path)
    assert again.train_masks is None and again.test_masks is None
    assert np.array_equal(again.train_images, made.train_images)
    assert not list(Path(again.cache_path).glob("*masks*"))


def test_split_checks_its_masks():
    images, labels = np.zeros((3, 4, 4, 1), np.uint8), np.zeros(3, np.int64)
    Split(images, labels, np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="masks"):
        Split(images, labels, np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="masks"):
        Split(images, labels, np.zeros((3, 4, 4), bool))


# ----------------------------------------------------------------------------- patch (colour)


def test_patch_colours_code_the_class_in_train_and_not_in_test(tmp_path):
    palette = patch_palette(K).astype(int)
    assert len({tuple(c) for c in palette}) == K
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)[~np.eye(K, dtype=bool)]
    assert distances.min() >= 120  # well separated
    ds = fake_dataset(n_train=400, n_test=600, channels=3)
    out = apply_shortcut(ds, "patch", size=2, cache_dir=tmp_path, progress=False)
    train_colours = artefact_values(out.train, 2).astype(int)
    assert np.array_equal(train_colours, palette[np.asarray(ds.train.labels)])
    test_colours = artefact_values(out.test, 2).astype(int)
    codes = np.array([next(i for i, p in enumerate(palette) if (p == c).all()) for c in test_colours])
    table = np.zeros((K, K), int)
    np.add.at(table, (np.asarray(ds.test.labels), codes), 1)
    assert chi2_contingency(table).pvalue > 1e-3 and np.trace(table) < 0.2 * len(codes)
    assert len(patch_palette(30)) == 30 and len({tuple(c) for c in patch_palette(30)}) == 30


def test_patch_on_greyscale_names_the_swatch_as_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.shortcut=swatch"):
        apply_shortcut(fake_dataset(n_train=10, n_test=10), "patch", cache_dir=tmp_path, progress=False)
    assert sorted(SHORTCUTS.names()) == ["patch", "swatch"]


# ----------------------------------------------------------------------------- the named decoy datasets


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format by hand: 0, 0, type 0x08, ndim, big-endian uint32 dims, then the bytes (gzip)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes()))


def write_fake_fashion_mnist(folder: Path, n_train=60, n_test=40) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    tr, te = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    )
    trl, tel = np.arange(n_train) % 10, (np.arange(n_test) * 7) % 10
    write_idx(folder / "train-images-idx3-ubyte.gz", tr)
    write_idx(folder / "train-labels-idx1-ubyte.gz", trl)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", te)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", tel)
    return tr, trl, te, tel


def test_decoy_fashion_mnist_is_fashion_mnist_plus_a_swatch(tmp_path):
    tr, trl, te, tel = write_fake_fashion_mnist(tmp_path / "fm")
    ds = load_dataset("decoy-fashion-mnist", root=tmp_path / "fm", cache_dir=tmp_path / "cache", progress=False)
    assert ds.name == "decoy-fashion-mnist" and ds.has_masks and ds.hflip is False
    assert ds.train.images.shape == (60, 28, 28, 1) and ds.test.masks.shape == (40, 28, 28)
    assert np.array_equal(artefact_values(ds.train, 4)[:, 0].astype(int), 255 - 25 * trl)
    outside = np.asarray(ds.train.masks) == 0
    assert np.array_equal(np.asarray(ds.train.images)[..., 0][outside], tr[outside])
    assert np.array_equal(np.asarray(ds.test.labels), tel)
    again = load_dataset("decoy_fashion_mnist", root=tmp_path / "fm", cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(again.train.masks, np.memmap) and np.array_equal(again.train.images, ds.train.images)


def test_decoy_sources_report_missing_files_and_never_flip(tmp_path):
    from teachx.data import get_source
    from teachx.config.schema import DataConfig
    from teachx.data.options import augmentation

    with pytest.raises(DataError, match=r"'decoy-mnist' is made from mnist.*dataset 'mnist' not found"):
        load_dataset("decoy-mnist", root=tmp_path / "empty", progress=False)
    source, _ = get_source("decoy-fashion-mnist")
    assert source.hflip is False and source.hflip_reason == "a decoy's corner position is part of the benchmark"
    aug = augmentation(DataConfig(name="decoy-fashion-mnist"))
    assert aug["hflip"] is False and "corner position" in aug["hflip_from"]
    aug = augmentation(DataConfig(name="fashion-mnist", shortcut="swatch"))
    assert aug == {
        "augment": True,
        "crop_padding": 4,
        "hflip": False,
        "hflip_from": "data.shortcut: flips would move the artefact",
    }
    assert (
        augmentation(DataConfig(name="fashion-mnist", shortcut="swatch", hflip=True))["hflip"] is True
    )  # explicit wins


# ----------------------------------------------------------------------------- config and CLI


def test_config_shows_the_shortcut_keys(capsys):
    code, out, err = teachx_main(capsys, "config", "data.shortcut=swatch", "data.shortcut_train=clean")
    assert code == 0, err
    for line in ("shortcut: swatch", "shortcut_train: clean", "shortcut_size: 4", "shortcut_seed: 0"):
        assert f"  {line}" in out, out
    assert "hflip: null  # resolved: false (data.shortcut: flips would move the artefact)" in out
    code, out, err = teachx_main(capsys, "config", "--describe")
    assert code == 0, err
    assert any(ln.strip().startswith("shortcut: null") and "swatch" in ln.split("#", 1)[1] for ln in out.splitlines())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data.shortcut=blob"], "data.shortcut: unknown shortcut 'blob'; valid shortcuts: patch, swatch"),
        (
            ["data.shortcut=swatch", "data.shortcut_train=noisy"],
            "data.shortcut_train must be one of confounded, clean, random",
        ),
        (["data.shortcut=swatch", "data.shortcut_size=0"], "data.shortcut_size must be >= 1"),
        (["data.shortcut=swatch", "data.shortcut_seed=-2"], "data.shortcut_seed must be >= 0"),
        (["data.name=decoy-fashion-mnist", "data.shortcut=swatch"], "already carries its artefact"),
    ],
)
def test_bad_shortcut_config_exits_2_with_one_line(capsys, args, fragment):
    code, _, err = teachx_main(capsys, "config", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teachx: error:") and fragment in lines[0], err


def test_make_plan_applies_the_shortcut(tmp_path):
    plan_module = pytest.importorskip("teachx.runs.plan")
    from teachx.runs.resolve import resolve_config

    write_fake_fashion_mnist(tmp_path / "fm")
    cfg = resolve_config(
        overrides=[
            "data.name=fashion-mnist",
            f"data.root={tmp_path / 'fm'}",
            "data.shortcut=swatch",
            "data.shortcut_size=3",
            "data.val_fraction=0",
        ]
    )
    plan = plan_module.make_plan(cfg, progress=False)
    assert plan.dataset.name == "fashion-mnist+swatch" and plan.dataset.has_masks
    assert plan.dataset.extra["shortcut"]["size"] == 3 and plan.augment is not None and not plan.augment.hflip
    cfg = resolve_config(overrides=["data.name=fashion-mnist", f"data.root={tmp_path / 'fm'}", "data.shortcut=patch"])
    with pytest.raises(ConfigError, match="use data.shortcut=swatch"):
        plan_module.make_plan(cfg, progress=False)


# ----------------------------------------------------------------------------- wrong-reason score


def test_wrong_reason_score_by_hand():
    maps = torch.zeros(3, 2, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    maps[0, 1] = torch.tensor([[0.0, 0.0], [-1.0, 4.0]])  # |.| per channel, summed: [[1, 2], [4, 4]], total 11
    maps[1, 0] = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    masks = torch.tensor([[[1, 0], [1, 0]], [[0, 1], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.uint8)
    score = wrong_reason_score(maps, masks)
    assert score.dtype == torch.float64
    assert score.tolist() == pytest.approx([(1 + 4) / 11, 0.0, 0.0])  # image 2: an all-zero map scores 0, not NaN
    # a (N, 1, H, W) map: channels summed with their signs first, |[[1, -2], [2, 4]]| -> (1 + 2) / 9
    assert wrong_reason_score(maps.sum(1, keepdim=True), masks)[0].item() == pytest.approx(3 / 9)
    with pytest.raises(ConfigError, match="masks must be"):
        wrong_reason_score(maps, masks[:2])
    with pytest.raises(ConfigError, match="needs the artefact masks"):
        build_metric("wrong_reason")(None, torch.zeros(3, 2, 2, 2), None, maps)
    metric = build_metric("wrong_reason", masks=masks)
    result = metric(None, torch.zeros(3, 2, 2, 2), None, maps)
    assert METRICS.get("wrong_reason").higher_is_better is False
    assert result.scores.tolist() == pytest.approx(score.tolist()) and result.extra["area"] == pytest.approx(
        (2 / 4 + 1 / 4 + 1) / 3
    )


def linear_model(weight_region: torch.Tensor, classes: int = 3) -> nn.Module:
    """f(x) = W x with W non-zero only on ``weight_region`` (H, W): every explanation lives there."""
    h, w = weight_region.shape
    lin = nn.Linear(h * w, classes, bias=False)
    with torch.no_grad():
        lin.weight.copy_(
            torch.randn(classes, h * w, generator=torch.Generator().manual_seed(0)) * weight_region.flatten()
        )
    return nn.Sequential(nn.Flatten(), lin)


def test_artefact_share_on_a_linear_model_is_known_in_closed_form():
    n, size = 6, 3
    masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
    masks[:, :size, :size] = 1
    region = masks[0].float()
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    y = torch.arange(n) % 3
    area = size * size / 64
    eps = build("lrp", composite="epsilon")
    methods = ("gradient", "lrp", eps)  # eps is named "lrp" too: one must be given a label
    with pytest.raises(ConfigError, match="distinct names"):
        artefact_share(linear_model(region), x, y, masks, methods=methods)
    methods = {"gradient": "gradient", "lrp": "lrp", "lrp_epsilon": eps}
    on = artefact_share(linear_model(region), x, y, masks, methods=methods, batch_size=4)
    off = artefact_share(linear_model(1 - region), x, y, masks, methods=methods)
    # gradient = W[y] and LRP-epsilon = x * W[y] live where W does; the default composite puts Flat on
    # the first layer, here the only one, which spreads relevance evenly: exactly the chance level
    assert on == pytest.approx({"gradient": 1.0, "lrp": area, "lrp_epsilon": 1.0, "area": area})
    assert off == pytest.approx({"gradient": 0.0, "lrp": area, "lrp_epsilon": 0.0, "area": area})
    both = artefact_share(
        linear_model(torch.ones(8, 8)),
        x,
        y,
        masks,
        methods={"eps": build("lrp", composite="epsilon"), "gxi": "gradient_x_input"},
    )
    assert both["eps"] == pytest.approx(both["gxi"], abs=1e-6)  # LRP-epsilon of a bias-free linear model is x * W


class MapModel(nn.Module):
    """A linear classifier f(x) = W x with a fixed built-in map: its gradient is W[y], known in closed form,
    and its built-in map's mass on the artefact is whatever the test puts there."""

    per_class = False

    def __init__(self, weight: torch.Tensor, built_in: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)
        self.built_in = built_in  # (1, H, W), the same for every image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))

    def forward_all(self, x: torch.Tensor, target=None):
        return self(x), self.explain(x, target)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.built_in.expand(x.shape[0], *self.built_in.shape).clone()


def test_honesty_is_the_built_in_share_over_the_models_own_gradient_share():
    """shortcut_evaluation's ratio against a direct computation: the gradient of f(x) = W x is W[y], so its
    share on the artefact is sum |W[y]| on the mask / sum |W[y]|, computed here without teachx."""
    from types import SimpleNamespace

    from teachx.runs.evaluation import shortcut_evaluation
    from teachx.runs.records import ArtefactShares, RunResults

    n, classes = 6, 3
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(n) % classes
    masks = np.zeros((n, 8, 8), dtype=np.uint8)
    masks[:, :2, :2] = 1  # the artefact: a 2x2 corner, 4 of 64 pixels
    weight = torch.from_numpy(rng.normal(size=(classes, 64))).float()
    weight[:, :2] *= 20  # the model leans on the artefact's top row
    built_in = torch.ones(1, 8, 8)
    built_in[0, :2, :2] = 0.5  # the built-in map puts little there: 2 of 62
    ds = SimpleNamespace(test=Split(images, labels, masks), extra={})
    plan = SimpleNamespace(dataset=ds, mean=(0.0,), std=(1.0,))
    cfg = SimpleNamespace(teacher=SimpleNamespace(eval_images=None), data=SimpleNamespace(split_seed=0))
    # the same classifier without a built-in map (a baseline): post-hoc shares only
    models = {
        "baseline": nn.Sequential(nn.Flatten(), MapModel(weight, built_in).lin),
        "impactx": MapModel(weight, built_in),
    }
    out = shortcut_evaluation(cfg, plan, models, torch.device("cpu"))

    w = weight.abs().numpy().reshape(classes, 8, 8)
    gradient = np.mean([w[y][:2, :2].sum() / w[y].sum() for y in labels])
    assert out["impactx"]["gradient"] == pytest.approx(gradient, rel=1e-5)
    assert out["impactx"]["built_in"] == pytest.approx(2 / 62)
    assert out["impactx"]["honesty"] == pytest.approx((2 / 62) / gradient, rel=1e-5) and out["impactx"]["honesty"] < 0.2
    assert out["impactx"]["area"] == pytest.approx(4 / 64)
    assert "built_in" not in out["baseline"] and "honesty" not in out["baseline"]
    assert out["baseline"]["gradient"] == pytest.approx(gradient, rel=1e-5)
    # the typed record: the same values, and a block written before the ratio existed gets it from its shares
    shares = RunResults(shortcut=out).artefact_shares
    assert set(shares) == {"baseline", "impactx"} and shares["baseline"].honesty is None
    assert shares["impactx"].honesty == pytest.approx(out["impactx"]["honesty"])
    old = {k: v for k, v in out["impactx"].items() if k != "honesty"}
    assert ArtefactShares.from_dict(old).to_dict() == out["impactx"]
    assert ArtefactShares.from_dict({"gradient": 0.0, "built_in": 0.1, "area": 0.1}).honesty is None  # no ratio of 0
