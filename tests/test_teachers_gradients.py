"""Gradient-family teachers, Grad-CAM, Occlusion and post-processing against independent references:
captum 0.9 (same options), closed forms (IG on linear models, completeness) and scipy/numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from teachx.errors import ConfigError, DataError
from teachx.teachers.base import TEACHERS
from teachx.teachers.gradcam import GradCam
from teachx.teachers.gradients import (
    QUADRATURE_RULES,
    GradientXInput,
    IntegratedGradients,
    Saliency,
    quadrature,
)
from teachx.teachers.occlusion import Occlusion
from teachx.teachers.postprocess import normalize_maps, postprocess, reduce_channels, smooth_maps

captum_attr = pytest.importorskip("captum.attr")


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference within ``rel`` of the reference's largest |value|."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate reference"
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


# ----------------------------------------------------------------------------- against captum


@pytest.mark.parametrize("use_abs", [True, False])
def test_saliency_matches_captum(small_cnn, inputs, targets, use_abs):
    ours = Saliency(abs=use_abs).attribute(small_cnn, inputs, targets)
    ref = captum_attr.Saliency(small_cnn).attribute(inputs.clone(), target=targets, abs=use_abs)
    assert ours.dtype == torch.float32
    assert_close_to_ref(ours, ref)


def test_gradient_x_input_matches_captum(small_cnn, inputs, targets):
    ours = TEACHERS.get("gxi")().attribute(small_cnn, inputs, targets)
    ref = captum_attr.InputXGradient(small_cnn).attribute(inputs.clone(), target=targets)
    assert_close_to_ref(ours, ref)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
@pytest.mark.parametrize("baseline", ["zero", "tensor"])
def test_integrated_gradients_matches_captum(small_cnn, inputs, targets, method, baseline):
    base = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) if baseline == "tensor" else "zero"
    ours = IntegratedGradients(baseline=base, steps=16, method=method).attribute(small_cnn, inputs, targets)
    ref_base = base.expand_as(inputs) if isinstance(base, torch.Tensor) else torch.zeros_like(inputs)
    ref = captum_attr.IntegratedGradients(small_cnn).attribute(
        inputs.clone(), baselines=ref_base, target=targets, n_steps=16, method=method
    )
    assert_close_to_ref(ours, ref)


def test_integrated_gradients_trapezoid_is_captums_rescaled(small_cnn, inputs, targets):
    """captum's trapezoid weights sum to (n-1)/n; ours sum to 1 (same nodes), so ours*(n-1)/n == captum."""
    n = 12
    ours = IntegratedGradients(steps=n, method="riemann_trapezoid").attribute(small_cnn, inputs, targets)
    ref = captum_attr.IntegratedGradients(small_cnn).attribute(
        inputs.clone(), target=targets, n_steps=n, method="riemann_trapezoid"
    )
    assert_close_to_ref(ours * (n - 1) / n, ref)


def test_integrated_gradients_internal_batch_size_does_not_change_maps(small_cnn, inputs, targets):
    full = IntegratedGradients(steps=8).attribute(small_cnn, inputs, targets)
    for rows in (5, 13):
        chunked = IntegratedGradients(steps=8, internal_batch_size=rows).attribute(small_cnn, inputs, targets)
        assert_close_to_ref(chunked, full, rel=1e-6)


@pytest.mark.parametrize("layer,relu", [(None, True), (None, False), ("body.2", True)])
def test_gradcam_matches_captum(small_cnn, inputs, targets, layer, relu):
    module = small_cnn.body if layer is None else small_cnn.get_submodule(layer)
    ours = GradCam(layer=layer, relu=relu).attribute(small_cnn, inputs, targets)
    cam = captum_attr.LayerGradCam(small_cnn, module).attribute(inputs, target=targets, relu_attributions=relu)
    ref = captum_attr.LayerAttribution.interpolate(cam, (16, 16), "bilinear")  # (B, 1, H, W)
    # convention: each channel holds cam / C, so the channel sum is captum's map
    assert_close_to_ref(reduce_channels(ours, "sum"), ref)
    assert torch.allclose(ours[:, :1] * 3, ours.sum(1, keepdim=True), atol=1e-7)
    assert torch.equal(ours[:, 0], ours[:, 2])


