"""LRP teacher: rules, composites and canonizers against an independent matrix-form reference.

The reference below is written from the rules' textbook definitions, layer by layer, with
explicit contribution tensors ``z_ij`` (im2col via ``F.unfold`` for convolutions, ``F.fold`` to
scatter relevance back, its own BatchNorm folding and its own rule table per composite), in
float64. It shares no code with ``teachx.teachers.lrp`` (which uses hooks and input-gradient
kernels), so agreement to ~1e-10 checks the hook implementation rule by rule.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.models.layers import Add, Mul
from teachx.teachers.base import TEACHERS
from teachx.teachers.lrp import (
    CANONIZERS,
    COMPOSITES,
    RULES,
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    Lrp,
    Norm,
    Pass,
    WSquare,
    ZBox,
    ZPlus,
    lrp_context,
)
from teachx.teachers.lrp.canonizers import MergeBatchNorm

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STAB = 1e-6  # the fixed stabiliser of all non-epsilon rules (zennit's default)


# ============================================================================ reference (matrix form)


def ref_stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def ref_rule(rule: tuple, x_cols, w, b, r, low_cols=None, high_cols=None, ones_cols=None):
    """Relevance of the input columns for one linear map, from explicit contributions.

    x_cols (B, K, L): input patches; w (O, K); b (O,) or None; r (B, O, L): output relevance.
    Returns (B, K, L). Contributions z[b, o, k, l] = x_cols[b, k, l] * w[o, k].
    """
    kind = rule[0]
    bias = torch.zeros(w.shape[0], dtype=DT) if b is None else b
    bias = bias.view(1, -1, 1)
    z = x_cols[:, None] * w[None, :, :, None]  # (B, O, K, L)

    def spread(contrib, den, rel):
        return (contrib * (rel / den)[:, :, None, :]).sum(1)

    if kind == "epsilon":
        return spread(z, ref_stab(z.sum(2) + bias, rule[1]), r)
    if kind == "zplus":
        zp = z.clamp(min=0)
        return spread(zp, ref_stab(zp.sum(2) + bias.clamp(min=0), STAB), r)
    if kind == "alpha_beta":
        alpha, beta = rule[1], rule[2]
        zp, zn = z.clamp(min=0), z.clamp(max=0)
        return alpha * spread(zp, ref_stab(zp.sum(2) + bias.clamp(min=0), STAB), r) - beta * spread(
            zn, ref_stab(zn.sum(2) + bias.clamp(max=0), STAB), r
        )
    if kind == "gamma":
        g = rule[1]
        out = z.sum(2) + bias
        z_up, z_down = z + g * z.clamp(min=0), z + g * z.clamp(max=0)
        den_up = ref_stab(z_up.sum(2) + bias + g * bias.clamp(min=0), STAB)
        den_down = ref_stab(z_down.sum(2) + bias + g * bias.clamp(max=0), STAB)
        return spread(z_up, den_up, r * (out > 0)) + spread(z_down, den_down, r * (out < 0))
    if kind == "zbox":
        zb = (
            z
            - low_cols[:, None] * w.clamp(min=0)[None, :, :, None]
            - high_cols[:, None] * w.clamp(max=0)[None, :, :, None]
        )
        return spread(zb, ref_stab(zb.sum(2), STAB), r)
    if kind == "flat":
        zf = ones_cols[:, None] * torch.ones_like(w)[None, :, :, None]
        return spread(zf, ref_stab(zf.sum(2), STAB), r)
    if kind == "wsquare":
        zw = ones_cols[:, None] * (w**2)[None, :, :, None]
        return spread(zw, ref_stab(zw.sum(2), STAB), r)
    raise AssertionError(kind)


def ref_bound_image(value, like):
    t = torch.as_tensor(value, dtype=DT)
    if t.dim() == 1:
        t = t.view(1, -1, *([1] * (like.dim() - 2)))
    return t.expand_as(like).clone()


def ref_dense(rule, x, w, b, r, low=None, high=None):
    cols = x[:, :, None]
    extra = {}
    if rule[0] == "zbox":
        extra = {"low_cols": ref_bound_image(low, x)[:, :, None], "high_cols": ref_bound_image(high, x)[:, :, None]}
    if rule[0] in ("flat", "wsquare"):
        extra = {"ones_cols": torch.ones_like(cols)}
    return ref_rule(rule, cols, w, b, r[:, :, None], **extra)[:, :, 0]


def ref_conv(rule, x, conv, w, b, r, low=None, high=None):
    """Conv via im2col, group by group; relevance folded back (overlaps summed)."""
    groups = conv.groups
    cin_g, cout_g = x.shape[1] // groups, w.shape[0] // groups
    geometry = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    out = []
    for g in range(groups):
        xg = x[:, g * cin_g : (g + 1) * cin_g]
        cols = F.unfold(xg, **geometry)
        wg = w[g * cout_g : (g + 1) * cout_g].reshape(cout_g, -1)
        bg = None if b is None else b[g * cout_g : (g + 1) * cout_g]
        rg = r[:, g * cout_g : (g + 1) * cout_g].reshape(r.shape[0], cout_g, -1)
        extra = {}
        if rule[0] == "zbox":
            extra = {
                "low_cols": F.unfold(ref_bound_image(low, x)[:, g * cin_g : (g + 1) * cin_g], **geometry),
                "high_cols": F.unfold(ref_bound_image(high, x)[:, g * cin_g : (g + 1) * cin_g], **geometry),
            }
        if rule[0] in ("flat", "wsquare"):
            extra = {"ones_cols": F.unfold(torch.ones_like(xg), **geometry)}
        rc = ref_rule(rule, cols, wg, bg, rg, **extra)
        out.append(F.fold(rc, output_size=x.shape[-2:], **geometry))
    return torch.cat(out, 1)


def ref_avgpool(x, r, kernel):
    """Average pooling as a linear map with weights 1/k^2 per window; Norm rule (stabiliser only)."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel, stride=kernel).reshape(b, c, kernel[0] * kernel[1], -1)
    z = cols / (kernel[0] * kernel[1])
    den = ref_stab(z.sum(2), STAB)
    rc = z * (r.reshape(b, c, 1, -1) / den[:, :, None])
    return F.fold(rc.reshape(b, -1, rc.shape[-1]), x.shape[-2:], kernel, stride=kernel)


