"""Backbones: shapes, published parameter counts, module conventions, specs and the adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from teachx.errors import CheckpointError, ConfigError
from teachx.models import MODELS, Add, Backbone, Mul, StochasticDepth, adapt, build_from_spec, build_model, model_spec

torch.set_num_threads(1)

NAMES = ["lenet5", "mobilenet", "efficientnet_b0", "efficientnet_b2", "resnet18", "resnet_cifar"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_body_hw(name: str, h: int, w: int) -> tuple[int, int]:
    """Closed forms: LeNet conv/pool arithmetic; others ceil(s / 8) small (<= 64 px), ceil(s / 32) otherwise."""
    if name == "lenet5":
        pad = 2 if min(h, w) < 32 else 0
        return tuple(((s + 2 * pad - 4) // 2 - 4) // 2 for s in (h, w))  # type: ignore[return-value]
    if name == "resnet_cifar":  # stride 1, 2, 2 at every input size
        return math.ceil(h / 4), math.ceil(w / 4)
    factor = 8 if max(h, w) <= 64 else 32
    return math.ceil(h / factor), math.ceil(w / factor)


# ---- registry and shapes -------------------------------------------------------------------


def test_registry_names_and_aliases():
    assert set(NAMES) <= set(MODELS.names())
    assert MODELS.canonical("mobilenet_v1") == "mobilenet"
    assert build_model("MobileNet_V1", 3, 10, 32, alpha=0.25).spec["name"] == "mobilenet"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64, 96, (28, 40)])
def test_shapes_and_head_composition(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 7, size).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, channels, h, w)
    with torch.no_grad():
        spatial = model.body(x)
        feats = model.features(x)
        logits = model(x)
    assert isinstance(model, Backbone)
    assert (model.in_channels, model.num_classes) == (channels, 7)
    assert spatial.shape[:2] == (2, spatial.shape[1]) and spatial.shape[2:] == expected_body_hw(name, h, w)
    assert feats.shape == (2, model.feature_dim)
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, model.classifier(feats), atol=1e-6)
    assert torch.allclose(feats, model.neck(spatial), atol=1e-6)
    assert model.feature_layer is model.body


def test_feature_dims():
    dims = {name: build_model(name, 3, 10, 32).feature_dim for name in NAMES}
    assert dims == {
        "lenet5": 84,
        "mobilenet": 1024,
        "efficientnet_b0": 1280,
        "efficientnet_b2": 1408,
        "resnet18": 512,
        "resnet_cifar": 64,
    }
    assert build_model("mobilenet", 3, 10, 32, alpha=0.5).feature_dim == 512


def test_backward_reaches_input_and_all_parameters():
    torch.manual_seed(0)
    model = build_model("efficientnet_b0", 3, 5, 32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


# ---- parameter counts against published figures ---------------------------------------------


@pytest.mark.parametrize(
    "name,channels,classes,size,expected",
    [
        ("lenet5", 1, 10, 32, 61_706),  # LeCun et al. 1998 layout, 1-ch 32x32
        ("lenet5", 1, 10, 28, 61_706),  # padding=2 keeps the 32x32 geometry
        ("mobilenet", 3, 1000, 224, 4_231_976),  # Keras MobileNet trainable params (paper: 4.2M)
        ("efficientnet_b0", 3, 1000, 224, 5_288_548),  # torchvision docs (paper: 5.3M)
        ("efficientnet_b2", 3, 1000, 260, 9_109_994),  # torchvision docs (paper: 9.2M)
        ("resnet18", 3, 10, 32, 11_173_962),  # CIFAR ResNet-18
        ("resnet18", 3, 1000, 224, 11_689_512),  # torchvision docs
    ],
)
def test_parameter_counts(name, channels, classes, size, expected):
    assert n_params(build_model(name, channels, classes, size)) == expected


def cifar_resnet_params(depth: int, width: int = 16, channels: int = 3, classes: int = 10) -> int:
    """Closed form: conv3x3 (no bias) + BN (2 per channel) per layer, conv1x1-BN shortcuts, linear head."""
    n = (depth - 2) // 6
    conv_bn = lambda i, o, k: k * k * i * o + 2 * o  # noqa: E731
    total, c = conv_bn(channels, width, 3), width
    for out in (width, 2 * width, 4 * width):
        for b in range(n):
            total += conv_bn(c, out, 3) + conv_bn(out, out, 3) + (conv_bn(c, out, 1) if c != out else 0)
            c = out
    return total + c * classes + classes


@pytest.mark.parametrize("depth,width", [(8, 16), (20, 16), (32, 16), (14, 32)])
def test_cifar_resnet_parameter_counts(depth, width):
    model = build_model("resnet_cifar", 3, 10, 32, depth=depth, width=width)
    assert n_params(model) == cifar_resnet_params(depth, width)
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]) + 1 == depth


def test_cifar_resnet_20_matches_the_paper():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A: the shortcuts add none);
    # ours uses conv1x1-BN shortcuts at the two stage changes: 32*16 + 2*32 + 64*32 + 2*64 = 2,752 more
    assert n_params(build_model("resnet20", 3, 10, 32)) == 269_722 + 2_752


@pytest.mark.parametrize("depth", [7, 9, 0, True])
def test_cifar_resnet_rejects_bad_depth(depth):
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnet_cifar", 3, 10, 32, depth=depth)


def test_small_input_strides_keep_parameter_count():
    for name in ("mobilenet", "efficientnet_b0"):
        assert n_params(build_model(name, 3, 10, 32)) == n_params(build_model(name, 3, 10, 224))
    # the papers' rounding: MobileNet alpha scales widths by int(w * alpha) (Keras)
    assert n_params(build_model("mobilenet", 3, 1000, 224)) == pytest.approx(4.23e6, rel=2e-3)


# ---- module conventions ----------------------------------------------------------------------

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh)
ALLOWED_OWNERS = ACTIVATIONS + (Add, Mul)
POINTWISE = {
    "relu",
    "relu6",
    "hardtanh",
    "silu",
    "sigmoid",
    "tanh",
    "gelu",
    "elu",
    "leaky_relu",
    "hardswish",
    "add",
    "__add__",
    "__radd__",
    "__iadd__",
    "mul",
    "__mul__",
    "__rmul__",
    "__imul__",
    "sub",
    "__sub__",
}


class OpRecorder(TorchFunctionMode):
    """Records torch calls made outside activation/Add/Mul modules, and in-place calls anywhere."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.stray: list[str] = []
        self.inplace: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or (kwargs or {}).get("inplace"):
            self.inplace.append(name)
        if self.depth == 0 and name in POINTWISE:
            self.stray.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,size", [(n, 32) for n in NAMES] + [("resnet18", 96), ("efficientnet_b0", 96)])