@pytest.mark.parametrize("window,stride,baseline", [(4, 4, 0.0), (4, 2, 0.0), (5, 3, 0.5), (3, 1, -1.0)])
def test_occlusion_matches_captum(small_cnn, inputs, targets, window, stride, baseline):
    ours = Occlusion(window=window, stride=stride, baseline=baseline, internal_batch_size=37).attribute(
        small_cnn, inputs, targets
    )
    ref = captum_attr.Occlusion(small_cnn).attribute(
        inputs,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=baseline,
        target=targets,
        perturbations_per_eval=16,
    )
    # captum repeats the per-pixel value in every channel; ours spreads it evenly (value / C)
    assert_close_to_ref(ours * 3, ref)


def test_occlusion_rectangular_window_matches_captum(small_cnn, inputs, targets):
    ours = Occlusion(window=(3, 6), stride=(2, 5)).attribute(small_cnn, inputs, targets)
    ref = captum_attr.Occlusion(small_cnn).attribute(
        inputs, sliding_window_shapes=(3, 3, 6), strides=(3, 2, 5), target=targets
    )
    assert_close_to_ref(ours * 3, ref)


# ----------------------------------------------------------------------------- closed forms


class LinearModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(3 * 16 * 16, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(4, 3 * 16 * 16, generator=gen))
            self.linear.bias.copy_(torch.randn(4, generator=gen))

    def forward(self, x):
        return self.linear(self.flatten(x))


