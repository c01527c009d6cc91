"""A concept record: an artefact's direction (CAV) at one layer of one model, with what the ClArC
corrections need to use it.

Reveal finds a concept; Revise consumes it (``teachx.training.clarc`` and the
``rrclarc`` / ``aclarc`` training methods). The record lives here, below both, so that either can read
and write it without importing the other.

What a concept holds and why:

- ``cav``: the unit concept activation vector over the layer's channels (a conv layer's C, a linear
  layer's width). It was fitted on *pooled* activations (``pooling``: ``max`` over the spatial positions,
  as the ClArC reference code does, or ``mean``; a linear layer's activations are used as they are).
- ``mean_clean`` / ``mean_artefact``: the mean pooled activation of the samples without and with the
  artefact. Their projections on the CAV, ``z_clean`` and ``z_artefact``, are what P-ClArC projects to
  and A-ClArC shifts to; ``z_artefact - z_clean`` is the artefact's mean offset along the CAV.
- ``threshold``: the CAV score (``cav . pooled activation``) above which R-ClArC counts the artefact as
  present; None means halfway between ``z_clean`` and ``z_artefact``.
- ``model_digest``: :func:`model_digest` of the model the CAV was computed on. A CAV means nothing for
  other weights, so every user of a concept checks it (:meth:`Concept.check_model`).
- ``arrays`` / ``info``: whatever else Reveal keeps with the concept (per-sample scores, localisation
  masks; JSON-able notes), carried along; ``rrr_revealed`` reads the masks (``masks`` with their training
  indices ``localised``, as ``teachx revise`` writes them).

On disk a concept is two files side by side: ``NAME.npz`` (the arrays) and ``NAME.json`` (the rest, the
sha256 of the npz file, and a digest of its own). Reading verifies both, so a flipped byte in either is
one clear error, never a silently different correction.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError, CorruptionError
from teachx.registry import suggest
from teachx.utils.hashing import hash_state_dict, sha256_file
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic

FORMAT = "teachx-concept-1"
POOLINGS = ("max", "mean")
#: arrays of the npz file that the record itself uses (``arrays`` may not reuse these names)
_OWN_ARRAYS = ("cav", "mean_clean", "mean_artefact")
_FIX = "save the concept again (teachx.training.concepts.save_concept) or restore the file from a copy"


def model_digest(model: nn.Module) -> str:
    """``sha256:<hex>`` of the model's weights and buffers (names, dtypes, shapes, exact values): the same
    for a model and every copy loaded from its checkpoint, different after any change of a weight."""
    return "sha256:" + hash_state_dict(model.state_dict())


def _vector(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"concept {name} must be a non-empty vector, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"concept {name} holds NaN or infinite values; compute the concept again")
    return arr


@dataclass(frozen=True)
class Concept:
    """An artefact's CAV at ``layer`` of the model with digest ``model_digest`` (see the module's text)."""

    name: str
    layer: str
    cav: np.ndarray
    mean_clean: np.ndarray
    mean_artefact: np.ndarray
    model_digest: str
    pooling: str = "max"
    threshold: Optional[float] = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("a concept needs a name (a non-empty string)")
        if not isinstance(self.layer, str) or not self.layer:
            raise ConfigError(f"concept '{self.name}' needs a layer name (a module name of the model)")
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"concept pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}{suggest(str(self.pooling), list(POOLINGS))}"
            )
        cav = _vector("cav", self.cav)
        norm = float(np.linalg.norm(cav))
        if norm == 0.0:
            raise ConfigError(f"concept '{self.name}' has a zero CAV; compute the concept again")
        # a CAV is a direction: kept as a unit vector, so that projections are plain dot products (one that
        # already is -- up to rounding -- is kept bit for bit, so a record reads back exactly as it was saved)
        object.__setattr__(self, "cav", cav / norm if abs(norm - 1.0) > 1e-9 else cav)
        for key in ("mean_clean", "mean_artefact"):
            vec = _vector(key, getattr(self, key))
            if vec.shape != cav.shape:
                raise ConfigError(
                    f"concept '{self.name}': {key} has {vec.size} values but the CAV has {cav.size}; compute the concept again"
                )
            object.__setattr__(self, key, vec)
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not math.isfinite(float(self.threshold)):
                raise ConfigError(f"concept '{self.name}': threshold must be a finite number, got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))
        arrays = {str(k): np.asarray(v) for k, v in dict(self.arrays).items()}
        clash = sorted(set(arrays) & set(_OWN_ARRAYS))
        if clash:
            raise ConfigError(f"concept arrays may not be named {', '.join(clash)}: the record uses those names")
        object.__setattr__(self, "arrays", arrays)
        info = dict(self.info)
        try:
            json.dumps(info)
        except (TypeError, ValueError):
            raise ConfigError(
                f"concept '{self.name}': info must hold JSON values (text, numbers, lists, mappings)"
            ) from None
        object.__setattr__(self, "info", info)

    # -- what the corrections use ---------------------------------------------------------------
    @property
    def width(self) -> int:
        """The layer width the CAV is for (a conv layer's channels, a linear layer's features)."""
        return int(self.cav.size)

    @property
    def z_clean(self) -> float:
        """The mean CAV score of the samples without the artefact (P-ClArC projects to it)."""
        return float(self.cav @ self.mean_clean)

    @property
    def z_artefact(self) -> float:
        """The mean CAV score of the samples with the artefact (A-ClArC shifts to it)."""
        return float(self.cav @ self.mean_artefact)

    @property
    def offset(self) -> float:
        """The artefact's mean offset along the CAV: ``z_artefact - z_clean``."""
        return self.z_artefact - self.z_clean

    @property
    def score_threshold(self) -> float:
        """The CAV score above which the artefact counts as present (R-ClArC): ``threshold``, or halfway
        between the clean and the artefact means."""
        return self.threshold if self.threshold is not None else 0.5 * (self.z_clean + self.z_artefact)

    def cav_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """The CAV as a tensor of ``like``'s dtype and device."""
        return torch.as_tensor(self.cav, dtype=like.dtype, device=like.device)

    # -- checks against a model ------------------------------------------------------------------
    def check_model(self, model: nn.Module, example: Optional[torch.Tensor] = None, where: str = "") -> nn.Module:
        """The module at ``layer`` of ``model``, after checking that the concept was computed on this very
        model (its digest) and, given an ``example`` input, that the layer's width is the CAV's.
        ``where`` names the concept's source (a file) in the messages."""
        src = f"concept '{self.name}'" + (f" ({where})" if where else "")
        digest = model_digest(model)
        if digest != self.model_digest:
            raise ConfigError(
                f"{src} was computed on another model ({self.model_digest[:19]}, this one is {digest[:19]}); "
                "compute the concept on the model you correct (the baseline of the run you fine-tune)"
            )
        module = layer_module(model, self.layer, src)
        if example is not None:
            width = layer_width(model, module, example)
            if width != self.width:
                raise ConfigError(
                    f"{src} has a CAV of {self.width} values but layer '{self.layer}' has {width} channels; "
                    "compute the concept at this layer of this model"
                )
        return module

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record's JSON part (without the npz checksum and digest that :func:`save_concept` adds)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "layer": self.layer,
            "model_digest": self.model_digest,
            "pooling": self.pooling,
            "threshold": self.threshold,
            "width": self.width,
            "z_clean": self.z_clean,
            "z_artefact": self.z_artefact,
            "arrays": sorted(self.arrays),
            "info": dict(self.info),
        }


