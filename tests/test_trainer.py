"""The training loop: determinism, resume after kill -9 == uninterrupted run, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from teachx.training.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("_train_script.py")
EPOCHS = 4


def _run(out: Path, delay: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(EPOCHS), str(delay)], capture_output=True, text=True, timeout=300
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).group("model")


@pytest.mark.slow
def test_resume_after_kill_gives_same_weights(tmp_path):
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    # interrupted run: SIGKILL in the middle of epoch 2 or later (batches are slowed down)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(EPOCHS), "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    last_json = out / "checkpoints" / "last.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if last_json.exists():
            try:
                if json.loads(last_json.read_text())["epoch"] >= 0:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    time.sleep(0.12)  # a couple of batches into the next epoch
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(last_json.read_text())["epoch"]
    assert killed_at < EPOCHS - 1
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (
        _weights(tmp_path / "ref" / "checkpoints" / "last.safetensors"),
        _weights(out / "checkpoints" / "last.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h_ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    h_res = json.loads((out / "history.json").read_text())
    assert [h["val_acc"] for h in h_ref] == [h["val_acc"] for h in h_res]
    assert [h["train_loss"] for h in h_ref] == pytest.approx([h["train_loss"] for h in h_res], abs=0)
    # no temp files left behind
    assert not [p for p in out.rglob("*.tmp")]


def test_training_learns_and_selects_best(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from _train_script import main

    main(str(tmp_path / "r"), 15, 0.0)
    hist = json.loads((tmp_path / "r" / "history.json").read_text())
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors").meta
    assert best["best_epoch"] == 1 + int(np.argmax([h["val_acc"] for h in hist]))
    assert max(h["val_acc"] for h in hist) > 0.8  # the synthetic task is easy (chance: 0.25)
    assert hist[-1]["lr"] < hist[0]["lr"]  # cosine schedule decays


def test_schedules_closed_form():
    from teachx.config.train import TrainConfig
    from teachx.training.schedule import lr_at

    c = TrainConfig(epochs=10, lr=1.0, schedule="cosine")
    assert lr_at(c, 0, 10) == pytest.approx(1.0)
    assert lr_at(c, 50, 10) == pytest.approx(0.5)
    s = TrainConfig(epochs=10, lr=1.0, schedule="multistep", milestones=[3, 6], gamma=0.1)
    assert (
        lr_at(s, 29, 10) == pytest.approx(1.0)
        and lr_at(s, 30, 10) == pytest.approx(0.1)
        and lr_at(s, 65, 10) == pytest.approx(0.01)
    )
    w = TrainConfig(epochs=10, lr=1.0, schedule="constant", warmup_epochs=1)
    assert lr_at(w, 0, 10) == pytest.approx(0.1) and lr_at(w, 9, 10) == pytest.approx(1.0)


def test_tensorboard_logging_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    sys.path.insert(0, str(SCRIPT.parent))
    from _train_script import synthetic_dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from teachx.models import build_model
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer

    ds = synthetic_dataset(64, 16)
    plan = DataPlan(ds, np.arange(48), np.arange(48, 64))
    cfg = TrainConfig(epochs=2, batch_size=16, tensorboard=True, progress=False)
    Trainer(
        ClassifierTask(build_model("lenet5", 1, 4, 16)),
        plan,
        cfg,
        tmp_path,
        device="cpu",
        meta={"kind": "classifier"},
        log=lambda s: None,
    ).fit()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    hist = json.loads((tmp_path / "history.json").read_text())
    vals = [e.value for e in acc.Scalars("val_acc")]
    assert vals == pytest.approx([h["val_acc"] for h in hist])


@pytest.mark.parametrize("backbone", ["lenet5"])
def test_channels_last_trains_to_the_same_model(tmp_path, backbone):
    """train.channels_last changes the memory layout only: same weights (to float rounding), same history."""
    sys.path.insert(0, str(SCRIPT.parent))
    from _train_script import synthetic_dataset

    from teachx.models import build_model
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer

    from teachx.data.base import ImageDataset, Split

    torch.set_num_threads(1)
    one = synthetic_dataset(64, 16)  # made 3-channel: with 1 input channel PyTorch already picks NHWC after conv 1
    rgb = lambda sp: Split(np.repeat(sp.images, 3, axis=3), sp.labels)  # noqa: E731
    ds = ImageDataset(
        "synthetic3", one.class_names, rgb(one.train), rgb(one.test), (0.3,) * 3, (0.25,) * 3, hflip=False
    )
    plan = DataPlan(ds, np.arange(48), np.arange(48, 64))
    weights, hist, layouts = [], [], []
    for cl in (False, True):
        torch.manual_seed(0)
        opts = {"alpha": 0.25} if backbone == "mobilenet" else {}
        model = build_model(backbone, 3, 4, 16, **opts)
        # SGD: Adam would amplify rounding-level gradient differences on near-zero gradients into +-lr steps
        cfg = TrainConfig(epochs=2, batch_size=16, progress=False, channels_last=cl, optimizer="sgd", lr=0.05)
        seen: list[bool] = []  # layout of every multi-channel conv input during training steps
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1:
                m.register_forward_pre_hook(
                    lambda mod, inp: (
                        seen.append(
                            inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()
                        )
                        if mod.training
                        else None
                    )
                )
        Trainer(
            ClassifierTask(model),
            plan,
            cfg,
            tmp_path / str(cl),
            device="cpu",
            meta={"kind": "classifier"},
            log=lambda s: None,
        ).fit()
        layouts.append(set(seen))
        weights.append(_weights(tmp_path / str(cl) / "checkpoints" / "last.safetensors"))
        hist.append(json.loads((tmp_path / str(cl) / "history.json").read_text()))
    assert layouts == [{False}, {True}]  # the option did change the activations' layout
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5)
    assert [h["val_acc"] for h in hist[0]] == [h["val_acc"] for h in hist[1]]


def test_channels_last_gradients_are_float32_rounding_close():
    """MobileNet (BN over 2x2 maps: ill-conditioned): both layouts' gradients against a float64
    reference; channels_last stays at the contiguous run's own rounding level."""
    import copy

    import torch.nn.functional as F

    from teachx.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("mobilenet", 3, 4, 16, alpha=0.25).train()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))

    def grads(m, xx):
        m.zero_grad()
        F.cross_entropy(m(xx), y).backward()
        return torch.cat([p.grad.double().flatten() for p in m.parameters()])

    contiguous = grads(model, x)
    cl = grads(
        copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    )
    ref = grads(copy.deepcopy(model).double(), x.double())
    err = lambda g: ((g - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(contiguous) < 1e-2 and err(cl) < 3 * err(contiguous), (err(contiguous), err(cl))


def test_no_validation_split_keeps_the_last_epoch(tmp_path):
    """data.val_fraction=0: nothing to validate on, so the best checkpoint is the last epoch's (it used
    to end in 'no best checkpoint' because a NaN validation accuracy never improves)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from _train_script import synthetic_dataset

    from teachx.models import build_model
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer

    ds = synthetic_dataset(48, 16)
    plan = DataPlan(ds, np.arange(48), np.arange(0))
    cfg = TrainConfig(epochs=3, batch_size=16, progress=False)
    res = Trainer(
        ClassifierTask(build_model("lenet5", 1, 4, 16)),
        plan,
        cfg,
        tmp_path,
        device="cpu",
        meta={"kind": "classifier"},
        log=lambda s: None,
    ).fit()
    assert res.best_epoch == 3
    best, last = _weights(res.best_path), _weights(res.last_path)
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
