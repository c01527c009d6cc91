"""The metric contract: one call signature, metadata on the class, per-sample tensors out.

Every metric is called as ``metric(model, inputs, targets, maps, explain_fn=None)`` and returns a
``MetricResult`` whose ``scores`` are one number per input, computed batched with torch on the
inputs' device (no numpy round-trips). The class attributes say how to read the numbers
(``higher_is_better``, ``category``) and what the metric needs (``needs_model``,
``needs_teacher``), so tables and reports never guess a direction.

A new metric is one file with a ``Metric`` subclass decorated ``@METRICS.register("name")``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.registry import MEASURES, Measure, Registry

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``explain_fn(model, inputs, targets) -> maps``: re-explains (e.g. a randomised model)."""

CATEGORIES = ("faithfulness", "randomisation", "complexity", "agreement", "localisation")


@dataclass
class MetricResult:
    """Per-sample scores, plus the curves behind them where a metric has curves.

    ``curves`` is (B, K) (e.g. the class score after each pixel-flipping step, or the
    similarity after each randomised layer) with ``curve_x`` (K,) its x axis.
    """

    name: str
    scores: torch.Tensor
    higher_is_better: bool
    curves: Optional[torch.Tensor] = None
    curve_x: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> float:
        """Mean over the samples with a defined (finite) score."""
        finite = self.scores[torch.isfinite(self.scores)]
        return float(finite.double().mean()) if finite.numel() else float("nan")

    def to_dict(self, with_values: bool = True) -> dict[str, Any]:
        """JSON-able summary: mean/std over finite scores, count of undefined ones, values."""
        scores = self.scores.detach().double().cpu()
        finite = scores[torch.isfinite(scores)]
        out: dict[str, Any] = {
            "mean": float(finite.mean()) if finite.numel() else None,
            "std": float(finite.std(unbiased=False)) if finite.numel() else None,
            "n": int(scores.numel()),
            "n_undefined": int(scores.numel() - finite.numel()),
            "higher_is_better": self.higher_is_better,
        }
        if with_values:
            out["values"] = [_json_float(v) for v in scores.tolist()]
            if self.curves is not None:
                curves = self.curves.detach().double().cpu()
                out["mean_curve"] = [_json_float(v) for v in curves.nanmean(0).tolist()]
            if self.curve_x is not None:
                out["curve_x"] = [float(v) for v in self.curve_x.detach().double().cpu().tolist()]
        for key, value in self.extra.items():
            if isinstance(value, torch.Tensor):
                value = [_json_float(v) for v in value.detach().double().cpu().flatten().tolist()]
            out[key] = value
        return out