def ref_maxpool(x, r, kernel):
    """Winner takes all: the relevance of a window goes to its maximum."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel, stride=kernel).reshape(b, c, kernel[0] * kernel[1], -1)
    idx = cols.argmax(2, keepdim=True)
    rc = torch.zeros_like(cols).scatter(2, idx, r.reshape(b, c, 1, -1))
    return F.fold(rc.reshape(b, -1, rc.shape[-1]), x.shape[-2:], kernel, stride=kernel)


def merged_params(layer, bn):
    """The reference's own BatchNorm folding: W' = W g / sqrt(v + e), b' = (b - m) g / sqrt(v + e) + beta."""
    w, b = layer.weight.detach(), layer.bias
    b = torch.zeros(w.shape[0], dtype=DT) if b is None else b.detach()
    if bn is None:
        return w, (None if layer.bias is None else b)
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * k.view(-1, *([1] * (w.dim() - 1))), (b - bn.running_mean) * k + bn.bias.detach()


class ResSEBlock(nn.Module):
    """relu(Add(Mul(h, se_gate(h)), x)) with h = relu(bn(conv(x))): a residual sum and an SE gate."""

    def __init__(self, channels: int, squeeze: int = 2, act=nn.ReLU):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), act())
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeeze, 1),
            nn.ReLU(),
            nn.Conv2d(squeeze, channels, 1),
            nn.Sigmoid(),
        )
        self.mul = Mul()
        self.add = Add()
        self.act = act()

    def forward(self, x):
        h = self.branch(x)
        return self.act(self.add(self.mul(h, self.se(h)), x))


