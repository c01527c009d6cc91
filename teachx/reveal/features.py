"""A layer's activations: which layers a model has, and each sample's activations pooled to one vector.

Layers are named as in ``model.named_modules()`` (e.g. ``body.3``). Pooling: the spatial maximum of each
channel, as Reveal-to-Revise does -- an artefact that fills a small patch still gives a full response in the
channels that detect it, where a spatial mean would dilute it by the patch's area.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from teachx.errors import ConfigError
from teachx.registry import suggest


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """name -> output shape (without the batch) of every named module whose output is one tensor of 2 or 4
    dimensions (a feature vector or feature maps), in forward order; the model's own output is left out."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _args, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() in (2, 4) and name not in shapes:
                shapes[name] = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


def default_layer(shapes: dict[str, tuple[int, ...]]) -> str:
    """The last layer with feature maps larger than 1x1 (R2R uses the last convolutional block); else the last layer."""
    maps = [n for n, s in shapes.items() if len(s) == 3 and s[1] * s[2] > 1]
    return (maps or list(shapes))[-1]


def classifier_input(shapes: dict[str, tuple[int, ...]]) -> str:
    """The features the classifier reads: the last layer (in forward order) whose output is not shaped like the
    model's output (e.g. LeNet-5's ``neck``, a ResNet's pooled features).

    Why not the last feature maps: a shortcut that may sit anywhere in the image (a timestamp in a random
    corner) is encoded position-free only where the network has pooled over space; the last conv block of a
    small network has too few channels to hold it (measured: docs/guide/reveal.md). For a large CNN the
    penultimate features are the spatially pooled last block, close to what R2R fits its CAVs on."""
    names = list(shapes)
    if not names:
        raise ConfigError("the model has no named layers to read activations from")
    out = shapes[names[-1]]
    return ([n for n in names if shapes[n] != out] or names)[-1]


def check_layer(layer: Optional[str], shapes: dict[str, tuple[int, ...]]) -> str:
    """``layer`` if the model has it (None: :func:`default_layer`); else a one-line error listing the valid ones."""
    if layer is None:
        return default_layer(shapes)
    if layer not in shapes:
        valid = list(shapes)
        raise ConfigError(f"unknown layer '{layer}'{suggest(layer, valid)}; valid layers: {', '.join(valid)}")
    return layer


def find_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(f"unknown layer '{layer}'; valid layers: {', '.join(n for n in modules if n)}")
    return modules[layer]


@contextlib.contextmanager
def capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``module`` appends its output to the yielded list."""
    out: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, o: out.append(o))
    try:
        yield out
    finally:
        handle.remove()


def pool(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) spatial maxima; (B, D) stays."""
    return acts.amax(dim=(2, 3)) if acts.dim() == 4 else acts


def pooled_activations(
    model: nn.Module,
    batches: Callable[[np.ndarray], torch.Tensor],
    indices: np.ndarray,
    layer: str,
    batch_size: int = 256,
    step: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """(N, D) float32 pooled activations of ``layer`` for ``batches(indices[chunk])`` (normalised inputs);
    ``step(n)`` is called after each batch (a progress bar)."""
    module = find_module(model, layer)
    rows = []
    model.eval()
    with torch.no_grad(), capture(module) as out:
        for s in range(0, len(indices), batch_size):
            out.clear()
            model(batches(indices[s : s + batch_size]))
            rows.append(pool(out[0]).float().cpu().numpy())
            step(len(indices[s : s + batch_size]))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def pooled_relevances(
    model: nn.Module,
    batches: Callable[[np.ndarray], torch.Tensor],
    indices: np.ndarray,
    targets: np.ndarray,
    layer: str,
    batch_size: int = 256,
    composite: str = "epsilon_plus_flat",
) -> np.ndarray:
    """(N, D) float32 LRP relevances of ``layer`` for the ``targets`` logits, summed over space per channel.

    Inside teachx's LRP context the backward pass carries relevance itself, so the "gradient" reaching the
    layer's output is its relevance; the sum over channels is about the target logit. Summing over space, not
    taking the maximum, keeps that conservation: a channel's share of the decision.
    """
    from teachx.teachers.lrp import Lrp

    module = find_module(model, layer)
    lrp = Lrp(composite=composite)
    rows = []
    for s in range(0, len(indices), batch_size):
        chunk = indices[s : s + batch_size]
        captured: list[torch.Tensor] = []
        with lrp.context(model), torch.enable_grad():
            handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
            try:
                x = batches(chunk).detach().requires_grad_(True)
                out = model(x)
            finally:
                handle.remove()
            a = captured[0]
            t = torch.as_tensor(np.asarray(targets)[s : s + batch_size], device=out.device).long().view(-1, 1)
            seed = torch.zeros_like(out).scatter_(1, t, out.detach().gather(1, t))
            (grad,) = torch.autograd.grad(out, a, seed)
        rel = grad.detach().float()
        rows.append((rel.sum((2, 3)) if rel.dim() == 4 else rel).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
