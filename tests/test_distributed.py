"""torch.distributed: sharded teacher maps, DDP training, resume -- 2 gloo processes vs 1 process.

The 2-process runs are real torchrun launches (``teachx.cli.launch.torchrun_command``) of
``tests/_ddp_script.py``; the 1-process references run the same workloads in this process.
Three launches in all, to keep the suite fast on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torch.distributed as dist

if not dist.is_available():  # pragma: no cover
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))

import _ddp_script as work  # noqa: E402

from teachx.errors import ConfigError  # noqa: E402
from teachx.cli.launch import relaunch_with_torchrun, should_relaunch, strip_nproc, torchrun_command  # noqa: E402
from teachx.utils import distributed as dist_utils  # noqa: E402
from teachx.training.checkpoint import load_checkpoint  # noqa: E402

# DDP vs 1 process, same global batch, no augmentation/dropout/BatchNorm: the only difference is
# the order of floating-point additions (two half-batch means averaged vs one batch mean).
WEIGHT_ATOL = 1e-5


def _launch(out: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = torchrun_command(2, [str(out), *args], module="_ddp_script")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if expect_ok and proc.returncode != 0:
        log = out.parent / f"{out.name}-torchrun.log"
        log.write_text(proc.stdout + "\n----\n" + proc.stderr)
        errors = [
            line for line in proc.stderr.splitlines() if "Error" in line or "error" in line or "terminate" in line
        ]
        pytest.fail(f"torchrun failed ({proc.returncode}); full log {log}; error lines: " + " | ".join(errors[:12]))
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).group("model")


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process launch (maps, classifier, IMPACTX lam=1 and lam=0) and the 1-process references."""
    root = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)
    _launch(root / "ddp")
    ds = work.dataset()
    ref = root / "ref"
    work.make_maps(ref, ds, distributed=False)
    work.train_classifier(ref, ds, distributed=False)
    work.train_impactx(ref, ds, 1.0, distributed=False)
    work.train_impactx(ref, ds, 0.0, distributed=False)
    work.train_method(ref, ds, "rrr", distributed=False)
    return root


@pytest.mark.slow
def test_sharded_maps_equal_single_process_bitwise(runs):
    ddp_dirs = sorted((runs / "ddp" / "maps").iterdir())
    ref_dirs = sorted((runs / "ref" / "maps").iterdir())
    assert [d.name for d in ddp_dirs] == [d.name for d in ref_dirs] and len(ref_dirs) == 2  # same keys: ig, batchdep
    for d_ddp, d_ref in zip(ddp_dirs, ref_dirs):
        a = np.load(d_ddp / "maps.npy")
        b = np.load(d_ref / "maps.npy")
        assert a.dtype == np.float16 and a.shape == b.shape
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), d_ddp.name  # bitwise
        assert np.load(d_ddp / "done.npy").all() and np.load(d_ref / "done.npy").all()
        assert np.abs(a.astype(np.float32)).sum() > 0  # real maps, not the zero-initialised file
        meta = json.loads((d_ddp / "meta.json").read_text())
        assert meta["shape"][0] == 192


@pytest.mark.slow
def test_batch_dependent_maps_need_batch_round_robin(runs):
    """Why batches (not single rows) are dealt to ranks: the batch-dependent store would differ."""
    ds_idx = np.arange(192)
    todo = np.setdiff1d(ds_idx, work.PREFILLED)
    ref = np.load(
        next(
            d for d in (runs / "ref" / "maps").iterdir() if json.loads((d / "meta.json").read_text())["shape"][-1] == 4
        )
        / "maps.npy"
    )
    # what todo[r::2] row sharding would have computed for rank 0's first batch:
    row_sharded = work.batch_dependent_compute(todo[0::2][: work.MAP_BATCH]).numpy().astype(np.float16)
    assert not np.array_equal(row_sharded, ref[todo[0::2][: work.MAP_BATCH]])


@pytest.mark.slow
def test_ddp_training_matches_single_process(runs):
    for name in ("classifier", "impactx_lam1.0", "impactx_lam0.0"):
        a = _weights(runs / "ddp" / name / "checkpoints" / "last.safetensors")
        b = _weights(runs / "ref" / name / "checkpoints" / "last.safetensors")
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= WEIGHT_ATOL, (name, worst)
        moved = max((a[k] - _init_weights(name)[k]).abs().max().item() for k in a if a[k].is_floating_point())
        assert moved > 100 * WEIGHT_ATOL, (name, moved)  # the runs trained: the agreement is not vacuous
        h_ddp, h_ref = _history(runs / "ddp" / name), _history(runs / "ref" / name)
        assert len(h_ddp) == len(h_ref)
        for r_ddp, r_ref in zip(h_ddp, h_ref):
            # metrics are all-reduced over ranks: the whole training and validation sets, not rank 0's half
            assert r_ddp["val_n"] == r_ref["val_n"] == 32
            assert r_ddp["val_acc"] == r_ref["val_acc"]
            assert r_ddp["train_loss"] == pytest.approx(r_ref["train_loss"], abs=1e-5)
            assert r_ddp["train_acc"] == pytest.approx(r_ref["train_acc"], abs=1e-9)
            assert r_ddp["val_loss"] == pytest.approx(r_ref["val_loss"], abs=1e-5)
            assert r_ddp["lr"] == r_ref["lr"]
            if name == "impactx_lam1.0":
                assert r_ddp["train_map_mse"] == pytest.approx(r_ref["train_map_mse"], rel=1e-4)
    # lam = 0 leaves the IMPACTX decoder untouched (DDP ran with find_unused_parameters)
    a = _weights(runs / "ddp" / "impactx_lam0.0" / "checkpoints" / "last.safetensors")
    init = _init_weights("impactx_lam0.0")
    assert all(torch.equal(a[k], init[k]) for k in a if k.startswith("decoder."))


