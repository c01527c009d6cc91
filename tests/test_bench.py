"""The benchmark suite's own measuring code: the peak-memory probe and the MAC counter against
closed forms, and the summary table's rows for the results each benchmark writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_teachx_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset needs Linux /proc")
@pytest.mark.slow
def test_memory_probe_sees_a_known_allocation():
    """In a fresh process, as the benchmark measures: in this one, heap freed by earlier tests stays
    resident (teachx's malloc tuning keeps it) and could hold the allocation without new pages."""
    import subprocess

    mb = 96
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(BENCH)!r})
import bench_memory

def touch():
    t = torch.ones({mb} * 2**20 // 4)  # every page written: resident
    return float(t[-1])

print(json.dumps([bench_memory.measure(touch)["peak_extra_mb"], bench_memory.measure(lambda: None)["peak_extra_mb"]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen, nothing = json.loads(out.stdout.strip().splitlines()[-1])
    assert mb - 1 <= seen <= mb + 16
    assert nothing < 4


def test_mac_counter_matches_closed_form():
    bench_impactx = _load("bench_impactx")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 14 * 14, 10),
    )
    x = torch.randn(2, 3, 16, 16)
    expect = 16 * 16 * 8 * 3 * 9 + 14 * 14 * 8 * 2 * 9 + 8 * 14 * 14 * 10
    assert bench_impactx.macs_per_image(model, x) == expect
    # LeNet-5 on 32x32x3: the textbook count (conv 5x5: 28*28*6*75 + 10*10*16*150, then 400-120-84-10)
    from teachx.models import build_model

    lenet = build_model("lenet5", 3, 10, 32)
    assert (
        bench_impactx.macs_per_image(lenet, torch.randn(1, 3, 32, 32))
        == 28 * 28 * 6 * 75 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    )


def test_summary_rows_for_memory_and_step_breakdown(tmp_path, monkeypatch):
    run_all = _load("run_all")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    (tmp_path / "memory.json").write_text(
        json.dumps(
            {
                "batch": 64,
                "rows": [
                    {"model": "lenet5", "operation": "deepshap", "peak_extra_mb": 41.4},
                    {"model": "lenet5", "operation": "shap_deepexplainer", "error": "boom"},
                ],
            }
        )
    )
    (tmp_path / "impactx.json").write_text(
        json.dumps(
            {
                "results": [
                    {
                        "model": "lenet5",
                        "batch": 64,
                        "ratio_impactx_to_baseline": 3.0,
                        "ratio_impactx_lambda0_to_baseline": 2.0,
                        "map_read_s": 0.001,
                        "impactx_epoch_in_memory_maps_s": 1.0,
                        "map_reading_overhead": 0.001,
                        "ratio_builtin_maps_to_forward": 2.0,
                        "speedup_builtin_vs_deepexplainer": None,
                        "step_parts_s": {"M forward+backward": 0.003, "decoder": 0.005},
                        "step_s": 0.009,
                        "baseline_step_s": 0.004,
                        "macs_per_image": {"baseline": 100, "decoder": 250},
                    }
                ]
            }
        )
    )
    table = run_all.summary()
    assert "| lenet5 | DeepSHAP 41, shap.DeepExplainer failed |" in table
    assert "M forward+backward 3.0, decoder 5.0; multiply-adds per image: decoder 2.50x" in table
    assert "(sum 8.0 vs step 9.0; baseline step 4.0)" in table
    assert "DeepExplainer (bg 100) | lenet5" not in table  # skipped post-hoc comparison: no row
    assert [script for script, _ in run_all.BENCHES] and all((BENCH / script).exists() for script, _ in run_all.BENCHES)
    row = {
        "model": "lenet5",
        "decoder": "unet_input",
        "decoder_width": 64,
        "per_class": True,
        "map_loss": "pearson",
        "decoder_reads_m": True,
        "batch": 64,
        "ratio_builtin_maps_to_forward": 2.0,
        "ratio_impactx_step_to_baseline": 3.0,
        "macs_per_image": {"baseline": 100, "decoder": 50},
    }
    (tmp_path / "impactx_decoders_reads_m.json").write_text(json.dumps({"threads": 2, "decoders": [row]}))
    assert (
        "(impactx.decoder=unet_input width 64 per class, pearson loss, reading M, batch 64, 2 threads) | lenet5 | 2.00x; 3.00x "
        "(decoder multiply-adds 0.50x the model's) | <= 2.5x; <= 2.5x | no |"
    ) in run_all.summary()


def test_the_reveal_row_says_which_images_and_model_it_measured(tmp_path, monkeypatch):
    """bench_reveal.py runs on CIFAR-10's real images with a briefly trained LeNet-5 when the data is there, else on
    random images and an untrained one: the summary row names which (a record from before says nothing: random)."""
    run_all = _load("run_all")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    base = {
        "teacher": "lrp",
        "method": "spray",
        "threads": 1,
        "n": 45000,
        "total_s": 32.0,
        "seconds": {"maps_s": 11, "activations_s": 5, "reveal_s": 8, "figures_s": 7},
        "projected_cifar10_45000_s": 30.0,
        "meets_target": True,
    }
    real = {
        **base,
        "images": "CIFAR-10 training split (cifar10-jpg.zip)",
        "model": "lenet5 trained 1 epoch(s) on the images",
    }
    (tmp_path / "reveal_45000.json").write_text(json.dumps(real))
    (tmp_path / "reveal.json").write_text(json.dumps({**base, "n": 9000}))
    table = run_all.summary()
    assert "| teachx reveal over 45,000 images (CIFAR-10 training split (cifar10-jpg.zip); lrp maps, spray, " in table
    assert "| lenet5 trained 1 epoch(s) on the images | 32 s" in table
    assert "| teachx reveal over 9,000 images (seeded random 32x32x3; lrp maps, spray, " in table


def test_the_reveal_oracle_scores_a_planted_artefact_layer_and_not_a_noise_layer():
    """bench_reveal_oracle.py: CAVs fitted on the true labels of one class retrieve the artefact's images among all
    images where a layer carries it, at chance where none does, and on all layers side by side."""
    pytest.importorskip("sklearn")
    import numpy as np

    oracle = _load("bench_reveal_oracle").oracle
    rng = np.random.default_rng(0)
    n = 600
    in_class = np.arange(n) < 200
    poisoned = in_class & (np.arange(n) % 2 == 0)
    carries = rng.normal(0, 1, (n, 5))
    carries[poisoned, 2] += 3.0
    noise = rng.normal(0, 1, (n, 7))
    feats = {pool: {"a": carries, "b": noise} for pool in ("max", "mean")}
    got = oracle(feats, poisoned, in_class)
    assert set(got) == {
        f"{k}/{p}/{layer}"
        for k in ("pattern", "logistic")
        for p in ("max", "mean")
        for layer in ("a", "b", "all layers")
    }
    for kind in ("pattern", "logistic"):
        assert got[f"{kind}/max/a"] > 0.95 and got[f"{kind}/max/all layers"] > 0.95
        assert 0.35 < got[f"{kind}/max/b"] < 0.65