class Reference:
    """Walks a model's layers (Sequential order) and applies the composite's rules in matrix form."""

    def __init__(self, composite: str, epsilon=1e-6, gamma=0.25, low=None, high=None, residual=True):
        eps, ab, gam = ("epsilon", epsilon), ("alpha_beta", 2.0, 1.0), ("gamma", gamma)
        table = {  # composite -> (first-layer rule or None, first-layer applies to dense too?, conv rule, dense rule)
            "epsilon": (None, False, eps, eps),
            "epsilon_plus": (None, False, ("zplus",), eps),
            "epsilon_plus_flat": (("flat",), True, ("zplus",), eps),
            "epsilon_gamma_box": (("zbox",), False, gam, eps),
            "epsilon_alpha2_beta1": (None, False, ab, eps),
            "epsilon_alpha2_beta1_flat": (("flat",), True, ab, eps),
            "gamma": (None, False, gam, gam),
            "zplus": (None, False, ("zplus",), ("zplus",)),
        }
        self.first, self.first_dense, self.conv_rule, self.dense_rule = table[composite]
        self.low, self.high, self.residual = low, high, residual
        self.first_seen = False

    def rule_for(self, layer):
        is_conv = isinstance(layer, nn.Conv2d)
        if not self.first_seen and self.first is not None and (is_conv or self.first_dense):
            self.first_seen = True
            return self.first
        return self.conv_rule if is_conv else self.dense_rule

    # --- forward: a list of (kind, module, params, input) steps
    def plan(self, layers):
        """Group (linear, BatchNorm) pairs and assign rules in module order (first layer first)."""
        steps, i = [], 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d) else None
                w, b = merged_params(layer, bn)
                steps.append(("linear", layer, (w, b, self.rule_for(layer))))
                i += 2 if bn is not None else 1
                continue
            if isinstance(layer, ResSEBlock):
                inner = self.plan(list(layer.branch))
                self.plan(list(layer.se))  # consumes rule positions like the implementation; gets no relevance
                steps.append(("resse", layer, inner))
            else:
                steps.append(("other", layer, None))
            i += 1
        return steps

    def run(self, model, x, target):
        steps = self.plan(list(model))
        with torch.no_grad():
            out, trace = self.forward(steps, x)
            r = torch.zeros_like(out).scatter(1, target.view(-1, 1), out.gather(1, target.view(-1, 1)))
            return self.backward(steps, trace, r)

    def forward(self, steps, x):
        trace = []
        for kind, layer, params in steps:
            trace.append(x)
            if kind == "linear":
                w, b, _ = params
                x = (
                    F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
                    if isinstance(layer, nn.Conv2d)
                    else F.linear(x, w, b)
                )
            elif kind == "resse":
                h, inner_trace = self.forward(params, x)
                gated = h * layer.se(h)
                trace[-1] = (x, h, inner_trace, gated)
                x = torch.relu(gated + x)
            else:
                x = layer(x)
        return x, trace

    def backward(self, steps, trace, r):
        for (kind, layer, params), x in zip(reversed(steps), reversed(trace)):
            if kind == "linear":
                w, b, rule = params
                if isinstance(layer, nn.Conv2d):
                    r = ref_conv(rule, x, layer, w, b, r, self.low, self.high)
                else:
                    r = ref_dense(rule, x, w, b, r, self.low, self.high)
            elif kind == "resse":
                x_in, h, inner_trace, gated = x
                total = gated + x_in
                if self.residual:
                    s = r / ref_stab(total, STAB)  # proportional split of the sum
                    r_gated, r_skip = gated * s, x_in * s
                else:
                    r_gated, r_skip = r, r  # plain gradient of a sum copies relevance to both
                r = self.backward(params, inner_trace, r_gated) + r_skip  # gate: all relevance to h
            elif isinstance(layer, nn.MaxPool2d):
                r = ref_maxpool(x, r, (layer.kernel_size,) * 2)
            elif isinstance(layer, nn.AvgPool2d):
                r = ref_avgpool(x, r, (layer.kernel_size,) * 2)
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                r = ref_avgpool(x, r, tuple(x.shape[-2:]))
            elif isinstance(layer, nn.Flatten):
                r = r.reshape(x.shape)
            elif isinstance(layer, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Dropout, nn.Identity)):
                pass  # activations pass relevance through
            else:
                raise AssertionError(f"reference cannot handle {layer}")
        return r


