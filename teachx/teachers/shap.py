"""SHAP teachers: DeepSHAP (DeepLIFT rescale over a background set) and Expected Gradients.

Why one file of over 500 lines: the traced graph, the per-operation DeepLIFT rules and the
batched backward of DeepSHAP are one algorithm.


``DeepShap`` computes what ``shap.DeepExplainer`` computes for a PyTorch model, but batched:
for input x_i and background b_k, DeepLIFT's "rescale" rule replaces the derivative of every
element-wise non-linearity by the multiplier (f(x) - f(b)) / (x - b) and everything else
(conv, linear, batch-norm, pooling, sums, products) is differentiated plainly *at the
background point* b_k, exactly as shap's backward hooks do on the background half of its
joint batch. The attribution is phi_i = mean_k grad_ik * (x_i - b_k); with every
non-linearity a module it satisfies sum(phi_i) = f(x_i)_t - mean_k f(b_k)_t.

Why not hooks: shap (and a direct port) runs the model forward on all B*K (input, background)
pairs, then backward. Here the model is traced once with ``torch.fx``; x (B) and the
background (K) go forward once each, and one hand-written *input-gradient-only* backward runs
over the B*K pairs, with the multipliers computed from the recorded pre-activations. Linear
operations need no forward on the pairs, so the cost is that of a plain backward.

Where we differ from shap 0.51 on purpose (everything else is its rule, value for value):

- ReLU6, SiLU, Hardswish, Mish... get the rescale rule (shap has no handler for them, warns and
  uses a plain gradient, which breaks completeness);
- overlapping max-pool windows add their routed changes (shap's ``max_unpool`` overwrites one);
- shap's max-pool rule reads the gradient of the *input* half of its joint batch for one of its
  two terms; the halves only differ downstream of a product of two input-dependent tensors
  (an SE gate after a max-pool), where we use the background half for both terms;
- functional non-linearities (``torch.relu`` in ``forward``) get the plain gradient, as in shap,
  but with a warning. Models whose forward fx cannot trace raise a ConfigError.

``ExpectedGradients`` is ``shap.GradientExplainer``: E_{b, alpha}[(x - b) * grad f(b + alpha (x - b))].
"""

from __future__ import annotations

import hashlib

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from teachx.errors import ConfigError, DataError
from teachx.teachers.base import TEACHERS, Teacher
from teachx.teachers.gradients import as_target, check_inputs, input_gradients, target_logits, tensor_sha256

# ----------------------------------------------------------------------------- rules by layer type

#: element-wise non-linearities that get DeepLIFT's rescale multiplier (shap's ``nonlinear_1d``;
#: shap 0.51 lacks ReLU6/SiLU/Hardswish..., which then fall back to a plain gradient that breaks
#: completeness -- register them in shap's ``op_handler`` to compare).
RESCALE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.PReLU,
)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_ADD_FUNCTIONS = {operator.add, torch.add}
_MUL_FUNCTIONS = {operator.mul, torch.mul}
#: functional ops known to be linear (or shap-compatible) that need no warning when they get
#: the plain gradient at the background point.
_QUIET_FALLBACK = {
    operator.getitem,
    operator.sub,
    operator.truediv,
    operator.neg,
    torch.cat,
    torch.stack,
    torch.mean,
    torch.sum,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.avg_pool1d,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    F.pad,
    "mean",
    "sum",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "expand",
    "expand_as",
    "__getitem__",
    "chunk",
    "split",
    "narrow",
    "sub",
    "div",
    "neg",
    "repeat",
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.Upsample,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
}

#: threshold below which a pair's input difference counts as zero (shap's values)
RESCALE_EPS = 1e-6
MAXPOOL_EPS = 1e-7
#: default size of one backward pass: elements of its largest (pairs, ...) activation. Small
#: passes keep the element-wise multiplier work in cache; 2**20 floats = 4 MiB. PAIR_LIMIT
#: caps memory when a single input's K pairs are larger than that (32 MiB per activation).
PAIR_BUDGET = 1 << 20
PAIR_LIMIT = 1 << 23


