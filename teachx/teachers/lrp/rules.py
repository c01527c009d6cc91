"""LRP rules: *what* relevance a layer passes to its inputs.

Why one file of over 500 lines: every rule is a small data-like class, as in zennit's rules.py,
and the rules share their stabilisers and vector-Jacobian helpers.


A rule is a small data-like object with two methods that the attributor calls from one hooked
forward and one backward pass:

- ``forward(module, inputs, output) -> state`` runs in the module's forward hook (no grad) and
  precomputes what the backward needs (e.g. the z+ denominator of the ZPlus rule);
- ``backward(module, inputs, output, state, relevance) -> relevance per input`` maps the
  relevance of the module's output to its inputs, with explicit vector-Jacobian products
  (``conv``'s input gradient, ``relevance @ W``), never a Python re-forward of the model.

The formulas and stabilisers follow zennit (Anders et al.) so maps agree with it: a denominator
``z`` is stabilised as ``z + eps`` for ``z >= 0`` and ``z - eps`` for ``z < 0``; the ZPlus,
AlphaBeta and Gamma rules are the generalised versions that also accept negative inputs (with
the usual fast path when the layer input is non-negative, as after a ReLU).

A new rule is one ``Rule`` subclass decorated ``@RULES.register("name")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from teachx.errors import ConfigError
from teachx.models.layers import Add
from teachx.registry import Registry

Tensor = torch.Tensor
Relevances = tuple[Optional[Tensor], ...]
BoundLike = Union[float, int, Sequence[float], Tensor]

STABILIZER = 1e-6
"""Epsilon of the stabiliser that keeps every non-Epsilon rule's division finite (zennit's default)."""


# ----------------------------------------------------------------------------- helpers


def stabilize(z: Tensor, epsilon: float = STABILIZER) -> Tensor:
    """``z + eps`` where ``z >= 0``, ``z - eps`` elsewhere: the denominator never reaches zero.

    ``copysign`` is several times faster than ``torch.where`` on CPU. It differs from zennit's
    ``+eps`` only at ``z == -0.0``, which a sum can only produce when every contribution is
    zero, so the relevance it passes down is zero either way.
    """
    return torch.copysign(z.new_full((), epsilon), z).add_(z)


def stabilize_(z: Tensor, epsilon: float = STABILIZER, nonnegative: bool = False) -> Tensor:
    """In-place ``stabilize`` for a tensor the caller owns (saves allocating a full-size copy).

    ``nonnegative=True`` is for denominators that are sums of non-negative terms (z+, flat,
    w^2): there ``z + eps`` is exactly the stabiliser, with no sign test at all.
    """
    if nonnegative:
        return z.add_(epsilon)
    return z.add_(torch.copysign(z.new_full((), epsilon), z))


def _divide(relevance: Tensor, denominator: Tensor) -> Tensor:
    return torch.div(relevance, denominator)


def is_linear_layer(module: nn.Module) -> bool:
    """Layers the weight-based rules understand: ``nn.Linear`` and (non-transposed) Conv1d/2d/3d."""
    return isinstance(module, nn.Linear) or (isinstance(module, _ConvNd) and not module.transposed)


def linear_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The layer's own affine map, evaluated with substituted parameters."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)  # handles padding modes and 'same' padding


def linear_vjp(module: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
    """``W^T grad``: the input gradient of the layer with weight ``weight`` at input shape ``x``.

    Uses the same kernels as autograd's backward (so it costs what a plain backward costs);
    ``x`` only provides the input's shape.
    """
    if isinstance(module, nn.Linear):
        return grad.matmul(weight)
    dims = weight.dim() - 2
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            list(module.stride),
            list(module.padding),
            list(module.dilation),
            False,
            [0] * dims,
            module.groups,
            [True, False, False],
        )
        return grad_input
    with torch.enable_grad():  # rare layouts (reflect/circular padding, 'same'): let autograd do it
        xd = x.detach().requires_grad_(True)
        (grad_input,) = torch.autograd.grad(module._conv_forward(xd, weight, None), xd, grad)
    return grad_input


def _check_linear(rule: "Rule", module: nn.Module) -> None:
    if not is_linear_layer(module):
        raise ConfigError(
            f"LRP rule {rule.name} needs a Linear or Conv layer, got {type(module).__name__}; "
            "map it to another rule (Pass, Norm) in the composite"
        )


def _bias(module: nn.Module, zero_bias: bool) -> Optional[Tensor]:
    return None if zero_bias else getattr(module, "bias", None)


def _clamp(t: Optional[Tensor], min: Optional[float] = None, max: Optional[float] = None) -> Optional[Tensor]:  # noqa: A002
    return None if t is None else t.clamp(min=min, max=max)


def _nonnegative(x: Tensor) -> bool:
    """True for inputs that come out of a ReLU-like layer: the fast paths skip the x- terms."""
    return x.numel() == 0 or bool(x.amin() >= 0)


# A term is (coefficient, input, weight, bias): its output ``coef * layer(input; weight, bias)`` adds
# to a denominator, and its relevance share ``coef * input * W^T s`` adds to the input relevance.
Term = tuple[float, Tensor, Tensor, Optional[Tensor]]


def _terms_forward(module: nn.Module, terms: Sequence[Term]) -> Tensor:
    """``sum_k coef_k * layer(input_k; weight_k, bias_k)``, accumulated in place."""
    total = None
    for coef, inp, weight, bias in terms:
        z = linear_forward(module, inp, weight, bias)
        if coef != 1.0:
            z.mul_(coef)
        total = z if total is None else total.add_(z)
    assert total is not None
    return total


def _terms_backward(module: nn.Module, x: Tensor, terms: Sequence[Term], s: Tensor) -> Tensor:
    """``sum_k coef_k * input_k * W_k^T s`` (fresh vjp buffers are scaled in place)."""
    total = None
    for coef, inp, weight, _ in terms:
        r = linear_vjp(module, x, weight, s).mul_(inp if coef == 1.0 else coef * inp)
        total = r if total is None else total.add_(r)
    assert total is not None
    return total


def _as_bound(value: BoundLike, like: Tensor) -> Tensor:
    """A float or per-channel bound as a (1, C, 1, ...) tensor (or scalar) broadcastable to ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 1 and like.dim() > 2:
        t = t.view(1, -1, *([1] * (like.dim() - 2)))
    elif t.dim() == 1:
        t = t.view(1, -1)
    return t.expand(1, *like.shape[1:])