# ============================================================================ test models


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=gen, dtype=DT))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=DT))
            m.weight.data.copy_(1.0 + 0.3 * torch.randn(c, generator=gen, dtype=DT))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=gen, dtype=DT))
    return model


def zero_biases(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.bias.data.zero_()
    return model


def make_mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(16, 12, bias=bias),
            nn.ReLU(),
            nn.Linear(12, 10, bias=bias),
            nn.ReLU(),
            nn.Linear(10, 5, bias=bias),
        )
        .to(DT)
        .eval()
    )


def make_cnn(seed=0, bias=True):
    """conv-BN-relu-maxpool, conv(stride 1, dilation)-BN-relu6-avgpool, depthwise conv-relu, dense-relu-dense."""
    torch.manual_seed(seed)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=bias),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=2, dilation=2, bias=bias),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 10, bias=bias),
            nn.ReLU(),
            nn.Linear(10, 5, bias=bias),
        )
        .to(DT)
        .eval()
    )
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed + 100))


def make_resse(seed=0, bias=True):
    torch.manual_seed(seed)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=bias),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            ResSEBlock(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 5, bias=bias),
        )
        .to(DT)
        .eval()
    )
    if not bias:
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.data.zero_()
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed + 100))


MODELS = {"mlp": (make_mlp, (3, 1, 4, 4)), "cnn": (make_cnn, (3, 3, 8, 8)), "resse": (make_resse, (3, 3, 8, 8))}
BOX = dict(input_low=[-2.0, -2.5, -1.5], input_high=[2.5, 2.0, 3.0])


def make_inputs(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


TARGET = torch.tensor([0, 3, 4])
SCALE = 1e3  # conservation tests: makes the fixed 1e-6 stabilisers negligible
ALL_COMPOSITES = [
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "gamma",
    "zplus",
]


# ============================================================================ reference agreement


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("composite", ALL_COMPOSITES)
def test_matches_matrix_reference(model_name, composite):
    make, shape = MODELS[model_name]
    model, x = make(), make_inputs(shape)
    box = BOX if composite == "epsilon_gamma_box" else {}
    if model_name == "mlp" and box:
        box = dict(input_low=-2.0, input_high=2.5)
    teacher = Lrp(composite, **box)
    got = teacher.attribute(model, x, TARGET)
    ref = Reference(composite, low=box.get("input_low"), high=box.get("input_high")).run(model, x, TARGET)
    assert got.shape == x.shape and got.dtype == DT
    scale = float(ref.abs().max())
    assert scale > 1e-7 and torch.count_nonzero(ref) > ref.numel() // 4  # not a vacuous comparison
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9 * scale)


def single_layer_cases():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1).to(DT)
    grouped = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2).to(DT)
    unit_stride = nn.Conv2d(3, 5, (3, 5), padding=(0, 1)).to(DT)
    dense = nn.Linear(7, 5).to(DT)
    return {
        "conv": (conv, (2, 4, 7, 7)),
        "grouped_conv": (grouped, (2, 4, 5, 5)),
        "dense": (dense, (2, 7)),
        "unit_stride_conv": (unit_stride, (2, 3, 6, 7)),
    }