class _Tracer(fx.Tracer):
    """torch's leaves plus every module we have a rule for; user modules are traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, RESCALE_MODULES + MAXPOOL_MODULES + _CONV_MODULES + _BN_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Graph:
    """A traced model: nodes in order, the modules they call, and which nodes carry gradient."""

    root: nn.Module
    nodes: list[fx.Node]
    modules: dict[str, nn.Module]
    output: fx.Node
    active: set[fx.Node] = field(default_factory=set)  # tensors that depend on the input


def trace(model: nn.Module) -> _Graph:
    """Trace ``model`` with torch.fx; a model fx cannot trace raises a one-line ConfigError."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError...)
        raise ConfigError(
            f"DeepShap traces the model with torch.fx and could not trace {type(model).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); remove data-dependent "
            "control flow from forward(), or use the 'expected_gradients' teacher"
        ) from exc
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(placeholders) != 1:
        raise ConfigError(
            f"DeepShap explains models with one input tensor, {type(model).__name__}.forward takes "
            f"{len(placeholders)}; wrap the model so forward(x) takes one image batch"
        )
    out_arg = outputs[0].args[0]
    if not isinstance(out_arg, fx.Node):
        raise ConfigError(
            "DeepShap needs a model whose forward returns one logits tensor; wrap the model so "
            "forward(x) returns (B, num_classes) logits"
        )
    modules = dict(model.named_modules())
    g = _Graph(root=model, nodes=nodes, modules=modules, output=out_arg)
    return g


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _load(arg: Any, env: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: env[n])


