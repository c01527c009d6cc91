"""A layer's activations: which layers a model has, and each sample's activations pooled to one vector.

Layers are named as in ``model.named_modules()`` (e.g. ``body.3``). Pooling: the spatial maximum of each
channel, as Reveal-to-Revise does -- an artefact that fills a small patch still gives a full response in the
channels that detect it, where a spatial mean would dilute it by the patch's area.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

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


#: modules that end a block with a nonlinearity: their outputs are a network's hidden representations
NONLINEARITIES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish)


def activation_layers(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The outputs of the model's nonlinearities, in forward order (LeNet-5: both conv blocks and both hidden
    dense layers); the classifier's input features when it has none.

    Why every depth at once: an artefact is encoded where the receptive field fits it -- a colour cast or a
    bright stroke already in the first conv block, a learnt composite only near the classifier. On the
    Fashion-MNIST benchmarks a CAV fitted on the true artefact images retrieves the colour shift with AUROC
    0.997 at LeNet-5's first block and 0.76 at the classifier's input, the timestamp with 0.72 and 0.91
    (docs/studies/r2r-fashion-mnist.md)."""
    modules = dict(model.named_modules())
    names = [n for n in shapes if isinstance(modules.get(n), NONLINEARITIES)]
    return names or [classifier_input(shapes)]


def check_layers(layers: Optional[str], model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Comma-separated layer names, each checked (:func:`check_layer`); None: :func:`activation_layers`."""
    if not layers:
        return activation_layers(model, shapes)
    return list(dict.fromkeys(check_layer(name.strip(), shapes) for name in layers.split(",") if name.strip()))


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


def stacked_activations(
    model: nn.Module,
    batches: Callable[[np.ndarray], torch.Tensor],
    indices: np.ndarray,
    layers: Sequence[str],
    batch_size: int = 256,
) -> np.ndarray:
    """(N, D1 + D2 + ...) pooled activations (spatial maxima) of every layer in ``layers``, side by side, from
    one forward pass per batch (raw: :class:`LayerStack` scales them)."""
    modules = [find_module(model, layer) for layer in layers]
    rows = []
    model.eval()
    with contextlib.ExitStack() as stack, torch.no_grad():
        outs = [stack.enter_context(capture(m)) for m in modules]
        for s in range(0, len(indices), batch_size):
            for out in outs:
                out.clear()
            model(batches(indices[s : s + batch_size]))
            rows.append(np.concatenate([pool(out[0]).flatten(1).float().cpu().numpy() for out in outs], 1))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class LayerStack:
    """Several layers' pooled activations side by side, each unit standardised with one class's mean and
    spread, and each layer scaled by 1/sqrt(its width) so that every layer weighs the same whatever its width.

    Why standardised: raw units differ in scale by orders of magnitude between layers and channels, and a
    direction fitted on raw values follows the loud units; an artefact channel may be a quiet one."""

    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, layers: Sequence[str], sizes: Sequence[int], x: np.ndarray) -> "LayerStack":
        """The scaling of ``x`` (N, sum(sizes)), a class's raw :func:`stacked_activations`."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1] != sum(sizes):
            raise ValueError(f"{x.shape[1]} columns for layers of {sum(sizes)} units")
        std = x.std(0)
        width = np.repeat(np.sqrt(np.asarray(sizes, dtype=np.float64)), sizes)
        return cls(tuple(layers), tuple(int(n) for n in sizes), x.mean(0), np.where(std > 0, std, 1.0) * width)

    @classmethod
    def raw(cls, layers: Sequence[str], sizes: Sequence[int], x: np.ndarray) -> "LayerStack":
        """The identity on ``x``'s layers: the raw pooled values, unscaled."""
        d = int(sum(sizes))
        return cls(tuple(layers), tuple(int(n) for n in sizes), np.zeros(d), np.ones(d))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def dominant(self, direction: np.ndarray) -> tuple[str, np.ndarray]:
        """The layer that carries most of ``direction`` (a unit vector in the scaled space: the largest share of
        its squared length) and that part mapped back to the layer's raw activations, unit length."""
        parts = np.split(np.asarray(direction, dtype=np.float64), np.cumsum(self.sizes)[:-1])
        return self.part(direction, int(np.argmax([float(p @ p) for p in parts])))

    def part(self, direction: np.ndarray, k: int) -> tuple[str, np.ndarray]:
        """The ``k``-th layer and its part of ``direction`` (in the scaled space) mapped back to the layer's raw
        activations, unit length: where and along what to localise a concept fitted on the stack (the first
        layer, whose small receptive field gives the sharpest maps: :mod:`teachx.reveal.localise`)."""
        w = np.asarray(direction, dtype=np.float64) / self.scale
        raw = np.split(w, np.cumsum(self.sizes)[:-1])[k]
        norm = np.linalg.norm(raw)
        return self.layers[k], raw / norm if norm > 0 else raw


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
