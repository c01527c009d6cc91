"""``impactx`` (Apicella et al. 2025): M + LEP + decoder + classifier, trained with CE plus lambda
times a loss between the built-in map and the teacher's map (``teachx.training.impactx``).

Its options are typed (:class:`~teachx.training.methods.impactx_options.ImpactxOptions`, read with
:func:`~teachx.training.methods.impactx_options.impactx_options`) and live in ``method.options`` like every
method's; ``impactx.KEY``, where they were written before, is accepted as the same key, and study unit keys and
run-directory hashes are made from that old layout, so existing studies and runs keep theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from dataclasses import fields

from teachx.config.schema import RunConfig
from teachx.errors import ConfigError
from teachx.models.impactx import build_impactx
from teachx.training.impactx import ImpactxTask, MapSource, SelfFaithfulness
from teachx.training.map_losses import MapLoss, formula
from teachx.training.methods.base import METHODS, MethodContext, Option, TrainingMethod
from teachx.training.methods.impactx_options import SECTION, ImpactxOptions, impactx_options, saved_impactx_options
from teachx.utils.docs import option_docs


def listed_options() -> dict[str, Option]:
    """IMPACTX's options as ``teachx methods`` lists them: each field's default and its comment."""
    docs = option_docs(ImpactxOptions)
    return {f.name: Option(f.default, docs.get(f.name, "")) for f in fields(ImpactxOptions)}


@METHODS.register("impactx")
class Impactx(TrainingMethod):
    name = "impactx"
    summary = "built-in attribution map trained towards a teacher's maps (options also written impactx.KEY)"
    reference = "Apicella et al. 2025, IMPACTX"
    checkpoint_kind = "impactx"
    builtin_map = True
    label = "IMPACTX"
    # its study units keep the kind and key prefix they had before other methods existed
    unit_kind = "impactx"
    unit_key_prefix = "x-"
    study_evaluation = True
    options = listed_options()
    options_type = ImpactxOptions
    config_section = SECTION
    map_follows_teacher = True
    # impactx.decoder was paper, with one map and MSE, width 32, not reading M, without self-teaching
    key_reference = {
        "impactx": {
            "decoder": "paper",
            "per_class": False,
            "map_loss": "mse",
            "decoder_width": 32,
            "decoder_reads_m": False,
            "self_teach_every": 0,
            "self_teach_method": "teacher",
        }
    }

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.ic: ImpactxOptions = impactx_options(cfg)  # its options, typed, read once as ``opts`` is

    def needs_teacher_maps(self) -> bool:
        return self.ic.lam > 0

    def trains_builtin_map(self) -> bool:
        return self.ic.lam > 0  # with lambda = 0 the decoder is never trained

    def build_model(self, ctx: MethodContext) -> nn.Module:
        cfg, ic, ds = self.cfg, self.ic, ctx.plan.dataset
        store = ctx.train_maps
        model = build_impactx(
            cfg.model.backbone,
            ds.channels,
            ds.num_classes,
            ds.image_size,
            backbone_options=cfg.model.options,
            lep_backbone=ic.lep_backbone,
            map_size=(ic.map_size, ic.map_size) if ic.map_size else None,
            map_channels=store.maps.shape[1] if store is not None else 1,
            decoder_width=ic.decoder_width,
            classifier_hidden=ic.classifier_hidden,
            decoder_scale=ic.decoder_scale,
            decoder=ic.decoder,
            per_class=ic.per_class,
            additive_reference=ic.additive_reference,
            decoder_reads_m=ic.decoder_reads_m,
        )
        if ic.m_init == "teacher":
            if ctx.teacher_model is None or type(ctx.teacher_model) is not type(model.m):
                raise ConfigError("impactx.m_init=teacher needs a teacher of the same backbone as the student")
            model.m.load_state_dict(ctx.teacher_model.state_dict())
            if ic.m_frozen:
                model.freeze_m()
        return model

    def task(self, model: nn.Module, ctx: MethodContext):
        cfg, ic, plan = self.cfg, self.ic, ctx.plan
        source = None
        if ctx.train_maps is not None and ic.lam > 0:
            classes = ctx.train_map_classes() if ic.per_class else None
            source = MapSource(ctx.train_maps, ic.maps, plan.train_idx, cfg.seed, classes=classes)
        return ImpactxTask(
            model,
            source,
            ic.lam,
            cfg.train.label_smoothing,
            map_loss=MapLoss(ic.map_loss, ic.map_target_pool),
            faith_weight=ic.faith_weight,
            faith=SelfFaithfulness(ic.faith_patch, ic.faith_samples),
        )

    def epoch_hook(self, task, ctx: MethodContext, out_dir: Path) -> Optional[Callable[[int], None]]:
        if not (self.ic.self_teach_every and getattr(task, "source", None) is not None):
            return None
        if ctx.self_teaching is None:
            raise ValueError(
                "impactx.self_teach_every needs MethodContext.self_teaching (a hook that re-explains the training split)"
            )
        return ctx.self_teaching(task, out_dir)

    def describe(self) -> str:
        ic = self.ic
        return f"IMPACTX ({self.cfg.model.backbone}, lambda={ic.lam}, maps={ic.maps})"

    def arm_text(self) -> str:
        return f"lam={self.ic.lam} maps={self.ic.maps}"

    def training_loss(self) -> str:
        """CE plus the configured map loss (and faithfulness term), e.g. "CE + λ·(1 − Pearson)"."""
        ic = self.ic
        text = "CE" if ic.lam == 0 else f"CE + λ·{formula(ic.map_loss, ic.map_target_pool)}"
        return text + (" + faithfulness term" if ic.faith_weight > 0 else "")

    def record(self) -> dict[str, Any]:
        return {"method": self.name}

    def is_control(self) -> bool:
        return self.ic.lam == 0  # the same model without the explanation signal

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"teacher": self.cfg.teacher.method}

    def results(self, record: dict[str, Any]) -> dict[str, Any]:
        """The keys IMPACTX runs always had."""
        return {
            "lam": self.ic.lam,
            "maps": self.ic.maps,
            "impactx_test_acc": record["test_acc"],
            "impactx_val_acc": record["val_acc"],
            "impactx_seconds_per_epoch": record["seconds_per_epoch"],
        }

    def unit_record(self, stage: dict[str, Any]) -> dict[str, Any]:
        return {"lam": self.ic.lam, "maps": self.ic.maps}

    def study_row(self, unit: dict[str, Any]) -> dict[str, Any]:
        return {"lam": self.ic.lam, "maps": self.ic.maps}

    @classmethod
    def model_label(cls, config: dict[str, Any]) -> str:
        return f"{cls.display_name()} (lambda={saved_impactx_options(config).get('lam')})"

    @classmethod
    def model_info(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"lam": saved_impactx_options(config).get("lam")}

    @classmethod
    def per_class_maps(cls, config: dict[str, Any]) -> bool:
        return bool(saved_impactx_options(config).get("per_class", False))

    @classmethod
    def result_text(cls, results: dict[str, Any]) -> tuple[str, str]:
        return cls.display_name(), f"lambda={results.get('lam')}, maps={results.get('maps')}"

    @classmethod
    def result_acc(cls, results: dict[str, Any], split: str) -> Optional[float]:
        return results.get(f"impactx_{split}_acc")  # also in runs made before method_*_acc existed
