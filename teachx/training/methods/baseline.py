"""``baseline``: the plain backbone trained with cross-entropy alone.

The run's baseline stage trains it anyway (it is every method's comparison and, by default, the
teacher); as a method it exists for studies whose arms change the data, e.g. the clean-data ceiling
of a shortcut benchmark (``data.shortcut_train: clean``).
"""

from __future__ import annotations

from torch import nn

from teachx.training.methods.base import METHODS, MethodContext, TrainingMethod
from teachx.training.trainer import ClassifierTask


@METHODS.register("baseline", "erm", "plain")
class Baseline(TrainingMethod):
    name = "baseline"
    summary = "the backbone with cross-entropy only (empirical risk minimisation)"
    reuses_baseline = True

    def task(self, model: nn.Module, ctx: MethodContext) -> ClassifierTask:
        return ClassifierTask(model, self.cfg.train.label_smoothing)