@pytest.mark.slow
def test_training_methods_under_ddp(runs):
    """Every method trains under DDP through the registry; RRR (no randomness, no BatchNorm) matches
    one process number by number -- its double backward synchronises gradients like any other loss."""
    for name in work.METHOD_RUNS:
        h = _history(runs / "ddp" / f"method_{name}")
        assert len(h) == 2 and all(np.isfinite(r["train_loss"]) for r in h), name
        assert (runs / "ddp" / f"method_{name}" / "checkpoints" / "best.safetensors").exists()
    a = _weights(runs / "ddp" / "method_rrr" / "checkpoints" / "last.safetensors")
    b = _weights(runs / "ref" / "method_rrr" / "checkpoints" / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL
    h_ddp, h_ref = _history(runs / "ddp" / "method_rrr"), _history(runs / "ref" / "method_rrr")
    for r_ddp, r_ref in zip(h_ddp, h_ref):
        assert r_ddp["train_rrr"] == pytest.approx(r_ref["train_rrr"], rel=1e-4)


def _init_weights(name: str) -> dict[str, torch.Tensor]:
    from teachx.models import build_model
    from teachx.models.impactx import build_impactx

    torch.manual_seed(0)
    model = (
        build_model("lenet5", 1, 4, (16, 16))
        if name == "classifier"
        else build_impactx("lenet5", 1, 4, (16, 16), decoder_width=8, decoder="paper")
    )
    return model.state_dict()


@pytest.mark.slow
def test_resume_after_interruption_under_ddp(runs, tmp_path):
    """Rank 1 dies in the middle of epoch 2; re-launching resumes from epoch 1's checkpoint and ends
    bitwise equal to the uninterrupted 2-process run."""
    out = tmp_path / "crash"
    crashed = _launch(out, "--only", "train", "--crash-epoch", "1", expect_ok=False)
    assert crashed.returncode != 0
    last = out / "classifier" / "checkpoints" / "last.json"
    assert json.loads(last.read_text())["epoch"] == 0  # only epoch 1 finished (rank 0 wrote it)
    _launch(out, "--only", "train")
    a = _weights(out / "classifier" / "checkpoints" / "last.safetensors")
    b = _weights(runs / "ddp" / "classifier" / "checkpoints" / "last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h_res, h_ref = _history(out / "classifier"), _history(runs / "ddp" / "classifier")
    assert [h["train_loss"] for h in h_res] == [h["train_loss"] for h in h_ref]
    assert [h["val_loss"] for h in h_res] == [h["val_loss"] for h in h_ref]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_collective_helpers_under_torchrun(runs):
    r0, r1 = (json.loads((runs / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["is_main"] and not r1["is_main"]
    assert r0["on_main_pid"] == r1["on_main_pid"] == r0["own_pid"] != r1["own_pid"]  # ran on rank 0, result shared
    assert r0["sum"] == r1["sum"] == 3.0
    assert r0["broadcast"] == r1["broadcast"] == {"from": 0}
    assert (r0["main_first"], r1["main_first"]) == (False, True)  # rank 0 wrote the file before rank 1 looked
    assert (runs / "ddp" / "first.txt").read_text() == "0"
    assert r0["error"] == r1["error"] == "rank 0 failed"  # an error on rank 0 reaches every rank


def test_single_process_helpers_are_no_ops():
    assert not dist_utils.is_initialized() and dist_utils.world_size() == 1 and dist_utils.is_main()
    t = torch.tensor([1.5, 2.0])
    assert dist_utils.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1}
    dist_utils.barrier()
    assert dist_utils.on_main(lambda v: v + 1, 1) == 2
    assert dist_utils.init_distributed().world_size == 1  # not launched by torchrun


def test_launch_command_strips_nproc():
    argv = ["run", "cfg.yaml", "--nproc", "4", "--out", "x", "--nproc=2", "train.lr=0.1"]
    assert strip_nproc(argv) == ["run", "cfg.yaml", "--out", "x", "train.lr=0.1"]
    cmd = torchrun_command(2, argv)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "teachx", "run", "cfg.yaml", "--out", "x", "train.lr=0.1"]
    assert should_relaunch(2) and not should_relaunch(1) and not should_relaunch(None)


# -- the CUDA/NCCL decisions, on a simulated GPU machine (no GPU here: torch.cuda and the process
# group are replaced by recorders; the collectives themselves are what the gloo runs above test)


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with 2 visible GPUs, launched by torchrun as local rank 1 of 2; records calls."""
    calls: dict = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls["init"].append(backend))
    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(key, value)
    return calls


def test_gpu_ranks_join_with_nccl_on_their_own_device(fake_gpus):
    dist_utils.init_distributed()
    assert fake_gpus == {"set_device": [1], "init": ["nccl"]}  # device chosen before the group forms
    dist_utils.init_distributed(backend="gloo")  # an explicit backend wins, and gloo binds no device
    assert fake_gpus == {"set_device": [1], "init": ["nccl", "gloo"]}


def test_more_ranks_than_gpus_is_refused_with_the_fix(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but only 2 CUDA device"):
        dist_utils.init_distributed()
    assert fake_gpus["init"] == []  # refused before joining anything
    with pytest.raises(ConfigError, match=r"--nproc 3 but only 2 GPU\(s\) are visible; use --nproc <= 2"):
        relaunch_with_torchrun(3, ["run", "cfg.yaml"])


def test_bare_cuda_device_becomes_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist_utils, "is_initialized", lambda: True)
    monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
    assert dist_utils.device_for(torch.device("cuda")) == torch.device("cuda", 1)
    assert dist_utils.device_for(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert dist_utils.device_for(torch.device("cpu")) == torch.device("cpu")
