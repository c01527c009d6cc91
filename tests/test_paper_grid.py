"""The IMPACTX paper grid (teachx/configs/paper-<dataset>-<backbone>.yaml): every cell resolves with the
paper's design, its header states the expected wall time, every cell starts (dry run), and a LeNet-5 study
of each dataset kind runs to its study.json on format-exact synthetic CIFAR-10 / CIFAR-100 / STL-10 files
(tiny smoke settings); the grid benchmark's quick mode writes a valid result file and its header lines go
back into a config."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import invoke_study  # noqa: E402

from test_data_formats import rng_images, tar_folder, write_cifar10, write_stl  # noqa: E402  (the format writers)

from teachx.data import load_dataset  # noqa: E402
from teachx.config.shipped import header, shipped_configs  # noqa: E402
from teachx.studies.spec import load_study  # noqa: E402
from teachx.training.methods import impactx_options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"  # the research studies: run by path from the repository, not shipped


def research(name: str) -> str:
    """The path of a research study in the repository's studies/ folder."""
    return str(STUDIES / f"{name}.yaml")


DATASETS = {"cifar10": 10, "cifar100": 100, "stl10": 10}
BACKBONES = ("lenet5", "mobilenet", "efficientnet_b2")
CELLS = [f"paper-{d}-{b}" for d in DATASETS for b in BACKBONES]
ARMS = ["impactx", "lambda0", "shuffled", "abn"]


pytestmark = pytest.mark.usefixtures("isolated_dirs")  # TEACHX_DATA and TEACHX_CACHE under tmp_path


# ---------------------------------------------------------------------------------- the configs
def test_grid_is_complete_and_follows_the_paper():
    shipped = shipped_configs()
    assert sorted(n for n in shipped if n.startswith("paper-")) == sorted(CELLS)
    for name in CELLS:
        dataset, backbone = name.split("-", 2)[1:]
        spec = load_study(name)
        cfg = spec.config("all", None, spec.seeds[0])
        assert cfg.data.name == dataset and cfg.model.backbone == backbone, name
        assert cfg.data.download is True and cfg.device == "auto" and cfg.train.amp is True, name
        assert cfg.data.image_size is None, f"{name}: the dataset's native size (STL-10: 96x96), no resize"
        assert cfg.data.augment and cfg.data.hflip and cfg.data.crop_padding == (12 if dataset == "stl10" else 4), name
        assert cfg.train.batch_size == 128 and cfg.train.schedule == "cosine" and cfg.train.epochs >= 30, name
        if backbone != "lenet5":  # the stem is chosen explicitly: CIFAR strides at 32x32, ImageNet strides at 96x96
            assert cfg.model.options == {"small_input": dataset != "stl10"}, name
        assert len(spec.seeds) >= 5 and list(spec.arms) == ARMS and spec.control == "lambda0", name
        assert cfg.teacher.method == "deepshap" and cfg.teacher.background_size == 50 and cfg.teacher.seed == 0, name
        imp, lam0 = spec.config("all", "impactx", 0), spec.config("all", "lambda0", 0)
        assert imp.method.name == "impactx" and impactx_options(imp).lam == 1.0 and impactx_options(lam0).lam == 0
        assert impactx_options(spec.config("all", "shuffled", 0)).maps == "shuffled"
        assert spec.config("all", "abn", 0).method.name == "abn"


