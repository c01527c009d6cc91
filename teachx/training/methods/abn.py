"""``abn``: the Attention Branch Network (Fukui, Hirakawa, Yamashita, Fujiyoshi, CVPR 2019).

The model (``teachx.models.abn``) cuts the backbone's body after a pyramid level; an attention
branch turns those features g into K class-activation maps (their global average is a second
set of logits) and a class-agnostic attention map M in [0, 1]; the rest of the backbone classifies
(1 + M) * g. Both branches are trained from the labels alone, no teacher:

    L = attention_weight * CE(attention logits, y) + CE(perception logits, y)   (+ train.weight_decay)

The perception logits are the model's prediction; M, upsampled to the input, is its built-in map.
``train.label_smoothing`` applies to both cross-entropies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teachx.models import build_model
from teachx.models.abn import build_abn, resolve_split
from teachx.training.methods.base import METHODS, MethodContext, MethodTask, Option, TrainingMethod


class ABNTask(MethodTask):
    """Both branches' cross-entropies from ONE ``forward_branches`` call (as DDP requires)."""

    def __init__(self, model: nn.Module, attention_weight: float = 1.0, label_smoothing: float = 0.0):
        self.model, self.attention_weight, self.label_smoothing = model, float(attention_weight), label_smoothing

    def loss(self, x, y, maps):
        per, att, _ = self.model.forward_branches(x)
        ce_per = F.cross_entropy(per, y, label_smoothing=self.label_smoothing)
        ce_att = F.cross_entropy(att, y, label_smoothing=self.label_smoothing)
        loss = self.attention_weight * ce_att + ce_per
        return loss, per, {"ce_attention": ce_att.detach(), "ce_perception": ce_per.detach()}


@METHODS.register("abn", "attention_branch")
class ABN(TrainingMethod):
    name = "abn"
    loss_text = "CE + w·CE of the attention branch"
    summary = (
        "attention branch network: an attention branch (own CE) makes a map M that reweights the features, (1 + M) * g"
    )
    reference = "Fukui, Hirakawa, Yamashita, Fujiyoshi 2019, Attention Branch Network: Learning of Attention Mechanism for Visual Explanation"
    options = {
        "split": Option(
            -1,
            "pyramid level of the backbone the attention branch reads (0 = highest resolution); -1 = auto: the "
            "second-to-last level, as the paper (stride 2 for lenet5, 4 for the others at 32x32)",
            minimum=-1,
        ),
        "attention_weight": Option(1.0, "weight of the attention branch's cross-entropy (the paper: 1)", minimum=0.0),
        "width": Option(
            0, "channels of the attention branch's conv3x3 blocks; 0 = those of the split level", minimum=0
        ),
        "blocks": Option(
            1,
            "conv3x3-BN-ReLU blocks of the attention branch (the paper copies the next stage's residual blocks)",
            minimum=0,
            maximum=16,
        ),
    }
    checkpoint_kind = "abn"
    builtin_map = True
    # its attention map is judged like IMPACTX's built-in maps: faithfulness on the model itself against the
    # best unsmoothed post-hoc map, self-agreement, and the teacher comparison (which it is not trained towards)
    study_evaluation = True

    @classmethod
    def model_label(cls, config: dict) -> str:
        return "ABN"

    def check_data(self, plan) -> None:
        """Refuse a split the backbone cannot be cut at, before anything is trained (builds the
        backbone once, leaving torch's global generator as it was)."""
        super().check_data(plan)
        ds = plan.dataset
        with torch.random.fork_rng(devices=[]):
            net = build_model(
                self.cfg.model.backbone, ds.channels, ds.num_classes, ds.image_size, **self.cfg.model.options
            )
        resolve_split(net, self.opts["split"], self.cfg.model.backbone)

    def build_model(self, ctx: MethodContext) -> nn.Module:
        ds = ctx.plan.dataset
        return build_abn(
            self.cfg.model.backbone,
            ds.channels,
            ds.num_classes,
            ds.image_size,
            backbone_options=self.cfg.model.options,
            split=self.opts["split"],
            width=self.opts["width"] or None,
            blocks=self.opts["blocks"],
        )

    def task(self, model: nn.Module, ctx: MethodContext) -> ABNTask:
        return ABNTask(model, self.opts["attention_weight"], self.cfg.train.label_smoothing)
