"""Faithfulness: does removing what the map calls relevant change the model's output?

- ``PixelFlipping`` MoRF / LeRF (Bach et al. 2015; Samek et al. 2017; the IMPACTX paper's
  evaluation): features are replaced by a baseline in order of relevance, in ``steps`` equal
  fractions; the curve is the target-class score after each step, its AUC (trapezoid, x in [0, 1])
  the score. Low MoRF AUC / high LeRF AUC = faithful.
- ``Deletion`` / ``Insertion`` (Petsiuk et al. 2018, RISE): deletion is MoRF with a zero
  baseline; insertion starts from a blurred canvas and puts the most relevant pixels back first.
- ``FaithfulnessCorrelation`` (Bhatt et al. 2020): Pearson correlation, over random feature
  subsets, between the map's sum over the subset and the output drop when the subset is removed.

All images x all steps go through the model in chunks of ``batch_size`` perturbed images, so
1,000 images x (16 + 1) points is ~67 forward passes of 255 images rather than 17,000.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.evaluation.base import (
    METRICS,
    ExplainFn,
    Metric,
    MetricResult,
    check_output,
    class_scores,
    eval_mode,
    pearson,
    trapezoid_auc,
)
from teachx.evaluation.perturbation import (
    Baseline,
    check_baseline,
    feature_relevance,
    make_baseline,
    perturbation_ranks,
)


def step_counts(n_features: int, steps: int, device: torch.device) -> torch.Tensor:
    """Features perturbed after step k = 0..steps: floor(k * F / steps) (equal fractions)."""
    k = torch.arange(steps + 1, device=device, dtype=torch.long)
    return (k * n_features) // steps


class PerturbationCurve(Metric):
    """Shared engine of MoRF / LeRF / Deletion / Insertion.

    Args:
        steps: number of equal fractions; the curve has ``steps + 1`` points, the first one
            the unperturbed image (x = 0) and the last the fully perturbed one (x = 1).
        patch_size: perturb ``patch_size`` x ``patch_size`` patches (relevance summed per patch).
        baseline: ``"zero"`` | ``"mean"`` | ``"blur"`` | ``"uniform"`` | number | tensor.
        output: ``"probability"`` (softmax of the target class) or ``"logit"``.
        abs: order features by abs(relevance) instead of signed relevance.
        reduce_channels: sum per-channel maps into one map per pixel (the default) or perturb
            each channel of a pixel as its own feature.
        batch_size: perturbed images per forward pass (memory knob; does not change values),
            rounded down to whole images x (steps + 1) points, at least one image's points.
    """

    category = "faithfulness"
    needs_model = True
    most_relevant_first: bool = True
    insert: bool = False  # False: remove features from the image; True: insert them into the baseline

    def __init__(
        self,
        steps: int = 16,
        patch_size: int = 1,
        baseline: Baseline = "zero",
        output: str = "probability",
        abs: bool = False,
        reduce_channels: bool = True,
        blur_sigma: float = 5.0,
        noise_range: Optional[tuple[float, float]] = None,
        seed: int = 0,
        batch_size: int = 256,
    ):
        if int(steps) < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.steps = int(steps)
        self.patch_size = int(patch_size)
        self.baseline = check_baseline(baseline)
        self.output = check_output(output)
        self.abs = bool(abs)
        self.reduce_channels = bool(reduce_channels)
        self.blur_sigma = float(blur_sigma)
        self.noise_range = noise_range
        self.seed = int(seed)
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        baseline = self.baseline if not isinstance(self.baseline, torch.Tensor) else "tensor"
        return {
            "steps": self.steps,
            "patch_size": self.patch_size,
            "baseline": baseline,
            "output": self.output,
            "abs": self.abs,
            "reduce_channels": self.reduce_channels,
            "blur_sigma": self.blur_sigma,
            "seed": self.seed,
        }

    @torch.no_grad()
    def curves(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, steps + 1) target-class score after each perturbation step."""
        relevance, grid = feature_relevance(maps, inputs, self.patch_size, self.reduce_channels)
        if self.steps > grid.size:
            raise ConfigError(f"steps={self.steps} exceeds the {grid.size} features; use steps <= {grid.size}")
        ranks = perturbation_ranks(relevance, self.most_relevant_first, self.abs)
        counts = step_counts(grid.size, self.steps, inputs.device)
        baseline = make_baseline(inputs, self.baseline, self.blur_sigma, self.noise_range, self.seed)
        n_points = self.steps + 1
        n_images = inputs.shape[0]
        out = torch.empty((n_points, n_images), device=inputs.device, dtype=torch.float64)
        # a block of images x all steps per forward pass: masks, images and baselines broadcast
        # over the step axis, so no per-row gathers (each row is computed as before)
        block = max(1, self.batch_size // n_points)
        with eval_mode(model):
            for start in range(0, n_images, block):
                images = slice(start, min(start + block, n_images))
                mask = ranks[images].unsqueeze(0) < counts.view(-1, 1, 1)  # (steps + 1, b, F)
                mask = grid.expand(mask.flatten(0, 1)).unflatten(0, mask.shape[:2])
                x, base = inputs[images].unsqueeze(0), baseline[images].unsqueeze(0)
                perturbed = torch.where(mask, x, base) if self.insert else torch.where(mask, base, x)
                target = targets[images].repeat(n_points)
                scores = class_scores(model(perturbed.flatten(0, 1)), target, self.output).double()
                out[:, images] = scores.view(n_points, -1)
        return out.t().contiguous()

    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert model is not None and maps is not None
        curves = self.curves(model, inputs, targets, maps)
        x = torch.linspace(0.0, 1.0, self.steps + 1, device=inputs.device, dtype=torch.float64)
        return self._result(trapezoid_auc(curves, x), curves=curves, curve_x=x)


@METRICS.register("pixel_flipping_morf", "morf", "pixel_flipping")
class PixelFlippingMoRF(PerturbationCurve):
    """Most-relevant-first pixel flipping: AUC of the target score as the top features go.

    A faithful map points at what the model uses, so the score collapses early: lower is better.
    """

    name = "pixel_flipping_morf"
    description = (
        "MoRF AUC: the model's probability for the explained class while the pixels the map ranks most "
        "relevant are removed first, averaged over the removal steps."
    )
    higher_is_better = False
    most_relevant_first = True


@METRICS.register("pixel_flipping_lerf", "lerf")
class PixelFlippingLeRF(PerturbationCurve):
    """Least-relevant-first pixel flipping: removing what the map calls irrelevant should keep
    the score high for long: higher is better."""

    name = "pixel_flipping_lerf"
    description = (
        "LeRF AUC: the model's probability for the explained class while the pixels the map ranks least "
        "relevant are removed first, averaged over the removal steps."
    )
    higher_is_better = True
    most_relevant_first = False


@METRICS.register("deletion")
class Deletion(PerturbationCurve):
    """Petsiuk et al.'s deletion: MoRF with a zero (black / dataset-mean) canvas and the class
    probability; lower AUC is better. Differs from ``pixel_flipping_morf`` only by its name
    and documented defaults, so reports can cite either protocol."""

    name = "deletion"
    description = (
        "Deletion AUC: the class probability as the most relevant pixels are blurred away, averaged over the steps."
    )
    higher_is_better = False
    most_relevant_first = True


@METRICS.register("insertion")
class Insertion(PerturbationCurve):
    """Petsiuk et al.'s insertion: start from a blurred copy of the image and paste the most
    relevant pixels back first; the probability should rise fast: higher AUC is better."""

    name = "insertion"
    description = (
        "Insertion AUC: the class probability as the most relevant pixels are put back into a blurred image, "
        "averaged over the steps."
    )
    higher_is_better = True
    most_relevant_first = True
    insert = True

    def __init__(self, steps: int = 16, baseline: Baseline = "blur", **kwargs: Any):
        super().__init__(steps=steps, baseline=baseline, **kwargs)


@METRICS.register("faithfulness_correlation", "faithfulness_corr")
class FaithfulnessCorrelation(Metric):
    """Bhatt et al. (2020): do the map's subset sums predict the output drops?

    For each image, ``n_runs`` random subsets of ``subset_size`` features (pixels or patches)
    are set to the baseline; the score is the Pearson correlation, across runs, between the sum
    of the map over the subset and f(x) - f(x with the subset removed). Seeded (``seed``): the
    same call gives the same numbers. NaN where either side is constant (undefined correlation).
    Higher is better; it is exactly 1 for a linear model, logit output, zero baseline and the
    exact contributions w * x as the map.

    Args:
        n_runs: random subsets per image.
        subset_size: features per subset (int) or a fraction of them (float in (0, 1)).
        output: ``"logit"`` (Quantus' default here) or ``"probability"``.
    """

    name = "faithfulness_correlation"
    description = (
        "The correlation between the relevance a map gives random pixel subsets and the drop in the class "
        "score when they are removed."
    )
    higher_is_better = True
    category = "faithfulness"
    needs_model = True

    def __init__(
        self,
        n_runs: int = 100,
        subset_size: int | float = 0.1,
        baseline: Baseline = "zero",
        output: str = "logit",
        patch_size: int = 1,
        reduce_channels: bool = True,
        blur_sigma: float = 5.0,
        noise_range: Optional[tuple[float, float]] = None,
        seed: int = 0,
        batch_size: int = 256,
    ):
        if int(n_runs) < 2:
            raise ConfigError(f"n_runs must be >= 2 for a correlation, got {n_runs}")
        self.n_runs = int(n_runs)
        self.subset_size = subset_size
        self.baseline = check_baseline(baseline)
        self.output = check_output(output)
        self.patch_size = int(patch_size)
        self.reduce_channels = bool(reduce_channels)
        self.blur_sigma = float(blur_sigma)
        self.noise_range = noise_range
        self.seed = int(seed)
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        return {
            "n_runs": self.n_runs,
            "subset_size": self.subset_size,
            "baseline": self.baseline if not isinstance(self.baseline, torch.Tensor) else "tensor",
            "output": self.output,
            "patch_size": self.patch_size,
            "reduce_channels": self.reduce_channels,
            "seed": self.seed,
        }

    def _subset_features(self, n_features: int) -> int:
        size = self.subset_size
        if isinstance(size, float) and 0 < size < 1:
            size = max(1, round(size * n_features))
        size = int(size)
        if not 1 <= size < n_features:
            raise ConfigError(
                f"subset_size={self.subset_size} must select between 1 and {n_features - 1} "
                f"of the {n_features} features (an int, or a fraction in (0, 1))"
            )
        return size

    _MASK_BLOCK = 16  # images per draw: subsets depend on (seed, image index) only

    def subsets(self, batch: int, n_features: int, device: torch.device) -> torch.Tensor:
        """(B, n_runs, F) boolean masks of the random subsets.

        Drawn on the CPU from one generator seeded with ``seed``, in blocks of 16 images, so
        image i gets the same subsets whatever the device, ``batch_size`` or later images.
        """
        return torch.cat([block for _, block in self._subset_blocks(batch, n_features)]).to(device)

    def _subset_blocks(self, batch: int, n_features: int):
        size = self._subset_features(n_features)
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, batch, self._MASK_BLOCK):
            count = min(self._MASK_BLOCK, batch - start)
            keys = torch.rand((count, self.n_runs, n_features), generator=generator)
            chosen = keys.topk(size, dim=-1, largest=False).indices
            masks = torch.zeros((count, self.n_runs, n_features), dtype=torch.bool)
            masks.scatter_(-1, chosen, True)
            yield start, masks

    @torch.no_grad()
    def compute(
        self,
        model: Optional[nn.Module],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        maps: Optional[torch.Tensor],
        explain_fn: Optional[ExplainFn],
    ) -> MetricResult:
        assert model is not None and maps is not None
        relevance, grid = feature_relevance(maps, inputs, self.patch_size, self.reduce_channels)
        baseline = make_baseline(inputs, self.baseline, self.blur_sigma, self.noise_range, self.seed)
        n_images, n_runs = inputs.shape[0], self.n_runs
        attribution_sums = torch.empty((n_images, n_runs), device=inputs.device, dtype=torch.float64)
        perturbed_scores = torch.empty((n_images, n_runs), device=inputs.device, dtype=torch.float64)
        with eval_mode(model):
            original = class_scores(model(inputs), targets, self.output).double()
            for first, masks in self._subset_blocks(n_images, grid.size):
                masks = masks.to(inputs.device)
                count = masks.shape[0]
                block = slice(first, first + count)
                attribution_sums[block] = (masks.double() * relevance[block].unsqueeze(1)).sum(-1)
                flat_masks = masks.view(count * n_runs, -1)
                flat_scores = perturbed_scores[block].view(-1)
                for start in range(0, count * n_runs, self.batch_size):
                    row = torch.arange(start, min(start + self.batch_size, count * n_runs), device=inputs.device)
                    image = first + row // n_runs
                    mask = grid.expand(flat_masks[row])
                    perturbed = torch.where(mask, baseline[image], inputs[image])
                    flat_scores[row] = class_scores(model(perturbed), targets[image], self.output).double()
                perturbed_scores[block] = flat_scores.view(count, n_runs)
        drops = original.unsqueeze(1) - perturbed_scores
        scores = pearson(attribution_sums, drops)
        return self._result(scores, extra={"subset_features": self._subset_features(grid.size)})