def test_5k_cells_match_their_45k_cells_but_for_the_data_size():
    """study-cifar10-<backbone>: the issue's scarce-data regime of paper-cifar10-<backbone> -- the same arms, seeds,
    backbone options, optimiser and teacher, on the JPEG copy's 5,000-image subset, 20 epochs."""
    for backbone in ("mobilenet", "efficientnet_b2"):
        small, full = load_study(research(f"study-cifar10-{backbone}")), load_study(f"paper-cifar10-{backbone}")
        a, b = small.config("all", None, 0), full.config("all", None, 0)
        assert (
            a.data.name.startswith("imagefolder:")
            and a.data.train_size == 5000
            and a.data.hflip
            and a.train.epochs == 20
        )
        assert (
            (a.model.backbone, a.model.options)
            == (b.model.backbone, b.model.options)
            == (backbone, {"small_input": True})
        )
        for key in (
            "optimizer",
            "lr",
            "momentum",
            "nesterov",
            "weight_decay",
            "warmup_epochs",
            "schedule",
            "batch_size",
            "amp",
        ):
            assert getattr(a.train, key) == getattr(b.train, key), (backbone, key)
        for key in ("method", "background_size", "target", "reduce", "normalize", "seed"):
            assert getattr(a.teacher, key) == getattr(b.teacher, key), (backbone, key)
        assert (
            list(small.arms) == list(full.arms) == ARMS
            and small.seeds == [0, 1, 2, 3, 4]
            and small.control == "lambda0"
        )
        for arm in ARMS:
            sa, fa = small.config("all", arm, 0), full.config("all", arm, 0)
            assert sa.method == fa.method, (backbone, arm)
        res = invoke_study(research(f"study-cifar10-{backbone}"), "--out", "unused", "--dry-run")
        assert res.exit_code == 0 and res.output.startswith("25 units:"), res.output


def test_cpu_cells_share_the_builtin_maps_mobilenet_units():
    """study-cifar10-<backbone>-cpu: the 5k cells at the size this CPU runs (ImageNet strides, Adam) -- the paper
    grid's arms and 5 seeds; the MobileNet one's baseline / IMPACTX / lambda = 0 units are exactly the units of
    study-builtin-maps-mobilenet's baseline / shap_paper_mse / lambda0 (its header says they share a directory), and
    the EfficientNet-B2 one differs from it only in the backbone."""
    from teachx.studies.spec import unit_names

    mob, eff = (
        load_study(research("study-cifar10-mobilenet-cpu")),
        load_study(research("study-cifar10-efficientnet_b2-cpu")),
    )
    for spec in (mob, eff):
        assert list(spec.arms) == ARMS and spec.seeds == [0, 1, 2, 3, 4] and spec.control == "lambda0"
        base = spec.config("5k", None, 0)
        assert (
            base.data.train_size == 5000
            and base.model.options == {"small_input": False}
            and base.teacher.method == "deepshap"
        )
        imp = spec.config("5k", "impactx", 0)
        ic = impactx_options(imp)
        assert (ic.decoder, ic.per_class, ic.map_loss, ic.lam) == (
            "paper",
            False,
            "mse",
            1.0,
        )
        assert spec.config("5k", "abn", 0).method.name == "abn"
    strip = lambda d: {k: v for k, v in d.items() if k != "model"}  # noqa: E731
    for arm in (None, *ARMS):
        a, b = mob.config("5k", arm, 3).to_dict(), eff.config("5k", arm, 3).to_dict()
        assert (
            strip(a) == strip(b)
            and a["model"]["backbone"] == "mobilenet"
            and b["model"]["backbone"] == "efficientnet_b2"
        )
    ours = {(v["arm"], v["seed"]): k for k, v in unit_names(mob).items()}
    theirs = {
        (v["arm"], v["seed"]): k for k, v in unit_names(load_study(research("study-builtin-maps-mobilenet"))).items()
    }
    for seed in (0, 1, 2):
        for arm, other in (("baseline", "baseline"), ("impactx", "shap_paper_mse"), ("lambda0", "lambda0")):
            assert ours[(arm, seed)] == theirs[(other, seed)], (arm, seed)
    assert len(ours) == 25 and len(set(ours.values()) - set(theirs.values())) == 16
    for name in ("study-cifar10-mobilenet-cpu", "study-cifar10-efficientnet_b2-cpu"):
        res = invoke_study(research(name), "--out", "unused", "--dry-run")
        assert res.exit_code == 0 and res.output.startswith("25 units:"), res.output


