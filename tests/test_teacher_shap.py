"""DeepShap and ExpectedGradients against shap 0.51, closed forms and completeness."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from teachx.errors import ConfigError, DataError
from teachx.teachers.base import TEACHERS
from teachx.teachers.shap import DeepShap, ExpectedGradients

shap = pytest.importorskip("shap")
from shap.explainers._deep import deep_pytorch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def shap_knows_relu6_and_silu():
    """shap 0.51 has no ReLU6/SiLU handler (it would use a plain gradient); register the rescale rule."""
    saved = dict(deep_pytorch.op_handler)
    deep_pytorch.op_handler["ReLU6"] = deep_pytorch.nonlinear_1d
    deep_pytorch.op_handler["SiLU"] = deep_pytorch.nonlinear_1d
    yield
    deep_pytorch.op_handler.clear()
    deep_pytorch.op_handler.update(saved)


def shap_deep(model, background, x, target):
    """shap.DeepExplainer's values for class target[i] of each input (B, C, H, W)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = shap.DeepExplainer(model, background).shap_values(x, check_additivity=False)
    values = np.asarray(values)
    return torch.from_numpy(np.stack([values[i, ..., int(t)] for i, t in enumerate(target)]))


def assert_close_to_shap(ours, ref, rel=1e-5):
    """max |ours - shap| <= rel * max |shap| (the brief's acceptance criterion)."""
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours - ref).abs().max().item() <= rel * scale, ((ours - ref).abs().max().item(), scale)


def logit_gap(model, x, background, target):
    """f(x)_t - mean_k f(b_k)_t: what DeepSHAP attributions must sum to."""
    with torch.no_grad():
        return model(x).gather(1, target.view(-1, 1))[:, 0] - model(background)[:, target].mean(0)


# ----------------------------------------------------------------------------- small test models