@pytest.mark.parametrize("method", sorted(QUADRATURE_RULES))
@pytest.mark.parametrize("steps", [2, 7, 32])
def test_integrated_gradients_linear_model_closed_form(inputs, method, steps):
    """On f(x) = Wx + b, IG = (x - baseline) * W[t] for any rule whose weights sum to 1."""
    model = LinearModel().double()
    x = inputs.double()
    baseline = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    ours = IntegratedGradients(baseline=baseline, steps=steps, method=method).attribute(model, x, target)
    expected = (x - baseline) * model.linear.weight[target].view(-1, 3, 16, 16)
    assert torch.allclose(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("method", sorted(QUADRATURE_RULES))
def test_quadrature_weights_sum_to_one_and_nodes_in_unit_interval(method):
    for steps in (2, 3, 10, 50):
        nodes, weights = quadrature(method, steps)
        assert len(nodes) == len(weights) == steps
        assert abs(weights.sum() - 1.0) < 1e-12
        assert nodes.min() >= 0.0 and nodes.max() <= 1.0


def test_gausslegendre_integrates_polynomials_exactly():
    nodes, weights = quadrature("gausslegendre", 5)
    for degree in range(10):  # exact up to degree 2n - 1
        assert abs((weights * nodes**degree).sum() - 1.0 / (degree + 1)) < 1e-12


def _path_derivative(model, x, baseline, target, alphas):
    """g(a) = grad f(b + a (x - b)) . (x - b), evaluated independently with plain autograd."""
    n, batch = len(alphas), x.shape[0]
    delta = x - baseline
    points = (baseline.unsqueeze(0) + alphas.view(-1, 1, 1, 1, 1) * delta.unsqueeze(0)).reshape(n * batch, *x.shape[1:])
    points.requires_grad_(True)
    out = model(points)[torch.arange(n * batch), target.repeat(n)].sum()
    (grad,) = torch.autograd.grad(out, points)
    return (grad.view(n, batch, -1) * delta.view(1, batch, -1)).sum(-1)  # (len(alphas), B)


def test_integrated_gradients_completeness_on_cnn(small_cnn, inputs, targets):
    """sum(IG) ~= f(x) - f(baseline); for the trapezoid rule on a piecewise-smooth path the error is
    at most h * TV(g), g the path derivative (TV estimated on a dense grid, h = 1/(steps-1))."""
    model = small_cnn.double()
    x = inputs.double()
    baseline = torch.zeros_like(x)
    with torch.no_grad():
        gap = (model(x) - model(baseline))[torch.arange(6), targets]
    dense = _path_derivative(model, x, baseline, targets, torch.linspace(0, 1, 513, dtype=torch.float64))
    total_variation = (dense[1:] - dense[:-1]).abs().sum(0)
    for steps in (8, 32, 128):
        ig = IntegratedGradients(steps=steps, method="riemann_trapezoid").attribute(model, x, targets)
        err = (ig.double().flatten(1).sum(1) - gap).abs()
        bound = total_variation / (steps - 1) + 1e-5 * gap.abs() + 1e-6
        assert torch.all(err <= bound), (steps, err, bound)
    ig = IntegratedGradients(steps=128, method="riemann_trapezoid").attribute(model, x, targets)
    assert torch.all((ig.double().flatten(1).sum(1) - gap).abs() <= 0.02 * gap.abs().max())


def test_integrated_gradients_completeness_on_smooth_model_gausslegendre(small_cnn_factory, inputs, targets):
    """With smooth activations (softplus, avg pooling) Gauss-Legendre converges fast: 32 steps ~ exact."""
    model = small_cnn_factory(seed=3)
    model.body[1] = nn.Softplus()
    model.body[2] = nn.AvgPool2d(2)
    model.body[4] = nn.Softplus()
    model = model.double()
    x = inputs.double()
    ig = IntegratedGradients(steps=32).attribute(model, x, targets)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x)))[torch.arange(6), targets]
    assert torch.allclose(ig.double().flatten(1).sum(1), gap, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_mean_baseline_is_per_image_channel_mean(small_cnn, inputs, targets):
    teacher = IntegratedGradients(baseline="mean", steps=8)
    base = teacher.baseline_for(inputs)
    assert torch.allclose(base[2, 1], inputs[2, 1].mean().expand(16, 16))
    explicit = IntegratedGradients(baseline=base[3:4].clone(), steps=8).attribute(small_cnn, inputs[3:4], targets[3:4])
    assert_close_to_ref(teacher.attribute(small_cnn, inputs, targets)[3:4], explicit, rel=1e-6)


def test_gradient_x_input_linear_bias_free_is_exact_decomposition(inputs):
    model = LinearModel()
    with torch.no_grad():
        model.linear.bias.zero_()
    target = torch.tensor([1, 0, 3, 2, 2, 1])
    maps = GradientXInput().attribute(model, inputs, target)
    logits = model(inputs)[torch.arange(6), target]
    assert torch.allclose(maps.flatten(1).sum(1), logits, rtol=1e-4, atol=1e-4)


def test_occlusion_linear_model_closed_form(inputs):
    """For f linear and non-overlapping windows, occluding a window drops f by sum_window (x - b) * w."""
    model = LinearModel()
    target = torch.tensor([1, 0, 3, 2, 2, 1])
    maps = Occlusion(window=4, baseline=0.25).attribute(model, inputs, target)
    contrib = ((inputs - 0.25) * model.linear.weight[target].view(-1, 3, 16, 16)).detach().sum(1)  # (B, H, W)
    per_window = torch.nn.functional.avg_pool2d(contrib.unsqueeze(1), 4) * 16  # window sums
    expected = torch.nn.functional.interpolate(per_window, scale_factor=4, mode="nearest")
    assert_close_to_ref(maps.sum(1, keepdim=True), expected, rel=1e-5)


# ----------------------------------------------------------------------------- options and errors


def test_options_are_json_and_distinguish_settings():
    tensor_a = torch.zeros(3, 16, 16)
    tensor_b = torch.zeros(3, 16, 16)
    tensor_b[0, 0, 0] = 1.0
    opts = [
        IntegratedGradients(baseline=tensor_a).options(),
        IntegratedGradients(baseline=tensor_b).options(),
        IntegratedGradients(baseline="mean", steps=8, method="riemann_left").options(),
        GradCam(layer="body.2").options(),
        Occlusion(window=(2, 3)).options(),
        Saliency(abs=False).options(),
    ]
    texts = [json.dumps(o, sort_keys=True) for o in opts]
    assert texts[0] != texts[1]
    assert json.loads(texts[2]) == {"baseline": "mean", "steps": 8, "method": "riemann_left"}
    assert IntegratedGradients(internal_batch_size=4).options() == IntegratedGradients().options()
    assert Occlusion(window=4).options() == {"window": [4, 4], "stride": [4, 4], "baseline": 0.0}


@pytest.mark.parametrize(
    "build",
    [
        lambda: IntegratedGradients(method="simpson"),
        lambda: IntegratedGradients(baseline="black"),
        lambda: IntegratedGradients(steps=0),
        lambda: IntegratedGradients(steps=1, method="riemann_trapezoid"),
        lambda: IntegratedGradients(internal_batch_size=0),
        lambda: Saliency(abs="yes"),
        lambda: GradCam(layer=3),
        lambda: Occlusion(window=0),
        lambda: Occlusion(stride=(1, 2, 3)),
        lambda: Occlusion(baseline="mean"),
        lambda: Occlusion(window=3, stride=4),
    ],
)
def test_bad_options_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_runtime_errors_are_one_line_and_user_fixable(small_cnn, inputs, targets):
    with pytest.raises(ConfigError, match="not a module"):
        GradCam(layer="body.9").attribute(small_cnn, inputs, targets)
    with pytest.raises(ConfigError, match="not a spatial map"):
        GradCam(layer="neck").attribute(small_cnn, inputs, targets)
    with pytest.raises(ConfigError, match="no 'body'"):
        GradCam().attribute(nn.Sequential(*small_cnn.body, *small_cnn.neck, small_cnn.classifier), inputs, targets)
    with pytest.raises(ConfigError, match="larger than"):
        Occlusion(window=17).attribute(small_cnn, inputs, targets)
    with pytest.raises(DataError, match="out of range"):
        Saliency().attribute(small_cnn, inputs, torch.full((6,), 5))
    with pytest.raises(DataError, match="one class index per input"):
        Saliency().attribute(small_cnn, inputs, torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match="floating-point"):
        Saliency().attribute(small_cnn, inputs.to(torch.uint8), targets)
    with pytest.raises(ConfigError, match="does not broadcast"):
        IntegratedGradients(baseline=torch.zeros(2, 16, 16)).attribute(small_cnn, inputs, targets)
    # a Sequential model's layer by name works for Grad-CAM
    seq = nn.Sequential(*small_cnn.body, *small_cnn.neck, small_cnn.classifier)
    assert_close_to_ref(
        GradCam(layer="4").attribute(seq, inputs, targets), GradCam().attribute(small_cnn, inputs, targets), rel=1e-6
    )


def test_int_target_broadcasts_and_no_grad_context_works(small_cnn, inputs):
    with torch.no_grad():
        a = Saliency().attribute(small_cnn, inputs, 2)
        c = GradCam().attribute(small_cnn, inputs, 2)
    b = Saliency().attribute(small_cnn, inputs, torch.full((6,), 2))
    assert torch.equal(a, b)
    assert c.abs().sum() > 0


def test_gradcam_works_with_frozen_parameters(small_cnn, inputs, targets):
    expected = GradCam().attribute(small_cnn, inputs, targets)
    for p in small_cnn.parameters():
        p.requires_grad_(False)
    assert torch.equal(GradCam().attribute(small_cnn, inputs, targets), expected)
    assert all(not p.requires_grad for p in small_cnn.parameters())


# ----------------------------------------------------------------------------- post-processing


@pytest.fixture
def maps():
    return torch.randn(4, 3, 9, 11, generator=torch.Generator().manual_seed(7))


def test_reduce_channels_against_numpy(maps):
    m = maps.numpy()
    expected = {
        "sum": m.sum(1, keepdims=True),
        "mean": m.mean(1, keepdims=True),
        "abs_sum": np.abs(m).sum(1, keepdims=True),
        "l2": np.sqrt((m**2).sum(1, keepdims=True)),
        "none": m,
    }
    for how, ref in expected.items():
        np.testing.assert_allclose(reduce_channels(maps, how).numpy(), ref, rtol=1e-6, atol=1e-6)


def test_normalize_maps_against_numpy_per_image(maps):
    m = maps.numpy().reshape(4, -1)
    a = np.abs(m)
    expected = {
        "none": m,
        "maxabs": m / a.max(1, keepdims=True),
        "l1": m / a.sum(1, keepdims=True),
        "std": m / m.std(1, keepdims=True),
        "minmax": (m - m.min(1, keepdims=True)) / (m.max(1, keepdims=True) - m.min(1, keepdims=True)),
        "percentile": np.clip(m / np.percentile(a, 90, axis=1, keepdims=True), -1, 1),
    }
    for how, ref in expected.items():
        out = normalize_maps(maps, how, percentile=90).numpy().reshape(4, -1)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=how)
    # per image: normalising one image alone gives the same result as in a batch
    assert torch.allclose(normalize_maps(maps[1:2], "std"), normalize_maps(maps, "std")[1:2])