def concept_from_activations(
    name: str,
    layer: str,
    pooled: np.ndarray | torch.Tensor,
    has_artefact: np.ndarray | torch.Tensor,
    model_digest: str,
    cav: Optional[np.ndarray | torch.Tensor] = None,
    pooling: str = "max",
    **kwargs: Any,
) -> Concept:
    """A concept from the pooled activations (N, C) of samples with and without the artefact.

    ``cav`` None: the pattern (signal) CAV, which the RR-ClArC reference recommends: the covariance of
    the activations with the artefact label over the label's variance -- for a 0/1 label, the difference
    of the two groups' means. The group means are always taken from ``pooled``.
    """
    acts = np.asarray(pooled.detach().cpu() if isinstance(pooled, torch.Tensor) else pooled, dtype=np.float64)
    label = np.asarray(
        has_artefact.detach().cpu() if isinstance(has_artefact, torch.Tensor) else has_artefact, dtype=bool
    )
    if acts.ndim != 2 or label.shape != (acts.shape[0],):
        raise ConfigError(
            f"pooled activations must be (samples, channels) with one artefact flag per sample, got {acts.shape} and {label.shape}"
        )
    if label.all() or not label.any():
        raise ConfigError("a concept needs samples both with and without the artefact; mark some of each")
    mean_art, mean_clean = acts[label].mean(0), acts[~label].mean(0)
    direction = mean_art - mean_clean if cav is None else np.asarray(cav, dtype=np.float64)
    return Concept(name, layer, direction, mean_clean, mean_art, model_digest, pooling, **kwargs)