class PoolResidualNet(nn.Module):
    """conv-BN-ReLU-maxpool, a residual Add around conv-ReLU6, ELU/LeakyReLU/Softplus, Tanh head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2, self.act2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU6()
        self.conv3, self.act3 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ELU()
        self.conv4, self.act4 = nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1)
        self.conv5, self.act5 = nn.Conv2d(8, 8, 1), nn.Softplus()
        self.pool2, self.flat = nn.AvgPool2d(3), nn.Flatten()
        self.drop = nn.Dropout(0.5)
        self.fc1, self.act6, self.fc2 = nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5)

    def forward(self, x):
        h = self.pool1(self.act1(self.bn1(self.conv1(x))))
        h = h + self.act2(self.conv2(h))
        h = self.act5(self.conv5(self.act4(self.conv4(self.act3(self.conv3(h))))))
        return self.fc2(self.act6(self.fc1(self.drop(self.flat(self.pool2(h))))))


class SqueezeExciteNet(nn.Module):
    """Residual + squeeze-and-excitation (SiLU, Sigmoid, elementwise product) as in EfficientNet."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.se1, self.se_act, self.se2, self.gate = nn.Conv2d(8, 4, 1), nn.SiLU(), nn.Conv2d(4, 8, 1), nn.Sigmoid()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        u = self.act2(self.conv2(h))
        u = u * self.gate(self.se2(self.se_act(self.se1(self.squeeze(u)))))
        h = h + u
        return self.fc(torch.flatten(self.pool(h), 1))


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def data(batch=4, background=8, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(background, 3, size, size, generator=g)


@pytest.mark.parametrize("net", [PoolResidualNet, SqueezeExciteNet])
def test_deepshap_matches_shap_deep_explainer(net):
    """In float64 (these random nets cancel a lot: in float32 both sit ~1e-5 apart from rounding)."""
    torch.manual_seed(0)
    model = randomise_bn(net()).double()
    x, bg = (t.double() for t in data())
    target = torch.tensor([0, 1, 2, 3])
    ours = DeepShap(bg).attribute(model, x, target)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert_close_to_shap(ours, shap_deep(model, bg, x, target), rel=1e-6)


def test_deepshap_completeness_without_products():
    """sum(phi) == f(x)_t - mean_k f(b_k)_t; float64 so rounding does not hide a missing term."""
    torch.manual_seed(0)
    model = randomise_bn(PoolResidualNet()).double()
    x, bg = (t.double() for t in data())
    target = torch.tensor([4, 3, 2, 1])
    ours = DeepShap(bg).attribute(model, x, target).double()  # float32 maps: sum in float64
    gap = logit_gap(model, x, bg, target)
    torch.testing.assert_close(ours.sum((1, 2, 3)), gap, rtol=1e-5, atol=1e-6 * gap.abs().max().item())


def test_deepshap_chunking_gives_the_same_values():
    torch.manual_seed(0)
    model = randomise_bn(PoolResidualNet())
    x, bg = data(batch=5, background=7)
    target = torch.tensor([0, 1, 2, 3, 4])
    full = DeepShap(bg).attribute(model, x, target)
    for batch_size in (3, 7, 14, 1000):  # splits the background, one input, two inputs, all
        torch.testing.assert_close(
            DeepShap(bg, batch_size=batch_size).attribute(model, x, target),
            full,
            rtol=1e-5,
            atol=1e-6 * full.abs().max().item(),
        )


def test_deepshap_functional_activation_warns_and_follows_shap():
    """F.relu is invisible to shap's module hooks: both give it the plain gradient; we warn."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 10 * 10, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = Functional().eval()
    x, bg = data()
    target = torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="no rescale rule for 'relu'"):
        ours = DeepShap(bg).attribute(model, x, target)
    assert_close_to_shap(ours, shap_deep(model, bg, x, target))


def test_deepshap_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = PoolResidualNet()
    randomise_bn(model).train()
    model.fc2.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    x, bg = data()
    ours = DeepShap(bg).attribute(model, x, 1)
    assert all(m.training for m in model.modules())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    # explained in eval mode (BN running stats, no dropout): same as an eval-mode call
    torch.testing.assert_close(ours, DeepShap(bg).attribute(model.eval(), x, 1))


def test_deepshap_options_registry_and_errors():
    _, bg = data()
    teacher = DeepShap(bg)
    options = json.loads(json.dumps(teacher.options()))
    assert options["background_size"] == 8 and len(options["background_sha256"]) == 64
    assert DeepShap(bg + 1).options() != options
    assert TEACHERS.get("deepshap") is DeepShap and TEACHERS.get("shap") is DeepShap
    with pytest.raises(DataError):
        DeepShap(torch.zeros(0, 3, 4, 4))
    with pytest.raises(ConfigError):
        DeepShap(bg, batch_size=0)
    with pytest.raises(DataError, match="background images have shape"):
        DeepShap(bg).attribute(PoolResidualNet().eval(), torch.zeros(2, 3, 16, 16), 0)

    class Chunked(nn.Module):  # two tensors out of one op: refused rather than silently wrong
        def forward(self, x):
            a, b = torch.chunk(x.flatten(1), 2, dim=1)
            return a[:, :3] * b[:, :3]

    class BatchMixing(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] - x.mean()

    for model in (Chunked(), BatchMixing()):
        with pytest.raises(ConfigError, match="DeepShap"):
            DeepShap(bg).attribute(model, bg[:2], 0)


# ----------------------------------------------------------------------------- the project's backbones


def backbone(name, **options):
    try:
        from teachx.models import build_model
    except ImportError:
        from teachx.models import lenet, mobilenet  # noqa: F401  (registers the models)
        from teachx.models._common import MODELS

        return lambda *a: MODELS.get(name)(*a, **options)
    return lambda *a: build_model(name, *a, **options)


def trained(model, steps=3, size=32, seed=0):
    """Random init plus a few SGD steps so ReLUs are not degenerate; eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # batch-norm statistics of the trained weights (a few steps leave them near their init and
    # can make a deep net's eval output constant): cumulative averages over a few batches
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "name,options", [("lenet5", {}), ("mobilenet", {"alpha": 0.25}), ("resnet_cifar", {"depth": 8})]
)
@pytest.mark.slow
def test_deepshap_matches_shap_on_backbones(name, options):
    torch.manual_seed(0)
    model = trained(backbone(name, **options)(3, 10, (32, 32)))
    x, bg = data(batch=4, background=8, size=32, seed=2)
    with torch.no_grad():
        target = model(x).argmax(1)
    ours = DeepShap(bg).attribute(model, x, target)
    assert_close_to_shap(ours, shap_deep(model, bg, x, target))
    gap = logit_gap(model, x, bg, target)
    assert gap.abs().min() > 1e-3  # the model is not degenerate
    torch.testing.assert_close(ours.sum((1, 2, 3)), gap, rtol=1e-4, atol=1e-5 * gap.abs().max().item())


# ----------------------------------------------------------------------------- expected gradients


def expected_gradients_reference(model, x, background, target, index, alpha, noise=None):
    """Per-sample (x - b) * grad f(b + a (x - b)) for given draws, one autograd call per input."""
    samples = []
    for i in range(x.shape[0]):
        xs = x[i].expand((index.shape[1],) + x.shape[1:])
        if noise is not None:
            xs = xs + noise[i]
        b = background[index[i]]
        a = alpha[i].float().view(-1, 1, 1, 1)
        points = (a * xs + (1 - a) * b).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(points)[:, target[i]].sum(), points)
        samples.append(grad * (xs - b))
    return torch.stack(samples)  # (B, n, C, H, W)