def _json_float(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


class Metric:
    """Base class. Subclasses set the metadata and implement ``compute``.

    Metadata (class attributes): ``name``; ``higher_is_better``; ``category`` (one of
    ``CATEGORIES``); ``needs_model`` (runs forward passes); ``needs_teacher`` (calls
    ``explain_fn`` to explain other models); ``data_applicability`` (``{"image"}``).
    """

    name: ClassVar[str] = "metric"
    #: one plain sentence: what the score measures (reports add which direction is better)
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    category: ClassVar[str] = "faithfulness"
    needs_model: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    needs_maps: ClassVar[bool] = True
    data_applicability: ClassVar[frozenset[str]] = frozenset({"image"})

    def __call__(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: torch.Tensor | int | None,
        maps: Optional[torch.Tensor] = None,
        explain_fn: Optional[ExplainFn] = None,
    ) -> MetricResult:
        inputs = _check_inputs(inputs)
        targets = _check_targets(targets, inputs) if (self.needs_model or self.needs_teacher) else targets
        if self.needs_model and model is None:
            raise ConfigError(f"metric '{self.name}' runs the model; pass model=<nn.Module>")
        if self.needs_teacher and explain_fn is None:
            raise ConfigError(
                f"metric '{self.name}' re-explains randomised models; pass explain_fn=fn(model, inputs, targets)"
            )
        if self.needs_maps:
            if maps is None:
                raise ConfigError(f"metric '{self.name}' scores attribution maps; pass maps=<(B,1|C,H,W) tensor>")
            maps = check_maps(maps, inputs)
        return self.compute(model, inputs, targets, maps, explain_fn)

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: Any,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """JSON-able options that change the scores (for reports and cache keys)."""
        return {}

    def _result(self, scores: torch.Tensor, **kwargs: Any) -> MetricResult:
        return MetricResult(name=self.name, scores=scores, higher_is_better=self.higher_is_better, **kwargs)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


METRICS: Registry[type[Metric]] = Registry("metric")


def measure(name: str) -> Measure:
    """The :class:`Measure` of a registered metric or a declared measure."""
    if name in MEASURES:
        return MEASURES[name]
    cls = METRICS.get(name)
    return Measure(cls.name, cls.description, cls.higher_is_better)


def build_metric(name_or_metric: str | Metric, **options: Any) -> Metric:
    """A metric instance from a registered name (with options) or an instance (returned as is)."""
    if isinstance(name_or_metric, Metric):
        return name_or_metric
    return METRICS.get(name_or_metric)(**options)


# ----------------------------------------------------------------------------- input checks


def _check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ConfigError(f"inputs must be an image batch (B, C, H, W), got {shape}")
    return inputs


def _check_targets(targets: torch.Tensor | int | None, inputs: torch.Tensor) -> torch.Tensor:
    if targets is None:
        raise ConfigError("targets are needed: pass the class index per image, a LongTensor (B,)")
    targets = torch.as_tensor(targets, device=inputs.device).long()
    if targets.dim() == 0:
        targets = targets.expand(inputs.shape[0])
    if targets.shape != (inputs.shape[0],):
        raise ConfigError(f"targets must have shape ({inputs.shape[0]},), got {tuple(targets.shape)}")
    return targets


def check_maps(maps: torch.Tensor, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Validate (B, 1|C, H, W) maps (a (B, H, W) map gets its channel axis); return float maps."""
    if not isinstance(maps, torch.Tensor):
        raise ConfigError(f"maps must be a torch.Tensor (B, 1|C, H, W), got {type(maps).__name__}")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4:
        raise ConfigError(f"maps must be (B, 1|C, H, W), got shape {tuple(maps.shape)}")
    if inputs is not None:
        b, c, h, w = inputs.shape
        if maps.shape[0] != b or maps.shape[-2:] != (h, w) or maps.shape[1] not in (1, c):
            raise ConfigError(
                f"maps of shape {tuple(maps.shape)} do not match inputs {tuple(inputs.shape)}; "
                f"expected ({b}, 1 or {c}, {h}, {w})"
            )
        maps = maps.to(inputs.device)
    maps = maps.detach()
    return maps if maps.is_floating_point() else maps.float()


def reduce_channels(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) by summing channels (the relevance of a pixel)."""
    return maps.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- model helpers


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put a model in eval mode and restore each module's train flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


OUTPUTS = ("probability", "logit")


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ConfigError(f"unknown output '{output}'; valid outputs: {', '.join(OUTPUTS)}")
    return output


def class_scores(logits: torch.Tensor, targets: torch.Tensor, output: str) -> torch.Tensor:
    """The target class's probability (softmax) or logit, per row."""
    if output == "probability":
        # at least float32 (half-precision softmax is too coarse), double stays double
        logits = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------- batched statistics


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks 1..N with ties given their average rank (scipy's 'average' method)."""
    n = values.shape[-1]
    flat = values.reshape(-1, n)
    sorted_values, order = flat.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.long)
    new_group[:, 1:] = (sorted_values[:, 1:] != sorted_values[:, :-1]).long()
    group = new_group.cumsum(1) - 1  # group id per sorted position
    positions = torch.arange(1, n + 1, device=values.device, dtype=torch.float64).expand_as(group)
    sums = torch.zeros_like(positions).scatter_add_(1, group, positions)
    counts = torch.zeros_like(positions).scatter_add_(1, group, torch.ones_like(positions))
    average = (sums / counts.clamp_min(1)).gather(1, group)
    ranks = torch.empty_like(average).scatter_(1, order, average)
    return ranks.reshape(values.shape)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of (B, N) tensors; NaN where a row is constant."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    out = (a * b).sum(-1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(a.double()), rankdata(b.double()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity; NaN where a row is all zeros."""
    a, b = a.double(), b.double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    out = (a * b).sum(-1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, H, W) maps, as skimage computes it.

    Uniform ``window`` x ``window`` window (shrunk to the largest odd size that fits), sample
    covariances, K1=0.01, K2=0.03, the mean over all valid window positions, and one data range
    per pair: max - min over both maps (Quantus' choice), so a map compared with itself gives 1.
    """
    a, b = a.double(), b.double()
    if a.dim() == 4:
        a, b = a.sum(1), b.sum(1)
    window = min(window, a.shape[-1], a.shape[-2])
    window = window if window % 2 == 1 else window - 1
    if window < 1:
        raise ConfigError("ssim needs maps of at least 1x1 pixels")
    both = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
    data_range = (both.max(1).values - both.min(1).values).clamp_min(1e-12).view(-1, 1, 1, 1)
    x, y = a.unsqueeze(1), b.unsqueeze(1)
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731 (valid region only)
    n = window * window
    cov_norm = n / (n - 1) if n > 1 else 1.0
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def trapezoid_auc(curves: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row-wise area under (x, curve) by the trapezoid rule."""
    return torch.trapezoid(curves.double(), x.double().to(curves.device), dim=-1)
