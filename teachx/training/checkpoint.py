"""Checkpoints as safetensors + JSON metadata: loading never executes pickled code.

One ``.safetensors`` file holds every tensor (model weights, optimizer state, RNG state) and,
in its header, the JSON metadata (model spec, epoch, history, optimizer hyper-parameters), so a
single atomic rename publishes a complete checkpoint. A ``.json`` sidecar repeats the metadata for
people and tools that do not read safetensors.

Integrity (format 2): the header also holds ``teachx_digest``, a sha256 over the metadata string
and every tensor (sorted names, dtype, shape, raw bytes), verified on every load. safetensors
itself checks the header but not the data, so without it a flipped byte inside the weights would
load without complaint; with it, that is a :class:`~teachx.errors.CorruptCheckpointError` naming
the file and the fix. Format-1 checkpoints (written before digests existed) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from teachx.errors import CheckpointError, CorruptCheckpointError
from teachx.utils.io import atomic_path, write_json_atomic

FORMAT = "teachx-checkpoint-2"  # 2: content digest in the header
LEGACY_FORMATS = ("teachx-checkpoint-1",)  # still loaded; they carry no digest
DIGEST_KEY = "teachx_digest"
#: what a user can do about a damaged checkpoint when the caller knows nothing better
DEFAULT_FIX = "train it again (or restore it from a backup), or point to another checkpoint"


@dataclass
class Checkpoint:
    """Tensors grouped by prefix ("model.", "optim.", "rng.", ...) plus JSON metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}


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
    meta_text = json.dumps(meta, default=str)
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata={"teachx": meta_text, DIGEST_KEY: checkpoint_digest(meta_text, flat)})
        except SafetensorError as exc:  # its I/O errors (a full disk) as the OSError they are: one line naming the file
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from exc
    write_json_atomic(path.with_suffix(".json"), meta)


def checkpoint_digest(meta_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata string and every tensor: name, dtype, shape and raw bytes, in name order.

    Bytes are read through a uint8 view, so every dtype (bf16 included) hashes exactly as stored.
    """
    h = hashlib.sha256()
    h.update(meta_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", fix: str = DEFAULT_FIX) -> Checkpoint:
    """Load a checkpoint and verify its content digest; any problem becomes a one-line CheckpointError.

    ``fix``: the way forward named when the file is damaged (a caller that knows which stage of a
    run wrote it can say exactly what to re-run).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors" if (path / "best.safetensors").exists() else path / "last.safetensors"
    if not path.exists():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; pass the path of a .safetensors file written by teachx"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")  # verified on the CPU, then moved
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError.of(
            path, f"not a readable safetensors file: {str(exc).splitlines()[0][:120]}", fix, "checkpoint"
        ) from None
    try:
        meta = json.loads(header["teachx"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(
            f"checkpoint '{path}' has no teachx metadata; it was not written by teachx (use `teachx train` to create one)"
        ) from None
    if meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(
            f"checkpoint '{path}' has format {meta.get('format')!r}, expected {FORMAT!r}; re-create it with this teachx version"
        )
    if meta.get("format") == FORMAT:  # legacy formats carry no digest
        stored = header.get(DIGEST_KEY)
        if stored is None:
            raise CorruptCheckpointError.of(path, "its content digest is missing", fix, "checkpoint")
        if stored != checkpoint_digest(header["teachx"], tensors):
            raise CorruptCheckpointError.of(path, "content digest mismatch", fix, "checkpoint")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
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