def test_headers_state_commands_units_and_wall_time():
    for name in CELLS:
        path = shipped_configs()[name]
        text = path.read_text()
        lines = text.splitlines()
        assert header(path).startswith("IMPACTX paper grid"), name
        assert f"teachx study {name} --out runs/{name}" in text, name
        assert "--nproc" in text and f"CUDA_VISIBLE_DEVICES=$i teachx study {name}" in text, name
        assert "= 25 units" in text, name
        mark = next(i for i, line in enumerate(lines) if line.startswith("# Expected wall time per unit"))
        block = [line for line in lines[mark + 1 :] if line.startswith("#   ") or line.startswith("#     ")]
        cpu = next(line for line in block if line.startswith("#   CPU"))
        gpu = next(line for line in block if line.startswith("#   GPU"))
        assert "not measured" in cpu or "thread" in cpu, name
        assert "not measured" in gpu or "AMP" in gpu, name
        steps = 36 if "stl10" in name else 352
        if "thread" in cpu:  # measured: steps/epoch x epochs x step time
            assert f"baseline {steps} x {load_study(name).base['train']['epochs']} x " in text, name


def test_every_cell_starts_as_a_dry_run():
    for name in CELLS:
        res = invoke_study(name, "--out", "unused", "--dry-run")
        assert res.exit_code == 0, res.output
        assert res.output.startswith("25 units:") and "control: lambda0" in res.output, res.output