RULE_CASES = [
    (Epsilon(1e-6), ("epsilon", 1e-6)),
    (Epsilon(0.25), ("epsilon", 0.25)),
    (ZPlus(), ("zplus",)),
    (AlphaBeta(2, 1), ("alpha_beta", 2.0, 1.0)),
    (AlphaBeta(1, 0), ("alpha_beta", 1.0, 0.0)),
    (Gamma(0.25), ("gamma", 0.25)),
    (Gamma(1.0), ("gamma", 1.0)),
    (Flat(), ("flat",)),
    (WSquare(), ("wsquare",)),
    (ZBox(-3.0, 3.0), ("zbox",)),
]


@pytest.mark.parametrize("layer_name", ["conv", "grouped_conv", "unit_stride_conv", "dense"])
@pytest.mark.parametrize("rule,ref", RULE_CASES, ids=[repr(r) for r, _ in RULE_CASES])
@pytest.mark.parametrize("sign", ["mixed", "nonnegative"])
def test_single_layer_rule_matches_reference(layer_name, rule, ref, sign):
    """Each rule on one layer, for inputs of both signs (general path) and >= 0 (the fast path)."""
    layer, shape = single_layer_cases()[layer_name]
    x = make_inputs(shape, seed=3)
    if sign == "nonnegative":
        x = x.clamp(min=0)
    r_out = make_inputs((shape[0],) + tuple(layer(x).shape[1:]), seed=4)
    with lrp_context(layer, Composite([((nn.Conv2d, nn.Linear), rule)])):
        xg = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(layer(xg), xg, r_out)
    kwargs = {"low": -3.0, "high": 3.0}
    if isinstance(layer, nn.Conv2d):
        want = ref_conv(ref, x, layer, layer.weight.detach(), layer.bias.detach(), r_out, **kwargs)
    else:
        want = ref_dense(ref, x, layer.weight.detach(), layer.bias.detach(), r_out, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_epsilon_zero_equals_gradient_times_input_for_bias_free_relu_net():
    """Closed form: LRP-0 on a bias-free ReLU/max-pool network is exactly gradient x input."""
    model = zero_biases(make_cnn())
    model[7] = nn.MaxPool2d(2)  # average pooling would add its (1e-6) stabiliser
    x = make_inputs((3, 3, 8, 8))
    got = Lrp("epsilon", epsilon=0.0).attribute(model, x, TARGET)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, TARGET.view(-1, 1)).sum(), xg)
    torch.testing.assert_close(got, grad * x, rtol=1e-9, atol=1e-12)


# ============================================================================ conservation


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "zplus", "gamma", "epsilon_gamma_box"])
def test_conservation_without_biases(model_name, composite):
    """sum(R_in) == target logit when nothing (no bias, epsilon -> 0) absorbs relevance.

    Inputs are scaled up so the fixed 1e-6 stabilisers are negligible next to the activations.
    (Alpha-beta is left out: where an output has no negative contribution its beta share is
    dropped, so it does not conserve by design.)
    """
    make, shape = MODELS[model_name]
    model, x = make(bias=False), SCALE * make_inputs(shape)
    zero_biases(model)
    box = dict(input_low=-SCALE * 5, input_high=SCALE * 5) if composite == "epsilon_gamma_box" else {}
    relevance = Lrp(composite, epsilon=1e-12, **box).attribute(model, x, TARGET)
    logits = model(x).gather(1, TARGET.view(-1, 1)).squeeze(1)
    # the 1e-6 stabilisers of z+/gamma/pooling still shift sums by ~1e-6 relative per layer
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits.detach(), rtol=2e-5, atol=1e-9)