def test_normalize_zero_and_constant_maps_give_zeros_not_nan():
    zeros = torch.zeros(2, 1, 4, 4)
    for how in ("maxabs", "l1", "std", "minmax", "percentile"):
        assert torch.equal(normalize_maps(zeros, how), zeros), how
    assert torch.equal(normalize_maps(torch.full((1, 1, 3, 3), 2.0), "minmax"), torch.zeros(1, 1, 3, 3))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3, 4.0])
def test_smooth_maps_matches_scipy_gaussian_filter(maps, sigma):
    ndimage = pytest.importorskip("scipy.ndimage")
    ref = ndimage.gaussian_filter(maps.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(smooth_maps(maps.double(), sigma).numpy(), ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(smooth_maps(maps, 0.0), maps)


def test_postprocess_defaults_and_order(maps):
    out = postprocess(maps)
    expected = maps.sum(1, keepdim=True)
    expected = expected / expected.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    assert out.shape == (4, 1, 9, 11)
    assert torch.allclose(out, expected, atol=1e-6)
    smoothed = postprocess(maps, reduce="mean", normalize="minmax", smooth=1.0)
    assert torch.allclose(smoothed, normalize_maps(smooth_maps(maps.mean(1, keepdim=True), 1.0), "minmax"))
    assert smoothed.amin() == 0 and smoothed.amax() == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"reduce": "max"}, {"normalize": "zscore"}, {"smooth": -1.0}, {"normalize": "percentile", "percentile": 0}],
)
def test_postprocess_bad_options_raise_config_error(maps, kwargs):
    with pytest.raises(ConfigError):
        postprocess(maps, **kwargs)


# ----------------------------------------------------------------------------- real backbones


@pytest.mark.parametrize("backbone", ["lenet5", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_gradient_family_on_teachx_backbones(backbone):
    """Default Grad-CAM layer ('body') and every method work on real backbones (BN in eval, residuals)."""
    models = pytest.importorskip("teachx.models")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build_model(backbone, in_channels=3, num_classes=10, image_size=32).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 4, 9])
    teachers = [Saliency(), GradientXInput(), IntegratedGradients(steps=4), GradCam(), Occlusion(window=16)]
    for teacher in teachers:
        maps = teacher.attribute(model, x, target)
        assert maps.shape == x.shape and maps.dtype == torch.float32 and torch.isfinite(maps).all()
        single = teacher.attribute(model, x[1:2], target[1:2])
        assert (single - maps[1:2]).abs().max() <= 1e-4 * maps.abs().max() + 1e-12, type(teacher).__name__
    ref = captum_attr.LayerGradCam(model, model.body).attribute(x, target=target, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(ref, (32, 32), "bilinear")
    ours = reduce_channels(GradCam().attribute(model, x, target), "sum")
    if ref.abs().max() > 0:
        assert_close_to_ref(ours, ref)