# ---------------------------------------------------------------------------------- synthetic official files
def write_cifar100(root: Path, per_class: int = 3, test_per_class: int = 1) -> dict:
    """The official cifar-100-python.tar.gz: train/test/meta protocol-2 pickles, rows R, G, B planes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n_per, seed in (("train", per_class, 3), ("test", test_per_class, 4)):
        fine = np.repeat(np.arange(100), n_per)
        imgs = rng_images(seed, len(fine), 32, 32, 3)
        rows = np.stack([np.concatenate([im[:, :, ch].ravel() for ch in range(3)]) for im in imgs]).astype(np.uint8)
        blob = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": rows,
        }
        (folder / split).write_bytes(pickle.dumps(blob, protocol=2))
        out[split] = (imgs, fine)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    tar_folder(folder, root / "cifar-100-python.tar.gz")
    shutil.rmtree(folder)
    return out


def test_cifar100_official_archive_exact(tmp_path):
    expected = write_cifar100(tmp_path / "c100")
    ds = load_dataset("cifar100", root=tmp_path / "c100", cache_dir=tmp_path / "cache", progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, split).images, expected[split][0])
        np.testing.assert_array_equal(getattr(ds, split).labels, expected[split][1])
    assert ds.num_classes == 100 and ds.class_names[7] == "fine7" and ds.extra["coarse_class_names"][19] == "coarse19"
    assert ds.image_size == (32, 32) and ds.hflip is True


# the overrides that make a cell take seconds: one seed, one epoch, a small background and evaluation
SMOKE = [
    "data.download=false",
    "train.epochs=1",
    "study.seeds=[0]",
    "teacher.background_size=4",
    "teacher.eval_images=null",
    "teacher.faith_images=0",
    "study.eval.examples=0",
    "-q",
    "--no-report",
]


def _smoke(name: str, root: Path, out: Path, *extra: str) -> dict:
    torch.set_num_threads(1)
    res = invoke_study(name, "--out", str(out), f"data.root={root}", *SMOKE, *extra)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "study.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["baseline", *ARMS]
    assert all(len(r["test_acc"]) == 1 and 0.0 <= r["test_acc"][0] <= 1.0 for r in data["rows"])
    assert {r["method"] for r in data["rows"]} == {"baseline", "impactx", "abn"}
    assert data["study"]["control"] == "lambda0" and data["study"]["seeds"] == [0]
    return data


@pytest.mark.slow
def test_cifar100_lenet5_cell_runs(tmp_path):
    write_cifar100(tmp_path / "c100", per_class=3)
    data = _smoke("paper-cifar100-lenet5", tmp_path / "c100", tmp_path / "out")
    assert data["base_config"]["data"]["name"] == "cifar100" and data["base_config"]["model"]["backbone"] == "lenet5"


@pytest.mark.slow
def test_stl10_lenet5_cell_runs_at_96x96(tmp_path):
    write_stl(tmp_path / "stl" / "stl10_binary", n_train=30, n_test=10)
    assert load_dataset("stl10", root=tmp_path / "stl", cache_dir=tmp_path / "cache", progress=False).image_size == (
        96,
        96,
    )
    data = _smoke("paper-stl10-lenet5", tmp_path / "stl", tmp_path / "out", "train.batch_size=16")
    assert data["base_config"]["data"]["name"] == "stl10" and data["base_config"]["data"]["image_size"] is None


def test_cifar10_lenet5_cell_runs(tmp_path):
    # LeNet-5 for every real start: the same cell with MobileNet (40 images, batch 16) took 25 s on the
    # shared 2-core CPU, so the MobileNet and EfficientNet-B2 cells are started as dry runs (above)
    write_cifar10(tmp_path / "c10" / "cifar-10-batches-py", per_batch=8)  # 40 training images
    data = _smoke("paper-cifar10-lenet5", tmp_path / "c10", tmp_path / "out", "train.batch_size=16")
    assert data["base_config"]["data"]["name"] == "cifar10" and data["base_config"]["model"]["backbone"] == "lenet5"


# ---------------------------------------------------------------------------------- the benchmark
def _bench(name: str = "bench_paper_grid"):
    """A script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_teachx_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quick_writes_rows_and_header_lines(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "grid.json"
    bench.main(["--quick", "--models", "lenet5", "--shapes", "3x32x32:10", "--batch", "32", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "paper_grid" and data["device"] == "cpu" and data["quick"] is True
    (row,) = data["rows"]
    assert (row["backbone"], row["dataset"], row["config"]) == ("lenet5", "cifar10", "paper-cifar10-lenet5")
    assert row["device"] == "cpu" and row["threads"] == 1 and row["batch"] == 32 and row["amp"] is False
    assert set(row["step_s"]) == {"baseline", "impactx", "impactx_lambda0", "abn"} and all(
        v > 0 for v in row["step_s"].values()
    )
    assert row["arms_by_cost"] == {"impactx": ["impactx", "shuffled"], "impactx_lambda0": ["lambda0"], "abn": ["abn"]}
    assert row["schedule"] == {"train_images": 45_000, "batch_size": 128, "steps_per_epoch": 352, "epochs": 30}
    assert row["scaled_from_batch"] == 32 and row["step_s_at_config_batch"]["impactx"] == pytest.approx(
        4 * row["step_s"]["impactx"]
    )
    assert row["unit_s"]["baseline"] == pytest.approx(352 * 30 * row["step_s_at_config_batch"]["baseline"])
    assert row["maps_images"] == 46_000 and row["maps_s"] == pytest.approx(46_000 / row["maps_img_per_s"])
    per_seed = (
        row["unit_s"]["baseline"]
        + 2 * row["unit_s"]["impactx"]
        + row["unit_s"]["impactx_lambda0"]
        + row["unit_s"]["abn"]
    )
    assert row["units"] == 25 and row["cell_s"] == pytest.approx(5 * per_seed + row["maps_s"])
    assert "lenet5" in capsys.readouterr().out

    # the header lines go into a copy of the config, which still loads; the GPU line is left alone
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(shipped_configs()["paper-cifar10-lenet5"], configs)
    gpu_block = lambda t: [ln for ln in t.splitlines() if ln.startswith("#   GPU")]  # noqa: E731
    gpu_before = gpu_block((configs / "paper-cifar10-lenet5.yaml").read_text())
    bench.write_headers([row], configs)
    bench.write_headers([row], configs)  # idempotent: the block is replaced, not added to
    text = (configs / "paper-cifar10-lenet5.yaml").read_text()
    assert text.count("#   CPU (1 thread; batch 128; no AMP; step timed at batch 32, scaled linearly):") == 1
    assert gpu_block(text) == gpu_before and len(gpu_before) == 1 and "baseline 352 x 30 x " in text
    assert load_study(str(configs / "paper-cifar10-lenet5.yaml")).base["train"]["epochs"] == 30
    gpu_row = dict(
        row, device="cuda", device_name="NVIDIA H200", amp=True, amp_dtype="bfloat16", scaled_from_batch=None
    )
    assert bench.header_lines(gpu_row)[0] == "#   GPU (NVIDIA H200; batch 128; AMP bfloat16):"


# ---------------------------------------------------------------------------------- partial GPU studies
def _unit(root: Path, name: str, kind: str, seed: int, acc: float | None, **cfg) -> None:
    from teachx.utils.io import write_json_atomic

    d = root / "units" / name
    d.mkdir(parents=True)
    config = {"seed": seed, "model": {"backbone": "mobilenet"}, "train": {"epochs": 3}, **cfg}
    write_json_atomic(d / "unit.json", {"key": name, "kind": kind, "config": config}, digest=True)
    (d / "history.json").write_text(
        json.dumps([{"epoch": e, "seconds": 1.0 + e} for e in range(1 if acc is None else 3)])
    )
    if acc is not None:
        write_json_atomic(d / "stage.json", {"test_acc": acc}, digest=True)


def test_partial_study_summary_pairs_finished_arms_by_seed(tmp_path):
    """A study stopped by the device's time limit: arms with every seed are compared with the baseline (paired
    t-test as scipy computes it, Holm over the arms); unfinished arms are listed; a damaged record is an error."""
    from scipy import stats

    from teachx.errors import CorruptionError

    root = tmp_path / "study-5k-mobilenet"
    base, abn, lam0 = [0.50, 0.52, 0.47], [0.55, 0.53, 0.52], [0.49, 0.50, 0.51]
    for s in range(3):
        _unit(root, f"c-{s}", "classifier", s, base[s])
        _unit(root, f"m-{s}", "method", s, abn[s], method={"name": "abn"})
        _unit(root, f"x-l{s}", "impactx", s, lam0[s], impactx={"lam": 0, "maps": "teacher"})
        _unit(
            root, f"x-i{s}", "impactx", s, 0.6 if s < 2 else None, impactx={"lam": 1.0, "maps": "teacher"}
        )  # seed 2 unfinished
    mod = _bench("gpu_partial_studies")
    res = mod.summarise(root)
    assert res["units_total"] == 12 and res["units_finished"] == 11 and res["arms_unfinished"] == ["impactx"]
    rows = res["arms_complete"]
    assert set(rows) == {"baseline", "abn", "lambda0"} and rows["abn"]["test_acc"] == abn
    p_abn, p_l0 = stats.ttest_rel(abn, base).pvalue, stats.ttest_rel(lam0, base).pvalue
    assert rows["abn"]["vs_baseline"]["p_ttest"] == pytest.approx(p_abn)
    assert rows["abn"]["vs_baseline"]["mean_diff"] == pytest.approx(np.mean(np.subtract(abn, base)))
    lo, hi = sorted([p_abn, p_l0])
    assert sorted(r["vs_baseline"]["p_ttest_holm"] for r in (rows["abn"], rows["lambda0"])) == pytest.approx(
        [2 * lo, max(2 * lo, hi)]
    )
    unfinished = next(u for u in res["units"] if u["unit"] == "x-i2")
    assert (
        unfinished["finished"] is False and unfinished["epochs_done"] == 1 and unfinished["median_s_per_epoch"] == 1.0
    )

    # the same from the archive the GPU script writes (weights left out), then one flipped digit in a result
    import tarfile

    with tarfile.open(tmp_path / "s.tgz", "w:gz") as tar:
        tar.add(root, arcname=root.name)
    assert mod.summarise(tmp_path / "s.tgz")["arms_complete"] == rows
    stage = root / "units" / "m-1" / "stage.json"
    stage.write_text(stage.read_text().replace("0.53", "0.63"))
    with pytest.raises(CorruptionError):
        mod.summarise(root)
