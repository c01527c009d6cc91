"""Checkpoints: safetensors round trip (incl. optimizer state), clear errors, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from teachx.errors import CheckpointError
from teachx.training.checkpoint import (
    load_checkpoint,
    load_state_into,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_round_trip_continues_identically(tmp_path, opt_name):
    """Saving mid-training and continuing from the file == continuing in memory."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def make(m):
        if opt_name == "adam":
            return torch.optim.Adam(m.parameters(), lr=1e-2)
        return torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True)

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    a = _model()
    oa = make(a)
    for _ in range(3):
        step(a, oa)
    tensors, meta = optimizer_to_flat(oa)
    save_checkpoint(
        tmp_path / "c.safetensors",
        {**{f"model.{k}": v for k, v in a.state_dict().items()}, **{f"optim.{k}": v for k, v in tensors.items()}},
        {"optimizer": meta, "epoch": 2},
    )
    ck = load_checkpoint(tmp_path / "c.safetensors")
    b = _model()
    load_state_into(b, ck.group("model"), "test")
    ob = make(b)
    optimizer_from_flat(ob, ck.group("optim"), ck.meta["optimizer"])
    for _ in range(3):
        step(a, oa)
        step(b, ob)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert json.loads((tmp_path / "c.json").read_text())["epoch"] == 2


def test_corrupted_and_foreign_files(tmp_path):
    p = tmp_path / "x.safetensors"
    save_checkpoint(p, {"model.w": torch.ones(3)}, {"kind": "classifier"})
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)
    p.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not written by teachx"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_mismatched_model_is_one_line_error(tmp_path):
    m = _model()
    with pytest.raises(CheckpointError) as exc:
        load_state_into(nn.Sequential(nn.Linear(4, 5)), {k: v for k, v in m.state_dict().items()}, "checkpoint 'x'")
    assert "does not match" in str(exc.value) and "\n" not in str(exc.value)
    bad = dict(m.state_dict())
    bad["0.weight"] = torch.zeros(9, 4)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_into(_model(), bad, "checkpoint 'x'")


def test_save_is_atomic_no_temp_left(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", {"model.w": torch.ones(3)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]