def concept_from_scores(
    name: str,
    layer: str,
    cav: np.ndarray | torch.Tensor,
    scores: np.ndarray,
    has_artefact: np.ndarray,
    model_digest: str,
    pooling: str = "max",
    **kwargs: Any,
) -> Concept:
    """A concept from a CAV and the CAV scores of samples with and without the artefact (what a Reveal step
    that keeps scores rather than activations has). The corrections use only the means' projections on the
    CAV, so the group means are stored as ``z * cav``: their scores are the groups' mean scores, and nothing is
    claimed about their parts orthogonal to the CAV."""
    direction = np.asarray(cav.detach().cpu() if isinstance(cav, torch.Tensor) else cav, dtype=np.float64)
    unit = direction / (np.linalg.norm(direction) or 1.0)
    score = np.asarray(scores, dtype=np.float64)
    label = np.asarray(has_artefact, dtype=bool)
    if score.ndim != 1 or label.shape != score.shape:
        raise ConfigError(f"scores and artefact flags must be one per sample, got {score.shape} and {label.shape}")
    if label.all() or not label.any():
        raise ConfigError("a concept needs samples both with and without the artefact; mark some of each")
    z_art, z_clean = float(score[label].mean()), float(score[~label].mean())
    return Concept(name, layer, direction, z_clean * unit, z_art * unit, model_digest, pooling, **kwargs)


def concept_paths(path: str | Path) -> tuple[Path, Path]:
    """(NAME.json, NAME.npz) for ``NAME``, ``NAME.json`` or ``NAME.npz``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".npz") else p
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz")


def save_concept(concept: Concept, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``NAME.npz`` then ``NAME.json`` (the JSON names the npz's sha256, so it is written last);
    returns the JSON's path. An existing file is refused unless ``overwrite`` is given and the files there
    are a concept teachx wrote (its JSON record says so)."""
    json_path, npz_path = concept_paths(path)
    for p in (json_path, npz_path):
        if p.exists() and not (overwrite and _is_concept(json_path)):  # never replace what teachx did not write
            raise ConfigError(f"'{p}' exists; choose another concept name or remove that file first")
    arrays = {
        "cav": concept.cav,
        "mean_clean": concept.mean_clean,
        "mean_artefact": concept.mean_artefact,
        **concept.arrays,
    }
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_json_atomic(json_path, {**concept.to_json(), "npz_sha256": sha256_file(npz_path)}, digest=True)
    return json_path