def test_conventions(name, size):
    torch.manual_seed(0)
    model = build_model(name, 3, 4, size, **({"drop_path": 0.2} if name.startswith("eff") else {})).eval()
    calls: dict[int, int] = {}
    recorder = OpRecorder()
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1)))
        if isinstance(module, ALLOWED_OWNERS):
            handles.append(
                module.register_forward_pre_hook(lambda m, i: setattr(recorder, "depth", recorder.depth + 1))
            )
            handles.append(module.register_forward_hook(lambda m, i, o: setattr(recorder, "depth", recorder.depth - 1)))
    with torch.no_grad(), recorder:
        model(torch.randn(2, 3, size, size))
    for h in handles:
        h.remove()
    # each module instance runs at most once per forward
    assert max(calls.values()) == 1
    # activations, residual sums and gates happen only inside their modules; nothing in place
    assert recorder.stray == [], recorder.stray
    assert recorder.inplace == [], recorder.inplace
    for module in model.modules():
        assert getattr(module, "inplace", False) is False
    # every BatchNorm2d directly follows the Conv2d feeding it, inside one Sequential
    n_bn = 0
    for parent in model.modules():
        children = list(parent.children())
        for i, child in enumerate(children):
            if isinstance(child, nn.BatchNorm2d):
                n_bn += 1
                assert isinstance(parent, nn.Sequential) and i > 0
                assert isinstance(children[i - 1], nn.Conv2d)
                assert children[i - 1].out_channels == child.num_features
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_adds = sum(isinstance(m, Add) for m in model.modules())
    n_muls = sum(isinstance(m, Mul) for m in model.modules())
    expected_adds = {
        "lenet5": 0,
        "mobilenet": 0,
        "efficientnet_b0": 9,
        "efficientnet_b2": 16,
        "resnet18": 8,
        "resnet_cifar": 9,
    }
    expected_muls = {"efficientnet_b0": 16, "efficientnet_b2": 23}
    assert n_adds == expected_adds[name] and n_muls == expected_muls.get(name, 0)


