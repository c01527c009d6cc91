"""`teachx explain`: the built-in maps of an IMPACTX (or ABN) model for arbitrary image files, as PNG overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from teachx.data.transforms import normalize
from teachx.errors import CheckpointError, DataError
from teachx.models import BUILT_IN_MAP_MODELS, any_model_from_spec
from teachx.training.checkpoint import load_state_into
from teachx.utils.seeding import choose_device


def find_impactx_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a model with built-in maps that a path names: a checkpoint file, a `teachx run` /
    `teachx demo` directory (its ``impactx/`` or ``abn/checkpoints/best.safetensors``), a study unit
    directory (``OUT/units/<key>``) or a stage/checkpoints folder; a one-line error saying what to pass otherwise."""
    p = Path(path)
    if not p.is_dir():
        return p  # a file (or a missing path: load_checkpoint says so)
    for candidate in (*(p / stage / "checkpoints" for stage in BUILT_IN_MAP_MODELS), p / "checkpoints", p):
        if (candidate / "best.safetensors").is_file():
            if candidate == p / "checkpoints" and (p / "unit.json").is_file():
                kind = _unit_kind(p)
                if kind not in (None, *BUILT_IN_MAP_MODELS):
                    raise CheckpointError(f"'{path}' is a study {kind} unit (a model without built-in maps); pass an IMPACTX "
                                          "or ABN unit of the study (study.json lists them), or a checkpoint file")
            return candidate / "best.safetensors"
    what = "study directory" if (p / "study.json").is_file() or (p / "units").is_dir() else \
        "run directory" if (p / "config.yaml").is_file() else "directory"
    if what == "study directory":
        fix = "pass one of its IMPACTX or ABN units, e.g. <study>/units/<key> (study.json lists them)"
    elif (p / "impactx" / "checkpoints" / "last.safetensors").is_file():
        fix = ("its IMPACTX stage has not finished: run the same `teachx run` command again to finish it, "
               f"or pass {p / 'impactx' / 'checkpoints' / 'last.safetensors'}")
    else:
        fix = ("pass the --out folder of `teachx run` or `teachx demo` (not `teachx train`, which trains no IMPACTX model), "
               "a study unit, or an IMPACTX / ABN .safetensors file")
    raise CheckpointError(f"{what} '{path}' has no IMPACTX checkpoint; {fix}")


def _unit_kind(unit_dir: Path) -> str | None:
    """A study unit's kind: 'impactx', 'classifier', or the training method's name for a method unit ('abn', 'rrr', ...)."""
    import json

    try:
        unit = json.loads((unit_dir / "unit.json").read_text())
        kind = unit.get("kind")
        return ((unit.get("config") or {}).get("method") or {}).get("name", kind) if kind == "method" else kind
    except (OSError, ValueError, AttributeError):
        return None


def load_impactx(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model with built-in maps (IMPACTX or ABN) and its metadata from a checkpoint (verified
    against its digest), or from the checkpoint of a run / study-unit directory (:func:`find_impactx_checkpoint`)."""
    from teachx.interfaces.pipeline import load_checkpoint_verified

    path = find_impactx_checkpoint(path)
    ck = load_checkpoint_verified(path)  # a damaged file inside a run: the error says which stage to --redo
    spec = ck.meta.get("model_spec") or {}
    if spec.get("name") not in BUILT_IN_MAP_MODELS:
        raise CheckpointError(
            f"'{path}' is a {ck.meta.get('kind', 'unknown')} checkpoint, not an IMPACTX or ABN model; "
            "pass a `teachx run` directory or its impactx/checkpoints/best.safetensors"
        )
    model = any_model_from_spec(spec)
    load_state_into(model, ck.group("model"), f"checkpoint '{path}'")
    return model.eval(), ck.meta


def read_image(path: str | Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Image file -> uint8 (H, W, C) at the model's size and channels, and a notice if resized."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image '{path}' does not exist; pass paths of PNG/JPEG files")
    try:
        with Image.open(p) as im:
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); pass PNG/JPEG files") from None
    notice = ""
    if (im.height, im.width) != tuple(size):
        notice = f"resized {p.name} from {im.width}x{im.height} to {size[1]}x{size[0]} (the model's input size)"
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        raise DataError(f"'{path}' has {arr.shape[2]} channels, the model expects {channels}")
    return arr, notice


def explain_images(checkpoint: str, images: list[str], out: str, device: str = "auto",
                   cls: int | None = None) -> Iterator[str]:
    """Overlay PNGs of the built-in maps of ``images``; ``cls``: the map of that class instead of the
    predicted one (models with per-class maps only). Yields one line per image (and per notice)."""
    from teachx.reporting.figures import save_overlay

    model, meta = load_impactx(checkpoint)
    spec = meta["model_spec"]
    kind = spec["name"]
    channels, size = int(spec["in_channels"]), tuple(int(s) for s in spec["image_size"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    class_names = meta.get("class_names") or [str(i) for i in range(int(spec["num_classes"]))]
    if cls is not None:
        if not getattr(model, "per_class", False):
            raise CheckpointError(f"--class: this {kind.upper()} model has one built-in map for every class "
                                  "(trained without impactx.per_class); drop --class")
        if not 0 <= cls < len(class_names):
            raise CheckpointError(f"--class {cls}: the model has {len(class_names)} classes (0-{len(class_names) - 1})")
    arrays, notices = [], []
    for p in images:  # read all first: a bad file fails before anything is written
        a, note = read_image(p, channels, size)
        arrays.append(a)
        notices.append(note)
    dev = choose_device(device)
    model.to(dev)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    x = normalize(x_u8.to(dev), mean, std)
    with torch.no_grad():
        target = None if cls is None else torch.full((x.shape[0],), cls, dtype=torch.long, device=dev)
        logits, maps = model.forward_all(x, target)
    probs = logits.softmax(1).cpu()
    for i, p in enumerate(images):
        if notices[i]:
            yield f"notice: {notices[i]}"
        k = int(probs[i].argmax())
        stem = f"{Path(p).stem}_{kind}" + ("" if cls is None else f"_class{cls}")
        dest = out_dir / f"{stem}.png"
        n = 1
        while dest.exists():  # never replace a file
            dest = out_dir / f"{stem}_{n}.png"
            n += 1
        of = "" if cls is None else f"; map of {class_names[cls]}"
        save_overlay(dest, x_u8[i], maps[i].cpu(), title=f"{Path(p).name}: {class_names[k]} ({probs[i, k]:.2f}){of}")
        yield f"{p}: predicted {class_names[k]} ({probs[i, k]:.2f}) -> {dest}"