def _bound_to_json(value: BoundLike) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().tolist()
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


# ----------------------------------------------------------------------------- base class


class Rule:
    """Base class of LRP rules; subclasses are dataclasses whose fields are the rule's options."""

    name: ClassVar[str] = "rule"

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Any:
        """Precompute the backward's state in the forward hook (runs under ``torch.no_grad``)."""
        return None

    def backward(
        self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, state: Any, relevance: Tensor
    ) -> Relevances:
        """Relevance of each input given the relevance of ``output`` (None: no relevance flows)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """JSON-able description (rule name and parameters), used in teacher options/cache keys."""
        out: dict[str, Any] = {"rule": self.name}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = _bound_to_json(value) if f.name in ("low", "high") else value
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "rule")
        return f"{type(self).__name__}({params})"


RULES: Registry[type[Rule]] = Registry("LRP rule")


class _RuleFunction(torch.autograd.Function):
    """Identity on the module output in the forward; the rule's relevance map in the backward."""

    @staticmethod
    def forward(ctx, rule: Rule, module: nn.Module, state: Any, output: Tensor, *inputs: Any) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.rule, ctx.module, ctx.state = rule, module, state
        ctx.tensor_mask = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.save_for_backward(output, *[t for t in inputs if isinstance(t, torch.Tensor)])
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance: Optional[Tensor]):  # type: ignore[override]
        n_inputs = len(ctx.tensor_mask)
        if relevance is None:
            return (None,) * (4 + n_inputs)
        output, *saved = ctx.saved_tensors
        it = iter(saved)
        inputs = tuple(next(it) if is_tensor else None for is_tensor in ctx.tensor_mask)
        rel = ctx.rule.backward(ctx.module, inputs, output, ctx.state, relevance)
        rel = tuple(rel) + (None,) * (n_inputs - len(rel))
        return (None, None, None, None, *rel)


