"""`teachx explain`: the built-in maps of an IMPACTX (or ABN) model for arbitrary image files, as PNG overlays,
and with ``--faithfulness`` how faithful each map is to the model that made it (pixel flipping on that model,
next to the run's teacher method applied post hoc to it and a random map)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from teachx.config.loader import from_dict
from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.errors import CheckpointError, ConfigError, DataError, TeachxError
from teachx.evaluation.builtin_maps import (
    TRUST_METHOD,
    TRUST_METHODS,
    TRUST_THRESHOLD,
    builtin_map_faithfulness,
    disagrees,
    map_trust,
)
from teachx.models import BUILT_IN_MAP_MODELS, any_model_from_spec, shared_map_text
from teachx.runs.evaluation import post_hoc_maps
from teachx.runs import figures
from teachx.runs.plan import make_plan
from teachx.runs.recovery import load_checkpoint_verified
from teachx.runs.rundir import saved_run_config
from teachx.training.checkpoint import load_state_into
from teachx.utils.hashing import sha256_file
from teachx.utils.io import output_error, read_trusted_json, write_json_atomic
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
                    raise CheckpointError(
                        f"'{path}' is a study {kind} unit (a model without built-in maps); pass an IMPACTX "
                        "or ABN unit of the study (study.json lists them), or a checkpoint file"
                    )
            return candidate / "best.safetensors"
    what = (
        "study directory"
        if (p / "study.json").is_file() or (p / "units").is_dir()
        else "run directory"
        if (p / "config.yaml").is_file()
        else "directory"
    )
    if what == "study directory":
        fix = "pass one of its IMPACTX or ABN units, e.g. <study>/units/<key> (study.json lists them)"
    elif (p / "impactx" / "checkpoints" / "last.safetensors").is_file():
        fix = (
            "its IMPACTX stage has not finished: run the same `teachx run` command again to finish it, "
            f"or pass {p / 'impactx' / 'checkpoints' / 'last.safetensors'}"
        )
    else:
        fix = (
            "pass the --out folder of `teachx run` or `teachx demo` (not `teachx train`, which trains no IMPACTX model), "
            "a study unit, or an IMPACTX / ABN .safetensors file"
        )
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


def run_config_of(checkpoint: Path):
    """The run config of the run or study unit a checkpoint belongs to (``config.yaml`` of a `teachx run` /
    `teachx demo` directory, the ``config`` of a study unit's ``unit.json``); None for a checkpoint on its own."""
    for d in list(Path(checkpoint).resolve().parents)[:3]:  # <unit>/checkpoints/x or <run>/<stage>/checkpoints/x
        if (d / "unit.json").is_file():
            rec = read_trusted_json(d / "unit.json", "re-run the study to re-create the unit", "study unit record")
            return _config_in(dict(rec.get("config") or {}), d / "unit.json")
        if (d / "config.yaml").is_file():
            return _config_in(saved_run_config(d)[1], d / "config.yaml")
    return None


def _config_in(data: dict, path: Path):
    """The RunConfig ``data`` read from ``path``; an error names the file and the key as it is written there."""
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"the config in '{path}': {exc}") from None


def _post_hoc_plan(checkpoint: Path, channels: int, size: tuple[int, int]):
    """(run config, data plan) for the teacher method applied post hoc: the run's teacher and, for methods
    with a background (DeepSHAP, expected gradients), its training images. One-line errors otherwise."""
    cfg = run_config_of(checkpoint)
    if cfg is None:
        raise CheckpointError(
            f"--faithfulness needs the run the model came from (its config names the teacher method and the "
            f"data of its background), and '{checkpoint}' is outside a run or study unit; pass the "
            "`teachx run` / `teachx demo` directory or the study unit (STUDY/units/KEY)"
        )
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    if ds.channels != channels or tuple(ds.image_size) != tuple(size):
        raise DataError(
            f"--faithfulness: the run's data ({ds.name}) has {ds.channels}-channel {ds.image_size[0]}x{ds.image_size[1]} "
            f"images, the model expects {channels}-channel {size[0]}x{size[1]}; pass the run directory the model was trained in"
        )
    return cfg, plan


def _unique(out_dir: Path, stem: str, suffix: str) -> Path:
    dest, n = out_dir / f"{stem}{suffix}", 1
    while dest.exists():  # never replace a file teachx did not write (its own earlier ones are gone by now)
        dest, n = out_dir / f"{stem}_{n}{suffix}", n + 1
    return dest


