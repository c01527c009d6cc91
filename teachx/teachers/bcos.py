"""The exact explanation of a B-cos network (Böhle et al. 2022, 2024) as a teacher.

A B-cos network in explanation mode (dynamic scales detached) is the linear map ``W(x)`` of its
encoded input ``[x, 1 - x]``; the teacher returns ``W(x)_target * x_enc`` with the two encoding
channels of each colour channel added (see ``teachx.models.bcos``). The map has the inputs' shape and
its sum over channels and pixels is the target's logit, so the default channel reduction (sum) keeps
that completeness. Only B-cos backbones (``bcos_lenet5``, ``bcos_resnet``) can be explained this way.
"""

from __future__ import annotations

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.models.bcos import BcosNetwork
from teachx.teachers.base import TEACHERS, Teacher
from teachx.teachers.gradients import TargetLike, as_float32, as_target, check_inputs, target_logits


def check_bcos_model(model: nn.Module) -> BcosNetwork:
    """The model as a B-cos network, or a one-line ConfigError that says what to choose instead."""
    if not isinstance(model, BcosNetwork):
        raise ConfigError(
            f"the bcos teacher explains B-cos networks only, and the model is a {type(model).__name__}; "
            "train the teacher with teacher.backbone=bcos_lenet5 (or bcos_resnet), or choose another teacher.method"
        )
    return model


@TEACHERS.register("bcos", "bcos_contributions")
class BcosContributions(Teacher):
    """B-cos contributions ``W(x)_y * [x, 1 - x]``, summed over the encoding; they add up to the logit.

    Needs a B-cos backbone (bcos_lenet5, bcos_resnet). No options.
    """

    name = "bcos"
    backbones = ("bcos_lenet5", "bcos_resnet")

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
        check_inputs(inputs)
        network = check_bcos_model(model)
        target = as_target(target, inputs.shape[0], inputs.device)
        target_logits(torch.zeros(len(target), network.num_classes), target.cpu())  # the range check's one line
        return as_float32(network.contributions(inputs, target))
