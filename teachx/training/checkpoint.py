"""Checkpoints as safetensors + JSON metadata: loading never executes pickled code.

One ``.safetensors`` file holds every tensor (model weights, optimizer state, RNG state) and,
in its header, the JSON metadata (model spec, epoch, history, optimizer hyper-parameters), so a
single atomic rename publishes a complete checkpoint. A ``.json`` sidecar repeats the metadata for
people and tools that do not read safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from teachx.errors import CheckpointError
from teachx.utils.io import atomic_path, write_json_atomic

FORMAT = "teachx-checkpoint-1"


@dataclass
class Checkpoint:
    """Tensors grouped by prefix ("model.", "optim.", "rng.", ...) plus JSON metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors) and ``path.with_suffix('.json')`` atomically."""
    path = Path(path)
    meta = {"format": FORMAT, **meta}
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage; clone those.
    seen: set[int] = set()
    for k, v in flat.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            flat[k] = v.clone()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"teachx": json.dumps(meta, default=str)})
    write_json_atomic(path.with_suffix(".json"), meta)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint; any problem becomes a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors" if (path / "best.safetensors").exists() else path / "last.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a .safetensors file written by teachx")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupted or not a safetensors file ({str(exc).splitlines()[0][:120]}); "
            "re-create it or point to another checkpoint"
        ) from None
    try:
        meta = json.loads(header["teachx"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(
            f"checkpoint '{path}' has no teachx metadata; it was not written by teachx (use `teachx train` to create one)"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {meta.get('format')!r}, expected {FORMAT!r}; re-create it with this teachx version")
    return Checkpoint(tensors=tensors, meta=meta)


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(
            f"{what} does not match the model: {'; '.join(detail)}; use a checkpoint trained with the same backbone, dataset and options"
        )
    module.load_state_dict(state, strict=True)


# -- optimizer state <-> flat tensors ---------------------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (param groups)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
