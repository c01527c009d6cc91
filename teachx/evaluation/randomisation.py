"""Randomisation sanity checks: an explanation of a model should depend on the model's weights.

- ``MPRT`` (Adebayo et al. 2018): re-initialise the layers (cascading top-down from the output,
  cascading bottom-up, or one at a time) and compare the explanation of each randomised model
  with the original one (Spearman rank correlation, Pearson or SSIM). Low similarity = the
  method passes; lower is better.
- ``EfficientMPRT`` (Hedström et al. 2023, eMPRT): the relative rise in explanation complexity
  (discrete entropy of the map's value histogram) from the original to the fully randomised
  model, (H(e_random) - H(e)) / H(e). Higher is better.

The model passed in is never touched: randomisation happens on ``copy.deepcopy`` copies. Each
layer is re-initialised under its own seed (``seed + layer index``), so two layers of one shape
do not get identical weights.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.evaluation.base import (
    METRICS,
    ExplainFn,
    Metric,
    MetricResult,
    eval_mode,
    pearson,
    spearman,
    ssim,
)

LAYER_ORDERS = ("top_down", "bottom_up", "independent")
SIMILARITIES = ("spearman", "pearson", "ssim")
INITS = ("reset", "gaussian")


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in registration (forward) order."""
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def randomise_layer(module: nn.Module, seed: int, init: str = "reset") -> None:
    """Re-initialise one module's own parameters in place, deterministically.

    ``"reset"``: the module's ``reset_parameters()`` (its default initialisation; what Adebayo et
    al. and Quantus do), falling back to ``"gaussian"`` for modules without one;
    ``"gaussian"``: each parameter ~ N(0, std of the original parameter) (or N(0, 1) for a
    constant one), which also randomises normalisation layers that a reset sets to identity.
    """
    devices = [p.device for p in module.parameters(recurse=False) if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
        torch.manual_seed(int(seed))
        if init == "reset" and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        for param in module.parameters(recurse=False):
            std = float(param.float().std()) if param.numel() > 1 else 0.0
            param.normal_(0.0, std if std > 0 else 1.0)


def randomised_models(
    model: nn.Module, order: str = "top_down", seed: int = 0, init: str = "reset", layers: Optional[list[str]] = None
):
    """Yield ``(layer_name, model_copy)``: the model after each randomisation step.

    ``top_down``: cascading from the output layer (layer k's copy has the last k+1 layers
    randomised); ``bottom_up``: cascading from the input; ``independent``: a fresh copy with
    only that layer randomised. The original model is never modified.
    """
    if order not in LAYER_ORDERS:
        raise ConfigError(f"unknown layer order '{order}'; valid orders: {', '.join(LAYER_ORDERS)}")
    names = list(layers) if layers is not None else randomisable_layers(model)
    if not names:
        raise ConfigError("the model has no parameters to randomise")
    index = {name: i for i, name in enumerate(randomisable_layers(model))}
    if order == "top_down":
        names = names[::-1]
    current = copy.deepcopy(model)
    for name in names:
        if order == "independent":
            current = copy.deepcopy(model)
        randomise_layer(current.get_submodule(name), seed + index.get(name, 0), init)
        yield name, current


def fully_randomised(model: nn.Module, seed: int = 0, init: str = "reset") -> nn.Module:
    """A copy of the model with every layer re-initialised (same seeds as the cascade)."""
    last = None
    for _, last in randomised_models(model, "bottom_up", seed, init):
        pass
    assert last is not None
    return last


def _explain(explain_fn: ExplainFn, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        maps = explain_fn(model, inputs, targets)
    if not isinstance(maps, torch.Tensor) or maps.shape[0] != inputs.shape[0]:
        raise ConfigError("explain_fn(model, inputs, targets) must return a tensor with one map per input")
    maps = maps.detach()
    return maps.unsqueeze(1) if maps.dim() == 3 else maps


def _flatten_maps(maps: torch.Tensor, use_abs: bool) -> torch.Tensor:
    maps = maps.double().sum(dim=1)  # (B, H, W): channels reduced by sum
    return maps.abs() if use_abs else maps


@METRICS.register("mprt", "model_parameter_randomisation")
class MPRT(Metric):
    """Model-parameter randomisation test (Adebayo et al. 2018).

    Scores are the similarity between the explanation of the original model and that of the
    last randomised model (the fully randomised one for cascading orders); ``curves`` holds the
    similarity after each layer (x = layer index, names in ``extra["layers"]``). A method whose
    maps ignore the weights (e.g. an edge detector) scores 1: it fails the test. Lower is better.

    ``maps`` is not used: both explanations come from ``explain_fn`` so they are produced alike.

    Args:
        order: ``"top_down"`` (cascading from the output, Adebayo et al.), ``"bottom_up"``,
            ``"independent"``.
        similarity: ``"spearman"`` (default), ``"pearson"`` or ``"ssim"``.
        abs: compare abs(maps) (Adebayo et al. report both; True is their main setting).
        init: ``"reset"`` or ``"gaussian"`` (see ``randomise_layer``).
    """

    name = "mprt"
    description = "The similarity of a map to the map of the same model with its layers randomised one by one."
    higher_is_better = False
    category = "randomisation"
    needs_model = True
    needs_teacher = True
    needs_maps = False

    def __init__(
        self,
        order: str = "top_down",
        similarity: str = "spearman",
        abs: bool = True,
        seed: int = 0,
        init: str = "reset",
        layers: Optional[list[str]] = None,
    ):
        if order not in LAYER_ORDERS:
            raise ConfigError(f"unknown layer order '{order}'; valid orders: {', '.join(LAYER_ORDERS)}")
        if similarity not in SIMILARITIES:
            raise ConfigError(f"unknown similarity '{similarity}'; valid similarities: {', '.join(SIMILARITIES)}")
        if init not in INITS:
            raise ConfigError(f"unknown init '{init}'; valid inits: {', '.join(INITS)}")
        self.order = order
        self.similarity = similarity
        self.abs = bool(abs)
        self.seed = int(seed)
        self.init = init
        self.layers = layers

    def options(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "similarity": self.similarity,
            "abs": self.abs,
            "seed": self.seed,
            "init": self.init,
        }

    def _similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.similarity == "ssim":
            return ssim(a, b)
        fn = spearman if self.similarity == "spearman" else pearson
        return fn(a.flatten(1), b.flatten(1))

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert model is not None and explain_fn is not None
        original = _flatten_maps(_explain(explain_fn, model, inputs, targets), self.abs)
        names, per_layer = [], []
        for name, randomised in randomised_models(model, self.order, self.seed, self.init, self.layers):
            explained = _flatten_maps(_explain(explain_fn, randomised, inputs, targets), self.abs)
            names.append(name)
            per_layer.append(self._similarity(original, explained))
        curves = torch.stack(per_layer, dim=1)
        x = torch.arange(len(names), dtype=torch.float64, device=inputs.device)
        return self._result(curves[:, -1], curves=curves, curve_x=x, extra={"layers": names})


def histogram_entropy(maps: torch.Tensor, n_bins: int = 100) -> torch.Tensor:
    """Per-map Shannon entropy (nats) of the histogram of its values, as numpy bins them.

    ``n_bins`` equal-width bins over each map's own [min, max] (the last bin closed, like
    ``np.histogram``); a constant map falls in one bin (entropy 0).
    """
    values = maps.double().flatten(1)
    low = values.min(1, keepdim=True).values
    high = values.max(1, keepdim=True).values
    constant = high == low
    low = torch.where(constant, low - 0.5, low)
    high = torch.where(constant, high + 0.5, high)
    # np.histogram's binning: index from (v - low) * (n / (high - low)), then corrected
    # against the linspace edges, the right edge falling in the last bin
    index = ((values - low) * (n_bins / (high - low))).floor().long().clamp_(0, n_bins - 1)
    steps = torch.arange(n_bins + 1, device=values.device, dtype=torch.float64)
    edges = steps * ((high - low) / n_bins) + low
    edges[:, -1:] = high
    index = index - (values < edges.gather(1, index)).long()
    index = index + ((values >= edges.gather(1, index + 1)) & (index != n_bins - 1)).long()
    counts = torch.zeros((values.shape[0], n_bins), dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, index, torch.ones_like(values))
    p = counts / counts.sum(1, keepdim=True)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)


@METRICS.register("efficient_mprt", "emprt")
class EfficientMPRT(Metric):
    """eMPRT (Hedström et al. 2023): relative rise in explanation complexity under randomisation.

    score = (H(e_random) - H(e)) / H(e), with H the discrete entropy of the map's value
    histogram (``n_bins`` bins) and e_random the explanation of the fully randomised model (all
    layers re-initialised). A method that tracks the model gets noisier maps, so higher is
    better; NaN where H(e) = 0 (a constant original map). As in Quantus, the original
    explanation comes from ``explain_fn`` too (``use_maps=True`` takes ``maps`` instead).
    ``extra`` holds both entropies.
    """

    name = "efficient_mprt"
    description = "How much more complex (entropy) the maps become when the model's weights are fully randomised."
    higher_is_better = True
    category = "randomisation"
    needs_model = True
    needs_teacher = True
    needs_maps = False

    def __init__(
        self, n_bins: int = 100, abs: bool = False, seed: int = 0, init: str = "reset", use_maps: bool = False
    ):
        if int(n_bins) < 2:
            raise ConfigError(f"n_bins must be >= 2, got {n_bins}")
        if init not in INITS:
            raise ConfigError(f"unknown init '{init}'; valid inits: {', '.join(INITS)}")
        self.n_bins = int(n_bins)
        self.abs = bool(abs)
        self.seed = int(seed)
        self.init = init
        self.use_maps = bool(use_maps)

    def options(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "abs": self.abs, "seed": self.seed, "init": self.init}

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert model is not None and explain_fn is not None
        if self.use_maps and maps is not None:
            original = maps.detach()
        else:
            original = _explain(explain_fn, model, inputs, targets)
        randomised = _explain(explain_fn, fully_randomised(model, self.seed, self.init), inputs, targets)
        h_original = histogram_entropy(_flatten_maps(original, self.abs), self.n_bins)
        h_random = histogram_entropy(_flatten_maps(randomised, self.abs), self.n_bins)
        scores = (h_random - h_original) / h_original
        scores = torch.where(h_original > 0, scores, torch.full_like(scores, float("nan")))
        return self._result(scores, extra={"entropy_original": h_original, "entropy_randomised": h_random})
