"""What the concept-based corrections (``rrclarc``, ``aclarc``, ``rrr_revealed``) share: a concept file, a
starting model, and the frozen feature extractor of the reference recipe.

They fine-tune a model that already exists -- the one the concept was computed on -- rather than train
one from scratch:

- ``concept``: the path of a concept file (``NAME.json`` next to ``NAME.npz``;
  :mod:`teachx.training.concepts`), read and verified once;
- ``init``: where the starting weights come from: ``baseline`` (the run's trained baseline, the model
  Reveal examines) or ``teacher`` (the run's teacher model, e.g. a ``teacher.checkpoint``). Either way the
  model's digest must be the concept's, so a concept is never applied to weights it was not computed on;
- ``layer``: empty to use the concept's layer; set, it must name the same layer (a check, since a CAV
  belongs to one layer);
- ``freeze``: ``features`` (the Reveal-to-Revise recipe: every convolution and normalisation layer is
  frozen, normalisation statistics included, so only the dense layers train) or ``none``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.utils.hashing import sha256_file
from teachx.training.concepts import Concept, concept_paths, describe, load_concept
from teachx.training.methods.base import MethodContext, MethodTask, Option, TrainingMethod

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
_FROZEN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_NORMS)

CONCEPT_OPTIONS: dict[str, Option] = {
    "concept": Option("", "path of the concept file (NAME.json next to NAME.npz) that names the artefact's CAV"),
    "layer": Option("", "the concept's layer (empty: the one the concept names; set, it must be that one)"),
    "init": Option(
        "baseline",
        "starting weights: baseline (the run's trained baseline) | teacher (the run's teacher model); the concept must have been computed on them",
        choices=("baseline", "teacher"),
    ),
    "freeze": Option(
        "features",
        "features (convolution and normalisation layers frozen, only dense layers train, as in Reveal to Revise) | none",
        choices=("features", "none"),
    ),
}


def load_checked_concept(path: str, layer: str = "") -> Concept:
    """The concept file at ``path``, read and verified; ``layer`` set, it must be the concept's layer."""
    concept = load_concept(path)
    if layer and layer != concept.layer:
        raise ConfigError(
            f"concept '{path}' is at layer '{concept.layer}', not '{layer}'; "
            "leave method.options.layer empty or compute a concept at that layer"
        )
    return concept


def concept_record(concept: Concept, path: str) -> dict[str, Any]:
    """What a stage record keeps about the concept a method corrected along: its content, not only its path."""
    json_path, _ = concept_paths(path)
    return {
        "name": concept.name,
        "layer": concept.layer,
        "model_digest": concept.model_digest,
        "z_clean": concept.z_clean,
        "z_artefact": concept.z_artefact,
        "file_sha256": sha256_file(json_path),
    }


def freeze_features(model: nn.Module) -> list[nn.Module]:
    """Freeze every convolution and normalisation layer's parameters; returns the normalisation layers,
    which the task keeps in eval mode (their running statistics stay the starting model's)."""
    norms = []
    for m in model.modules():
        if isinstance(m, _FROZEN):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        if isinstance(m, _NORMS):
            norms.append(m)
    return norms


class ConceptTask(MethodTask):
    """A task on a fine-tuned model whose frozen normalisation layers stay in eval mode."""

    frozen_norms: list[nn.Module]

    def hold_frozen(self) -> None:
        """Called at every step: the Trainer puts the whole model in training mode each epoch."""
        for m in self.frozen_norms:
            m.eval()


def require_concept_option(method: str, value: Any, what: str) -> None:
    """Refuse a missing ``method.options.concept`` of a correction in one line; ``what`` says what the method does
    with the concept file's artefact."""
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"method {method} needs method.options.concept=PATH, the concept file (NAME.json next to NAME.npz) {what}"
        )


class ConceptMethod(TrainingMethod):
    """Base of the methods that fine-tune along a concept (not registered itself)."""

    options: dict[str, Option] = CONCEPT_OPTIONS
    corrects_concept = True
    fine_tunes_baseline = True
    #: whether the concept must carry localisation masks (arrays ``masks`` and ``localised``), which whoever makes
    #: the concept (a study's ``study.revise``) then localises
    concept_needs_masks: bool = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self._concept: Optional[Concept] = None

    @classmethod
    def check_combination(cls, opts: dict[str, Any]) -> None:
        require_concept_option(cls.name, opts["concept"], "of the artefact to correct")
        if not isinstance(opts["layer"], str):
            raise ConfigError(f"method.options.layer must be a layer name, got {opts['layer']!r}")

    def concept(self) -> Concept:
        """The concept file's record, read and verified once."""
        if self._concept is None:
            self._concept = load_checked_concept(self.opts["concept"], self.opts["layer"])
        return self._concept

    def check_data(self, plan) -> None:
        super().check_data(plan)
        self.concept()  # a missing or damaged concept file is refused before anything is trained

    def record(self) -> dict[str, Any]:
        """The method and its options, and which concept it corrected: the file's content, not only its path."""
        return {**super().record(), "concept": concept_record(self.concept(), self.opts["concept"])}

    def results(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"concept": record.get("concept")}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.opts.items() if k != "concept")
        return f"{self.name} (concept={self.opts['concept']}, {opts})"

    def starting_model(self, ctx: MethodContext) -> nn.Module:
        """The model the fine-tuning starts from (``init``)."""
        if self.opts["init"] == "teacher":
            if ctx.teacher_model is None:
                raise ConfigError(f"method {self.name} with init=teacher needs the run's teacher model")
            return ctx.teacher_model
        if ctx.baseline_model is None:
            raise ConfigError(
                f"method {self.name} fine-tunes the run's baseline, and none was given; run it with teachx run "
                "(which trains the baseline first) or set method.options.init=teacher"
            )
        return ctx.baseline_model()

    def build_model(self, ctx: MethodContext) -> nn.Module:
        """The backbone with the starting model's weights, after checking that the concept belongs to them
        (digest, layer, layer width)."""
        concept, start = self.concept(), self.starting_model(ctx)
        model = super().build_model(ctx)
        if type(start) is not type(model):
            raise ConfigError(
                f"method {self.name} fine-tunes a {type(model).__name__} (model.backbone), but its {self.opts['init']} "
                f"model is a {type(start).__name__}; use the same backbone"
            )
        model.load_state_dict(start.state_dict())
        ds = ctx.plan.dataset
        example = torch.zeros(1, ds.channels, *ds.image_size)
        concept.check_model(model, example, where=self.opts["concept"])
        ctx.log(f"[{self.name}] {describe(concept)}")
        return model

    def prepare(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """(the concept's layer, the frozen normalisation layers) after applying ``freeze``."""
        concept = self.concept()
        module = dict(model.named_modules())[concept.layer]
        norms = freeze_features(model) if self.opts["freeze"] == "features" else []
        return module, norms