def test_recorder_catches_functional_ops():
    """The convention test above would fail on a functional ReLU or an inline residual sum."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv(x)) + x
            y *= 2
            return nn.functional.relu6(y, inplace=True)

    bad, recorder = Bad(), OpRecorder()
    with torch.no_grad(), recorder:
        bad(torch.randn(1, 3, 8, 8))
    assert {"relu", "add"} <= set(recorder.stray)
    assert recorder.inplace == ["mul_", "relu6"]


# ---- determinism, specs, options --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_seeded_construction_is_deterministic(name):
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        states.append(build_model(name, 3, 10, 32).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0] if states[0][k].is_floating_point())


@pytest.mark.parametrize(
    "name,options",
    [
        ("lenet5", {"activation": "tanh", "pool": "avg"}),
        ("mobilenet", {"alpha": 0.5, "dropout": 0.1}),
        ("efficientnet_b2", {"drop_path": 0.1}),
        ("resnet18", {"small_input": False}),
    ],
)
def test_spec_round_trip(name, options):
    torch.manual_seed(0)
    model = build_model(name, 1, 3, (28, 36), **options).eval()
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec["name"] == name and spec["image_size"] == [28, 36]
    assert None not in spec["options"].values()  # auto values are stored resolved
    rebuilt = build_from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 36)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert model_spec(rebuilt) == model_spec(model)


def test_bad_names_options_and_specs():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_model("resnet19", 3, 10, 32)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        build_model("mobilenet", 3, 10, 32, alpah=0.5)
    for bad in [dict(alpha=0), dict(alpha="big"), dict(dropout=1.0), dict(small_input="yes")]:
        with pytest.raises(ConfigError):
            build_model("mobilenet", 3, 10, 32, **bad)
    with pytest.raises(ConfigError):
        build_model("lenet5", 3, 10, 32, activation="swish")
    with pytest.raises(ConfigError):
        build_model("lenet5", 3, 10, 12, padding=0)
    for args in [(0, 10, 32), (3, 0, 32), (3, 10, (32,)), (3, 10, "32")]:
        with pytest.raises(ConfigError):
            build_model("resnet18", *args)
    with pytest.raises(ConfigError, match="no spec"):
        model_spec(adapt(SmallUserCNN()))
    with pytest.raises(CheckpointError):
        build_from_spec({"name": "resnet18"})
    with pytest.raises(CheckpointError):
        build_from_spec(
            {"name": "resnet18", "in_channels": 3, "num_classes": 10, "image_size": [32, 32], "options": {"depth": 50}}
        )


def test_lenet_layout():
    model = build_model("lenet5", 1, 10, 28)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(2, 2), (0, 0)] and [c.out_channels for c in convs] == [6, 16]
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert build_model("lenet5", 1, 10, 96).neck[1].in_features == 16 * 21 * 21


def test_stochastic_depth():
    layer = StochasticDepth(0.5)
    x = torch.ones(64, 2, 3, 3)
    assert layer.eval()(x) is x
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))
    per_sample = a.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    # off by default, and eval mode is deterministic with it on
    model = build_model("efficientnet_b0", 3, 10, 32)
    assert not any(isinstance(m, StochasticDepth) for m in model.modules())
    model = build_model("efficientnet_b0", 3, 10, 32, drop_path=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# ---- adapter ------------------------------------------------------------------------------------


class SmallUserCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(24, 8)
        self.act3 = nn.Tanh()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.act3(self.hidden(torch.flatten(self.pool(h), 1))))


def _manual(net: SmallUserCNN, x: torch.Tensor):
    """The same computation written out by hand."""
    conv2_out = net.conv2(torch.relu(net.conv1(x)))
    pooled = nn.functional.adaptive_avg_pool2d(torch.relu(conv2_out), 2)
    return conv2_out, torch.tanh(net.hidden(torch.flatten(pooled, 1)))


def test_adapter_on_user_cnn():
    torch.manual_seed(0)
    net = SmallUserCNN()
    model = adapt(net)
    x = torch.randn(3, 2, 10, 12)
    conv2_out, feats = _manual(net, x)
    assert (model.in_channels, model.num_classes, model.feature_dim) == (2, 5, 8)
    assert model.classifier is net.fc and model.feature_layer is net.conv2
    assert torch.allclose(model(x), net(x))
    assert torch.allclose(model.features(x), feats, atol=1e-6)
    assert torch.allclose(model.classifier(model.features(x)), model(x), atol=1e-6)
    assert torch.allclose(model.body(x), conv2_out, atol=1e-6)
    # neck(h) really is a function of h: gradients w.r.t. h match the manual composition
    h = model.body(x).detach().requires_grad_(True)
    (g_adapted,) = torch.autograd.grad(model.neck(h).square().sum(), h)
    h2 = h.detach().requires_grad_(True)
    manual_neck = torch.tanh(net.hidden(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(h2), 2), 1)))
    (g_manual,) = torch.autograd.grad(manual_neck.square().sum(), h2)
    assert torch.allclose(g_adapted, g_manual, atol=1e-6)
    # no hooks left behind, parameters not double counted
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert n_params(model) == n_params(net)
    # replacing the head replaces it inside the wrapped module
    model.classifier = nn.Linear(8, 2)
    assert net.fc is model.classifier and model.num_classes == 2 and model(x).shape == (3, 2)


def test_adapter_explicit_names_and_errors():
    net = SmallUserCNN()
    model = adapt(net, classifier="fc", feature_layer="act1")
    assert model.body(torch.randn(1, 2, 8, 8)).shape == (1, 4, 8, 8)
    with pytest.raises(ConfigError, match="not a submodule"):
        adapt(net, classifier="head")
    with pytest.raises(ConfigError, match="in_features"):
        adapt(net, classifier="act3")
    with pytest.raises(ConfigError, match="no nn.Conv2d"):
        adapt(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ConfigError, match="body"):
        adapt(SmallUserCNN()).neck(torch.randn(1, 6, 4, 4))


@pytest.mark.parametrize("library,name", [("torchvision", "resnet18"), ("timm", "resnet18")])
def test_external_models(library, name):
    try:
        __import__(library)
    except Exception:  # noqa: BLE001 - not importable here: a clear ConfigError
        with pytest.raises(ConfigError, match=f"install it .*{library}"):
            build_model(f"{library}:{name}", 1, 7, 32)
        return
    model = build_model(f"{library}:{name}", 1, 7, 32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert torch.allclose(model.classifier(model.features(x)), model(x), atol=1e-5)


def test_gradcam_defaults_to_the_adapted_models_feature_layer():
    from teachx.teachers.gradcam import GradCam

    torch.manual_seed(0)
    net = SmallUserCNN().eval()
    model = adapt(net)  # feature layer: the last Conv2d, conv2 (the adapter's body is not run by forward)
    x = torch.randn(3, 2, 8, 8)
    target = torch.tensor([0, 4, 2])
    cam = GradCam().layer_cam(model, x, target)
    # by hand: A = conv2 output, weights = spatial mean of d logit_t / dA, ReLU(sum_k w_k A_k)
    a = net.conv2(torch.relu(net.conv1(x))).detach().requires_grad_(True)
    logits = net.fc(torch.tanh(net.hidden(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(a), 2), 1))))
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    expected = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-6)
