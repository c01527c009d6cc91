"""Are an IMPACTX model's built-in maps faithful to the model that makes them?

``builtin_map_faithfulness`` scores, on the IMPACTX model itself and for one target class per
image (the pipeline uses the model's predicted class), four map sets with the shared
pixel-flipping engine (``teachx.evaluation.faithfulness``; nothing is re-implemented here):

- ``built_in``: the model's own maps (one forward pass);
- ``teacher_post_hoc``: the teacher method applied post hoc to the same IMPACTX model (the
  reference an amortised explainer is measured against, as in the paper);
- ``mean_map``: the mean training teacher map, the same for every image (what a decoder that
  learned nothing per image would output; left out when not given, e.g. for images outside a dataset);
- ``random``: seeded uniform noise (the floor);
- ``post_hoc_<method>`` (when ``references`` are given): cheap, unsmoothed post-hoc maps of the same
  model (gradient x input, LRP-epsilon, Integrated Gradients). The teacher method may be smoothed
  or noisy, so matching it says little; ``best_post_hoc`` names the most faithful of these (lowest
  MoRF) and compares the built-in maps with it: MoRF ratio (built-in / best) and self-agreement.

Metrics: MoRF AUC (lower = more faithful), LeRF AUC (higher) and insertion AUC (higher; blurred
canvas). Deletion is left out: with the zero baseline it is MoRF. Agreement: per-image Pearson
correlation of the built-in map with the post-hoc map (``corr_self``, the self-agreement the
built-in maps aim for) and of the mean map with it (``corr_self_mean_map``, what the mean map
alone reaches).

Per image at inference, :func:`map_trust` is the cheap check of the same question: the Pearson correlation
of the built-in map with one backward pass of the same model (gradient x input by default) for the same
class, both summed over channels; :func:`disagrees` flags the images below ``TRUST_THRESHOLD``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from teachx.evaluation.base import build_metric, eval_mode, pearson
from teachx.evaluation.evaluate import evaluate_maps
from teachx.teachers import build
from teachx.teachers.base import Teacher

METRIC_NAMES = ("pixel_flipping_morf", "pixel_flipping_lerf", "insertion")


def map_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two map batches; a constant map (e.g. all zeros) counts as 0, not NaN."""
    return torch.nan_to_num(pearson(a.flatten(1), b.flatten(1)), nan=0.0)


#: the post-hoc map the per-image trust signal compares the built-in map with: one backward pass
TRUST_METHOD = "gradient_x_input"
#: the post-hoc methods the trust signal offers (both cost one backward pass)
TRUST_METHODS = ("gradient_x_input", "lrp")
#: images whose built-in map correlates below this with the model's own post-hoc map are flagged: a map
#: unrelated to the model's gradient correlates 0 on average, so a built-in map below 0 agrees with the
#: model less than a map that ignores it would
TRUST_THRESHOLD = 0.0


def map_trust(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    built_in: torch.Tensor,
    method: str | Teacher = TRUST_METHOD,
) -> torch.Tensor:
    """(B,) per-image Pearson correlation of the channel-summed built-in map with the channel-summed
    post-hoc map ``method`` (gradient x input: one backward pass) of ``model`` for the same ``targets``.

    ``built_in``: (B, C, h, w) built-in maps of ``targets``; a built-in map smaller than the image is
    compared with the post-hoc map averaged down to its size. A constant map counts as 0 (:func:`map_corr`).
    """
    teacher = build(method) if isinstance(method, str) else method
    with eval_mode(model):
        post_hoc = teacher.attribute(model, inputs, targets).detach().float().sum(1, keepdim=True)
    built = built_in.detach().float().to(post_hoc.device).sum(1, keepdim=True)
    if post_hoc.shape[-2:] != built.shape[-2:]:
        post_hoc = torch.nn.functional.adaptive_avg_pool2d(post_hoc, tuple(built.shape[-2:]))
    return map_corr(built, post_hoc)


def disagrees(trust: float | None, threshold: float = TRUST_THRESHOLD) -> bool | None:
    """Whether a trust value flags its image (below ``threshold``); None where there is no value."""
    return None if trust is None else bool(trust < threshold)


def builtin_map_faithfulness(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    built_in: torch.Tensor,
    mean_map: Optional[torch.Tensor],
    post_hoc: Optional[torch.Tensor] = None,
    steps: int = 16,
    seed: int = 0,
    batch_size: int = 256,
    per_image: bool = False,
    references: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, Any]:
    """JSON-able ``{"images", "steps", "auc": {metric: {set: mean}}, "corr_self", ...}``.

    ``built_in`` / ``post_hoc``: (B, C, H, W) maps of ``targets`` for ``inputs``; ``mean_map``:
    (C, H, W) or (1, C, H, W), or None to leave that set out. ``per_image`` adds every image's AUCs
    (``values``: {metric: {set: [B floats]}}) and self-agreement (``corr_self_values``). ``references``: post-hoc maps by method name, scored as ``post_hoc_<name>``; the
    most faithful of them on MoRF is ``best_post_hoc``.
    """
    n = int(inputs.shape[0])
    sets = {"built_in": built_in}
    if mean_map is not None:
        mean = mean_map.reshape(1, *mean_map.shape[-3:]).to(built_in.device, built_in.dtype)
        sets["mean_map"] = mean.expand_as(built_in).contiguous()
    if post_hoc is not None:
        sets["teacher_post_hoc"] = post_hoc
    for name, maps in (references or {}).items():
        sets[f"post_hoc_{name}"] = maps
    metrics = [build_metric(name, steps=steps, batch_size=batch_size) for name in METRIC_NAMES]
    report = evaluate_maps(model, inputs, targets, sets, metrics, seed=seed, with_values=per_image)
    out: dict[str, Any] = {
        "images": n,
        "steps": int(steps),
        "auc": {m: {s: report["maps"][s][m]["mean"] for s in report["maps"]} for m in METRIC_NAMES},
        "higher_is_better": {m: report["metrics"][m]["higher_is_better"] for m in METRIC_NAMES},
    }
    if per_image:
        out["values"] = {m: {s: report["maps"][s][m]["values"] for s in report["maps"]} for m in METRIC_NAMES}
    if post_hoc is not None:
        corr = map_corr(built_in, post_hoc)
        out["corr_self"] = float(corr.mean())
        if per_image:
            out["corr_self_values"] = [float(v) for v in corr.tolist()]
        if mean_map is not None:
            out["corr_self_mean_map"] = float(map_corr(sets["mean_map"], post_hoc).mean())
    if references:
        out["best_post_hoc"] = best_post_hoc(out["auc"]["pixel_flipping_morf"], built_in, references)
    return out


def best_post_hoc(
    morf: dict[str, float], built_in: torch.Tensor, references: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The most faithful reference map set (lowest MoRF AUC) and how the built-in maps compare with it:
    ``morf_ratio`` (built-in MoRF / its MoRF; 1.10 = 10% less faithful) and ``corr_self`` (per-image
    correlation with it, mean)."""
    scores = {name: morf[f"post_hoc_{name}"] for name in references}
    best = min(scores, key=lambda name: scores[name])
    return {
        "method": best,
        "pixel_flipping_morf": scores[best],
        "morf_ratio": morf["built_in"] / scores[best] if scores[best] > 0 else None,
        "corr_self": float(map_corr(built_in, references[best]).mean()),
        "morf_by_method": scores,
    }
