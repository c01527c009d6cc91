"""The contract every explanation method (teacher) follows, captum-style.

``teacher.attribute(model, inputs, target)`` returns one attribution per input element, the
same shape as ``inputs`` (B, C, H, W), on the inputs' device, for the class index ``target``
(LongTensor (B,)). It must not change the model's parameters or leave hooks/modes behind,
and must work batched. Channel reduction and per-image normalisation are separate
(``teachx.teachers.postprocess``) so every teacher gets them alike.

A new method is one file with a ``Teacher`` subclass decorated ``@TEACHERS.register("name")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from teachx.registry import Registry


class Teacher:
    """Base class; subclasses set ``name`` and implement ``attribute``."""

    name: str = "teacher"
    backbones: tuple[str, ...] = ()
    """The registered backbones this method can explain; empty: any model."""

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """JSON-able options that change the maps; part of the teacher-map store's cache key."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


TEACHERS: Registry[type[Teacher]] = Registry("teacher")