GREY_MODES = frozenset(
    {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
)  # Pillow modes without colour


def conform_image(im, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """A loaded Pillow image -> uint8 (H, W, C) with the model's channels and size, and a note for each change
    made (colour conversion, resizing): a user whose photo the model saw in grey should be told."""
    from PIL import Image

    notes = []
    mode = "L" if channels == 1 else "RGB"
    if mode == "L" and im.mode not in GREY_MODES:
        notes.append(f"converted from colour ({im.mode}) to greyscale (the model takes one-channel images)")
    elif mode == "RGB" and im.mode in GREY_MODES:
        notes.append("converted from greyscale to RGB (the model takes three-channel colour images)")
    im = im.convert(mode)
    if (im.height, im.width) != tuple(size):
        notes.append(f"resized from {im.width}x{im.height} to {size[1]}x{size[0]} (the model's input size)")
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.array(im, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, notes


#: the record, in a `teachx explain` --out folder, of the files teachx wrote there (name -> content digest):
#: the next `teachx explain` into that folder replaces exactly these, never a file it did not write or one
#: changed since (which is then the user's)
MANIFEST = ".teachx-explain.json"


class OutputFolder:
    """A `teachx explain` --out folder: what an earlier run wrote there is removed, and what this run
    writes is recorded in :data:`MANIFEST` file by file, so an interrupted run is replaced next time too."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, str] = {}

    def earlier(self) -> dict[str, str]:
        """name -> digest of the files an earlier run recorded here ({} without a readable record)."""
        import json

        try:
            files = json.loads((self.path / MANIFEST).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            return {}
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}

    def open(self) -> int:
        """Make the folder and remove the files an earlier run wrote there, unchanged; returns how many."""
        self.path.mkdir(parents=True, exist_ok=True)
        removed = 0
        for name, digest in self.earlier().items():
            p = self.path / name
            if Path(name).name != name or p.is_symlink() or not p.is_file() or sha256_file(p) != digest:
                continue  # gone, or no longer the file teachx wrote: kept
            p.unlink()
            removed += 1
        self._record()
        return removed

    def wrote(self, path: Path) -> None:
        """Record ``path`` (in this folder) as teachx's, with the digest of what is there now."""
        if not path.is_file():  # nothing was written (a drawing step that writes no file)
            return
        self.files[path.name] = sha256_file(path)
        self._record()

    def _record(self) -> None:
        write_json_atomic(
            self.path / MANIFEST,
            {
                "files": self.files,
                "note": "files `teachx explain` wrote here; the next `teachx explain` into this folder replaces them",
            },
        )


def read_image(path: str | Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Image file -> uint8 (H, W, C) at the model's size and channels, and a notice if converted or resized."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image '{path}' does not exist; pass paths of PNG/JPEG files")
    try:
        with Image.open(p) as im:
            im.load()
            arr, notes = conform_image(im, channels, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); pass PNG/JPEG files") from None
    if arr.shape[2] != channels:
        raise DataError(f"'{path}' has {arr.shape[2]} channels, the model expects {channels}")
    return arr, f"{p.name}: {'; '.join(notes)}" if notes else ""


def explain_images(
    checkpoint: str,
    images: list[str],
    out: str,
    device: str = "auto",
    cls: int | None = None,
    faithfulness: bool = False,
    steps: int = 16,
    trust_method: str = TRUST_METHOD,
    trust_threshold: float = TRUST_THRESHOLD,
) -> Iterator[str]:
    """Overlay PNGs of the built-in maps of ``images``; ``cls``: the map of that class instead of the
    predicted one (models with per-class maps only). Yields one line per image (and per notice).

    ``faithfulness``: also the run's teacher method applied post hoc to this model (an overlay per
    image) and, for the explained class, the pixel-flipping AUCs (MoRF, LeRF, insertion; ``steps``
    removal steps) of the built-in map, the post-hoc map and a random map on this model, with the
    built-in map's correlation with the post-hoc one (``teachx.evaluation.builtin_maps``): one line
    per image and ``faithfulness.json`` (every value, the means and what was compared).

    Always, per image, the trust signal (:func:`teachx.evaluation.builtin_maps.map_trust`): the Pearson
    correlation of the built-in map with ``trust_method`` (one backward pass of this model) for the same class,
    both summed over channels, flagged below ``trust_threshold``; in each image's line and in ``trust.json``.
    """
    ck_path = find_impactx_checkpoint(checkpoint)
    model, meta = load_impactx(ck_path)
    spec = meta["model_spec"]
    kind = spec["name"]
    channels, size = int(spec["in_channels"]), tuple(int(s) for s in spec["image_size"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    class_names = meta.get("class_names") or [str(i) for i in range(int(spec["num_classes"]))]
    if cls is not None:
        if not getattr(model, "per_class", False):
            raise CheckpointError(f"--class: this {kind.upper()} model has {shared_map_text(kind)}; drop --class")
        if not 0 <= cls < len(class_names):
            raise CheckpointError(f"--class {cls}: the model has {len(class_names)} classes (0-{len(class_names) - 1})")
    arrays, notices = [], []
    for p in images:  # read all first: a bad file fails before anything is written
        a, note = read_image(p, channels, size)
        arrays.append(a)
        notices.append(note)
    cfg, plan = _post_hoc_plan(ck_path, channels, size) if faithfulness else (None, None)
    dev = choose_device(device)
    model.to(dev)
    out_dir = Path(out)
    x_u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    x = normalize(x_u8.to(dev), mean, std)
    with torch.no_grad():
        target = None if cls is None else torch.full((x.shape[0],), cls, dtype=torch.long, device=dev)
        logits, maps = model.forward_all(x, target)
    probs = logits.softmax(1).cpu()
    explained = logits.argmax(1) if target is None else target
    trust = _trust(model, x, explained, maps, trust_method)
    trust_name = TRUST_NAMES.get(trust_method, trust_method)
    faith = _faithfulness(cfg, plan, model, x, explained, maps.float(), steps, dev) if faithfulness else None
    method = cfg.teacher.method if cfg is not None else ""
    folder = OutputFolder(out_dir)
    try:
        replaced = folder.open()  # only now: a failure above leaves nothing behind
    except OSError as exc:
        raise output_error(exc, out_dir, "--out") from exc
    if replaced:
        yield f"notice: replaced {replaced} file(s) an earlier `teachx explain` wrote in {out_dir}"
    rows, trust_rows = [], []
    for i, p in enumerate(images):
        if notices[i]:
            yield f"notice: {notices[i]}"
        k = int(probs[i].argmax())
        stem = f"{Path(p).stem}_{kind}" + ("" if cls is None else f"_class{cls}")
        dest = _unique(out_dir, stem, ".png")
        of = "" if cls is None else f"; map of {class_names[cls]}"
        figures.save_overlay(
            dest, x_u8[i], maps[i].cpu(), title=f"{Path(p).name}: {class_names[k]} ({probs[i, k]:.2f}){of}"
        )
        folder.wrote(dest)
        yield f"{p}: predicted {class_names[k]} ({probs[i, k]:.2f}) -> {dest}"
        flagged = disagrees(trust[i], trust_threshold)
        yield (
            f"  built-in map vs this model's {trust_name} (Pearson correlation, channels summed): {trust[i]:.3f}"
            + (
                f"; DISAGREES (below {trust_threshold:g}): the built-in map does not show what the model's {trust_name} shows"
                if flagged
                else f" (agrees: at or above {trust_threshold:g})"
            )
        )
        trust_rows.append(
            {
                "image": str(p),
                "predicted": k,
                "predicted_name": class_names[k],
                "explained_class": int(explained[i]),
                "explained_name": class_names[int(explained[i])],
                "built_in_png": str(dest),
                "trust": trust[i],
                "disagrees": flagged,
            }
        )
        if faith is not None:
            post_dest = _unique(out_dir, f"{Path(p).stem}_{method}" + ("" if cls is None else f"_class{cls}"), ".png")
            figures.save_overlay(
                post_dest,
                x_u8[i],
                faith["post_hoc"][i],
                title=f"{Path(p).name}: {method} of this model{of}",
                map_title=f"{method} map (post hoc)",
            )
            folder.wrote(post_dest)
            row = _faith_row(faith["report"], i)
            rows.append(
                {
                    "image": str(p),
                    "predicted": k,
                    "predicted_name": class_names[k],
                    "explained_class": int(explained[i]),
                    "explained_name": class_names[int(explained[i])],
                    "built_in_png": str(dest),
                    "post_hoc_png": str(post_dest),
                    **row,
                    "trust": trust[i],
                    "disagrees": disagrees(trust[i], trust_threshold),
                }
            )
            a = row["auc"]["pixel_flipping_morf"]
            yield (
                f"  faithfulness to this model, MoRF AUC (lower = more faithful): built-in {a['built_in']:.3f}, {method} post hoc "
                f"{a['teacher_post_hoc']:.3f}, random {a['random']:.3f}; built-in vs {method} correlation {row['corr_self']:.3f} -> {post_dest}"
            )
    flagged = sum(r["disagrees"] for r in trust_rows)
    dest = _unique(out_dir, "trust", ".json")
    write_json_atomic(
        dest,
        {
            "checkpoint": str(ck_path),
            "model": kind,
            "measure": f"Pearson correlation of the built-in map with this model's {trust_name}, each summed over "
            "channels, both of the explained class",
            "method": trust_method,
            "threshold": trust_threshold,
            "flag": f"disagrees: true where the correlation is below {trust_threshold:g}",
            "explained": "predicted" if cls is None else f"class {cls}",
            "disagreeing": flagged,
            "images": trust_rows,
        },
    )
    folder.wrote(dest)
    yield (
        f"trust: {flagged} of {len(trust_rows)} image(s) have a built-in map that disagrees with this model's "
        f"{trust_name} (correlation below {trust_threshold:g}) -> {dest}"
    )
    if faith is not None:
        report = faith["report"]
        record = {
            "checkpoint": str(ck_path),
            "model": kind,
            "teacher_method": method,
            "teacher": {
                "options": dict(cfg.teacher.options),
                "reduce": cfg.teacher.reduce,
                "normalize": cfg.teacher.normalize,
                "smooth": cfg.teacher.smooth,
                "background_size": cfg.teacher.background_size,
            },
            "explained": "predicted" if cls is None else f"class {cls}",
            "steps": report["steps"],
            "higher_is_better": report["higher_is_better"],
            "mean": {"auc": report["auc"], "corr_self": report["corr_self"]},
            "images": rows,
        }
        dest = _unique(out_dir, "faithfulness", ".json")
        write_json_atomic(dest, record)
        folder.wrote(dest)
        a = report["auc"]["pixel_flipping_morf"]
        yield (
            f"mean over {len(rows)} image(s): MoRF AUC built-in {a['built_in']:.3f}, {method} post hoc {a['teacher_post_hoc']:.3f}, "
            f"random {a['random']:.3f}; correlation {report['corr_self']:.3f} -> {dest}"
        )


#: how the trust signal's post-hoc methods are named to users
TRUST_NAMES = {"gradient_x_input": "gradient × input", "lrp": "LRP"}


def _trust(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, method: str
) -> list[float]:
    """Each image's trust value (:func:`map_trust`); a method that fails on this model is one line naming the fix."""
    if method not in TRUST_METHODS:
        raise ConfigError(f"--trust-method {method!r} is not offered; choose one of {', '.join(TRUST_METHODS)}")
    try:
        return [float(v) for v in map_trust(model, x, target, maps.float(), method).tolist()]
    except TeachxError:
        raise
    except Exception as exc:  # e.g. LRP rules that do not cover this architecture
        raise CheckpointError(
            f"--trust-method {method} failed on this model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            f"use --trust-method {TRUST_METHOD}"
        ) from None


def _faithfulness(
    cfg,
    plan,
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    built_in: torch.Tensor,
    steps: int,
    device: torch.device,
) -> dict:
    """The post-hoc maps of the run's teacher method on ``model`` and the faithfulness report of both map sets."""
    try:
        post_hoc = post_hoc_maps(cfg, plan, model, x, target, device)
    except TeachxError:
        raise
    except Exception as exc:  # a method that does not support this architecture: say which, one line
        raise CheckpointError(
            f"--faithfulness: {cfg.teacher.method} failed on this model ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); drop --faithfulness"
        ) from None
    report = builtin_map_faithfulness(
        model, x, target, built_in, None, post_hoc, steps=steps, seed=cfg.seed, per_image=True
    )
    return {"post_hoc": post_hoc.cpu(), "report": report}


def _faith_row(report: dict, i: int) -> dict:
    """Image ``i``'s values of a per-image faithfulness report."""
    return {
        "auc": {m: {s: v[i] for s, v in sets.items()} for m, sets in report["values"].items()},
        "corr_self": report["corr_self_values"][i],
    }