def test_expected_gradients_linear_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).eval()
    x, bg = data(batch=3, background=6, size=5)
    target = torch.tensor([0, 3, 1])
    teacher = ExpectedGradients(bg, n_samples=17, seed=3)
    index, _, _ = teacher.draws(x)
    w = model[1].weight[target].view(3, 3, 5, 5)
    expected = (x - bg[index].mean(1)) * w  # gradient is constant: only the sampled b matter
    torch.testing.assert_close(teacher.attribute(model, x, target), expected, rtol=1e-5, atol=1e-6)
    one = bg[:1]
    torch.testing.assert_close(
        ExpectedGradients(one, n_samples=5).attribute(model, x, target), (x - one) * w, rtol=1e-5, atol=1e-6
    )


def smooth_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()


def test_expected_gradients_equals_its_definition_for_the_drawn_samples():
    model = smooth_cnn()
    x, bg = data(batch=3, background=5, size=8)
    target = torch.tensor([2, 0, 1])
    teacher = ExpectedGradients(bg, n_samples=40, seed=7, local_smoothing=0.1, batch_size=50)
    index, alpha, noise = teacher.draws(x)
    ref = expected_gradients_reference(model, x, bg, target, index, alpha, noise).mean(1)
    ours = teacher.attribute(model, x, target)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(teacher.attribute(model, x, target), ours, rtol=0, atol=0)  # seeded
    assert not torch.equal(ExpectedGradients(bg, n_samples=40, seed=8).attribute(model, x, target), ours)
    assert json.loads(json.dumps(teacher.options()))["n_samples"] == 40
    assert TEACHERS.get("gradientshap") is ExpectedGradients


def test_expected_gradients_agrees_with_shap_gradient_explainer_and_is_complete_in_expectation():
    model = smooth_cnn()
    x, bg = data(batch=2, background=6, size=8)
    target = torch.tensor([1, 2])
    n = 1500
    teacher = ExpectedGradients(bg, n_samples=n, seed=0)
    ours = teacher.attribute(model, x, target)
    index, alpha, _ = teacher.draws(x)
    samples = expected_gradients_reference(model, x, bg, target, index, alpha)
    se = samples.std(1) / n**0.5  # standard error of one estimate, per element

    explainer = shap.GradientExplainer(model, bg)
    ranked = [explainer.shap_values(x[i : i + 1], nsamples=n, rseed=i) for i in range(2)]
    ref = torch.from_numpy(np.stack([np.asarray(r)[0, ..., int(t)] for r, t in zip(ranked, target)])).float()
    # two independent estimates of the same expectation: the difference has sd sqrt(2) * se
    z = (ours - ref).abs() / (2**0.5 * se + 1e-12)
    assert (z < 4).float().mean() > 0.99 and z.max() < 6, z.max()
    # completeness holds in expectation: sum(phi) - gap is a mean of n draws of a bounded variable
    gap = logit_gap(model, x, bg, target)
    sum_se = samples.sum((2, 3, 4)).std(1) / n**0.5
    assert ((ours.sum((1, 2, 3)) - gap).abs() < 4 * sum_se + 1e-6).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teachers_run_on_the_inputs_device():
    torch.manual_seed(0)
    model = randomise_bn(PoolResidualNet())
    x, bg = data()
    target = torch.tensor([0, 1, 2, 3])
    for teacher in (DeepShap(bg), ExpectedGradients(bg, n_samples=16)):
        cpu = teacher.attribute(model, x, target)
        gpu = teacher.attribute(model.cuda(), x.cuda(), target.cuda())
        model.cpu()
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4 * cpu.abs().max().item())


def test_deepshap_handles_channels_last_activations():
    """Regression: 1-channel images permuted from NHWC make convs emit channels_last activations."""
    from teachx.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", 1, 10, (28, 28)).eval()
    x = torch.randn(8, 28, 28, 1).permute(0, 3, 1, 2)  # as the data pipeline builds 1-channel batches
    bg = torch.randn(10, 1, 28, 28)
    bg[0] = x[0]  # one identical (input, background) pair in 80: the sparse |x - b| < eps fallback path
    target = torch.arange(8) % 10
    ref = DeepShap(bg).attribute(model, x.clone(memory_format=torch.contiguous_format), target)
    cl_model = build_model("lenet5", 1, 10, (28, 28)).eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    got = DeepShap(bg).attribute(cl_model, x.contiguous(memory_format=torch.channels_last), target)
    assert torch.allclose(got, ref, atol=1e-6 * ref.abs().max().item())
