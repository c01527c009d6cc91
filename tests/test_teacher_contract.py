"""The shared teacher contract, run against EVERY registered teacher (captum-style shared tests).

A new method inherits these tests by registering in ``TEACHERS``; if its constructor needs
options (a background set, a seed...), add a row to ``CASES``. Checks: shape/dtype/device,
batch independence, determinism, model left untouched (parameters, grads, requires_grad,
train/eval mode, hooks, monkey-patched forwards), inputs untouched, target respected, works
under ``torch.no_grad()``, and JSON-able ``options()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

from teachx.teachers.base import TEACHERS, Teacher

# The package __init__ imports every teacher module; import the known ones too, defensively, so
# these tests also run while a module is still missing (a module that exists but fails to import
# is an error, not a skip).
for _module in (
    "teachx.teachers",
    "teachx.teachers.gradients",
    "teachx.teachers.gradcam",
    "teachx.teachers.occlusion",
    "teachx.teachers.bcos",
    "teachx.teachers.shap",
    "teachx.teachers.lrp",
):
    try:
        _found = importlib.util.find_spec(_module) is not None
    except ModuleNotFoundError:
        _found = False
    if _found:
        importlib.import_module(_module)


def _background() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(11))


@dataclass
class Case:
    """How to build a teacher for these tests, and which contract items it is known to miss."""

    options: Callable[[], dict[str, Any]] = dict
    model: Callable[[], nn.Module] | None = None  # the model explained instead of conftest's SmallCNN
    known_gaps: dict[str, str] = field(default_factory=dict)  # test name -> reason (xfail, not strict)


def _bcos_network() -> nn.Module:
    """A small seeded B-cos ResNet (3 -> 5 classes, with its normalisation layers), in eval mode."""
    from teachx.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model("bcos_resnet", 3, 5, 16, depth=8, width=4).eval()


CASES: dict[str, Case] = {
    "integrated_gradients": Case(lambda: {"steps": 8}),
    "occlusion": Case(lambda: {"window": 4, "internal_batch_size": 40}),
    "deepshap": Case(lambda: {"background": _background()}),
    "expected_gradients": Case(lambda: {"background": _background(), "n_samples": 16, "seed": 0}),
    "bcos": Case(model=_bcos_network),  # explains B-cos networks only
}

NAMES = TEACHERS.names()


def build(name: str) -> Teacher:
    case = CASES.get(name, Case())
    return TEACHERS.get(name)(**case.options())


def maybe_xfail(name: str, check: str) -> None:
    reason = CASES.get(name, Case()).known_gaps.get(check)
    if reason:
        pytest.xfail(f"{name}: {reason}")


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "classes": {k: type(m) for k, m in model.named_modules()},
    }


def hooks_left(model: nn.Module) -> list[str]:
    """Every hook (module, parameter or global) and instance-level forward override still installed."""
    found = []
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if "hook" in attr and isinstance(value, dict) and value:
                found.append(f"{name or '<model>'}.{attr}")
        if "forward" in vars(module):
            found.append(f"{name or '<model>'}.forward (patched on the instance)")
    for name, param in model.named_parameters():
        if getattr(param, "_backward_hooks", None):
            found.append(f"parameter {name} tensor hooks")
    import torch.nn.modules.module as module_mod

    for attr in dir(module_mod):
        if attr.startswith("_global") and "hook" in attr:
            value = getattr(module_mod, attr)
            if isinstance(value, dict) and value:
                found.append(f"global {attr}")
    return found


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture
def small_cnn(request, small_cnn):
    """conftest's SmallCNN, or the model a teacher's case names (a teacher for one kind of network)."""
    name = request.getfixturevalue("name") if "name" in request.fixturenames else None
    factory = CASES.get(name, Case()).model if name else None
    return factory() if factory is not None else small_cnn


def test_registry_has_the_gradient_family():
    for expected in ("saliency", "gradient_x_input", "integrated_gradients", "gradcam", "occlusion"):
        assert expected in NAMES
    assert TEACHERS.canonical("ig") == "integrated_gradients"
    assert TEACHERS.canonical("gxi") == "gradient_x_input"


def test_shape_dtype_device(name, small_cnn, inputs, targets):
    maps = build(name).attribute(small_cnn, inputs, targets)
    assert isinstance(maps, torch.Tensor)
    assert maps.shape == inputs.shape
    assert maps.dtype == torch.float32
    assert maps.device == inputs.device
    assert not maps.requires_grad
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0, "all-zero maps on a non-degenerate model"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_device(name, small_cnn, inputs, targets):
    teacher = build(name)
    cpu = teacher.attribute(small_cnn, inputs, targets)
    gpu = teacher.attribute(small_cnn.cuda(), inputs.cuda(), targets.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert_close(gpu.cpu(), cpu, rel=1e-4)


def test_batch_independence(name, small_cnn, inputs, targets):
    maybe_xfail(name, "batch_independence")
    teacher = build(name)
    batched = teacher.attribute(small_cnn, inputs, targets)
    singles = torch.cat(
        [teacher.attribute(small_cnn, inputs[i : i + 1], targets[i : i + 1]) for i in range(len(inputs))]
    )
    assert_close(batched, singles, rel=1e-5)


def test_determinism(name, small_cnn, inputs, targets):
    maybe_xfail(name, "determinism")
    first = build(name).attribute(small_cnn, inputs, targets)
    torch.manual_seed(12345)  # a teacher must not depend on the global RNG state
    second = build(name).attribute(small_cnn, inputs, targets)
    assert_close(first, second, rel=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_model_left_untouched(name, small_cnn, inputs, targets, mode):
    model = small_cnn
    if mode == "train":
        model.train()
    elif mode == "mixed":
        model.train()
        model.body[0].eval()
        model.classifier.weight.requires_grad_(False)  # partly frozen, as in fine-tuning
        first = next(model.body[0].parameters())
        first.grad = torch.full_like(first, 0.5)  # pre-existing grads
    before = model_snapshot(model)
    build(name).attribute(model, inputs, targets)
    after = model_snapshot(model)
    for key in ("requires_grad", "training", "params", "classes"):
        assert after[key] == before[key], key
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"parameter/buffer {key} changed"
    for key, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][key] is None, f"gradient accumulated on parameter {key}"
        else:
            assert torch.equal(after["grads"][key], grad), f"existing gradient of {key} changed"
    assert hooks_left(model) == []


def test_inputs_left_untouched(name, small_cnn, inputs, targets):
    original = inputs.clone()
    build(name).attribute(small_cnn, inputs, targets)
    assert torch.equal(inputs, original)
    assert not inputs.requires_grad and inputs.grad is None
    leaf = inputs.clone().requires_grad_(True)
    build(name).attribute(small_cnn, leaf, targets)
    assert leaf.requires_grad and leaf.grad is None


def test_target_respected(name, small_cnn, inputs, targets):
    teacher = build(name)
    maps = teacher.attribute(small_cnn, inputs, targets)
    other = teacher.attribute(small_cnn, inputs, (targets + 1) % small_cnn.num_classes)
    scale = max(maps.abs().max().item(), other.abs().max().item())
    assert (maps - other).abs().max().item() > 1e-3 * scale, "maps do not depend on the target"


def test_single_int_target_means_every_image(name, small_cnn, inputs):
    teacher = build(name)
    assert_close(teacher.attribute(small_cnn, inputs, 3), teacher.attribute(small_cnn, inputs, torch.full((6,), 3)))


def test_works_inside_no_grad(name, small_cnn, inputs, targets):
    expected = build(name).attribute(small_cnn, inputs, targets)
    with torch.no_grad():
        maps = build(name).attribute(small_cnn, inputs, targets)
    assert_close(maps, expected, rel=1e-6)


def test_options_are_json_able(name):
    teacher = build(name)
    options = teacher.options()
    assert isinstance(options, dict)
    assert json.loads(json.dumps(options, sort_keys=True)) == options
    assert build(name).options() == options  # stable: usable as a cache key
    assert type(teacher).__name__ in repr(teacher)


def test_contract_checks_catch_violations(small_cnn, inputs):
    """The helpers above must see what a sloppy teacher leaves behind (guards the guards)."""
    handle = small_cnn.body[1].register_forward_hook(lambda *args: None)
    assert hooks_left(small_cnn) == ["body.1._forward_hooks"]
    handle.remove()
    small_cnn.neck.forward = lambda x: x
    assert hooks_left(small_cnn) == ["neck.forward (patched on the instance)"]
    del small_cnn.neck.forward
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert any(item.startswith("global") for item in hooks_left(small_cnn))
    finally:
        handle.remove()
    assert hooks_left(small_cnn) == []
    before = model_snapshot(small_cnn)
    small_cnn.body[0].train()
    small_cnn(inputs)[:, 0].sum().backward()
    after = model_snapshot(small_cnn)
    assert after["training"] != before["training"]
    assert before["grads"]["classifier.weight"] is None and after["grads"]["classifier.weight"] is not None