def apply_rule(rule: Rule, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
    """Wrap ``output`` so that the backward pass through it applies ``rule`` (used by forward hooks)."""
    if not isinstance(output, torch.Tensor):
        raise ConfigError(
            f"LRP rule {rule.name} got a {type(output).__name__} output from {type(module).__name__}; "
            "rules attach to modules that return one tensor"
        )
    with torch.no_grad():
        state = rule.forward(module, inputs, output)
    return _RuleFunction.apply(rule, module, state, output.detach(), *inputs)


# ----------------------------------------------------------------------------- rules for Linear/Conv


@RULES.register("epsilon", "z", "lrp0")
@dataclass(eq=False)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015): ``R_i = x_i sum_j w_ij R_j / (z_j + eps sign z_j)``.

    ``epsilon -> 0`` is LRP-0 (= gradient x input for ReLU networks); the bias absorbs its share.
    Costs one input-gradient, like a plain backward: the denominator is the layer's own output.
    """

    name: ClassVar[str] = "epsilon"
    epsilon: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"LRP epsilon must be a finite number >= 0, got {self.epsilon!r}")

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        return None

    def backward(self, module, inputs, output, state, relevance):
        (x,) = inputs[:1]
        z = output
        bias = _bias(module, False)
        if self.zero_bias and bias is not None:
            z = z - (bias if isinstance(module, nn.Linear) else bias.view(1, -1, *([1] * (z.dim() - 2))))
        den = stabilize(z, self.epsilon)
        s = torch.div(relevance, den, out=den)  # den is our own temporary: reuse its memory
        return (linear_vjp(module, x, module.weight, s).mul_(x),)


@RULES.register("zplus", "z+", "zp")
@dataclass(eq=False)
class ZPlus(Rule):
    """LRP-z+ (Montavon et al. 2017): only positive contributions ``(x_i w_ij)^+`` (and ``b_j^+``) count.

    Same as AlphaBeta(1, 0). For non-negative inputs (after a ReLU) it costs one extra forward
    with the clamped weights and one input-gradient with them.
    """

    name: ClassVar[str] = "zplus"
    zero_bias: bool = False

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x = inputs[0]
        w_pos, b_pos = module.weight.clamp(min=0), _clamp(_bias(module, self.zero_bias), min=0)
        if _nonnegative(x):  # after a ReLU: one extra forward with the clamped weights
            terms: list[Term] = [(1.0, x, w_pos, b_pos)]
        else:
            terms = [(1.0, x.clamp(min=0), w_pos, b_pos), (1.0, x.clamp(max=0), module.weight.clamp(max=0), None)]
        # every z+ term is >= 0 (x+ w+, x- w-, b+), so the stabiliser is a plain + eps
        return terms, stabilize_(_terms_forward(module, terms), nonnegative=True)

    def backward(self, module, inputs, output, state, relevance):
        terms, den = state
        return (_terms_backward(module, inputs[0], terms, _divide(relevance, den)),)


@RULES.register("alpha_beta", "alphabeta")
@dataclass(eq=False)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): ``alpha`` x positive minus ``beta`` x negative shares.

    Positive and negative contributions ``(x_i w_ij)^+-`` (with ``b^+-``) are normalised
    separately; ``alpha - beta = 1`` keeps relevance conserved.
    """

    name: ClassVar[str] = "alpha_beta"
    alpha: float = 2.0
    beta: float = 1.0
    zero_bias: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ConfigError(
                f"LRP alpha-beta needs alpha, beta >= 0 with alpha - beta = 1, got alpha={self.alpha}, "
                f"beta={self.beta}; e.g. AlphaBeta(alpha=2, beta=1)"
            )

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x = inputs[0]
        bias = _bias(module, self.zero_bias)
        w_pos, w_neg = module.weight.clamp(min=0), module.weight.clamp(max=0)
        b_pos, b_neg = _clamp(bias, min=0), _clamp(bias, max=0)
        if _nonnegative(x):
            pos: list[Term] = [(1.0, x, w_pos, b_pos)]
            neg: list[Term] = [(1.0, x, w_neg, b_neg)]
        else:
            x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
            pos = [(1.0, x_pos, w_pos, b_pos), (1.0, x_neg, w_neg, None)]
            neg = [(1.0, x_pos, w_neg, b_neg), (1.0, x_neg, w_pos, None)]
        den_pos = stabilize_(_terms_forward(module, pos), nonnegative=True)
        den_neg = stabilize_(_terms_forward(module, neg)) if self.beta != 0 else None
        return pos, neg, den_pos, den_neg

    def backward(self, module, inputs, output, state, relevance):
        pos, neg, den_pos, den_neg = state
        x = inputs[0]
        r_pos = _terms_backward(module, x, pos, _divide(relevance, den_pos))
        if self.beta == 0:
            return (r_pos.mul_(self.alpha),)
        r_neg = _terms_backward(module, x, neg, _divide(relevance, den_neg))
        return (r_pos.mul_(self.alpha).sub_(r_neg, alpha=self.beta),)