def _call(node: fx.Node, graph: _Graph, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return graph.modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(graph.root, node.target)
    raise AssertionError(node.op)


def run_forward(graph: _Graph, x: torch.Tensor, keep: Callable[[fx.Node], bool]) -> dict[fx.Node, Any]:
    """Forward ``x`` through the traced graph; returns the values of nodes where ``keep(node)``.

    Also fills ``graph.active`` (tensor nodes that depend on the input) on the way.
    """
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(graph.nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env: dict[fx.Node, Any] = {}
    kept: dict[fx.Node, Any] = {}
    active: set[fx.Node] = set()
    for i, n in enumerate(graph.nodes):
        if n.op == "placeholder":
            value: Any = x
            active.add(n)
        elif n.op == "output":
            break
        else:
            value = _call(n, graph, _load(n.args, env), _load(n.kwargs, env))
            if any(a in active for a in n.all_input_nodes):
                _check_per_sample(n, value, x.shape[0])
                if isinstance(value, torch.Tensor):
                    active.add(n)
        env[n] = value
        if keep(n):
            kept[n] = value
        for a in n.all_input_nodes:  # free values no later node reads
            if last_use.get(a) == i and a in env:
                del env[a]
    kept[graph.output] = env.get(graph.output, kept.get(graph.output))
    graph.active = active
    return kept


def _check_per_sample(n: fx.Node, value: Any, batch: int) -> None:
    """The pair-batched backward needs every input-dependent value to be one tensor per sample."""
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        raise ConfigError(
            f"DeepShap cannot follow '{n.target}', which returns several tensors (split/chunk...); "
            "use the 'expected_gradients' teacher for this model"
        )
    if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != batch):
        raise ConfigError(
            f"DeepShap needs per-sample computations, but '{n.target}' mixes the batch (output "
            f"shape {tuple(value.shape)} for {batch} inputs); use the 'expected_gradients' teacher"
        )


# ----------------------------------------------------------------------------- per-node backward rules


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((-1,) + tuple(t.shape[2:]))


def _pairs(t: torch.Tensor, nb: int, nk: int) -> torch.Tensor:
    """View a (nb*nk, ...) tensor as (nb, nk, ...)."""
    return t.view((nb, nk) + tuple(t.shape[1:]))


@dataclass
class _Rescale:
    """Pre-activations and outputs of one element-wise non-linearity, for x and the background."""

    x_in: torch.Tensor  # (B, ...)
    x_out: torch.Tensor
    b_in: torch.Tensor  # (K, ...)
    b_out: torch.Tensor
    b_grad: torch.Tensor  # f'(b): shap's fallback where |x - b| < eps is the plain gradient at b

    def backward(self, g: torch.Tensor, rows: slice, ks: slice) -> torch.Tensor:
        xi, yi = self.x_in[rows], self.x_out[rows]
        b_in, b_out, b_grad = self.b_in[ks], self.b_out[ks], self.b_grad[ks]
        nb, nk = xi.shape[0], b_in.shape[0]
        # contiguous: activations may come in channels_last or other strides; the flat indexing
        # below needs the standard layout
        delta_in = (xi.unsqueeze(1) - b_in.unsqueeze(0)).contiguous()  # (nb, nk, ...)
        multiplier = (yi.unsqueeze(1) - b_out.unsqueeze(0)).contiguous().div_(delta_in)
        # shap's fallback where |x - b| < eps: the plain gradient at b. Usually rare (patch by
        # index), but dead units give whole channels with x == b (then one torch.where is cheaper).
        small = delta_in.abs_() < RESCALE_EPS
        count = int(torch.count_nonzero(small))
        if count * 64 > small.numel():
            multiplier = torch.where(small, b_grad.unsqueeze(0), multiplier, out=multiplier)
        elif count:
            where = torch.nonzero(small.reshape(-1)).squeeze(1)
            per_pair = b_grad[0].numel()
            fallback = b_grad.reshape(nk, per_pair)[(where // per_pair) % nk, where % per_pair]
            multiplier.view(-1)[where] = fallback
        return _flat(multiplier.mul_(_pairs(g, nb, nk)))


@dataclass
class _MaxPool:
    """shap's max-pool rule: route the change of each window's max to both argmax positions."""

    x_in: torch.Tensor
    x_out: torch.Tensor
    x_idx: torch.Tensor  # flat argmax positions (B, C, L)
    b_in: torch.Tensor
    b_out: torch.Tensor
    b_idx: torch.Tensor

    def backward(self, g: torch.Tensor, rows: slice, ks: slice) -> torch.Tensor:
        xi, yi, ixi = self.x_in[rows], self.x_out[rows], self.x_idx[rows]
        b_in, b_out, b_idx = self.b_in[ks], self.b_out[ks], self.b_idx[ks]
        nb, nk, channels = xi.shape[0], b_in.shape[0], xi.shape[1]
        size = math.prod(xi.shape[2:])
        g = _pairs(g, nb, nk).reshape(nb, nk, channels, -1)
        shape = g.shape
        y = yi.reshape(nb, 1, channels, -1)
        r = b_out.reshape(1, nk, channels, -1)
        ix = ixi.unsqueeze(1).expand(shape)  # argmax of x's window
        ib = b_idx.unsqueeze(0).expand(shape)  # argmax of b's window
        cross = torch.maximum(y, r)
        # shap divides the routed change by x - b at the argmax position; x - b is only needed
        # there, so gather it at output resolution: at x's argmax it is y - b[ix], at b's x[ib] - r.
        b_flat = b_in.reshape(1, nk, channels, size).expand(nb, nk, channels, size)
        x_flat = xi.reshape(nb, 1, channels, size).expand(nb, nk, channels, size)
        delta_x = y - b_flat.gather(3, ix)
        delta_b = x_flat.gather(3, ib) - r
        from_x = _safe_div(g * (cross - r), delta_x, MAXPOOL_EPS)
        from_b = _safe_div(g * (y - cross), delta_b, MAXPOOL_EPS)
        out = g.new_zeros((nb, nk, channels, size))
        out.scatter_add_(3, ix, from_x)
        out.scatter_add_(3, ib, from_b)
        return out.reshape((nb * nk,) + tuple(xi.shape[1:]))


def _safe_div(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """num / den, 0 where |den| < eps (shap's max-pool convention)."""
    return torch.where(den.abs() < eps, torch.zeros((), dtype=num.dtype, device=num.device), num.div_(den))


def _maxpool_indices(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pool = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(module)]
    _, idx = pool(
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=module.ceil_mode,
        return_indices=True,
    )
    return idx.reshape(idx.shape[0], idx.shape[1], -1)


def _conv_input_grad(module: nn.Module, g: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    nd = g.dim() - 2
    fake = g.new_empty(1).expand(in_shape)
    return torch.ops.aten.convolution_backward(
        g,
        fake,
        module.weight,
        None,
        list(module.stride),
        list(module.padding),
        list(module.dilation),
        False,
        [0] * nd,
        module.groups,
        [True, False, False],
    )[0]


def _fast_module_rule(module: nn.Module) -> str | None:
    if isinstance(module, _CONV_MODULES) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BN_MODULES) and module.running_var is not None and not module.training:
        return "bn"
    if isinstance(module, _IDENTITY_MODULES):
        return "identity"
    if isinstance(module, nn.Flatten):
        return "reshape"
    if isinstance(module, (nn.AdaptiveAvgPool2d,)) and module.output_size in (1, (1, 1)):
        return "global_avg"
    return None


def _unbroadcast(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``g`` (pairs, ...) down to an argument of per-sample ``shape`` (batch dim kept)."""
    target = (g.shape[0],) + tuple(shape[1:]) if len(shape) == g.dim() else tuple(shape)
    return g.sum_to_size(target) if tuple(g.shape) != target else g


# ----------------------------------------------------------------------------- DeepShap


class _BackgroundTeacher(Teacher):
    """A teacher that compares inputs with a background (reference) set of images."""

    def _set_background(self, background: torch.Tensor) -> None:
        label = type(self).__name__
        if not isinstance(background, torch.Tensor) or not background.is_floating_point() or background.dim() < 2:
            raise DataError(
                f"{label} background must be a floating-point tensor (K, C, H, W) normalised like "
                "the inputs; pass e.g. a random subset of training images"
            )
        if background.shape[0] == 0:
            raise DataError(f"{label} background is empty; pass at least one background image")
        self.background = background.detach().clone()
        self._background_hash: str | None = None

    def _background_options(self) -> dict[str, Any]:
        """Background size and content hash (part of the teacher-map store key)."""
        if self._background_hash is None:
            self._background_hash = tensor_sha256(self.background)
        return {"background_size": int(self.background.shape[0]), "background_sha256": self._background_hash}

    def _background_like(self, x: torch.Tensor) -> torch.Tensor:
        background = self.background.to(device=x.device, dtype=x.dtype)
        if background.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{type(self).__name__} background images have shape {tuple(background.shape[1:])} but "
                f"inputs have {tuple(x.shape[1:])}; use background images of the input size"
            )
        return background


@TEACHERS.register("deepshap", "shap", "deep_shap")
class DeepShap(_BackgroundTeacher):
    """DeepSHAP (Lundberg & Lee 2017): DeepLIFT rescale averaged over a background set.

    Same values as ``shap.DeepExplainer(model, background).shap_values(x)`` for class ``target``
    (with ReLU6/SiLU registered as non-linear in shap), computed batched with one forward of the
    inputs, one of the background and an input-gradient-only backward over the B*K pairs.

    Args:
        background: (K, C, H, W) reference images normalised like the inputs; teachx passes a
            seeded sample of teacher.background_size training images
        batch_size: at most this many (input, background) pairs per backward pass (bounds
            memory); null picks it from the layer sizes
    """

    name = "deepshap"

    def __init__(self, background: torch.Tensor, batch_size: int | None = None):
        self._set_background(background)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(f"DeepShap batch_size must be a positive integer or None, got {batch_size!r}")
        self.batch_size = batch_size
        self._warned: set[str] = set()

    def options(self) -> dict[str, Any]:
        return self._background_options()

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        check_inputs(inputs)
        x = inputs.detach()
        background = self._background_like(x)
        target = as_target(target, x.shape[0], x.device)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                return self._attribute(model, x, background, target).to(torch.float32)
        finally:
            for m, mode in modes.items():
                m.training = mode

    # -- implementation

    def _attribute(
        self, model: nn.Module, x: torch.Tensor, background: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        graph = trace(model)
        kinds = {n: self._node_kind(graph, n) for n in graph.nodes}
        nk = background.shape[0]

        # forward the background once, keeping every value the backward rules read
        run_shapes_graph = run_shapes(graph, background[:1])  # also fills graph.active
        active = graph.active
        need_ref: set[fx.Node] = set()
        for n in graph.nodes:
            if n in active and kinds[n] in ("rescale", "maxpool"):
                need_ref |= {n, *[a for a in n.all_input_nodes if a in active]}
            elif n in active and kinds[n] in ("mul", "generic"):
                need_ref |= set(n.all_input_nodes)
        ref = run_forward(graph, background, keep=lambda n: n in need_ref)
        target_logits(ref[graph.output], target[:1].expand(nk))  # validates the output shape and classes
        # forward the inputs once, keeping only what the multipliers need
        need_x = {
            a
            for n in graph.nodes
            if kinds[n] in ("rescale", "maxpool") and n in active
            for a in n.all_input_nodes
            if a in active
        }
        need_x |= {n for n in graph.nodes if kinds[n] in ("rescale", "maxpool") and n in active}
        xv = run_forward(graph, x, keep=lambda n: n in need_x)
        target_logits(xv[graph.output], target)

        rules: dict[fx.Node, Any] = {}
        for n in graph.nodes:
            if n not in active:
                continue
            if kinds[n] == "rescale":
                (a,) = [a for a in n.all_input_nodes if a in active]
                module = graph.modules[n.target]
                with torch.enable_grad():
                    b_in = ref[a].detach().requires_grad_(True)
                    (b_grad,) = torch.autograd.grad(module(b_in).sum(), b_in)
                rules[n] = _Rescale(xv[a], xv[n], ref[a], ref[n], b_grad)
            elif kinds[n] == "maxpool":
                (a,) = [a for a in n.all_input_nodes if a in active]
                module = graph.modules[n.target]
                rules[n] = _MaxPool(
                    xv[a], xv[n], _maxpool_indices(module, xv[a]), ref[a], ref[n], _maxpool_indices(module, ref[a])
                )
            elif kinds[n] == "generic":
                self._warn_fallback(graph, n)
        del xv

        shapes = {n: tuple(v.shape) for n, v in run_shapes_graph.items()}
        rows_per_pass, k_per_pass = self._pass_shape(shapes, nk)
        out = torch.zeros_like(x)
        num_classes = shapes[graph.output][1]
        for start in range(0, x.shape[0], rows_per_pass):
            rows = slice(start, min(start + rows_per_pass, x.shape[0]))
            nb = rows.stop - rows.start
            for k_start in range(0, nk, k_per_pass):
                ks = slice(k_start, min(k_start + k_per_pass, nk))
                nkc = ks.stop - ks.start
                seed = torch.zeros((nb, nkc, num_classes), dtype=x.dtype, device=x.device)
                seed.scatter_(2, target[rows].view(nb, 1, 1).expand(nb, nkc, 1), 1.0)
                grad = _pairs(self._backward(graph, kinds, rules, ref, shapes, _flat(seed), rows, ks), nb, nkc)
                out[rows] += (grad * (x[rows].unsqueeze(1) - background[ks].unsqueeze(0))).sum(1)
        return out.div_(nk)

    def _pass_shape(self, shapes: dict[fx.Node, tuple[int, ...]], nk: int) -> tuple[int, int]:
        """(inputs, background samples) per backward pass: at most ``batch_size`` pairs."""
        if self.batch_size is not None:
            pairs = self.batch_size
        else:  # about PAIR_BUDGET elements in the largest pair-batched activation; split the
            # background only when one input's pairs exceed PAIR_LIMIT (smaller passes run slower)
            largest = max((math.prod(s[1:]) for s in shapes.values()), default=1)
            pairs = max(1, PAIR_BUDGET // largest)
            if pairs < nk:
                pairs = max(1, min(nk, PAIR_LIMIT // largest))
        if pairs >= nk:
            return pairs // nk, nk
        return 1, pairs

    def _node_kind(self, graph: _Graph, n: fx.Node) -> str | None:
        if n.op in ("placeholder", "output", "get_attr"):
            return None
        if n.op == "call_module":
            module = graph.modules[n.target]
            if isinstance(module, RESCALE_MODULES):
                return "rescale"
            if isinstance(module, MAXPOOL_MODULES):
                return "maxpool"
            return _fast_module_rule(module) or "generic"
        if n.op == "call_function":
            if n.target in _ADD_FUNCTIONS and "alpha" not in n.kwargs:
                return "add"
            if n.target in _MUL_FUNCTIONS:
                return "mul"
            if n.target in _RESHAPE_FUNCTIONS:
                return "reshape"
            return "generic"
        if n.op == "call_method":
            if n.target in _RESHAPE_METHODS:
                return "reshape"
            if n.target in ("add", "mul") and "alpha" not in n.kwargs:
                return n.target
            return "generic"
        return "generic"

    def _warn_fallback(self, graph: _Graph, n: fx.Node) -> None:
        what: Any = type(graph.modules[n.target]) if n.op == "call_module" else n.target
        if what in _QUIET_FALLBACK:
            return
        label = getattr(what, "__name__", str(what))
        if label not in self._warned:
            self._warned.add(label)
            warnings.warn(
                f"DeepShap: no rescale rule for '{label}'; it gets the plain gradient at the background "
                "point (as in shap), so attributions may not sum to f(x) - E f(b). Use an nn.Module "
                "activation (nn.ReLU...) for non-linearities.",
                stacklevel=4,
            )

    def _backward(
        self,
        graph: _Graph,
        kinds: dict,
        rules: dict,
        ref: dict,
        shapes: dict,
        seed: torch.Tensor,
        rows: slice,
        ks: slice,
    ) -> torch.Tensor:
        """Input gradient of every pair (x_i, b_k) through the DeepLIFT-modified graph: (nb*nk, C, H, W)."""
        nb, nk = rows.stop - rows.start, ks.stop - ks.start
        grads: dict[fx.Node, torch.Tensor] = {graph.output: seed}
        placeholder = graph.nodes[0]
        active = graph.active

        def give(node: Any, g: torch.Tensor) -> None:
            if not isinstance(node, fx.Node) or node not in active:
                return
            g = _unbroadcast(g, torch.Size(shapes[node]))
            grads[node] = grads[node] + g if node in grads else g

        for n in reversed(graph.nodes):
            if n.op == "placeholder":
                continue
            if n not in grads:
                continue
            g = grads.pop(n)
            kind = kinds[n]
            inputs = [a for a in n.all_input_nodes if a in active]
            if kind in ("rescale", "maxpool"):
                give(inputs[0], rules[n].backward(g, rows, ks))
            elif kind == "conv":
                module = graph.modules[n.target]
                give(inputs[0], _conv_input_grad(module, g, (g.shape[0],) + shapes[inputs[0]][1:]))
            elif kind == "linear":
                give(inputs[0], g.matmul(graph.modules[n.target].weight))
            elif kind == "bn":
                m = graph.modules[n.target]
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                give(inputs[0], g * scale.view((1, -1) + (1,) * (g.dim() - 2)))
            elif kind == "identity":
                give(inputs[0], g)
            elif kind == "reshape":
                give(inputs[0], g.reshape((g.shape[0],) + shapes[inputs[0]][1:]))
            elif kind == "global_avg":
                in_shape = shapes[inputs[0]]
                area = math.prod(in_shape[2:])
                give(inputs[0], (g / area).expand((g.shape[0],) + in_shape[1:]))
            elif kind == "add" and len(n.args) == 2 and not n.kwargs:
                for a in n.args:
                    give(a, g)
            elif kind == "mul" and len(n.args) == 2 and not n.kwargs:
                first, second = n.args
                give(first, _times(g, _ref_value(second, ref, active, ks), nb, nk))
                give(second, _times(g, _ref_value(first, ref, active, ks), nb, nk))
            else:
                for a, ga in _generic_vjp(graph, n, ref, g, nb, ks):
                    give(a, ga)
        if placeholder not in grads:  # the output does not depend on the input
            return seed.new_zeros((nb * nk,) + shapes[placeholder][1:])
        return grads[placeholder]


def _ref_value(arg: Any, ref: dict, active: set, ks: slice) -> tuple[Any, bool]:
    """(value at the background samples ``ks``, whether it has the background batch dim)."""
    if isinstance(arg, fx.Node):
        return (ref[arg][ks], True) if arg in active else (ref[arg], False)
    return arg, False


def _times(g: torch.Tensor, other: tuple[Any, bool], nb: int, nk: int) -> torch.Tensor:
    value, batched = other
    if not batched:  # a constant: broadcasts over the pairs as it did over the batch
        return g * value
    return _flat(_pairs(g, nb, nk) * value.unsqueeze(0))


def _generic_vjp(
    graph: _Graph, n: fx.Node, ref: dict, g: torch.Tensor, nb: int, ks: slice
) -> list[tuple[fx.Node, torch.Tensor]]:
    """Plain gradient of node ``n`` at the background point, for all pairs (what shap's hooks give)."""
    active = graph.active
    diff = [a for a in n.all_input_nodes if a in active]
    with torch.enable_grad():
        nk = ks.stop - ks.start
        leaves = {a: ref[a][ks].detach().requires_grad_(True) for a in diff}
        env = {a: leaves.get(a, ref.get(a)) for a in n.all_input_nodes}
        out = _call(n, graph, _load(n.args, env), _load(n.kwargs, env))
        grads = torch.autograd.grad(
            out, [leaves[a] for a in diff], _pairs(g, nb, nk), is_grads_batched=True, allow_unused=True
        )
    return [(a, _flat(ga) if ga is not None else None) for a, ga in zip(diff, grads) if ga is not None]


def run_shapes(graph: _Graph, one: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
    """Values of every tensor node for one background image (their shapes, batch dim 1)."""
    kept = run_forward(graph, one, keep=lambda n: True)
    return {n: v for n, v in kept.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- Expected Gradients


@TEACHERS.register("expected_gradients", "gradientshap", "gradient_shap")
class ExpectedGradients(_BackgroundTeacher):
    """Expected Gradients (Erion et al. 2021), the method of ``shap.GradientExplainer``.

    phi(x) = E_{b ~ background, alpha ~ U(0,1)}[(x - b) * grad f_t(b + alpha (x - b))], estimated with
    ``n_samples`` draws per input. Draws are seeded by ``seed`` and the image (see :meth:`draws`),
    so maps are repeatable.

    Args:
        background: (K, C, H, W) reference images normalised like the inputs; teachx passes a
            seeded sample of teacher.background_size training images
        n_samples: draws (background image, path point) per input (shap's default 200)
        seed: seed of the draws (with each image's own content, so maps do not depend on the batch)
        local_smoothing: standard deviation of N(0, s^2) noise added to x per draw, as shap does
        batch_size: at most this many gradient evaluations per backward pass (memory only)
    """

    name = "expected_gradients"

    def __init__(
        self,
        background: torch.Tensor,
        n_samples: int = 200,
        seed: int = 0,
        local_smoothing: float = 0.0,
        batch_size: int = 512,
    ):
        self._set_background(background)
        for label, value in (("n_samples", n_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ExpectedGradients {label} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"ExpectedGradients seed must be an integer, got {seed!r}")
        if isinstance(local_smoothing, bool) or not isinstance(local_smoothing, (int, float)) or local_smoothing < 0:
            raise ConfigError(f"ExpectedGradients local_smoothing must be a number >= 0, got {local_smoothing!r}")
        self.n_samples = n_samples
        self.seed = seed
        self.local_smoothing = float(local_smoothing)
        self.batch_size = batch_size

    def options(self) -> dict[str, Any]:
        return {
            **self._background_options(),
            "n_samples": self.n_samples,
            "seed": self.seed,
            "local_smoothing": self.local_smoothing,
        }

    def draws(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(background index (B, n), alpha (B, n), noise (B, n, ...) or None), drawn on the CPU.

        Each image's draws come from a generator seeded by ``seed`` and a hash of the image itself,
        so an image gets the same map whatever batch it is in, at whatever position (map stores,
        DDP sharding and resumed runs batch images differently).
        """
        batch, shape = inputs.shape[0], tuple(inputs.shape[1:])
        index = torch.empty((batch, self.n_samples), dtype=torch.long)
        alpha = torch.empty((batch, self.n_samples), dtype=torch.float64)
        noise = torch.empty((batch, self.n_samples) + shape) if self.local_smoothing > 0 else None
        pixels = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        for i in range(batch):
            digest = hashlib.blake2b(pixels[i].tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            index[i] = torch.randint(0, self.background.shape[0], (self.n_samples,), generator=gen)
            alpha[i] = torch.rand((self.n_samples,), generator=gen, dtype=torch.float64)
            if noise is not None:
                noise[i] = torch.randn((self.n_samples,) + shape, generator=gen) * self.local_smoothing
        return index, alpha, noise

    def attribute(self, model: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        check_inputs(inputs)
        x = inputs.detach()
        background = self._background_like(x)
        target = as_target(target, x.shape[0], x.device)
        index, alpha, noise = self.draws(x)
        index, alpha = index.to(x.device), alpha.to(device=x.device, dtype=x.dtype)
        n = self.n_samples
        per_pass = max(1, self.batch_size // n)  # whole inputs per pass so the mean is one reduction
        out = torch.empty_like(x)
        view = (-1,) + (1,) * (x.dim() - 1)
        for start in range(0, x.shape[0], per_pass):
            rows = slice(start, min(start + per_pass, x.shape[0]))
            nb = rows.stop - rows.start
            xs = x[rows].unsqueeze(1).expand((nb, n) + tuple(x.shape[1:]))
            if noise is not None:
                xs = xs + noise[rows].to(device=x.device, dtype=x.dtype)
            xs = xs.reshape((nb * n,) + tuple(x.shape[1:]))
            base = background[index[rows].reshape(-1)]
            a = alpha[rows].reshape(view)
            points = a * xs + (1 - a) * base
            grads = input_gradients(model, points, target[rows].repeat_interleave(n))
            out[rows] = (grads * (xs - base)).view((nb, n) + tuple(x.shape[1:])).mean(1)
        return out.to(torch.float32)