def test_layerwise_conservation_with_biases():
    """At every Linear/Conv layer: sum(R_in) == sum(R_out * (z - b) / stab(z)), the bias's share removed."""
    model, x = make_cnn(), make_inputs((3, 3, 8, 8))
    eps = 1e-3
    records = []

    def capture(module, args, output):
        entry = {"module": module, "input": args[0], "output": output.detach()}
        args[0].register_hook(lambda g: entry.__setitem__("r_in", g))
        output.register_hook(lambda g: entry.__setitem__("r_out", g))
        records.append(entry)

    teacher = Lrp("epsilon", epsilon=eps, canonizers=("merge_batchnorm",))
    with teacher.context(model):
        handles = [m.register_forward_hook(capture) for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        seed = torch.zeros_like(out).scatter(1, TARGET.view(-1, 1), out.gather(1, TARGET.view(-1, 1)).detach())
        torch.autograd.grad(out, xg, seed)
        biases = [e["module"].bias.detach().clone() for e in records]
        for h in handles:
            h.remove()
    assert len(records) == 5
    for entry, bias in zip(records, biases):
        z = entry["output"]
        b = bias.view(1, -1, *([1] * (z.dim() - 2)))
        expected = (entry["r_out"] * (z - b) / ref_stab(z, eps)).flatten(1).sum(1)
        torch.testing.assert_close(entry["r_in"].flatten(1).sum(1), expected, rtol=1e-9, atol=1e-12)


def test_residual_canonizer_conserves_and_plain_gradient_does_not():
    model, x = make_resse(bias=False), SCALE * make_inputs((3, 3, 8, 8))
    zero_biases(model)
    logits = model(x).gather(1, TARGET.view(-1, 1)).squeeze(1).detach()
    with_canonizer = Lrp("epsilon", epsilon=1e-12).attribute(model, x, TARGET)
    torch.testing.assert_close(with_canonizer.flatten(1).sum(1), logits, rtol=2e-5, atol=1e-9)
    # without it, the sum's plain gradient copies relevance into both branches (and the gate's
    # gradient leaks relevance into the SE branch): the total is no longer the logit
    without = Lrp("epsilon", epsilon=1e-12, canonizers=("merge_batchnorm",)).attribute(model, x, TARGET)
    assert not torch.allclose(without.flatten(1).sum(1), logits, rtol=1e-2)


def test_residual_split_is_proportional():
    add = Add()
    a, b = make_inputs((2, 3), seed=7), make_inputs((2, 3), seed=8)
    r = make_inputs((2, 3), seed=9)
    canonizer = CANONIZERS.get("residual")()
    with lrp_context(add, Composite([]), [canonizer]):
        ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ra, rb = torch.autograd.grad(add(ag, bg), (ag, bg), r)
    torch.testing.assert_close(ra, a * r / ref_stab(a + b, STAB))
    torch.testing.assert_close(rb, b * r / ref_stab(a + b, STAB))
    torch.testing.assert_close(ra + rb, r * (a + b) / ref_stab(a + b, STAB))


def test_gate_passes_all_relevance_to_the_gated_input():
    mul = Mul()
    x, gate = make_inputs((2, 4), seed=7), torch.rand(2, 4, dtype=DT)
    r = make_inputs((2, 4), seed=9)
    with lrp_context(mul, Composite([]), [CANONIZERS.get("residual")()]):
        xg, gg = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
        rx, rg = torch.autograd.grad(mul(xg, gg), (xg, gg), r, allow_unused=True)
    torch.testing.assert_close(rx, r)
    assert rg is None or torch.count_nonzero(rg) == 0


# ============================================================================ batch-norm canonizer


def test_merge_batchnorm_same_outputs_and_restores_parameters():
    model = make_cnn().float()
    x = make_inputs((3, 3, 8, 8)).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {name: p for name, p in model.named_parameters()}
    expected = model(x)
    restore = MergeBatchNorm().apply(model)
    try:
        merged = model(x)
        bn = model[1]
        assert torch.equal(bn(x[:, :1].expand(3, 6, 8, 8)), x[:, :1].expand(3, 6, 8, 8))  # BN is the identity
    finally:
        restore()
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert "forward" not in vars(model[1])
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_merge_batchnorm_bias_free_conv_gets_and_loses_bias():
    conv = nn.Conv2d(2, 3, 3, bias=False).to(DT)
    bn = randomize_batchnorm(nn.BatchNorm2d(3).to(DT), torch.Generator().manual_seed(0))
    model = nn.Sequential(conv, bn).eval()
    x = make_inputs((2, 2, 5, 5))
    expected = model(x)
    restore = MergeBatchNorm().apply(model)
    assert conv.bias is not None
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    restore()
    assert conv.bias is None and "bias" in conv._parameters
    assert torch.equal(model(x), expected)


# ============================================================================ model left untouched


def test_attribute_leaves_model_untouched():
    model = make_resse()
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.requires_grad_(False)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    x = make_inputs((3, 3, 8, 8))
    Lrp("epsilon_plus_flat").attribute(model, x, TARGET)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert "forward" not in vars(m)


def test_hooks_removed_even_when_forward_fails():
    model = make_cnn()
    with pytest.raises(RuntimeError):
        Lrp("epsilon").attribute(model, make_inputs((2, 3, 5, 5)), torch.tensor([0, 1]))  # wrong size
    assert all(not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    assert model[0].weight.shape == (6, 3, 3, 3) and torch.isfinite(model[0].weight).all()


def test_attribute_works_under_no_grad_and_with_int_target():
    model, x = make_mlp(), make_inputs((3, 1, 4, 4))
    with torch.no_grad():
        got = Lrp("epsilon").attribute(model, x, 2)
    want = Lrp("epsilon").attribute(model, x, torch.tensor([2, 2, 2]))
    torch.testing.assert_close(got, want)


# ============================================================================ options, registries, errors


def test_registered_names_and_options_are_json():
    assert "lrp" in TEACHERS and TEACHERS.get("lrp") is Lrp
    assert set(ALL_COMPOSITES) <= set(COMPOSITES.names())
    assert {"merge_batchnorm", "residual"} <= set(CANONIZERS.names())
    assert {"epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare", "norm", "pass", "gate"} <= set(
        RULES.names()
    )
    teacher = Lrp("epsilon_gamma_box", input_low=torch.tensor([-1.0, -2.0]), input_high=[1.0, 2.0])
    opts = json.loads(json.dumps(teacher.options()))
    assert opts == {
        "composite": "epsilon_gamma_box",
        "canonizers": ["merge_batchnorm", "residual"],
        "input_low": [-1.0, -2.0],
        "input_high": [1.0, 2.0],
        "epsilon": 1e-6,
        "gamma": 0.25,
    }
    assert Lrp().options()["composite"] == "epsilon_plus_flat"
    custom = Lrp(Composite([((nn.Linear,), Epsilon(0.1))]))
    json.dumps(custom.options())
    assert custom.options()["composite_spec"]["layer_map"][0]["epsilon"] == 0.1


def test_user_errors_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'epsilon_plus'"):
        Lrp("epsilon_plsu")
    with pytest.raises(ConfigError, match="input_low and input_high"):
        Lrp("epsilon_gamma_box")
    with pytest.raises(ConfigError, match="unknown LRP canonizer"):
        Lrp(canonizers=("merge_bachnorm",))
    with pytest.raises(ConfigError, match="epsilon must be a number"):
        Lrp(epsilon="small")
    with pytest.raises(ConfigError, match="gamma must be a number"):
        Lrp("gamma", gamma=-1.0)
    with pytest.raises(ConfigError, match="float or one float per channel"):
        Lrp("epsilon_gamma_box", input_low="low", input_high=1.0)
    with pytest.raises(ConfigError, match="alpha - beta = 1"):
        AlphaBeta(alpha=2, beta=2)
    with pytest.raises(ConfigError, match="low <= high"):
        ZBox(low=1.0, high=0.0)
    with pytest.raises(ConfigError, match="Linear or Conv"):
        with lrp_context(nn.Sequential(nn.ReLU()), Composite([((nn.ReLU,), Epsilon())])) as m:
            m(torch.randn(2, 3))


def test_pass_and_norm_rules_directly():
    """Pass is the identity; Norm on average pooling spreads relevance in proportion to inputs."""
    pool = nn.AvgPool2d(2)
    x = make_inputs((2, 3, 4, 4)).abs()
    r = make_inputs((2, 3, 2, 2), seed=5)
    with lrp_context(pool, Composite([((nn.AvgPool2d,), Norm())])):
        xg = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(pool(xg), xg, r)
    torch.testing.assert_close(got, ref_avgpool(x, r, (2, 2)))
    act = nn.SiLU()
    with lrp_context(act, Composite([((nn.SiLU,), Pass())])):
        xg = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(act(xg), xg, x)
    torch.testing.assert_close(got, x)


# ============================================================================ teachx backbones


@pytest.mark.parametrize("name", ["lenet5", "mobilenet", "resnet18", "resnet_cifar", "efficientnet_b0"])
def test_backbones_run_and_conserve(name):
    """Every teachx backbone: relevance sums to the target logit once biases are zero (float64)."""
    from teachx.models import build_model

    torch.manual_seed(0)
    kwargs = {"alpha": 0.25} if name == "mobilenet" else {}
    size = 32 if name == "lenet5" else 16
    model = build_model(name, 3, 4, size, **kwargs).to(DT)
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # untrained BN kills most units; give it plausible statistics
            m.running_var.copy_(0.05 + 0.1 * torch.rand(m.num_features, generator=gen, dtype=DT))
            m.weight.data.copy_(1.0 + 0.2 * torch.rand(m.num_features, generator=gen, dtype=DT))
    zero_biases(model)
    model.eval()
    x = make_inputs((2, 3, size, size))
    target = torch.tensor([1, 3])
    logits = model(x).gather(1, target.view(-1, 1)).squeeze(1).detach()
    assert logits.abs().min() > 1e-6
    relevance = Lrp("epsilon", epsilon=1e-12).attribute(model, x, target)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    # average pooling and residual sums keep a 1e-6 stabiliser, hence the loose-ish tolerance
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits, rtol=1e-4, atol=1e-8)
    default = Lrp().attribute(model, x, target)
    assert torch.isfinite(default).all() and default.abs().sum() > 0


# ============================================================================ zennit agreement


def _zennit():
    try:
        import zennit.composites  # noqa: F401
        import zennit.torchvision  # noqa: F401
    except Exception as exc:  # zennit imports torchvision, which does not import here
        pytest.skip(f"zennit is not importable: {type(exc).__name__}")
    import zennit

    return zennit


@pytest.mark.parametrize(
    "composite", ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box"]
)
def test_agrees_with_zennit(composite):
    zennit = _zennit()
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm

    model, x = make_cnn(), make_inputs((3, 3, 8, 8))
    kwargs = {}
    ours_kwargs = {}
    if composite == "epsilon_gamma_box":
        low = torch.tensor(BOX["input_low"], dtype=DT).view(1, 3, 1, 1).expand(1, 3, 8, 8)
        high = torch.tensor(BOX["input_high"], dtype=DT).view(1, 3, 1, 1).expand(1, 3, 8, 8)
        kwargs = {"low": low, "high": high}
        ours_kwargs = BOX
    comp = zennit.composites.COMPOSITES[composite](canonizers=[SequentialMergeBatchNorm()], **kwargs)
    with Gradient(model=model, composite=comp) as attributor:
        out, theirs = attributor(
            x, lambda o: torch.zeros_like(o).scatter(1, TARGET.view(-1, 1), o.gather(1, TARGET.view(-1, 1)))
        )
    ours = Lrp(composite, canonizers=("merge_batchnorm",), **ours_kwargs).attribute(model, x, TARGET)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_math_sanity_of_reference():
    """The reference itself: LRP-0 on one dense layer without bias is x * w[target]."""
    w = make_inputs((3, 4), seed=11)
    x = make_inputs((2, 4), seed=12)
    r = torch.zeros(2, 3, dtype=DT)
    r[:, 1] = x @ w[1]
    got = ref_dense(("epsilon", 0.0), x, w, None, r)
    torch.testing.assert_close(got, x * w[1])
    assert math.isclose(float(got.sum()), float((x @ w[1]).sum()), rel_tol=1e-12)