@RULES.register("gamma")
@dataclass(eq=False)
class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019), generalised to any sign (Andeol et al. 2021) as zennit does.

    Positive outputs use contributions ``x_i w_ij + gamma (x_i w_ij)^+``, negative outputs
    ``x_i w_ij + gamma (x_i w_ij)^-``; relevance at outputs that are exactly zero is dropped.
    """

    name: ClassVar[str] = "gamma"
    gamma: float = 0.25
    zero_bias: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"LRP gamma must be a finite number >= 0, got {self.gamma!r}")

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x, w, g = inputs[0], module.weight, self.gamma
        bias = _bias(module, self.zero_bias)
        w_up, w_down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if bias is None else bias + g * bias.clamp(min=0)
        b_down = None if bias is None else bias + g * bias.clamp(max=0)
        if _nonnegative(x):
            pos: list[Term] = [(1.0, x, w_up, b_up)]
            neg: list[Term] = [(1.0, x, w_down, b_down)]
        else:
            x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
            pos = [(1.0, x_pos, w_up, b_up), (1.0, x_neg, w_down, None)]
            neg = [(1.0, x_pos, w_down, b_down), (1.0, x_neg, w_up, None)]
        return pos, neg, stabilize_(_terms_forward(module, pos)), stabilize_(_terms_forward(module, neg))

    def backward(self, module, inputs, output, state, relevance):
        pos, neg, den_pos, den_neg = state
        x = inputs[0]
        s_pos = (relevance * (output > 0)).div_(den_pos)
        s_neg = (relevance * (output < 0)).div_(den_neg)
        return (_terms_backward(module, x, pos, s_pos).add_(_terms_backward(module, x, neg, s_neg)),)


@RULES.register("zbox", "z_box", "box")
@dataclass(eq=False)
class ZBox(Rule):
    """LRP-z^B (Montavon et al. 2017) for the input layer of a bounded input domain.

    ``low``/``high`` are the lowest/highest possible inputs *in the model's input space* (after
    normalisation), floats or per-channel sequences/tensors. Contributions are
    ``x_i w_ij - low_i w_ij^+ - high_i w_ij^-`` (the bias cancels, as in zennit).
    """

    name: ClassVar[str] = "zbox"
    low: BoundLike = 0.0
    high: BoundLike = 1.0

    def __post_init__(self) -> None:
        lo = torch.as_tensor(self.low, dtype=torch.float64)
        hi = torch.as_tensor(self.high, dtype=torch.float64)
        if lo.dim() > 1 or hi.dim() > 1:
            raise ConfigError("ZBox low/high must be floats or per-channel 1-D sequences, e.g. low=[-2.1, -2.0, -1.8]")
        try:
            ordered = bool(torch.all(lo <= hi))
        except RuntimeError:
            raise ConfigError("ZBox low and high must have the same number of channels (or be floats)") from None
        if not ordered:
            raise ConfigError(
                f"ZBox needs low <= high everywhere, got low={_bound_to_json(self.low)}, "
                f"high={_bound_to_json(self.high)}"
            )

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x, w = inputs[0], module.weight
        low, high = _as_bound(self.low, x), _as_bound(self.high, x)
        terms: list[Term] = [(1.0, x, w, None), (-1.0, low, w.clamp(min=0), None), (-1.0, high, w.clamp(max=0), None)]
        return terms, stabilize_(_terms_forward(module, terms))

    def backward(self, module, inputs, output, state, relevance):
        terms, den = state
        return (_terms_backward(module, inputs[0], terms, _divide(relevance, den)),)


@RULES.register("flat")
@dataclass(eq=False)
class Flat(Rule):
    """LRP-flat (Lapuschkin et al. 2019): relevance spread uniformly over each output's receptive field.

    Contributions are 1 for every in-bounds connection (zero padding contributes nothing), so the
    map shows *where* the first layer looked, independent of the pixel values.
    """

    name: ClassVar[str] = "flat"

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x = inputs[0]
        ones_w = torch.ones_like(module.weight)
        z = linear_forward(module, torch.ones_like(x[:1]), ones_w, None)  # the same for every sample
        return ones_w, stabilize_(z, nonnegative=True)

    def backward(self, module, inputs, output, state, relevance):
        ones_w, den = state
        x, s = inputs[0], _divide(relevance, den)
        # With all-ones weights every input channel receives the same sum over output channels,
        # so (without groups) one single-channel transposed conv does it: C_out x C_in fewer FLOPs.
        if isinstance(module, nn.Linear):
            return (s.sum(-1, keepdim=True).expand_as(x).contiguous(),)
        if module.groups == 1:
            return (_ones_kernel_vjp(module, x, ones_w, s.sum(1, keepdim=True)).expand_as(x).contiguous(),)
        return (linear_vjp(module, x, ones_w, s),)


def _ones_kernel_vjp(module: nn.Module, x: Tensor, ones_w: Tensor, s: Tensor) -> Tensor:
    """``ones^T s`` for a single-channel ``s``: a box sum, computed as a sum-pool where possible.

    For a stride-1, undilated 2-D conv, the transposed all-ones convolution is a k x k window
    sum over ``s`` zero-padded by ``k - 1 - padding`` on each side; CPU pooling kernels do that
    several times faster than a transposed convolution with one channel.
    """
    if (
        isinstance(module, nn.Conv2d)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and tuple(module.stride) == (1, 1)
        and tuple(module.dilation) == (1, 1)
    ):
        (kh, kw), (ph, pw) = module.kernel_size, module.padding
        padded = F.pad(s, (kw - 1 - pw, kw - 1 - pw, kh - 1 - ph, kh - 1 - ph))
        return F.avg_pool2d(padded, (kh, kw), stride=1, divisor_override=1)
    return linear_vjp(module, x[:, :1], ones_w[:1, :1], s)


@RULES.register("wsquare", "w2", "w_square")
@dataclass(eq=False)
class WSquare(Rule):
    """LRP-w^2 (Montavon et al. 2017): contributions ``w_ij^2``, independent of the input values.

    Follows the paper (no bias in the denominator), so relevance is conserved exactly.
    """

    name: ClassVar[str] = "wsquare"

    def forward(self, module, inputs, output):
        _check_linear(self, module)
        x = inputs[0]
        w2 = module.weight.square()
        return w2, stabilize_(linear_forward(module, torch.ones_like(x[:1]), w2, None), nonnegative=True)

    def backward(self, module, inputs, output, state, relevance):
        w2, den = state
        return (linear_vjp(module, inputs[0], w2, _divide(relevance, den)),)


# ----------------------------------------------------------------------------- parameter-free rules


def _pool_vjp(module: nn.Module, inputs: tuple[Tensor, ...], grad: Tensor) -> tuple[Optional[Tensor], ...]:
    """Input gradients of a module that is linear in its inputs (pooling, sums), at ``grad``."""
    x = inputs[0]
    if isinstance(module, nn.AdaptiveAvgPool2d) and x.dim() == 4:
        return (torch.ops.aten._adaptive_avg_pool2d_backward(grad, x),)
    if isinstance(module, nn.AvgPool2d) and x.dim() == 4:
        return (
            torch.ops.aten.avg_pool2d_backward(
                grad,
                x,
                _pair(module.kernel_size),
                _pair(module.stride if module.stride is not None else module.kernel_size),
                _pair(module.padding),
                module.ceil_mode,
                module.count_include_pad,
                module.divisor_override,
            ),
        )
    if isinstance(module, Add) and all(isinstance(t, torch.Tensor) and t.shape == grad.shape for t in inputs):
        return tuple(grad for _ in inputs)  # d(a + b)/da = d(a + b)/db = identity
    with torch.enable_grad():  # anything else that is linear in its inputs: let autograd do it
        leaves = [
            t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs
        ]
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        out = module.forward(*leaves)
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    return tuple(next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


@RULES.register("norm", "sum", "avgpool")
@dataclass(eq=False)
class Norm(Rule):
    """Relevance in proportion to each input's contribution: ``R_i = x_i (dz/dx_i)^T (R / stab(z))``.

    For average pooling this is the epsilon rule with a pure stabiliser; for a residual sum
    ``z = a + b`` it gives ``R_a = a R / (a + b)`` and ``R_b = b R / (a + b)``. Any module that
    is linear in its inputs works; pooling and sums use their closed-form gradients.
    """

    name: ClassVar[str] = "norm"

    def backward(self, module, inputs, output, state, relevance):
        den = stabilize(output)
        grads = _pool_vjp(module, inputs, torch.div(relevance, den, out=den))
        return tuple(None if g is None else x * g for x, g in zip(inputs, grads))


@RULES.register("pass", "identity")
@dataclass(eq=False)
class Pass(Rule):
    """Relevance passes through unchanged (element-wise activations: ReLU, SiLU, sigmoid, ...)."""

    name: ClassVar[str] = "pass"

    def backward(self, module, inputs, output, state, relevance):
        return (relevance,)


@RULES.register("gate", "pass_first")
@dataclass(eq=False)
class Gate(Rule):
    """For a gating product ``x * gate``: all relevance to ``x``, none to the gate (treated as constant).

    The standard LRP treatment of multiplicative gates (Arras et al. 2017, SE blocks): the gate
    only modulates how much of ``x`` flows on, so relevance is conserved through ``x``.
    """

    name: ClassVar[str] = "gate"

    def backward(self, module, inputs, output, state, relevance):
        return (relevance,) + (None,) * (len(inputs) - 1)


def make_rule(spec: Union[str, Rule, dict[str, Any]]) -> Rule:
    """A Rule from an instance, a registry name (``"epsilon"``) or options (``{"rule": "gamma", "gamma": 0.5}``)."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        return RULES.get(spec)()
    if isinstance(spec, dict) and "rule" in spec:
        params = {k: v for k, v in spec.items() if k != "rule"}
        cls = RULES.get(spec["rule"])
        try:
            return cls(**params)
        except TypeError as exc:
            valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
            raise ConfigError(f"bad options {params} for LRP rule {cls.name}: {exc}; valid options: {valid}") from None
    raise ConfigError(f"cannot make an LRP rule from {spec!r}; pass a name such as 'epsilon' or a Rule instance")


__all__ = [
    "RULES",
    "Rule",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "ZBox",
    "Flat",
    "WSquare",
    "Norm",
    "Pass",
    "Gate",
    "apply_rule",
    "make_rule",
    "stabilize",
    "is_linear_layer",
    "linear_forward",
    "linear_vjp",
    "STABILIZER",
]