def _is_concept(json_path: Path) -> bool:
    """Whether ``json_path`` is a concept record teachx wrote (readable JSON of this format)."""
    try:
        return json.loads(json_path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_concept(path: str | Path) -> Concept:
    """The concept at ``path`` (NAME, NAME.json or NAME.npz), verified: the JSON against its digest, the
    npz against the sha256 the JSON names. Any problem is one line naming the file and the fix."""
    json_path, npz_path = concept_paths(path)
    for p in (json_path, npz_path):
        if not p.is_file():
            raise ConfigError(
                f"concept file '{p}' does not exist; give the path of a concept file (NAME.json next to NAME.npz)"
            )
    record = read_trusted_json(json_path, _FIX, "concept file")
    if record.get("format") != FORMAT:
        if "arrays_sha256" in record and "cav" in record:  # a concept record of teachx reveal: another format
            raise ConfigError(
                f"'{json_path}' is a concept record of teachx reveal, not a ClArC concept file; make one from its "
                "CAV and scores with teachx.training.concepts.concept_from_scores and save_concept (see the Revise guide)"
            )
        raise ConfigError(
            f"'{json_path}' is not a teachx concept file (format {record.get('format')!r}); give a concept file "
            "written by teachx.training.concepts.save_concept"
        )
    if record.get("npz_sha256") != sha256_file(npz_path):
        raise CorruptionError.of(
            npz_path, "its sha256 differs from the one its JSON record names", _FIX, "concept file"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:  # verified bytes that numpy cannot read: not written by teachx
        raise CorruptionError.of(npz_path, f"unreadable ({str(exc)[:60]})", _FIX, "concept file") from None
    missing = [k for k in _OWN_ARRAYS if k not in arrays]
    if missing:
        raise CorruptionError.of(npz_path, f"it lacks {', '.join(missing)}", _FIX, "concept file")
    try:
        return Concept(
            name=record["name"],
            layer=record["layer"],
            cav=arrays.pop("cav"),
            mean_clean=arrays.pop("mean_clean"),
            mean_artefact=arrays.pop("mean_artefact"),
            model_digest=record["model_digest"],
            pooling=record.get("pooling", "max"),
            threshold=record.get("threshold"),
            arrays=arrays,
            info=record.get("info") or {},
        )
    except KeyError as exc:
        raise CorruptionError.of(json_path, f"it lacks {exc}", _FIX, "concept file") from None


def layer_names(model: nn.Module) -> list[str]:
    """The names a concept's layer may take: every named module of ``model`` but the model itself."""
    return [n for n, _ in model.named_modules() if n]


def layer_module(model: nn.Module, layer: str, what: str = "the concept") -> nn.Module:
    """The module named ``layer``; a ConfigError listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    names = layer_names(model)
    shown = ", ".join(names[:40]) + (f" and {len(names) - 40} more" if len(names) > 40 else "")
    raise ConfigError(
        f"{what} names layer '{layer}', which {type(model).__name__} does not have{suggest(layer, names)}; "
        f"compute the concept at one of its layers: {shown}"
    )


def layer_width(model: nn.Module, module: nn.Module, example: torch.Tensor) -> int:
    """The channel count (dim 1) of ``module``'s output when ``model`` runs on ``example`` (one no-grad
    forward in eval mode; the model's mode is restored)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o) if not seen else None)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        handle.remove()
        model.train(was_training)
    out = seen[0] if seen else None
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ConfigError("the concept's layer gives no (batch, channels, ...) tensor; choose a conv or linear layer")
    return int(out.shape[1])


def describe(concept: Concept) -> str:
    """One line about a concept, for a run's log."""
    return (
        f"concept '{concept.name}' at {concept.layer} ({concept.width} channels, {concept.pooling}-pooled): "
        f"z_clean {concept.z_clean:.4g}, z_artefact {concept.z_artefact:.4g}, threshold {concept.score_threshold:.4g}"
    )


__all__ = [
    "Concept",
    "FORMAT",
    "concept_from_activations",
    "concept_from_scores",
    "concept_paths",
    "describe",
    "layer_module",
    "layer_names",
    "layer_width",
    "load_concept",
    "model_digest",
    "save_concept",
]
