"""The Attention Branch Network (method ``abn``): the model against hand recomputations and closed
forms, the task's loss, spec round trip, every built-in backbone, training and exact resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teachx.errors import ConfigError
from teachx.models import build_model
from teachx.models.abn import ABN, abn_from_spec, build_abn
from teachx.models.base import Backbone
from teachx.training.checkpoint import load_checkpoint
from teachx.training.methods.abn import ABNTask

SCRIPT_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class TinyNet(Backbone):
    """conv-relu-pool | conv-relu-pool, flatten-linear-relu, linear: a LeNet in miniature (8x8 inputs)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU())
        self.classifier = nn.Linear(6, 3)
        self.in_channels, self.num_classes, self.feature_dim = 2, 3, 6
        self.pyramid_taps, self.pyramid_channels, self.pyramid_strides = (2, 5), (3, 4), (2, 4)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def _tiny_abn() -> ABN:
    torch.manual_seed(0)
    model = ABN(TinyNet(), 3, split=None, width=5, blocks=1)
    _randomise_bn(model)
    return model.double().eval()


def _bn(t: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _pointwise(t: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def test_forward_equals_a_hand_recomputation():
    model = _tiny_abn()
    body, x = (
        model.backbone.body,
        torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    )
    with torch.no_grad():
        per, att, m = model.forward_branches(x)
        # g: the body up to the default cut (level 0, after the first pool)
        g = F.max_pool2d(torch.clamp(F.conv2d(x, body[0].weight, body[0].bias, padding=1), min=0), 2)
        block = model.attention[0]
        h = torch.clamp(_bn(F.conv2d(g, block[0].weight, padding=1), block[1]), min=0)
        a = _pointwise(h, model.class_maps)  # K = 3 class-activation maps
        m_ref = 1 / (1 + torch.exp(-_bn(_pointwise(a, model.attention_map[0]), model.attention_map[1])))
        r = F.max_pool2d(torch.clamp(F.conv2d((1 + m_ref) * g, body[3].weight, body[3].bias, padding=1), min=0), 2)
        neck = model.backbone.neck
        f = torch.clamp(r.flatten(1) @ neck[1].weight.T + neck[1].bias, min=0)
        per_ref = f @ model.backbone.classifier.weight.T + model.backbone.classifier.bias
    assert model.split_level == 0 and tuple(g.shape) == (5, 3, 4, 4)
    assert m.shape == (5, 1, 4, 4) and a.shape == (5, 3, 4, 4)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-12)
    assert float(m.min()) >= 0 and float(m.max()) <= 1 and float(m.std()) > 0
    torch.testing.assert_close(att, a.mean(dim=(2, 3)), rtol=0, atol=1e-12)  # GAP of the K maps
    torch.testing.assert_close(per, per_ref, rtol=0, atol=1e-12)
    assert torch.equal(model(x), per)  # forward = the perception logits of forward_branches


def test_task_loss_is_both_cross_entropies():
    model = _tiny_abn()
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    loss, logits, logs = ABNTask(model, attention_weight=0.7).loss(x, y, None)
    with torch.no_grad():
        per, att, _ = model.forward_branches(x)

    def nll(z):
        return -(z - torch.log(torch.exp(z).sum(1, keepdim=True)))[torch.arange(len(y)), y].mean()

    assert set(logs) == {"ce_attention", "ce_perception"}
    torch.testing.assert_close(logs["ce_attention"], nll(att), rtol=0, atol=1e-12)
    torch.testing.assert_close(logs["ce_perception"], nll(per), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.detach(), 0.7 * nll(att) + nll(per), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.detach(), per, rtol=0, atol=0)
    assert ABNTask(model).maps_for(torch.arange(3)) is None


@pytest.mark.parametrize("backbone,options", [("lenet5", {}), ("mobilenet", {"alpha": 0.25})])
def test_zero_attention_is_the_plain_backbone(backbone, options):
    """M = 0 gives (1 + 0) * g = g: the perception branch is the backbone itself, bit for bit."""
    torch.manual_seed(0)
    model = build_abn(backbone, 3, 4, 16, options)
    _randomise_bn(model)
    plain = build_model(backbone, 3, 4, 16, **options)
    plain.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        model.attention_map[0].weight.zero_()
        model.attention_map[1].bias.fill_(-1e4)
    model.eval(), plain.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        per, _, m = model.forward_branches(x)
        assert torch.equal(m, torch.zeros_like(m))
        assert torch.equal(per, plain(x))
        assert torch.equal(model(x), plain(x))


def test_explain_is_the_upsampled_map_and_class_agnostic():
    torch.manual_seed(0)
    model = build_abn("lenet5", 1, 4, 28).eval()  # padding 2: g is 6 @ 14x14
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    maps = model.explain(x)
    assert maps.shape == (4, 1, 28, 28) and not maps.requires_grad
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    m = model.forward_branches(x)[2]
    assert m.shape == (4, 1, 14, 14)
    torch.testing.assert_close(maps, F.interpolate(m.detach(), size=(28, 28), mode="bilinear", align_corners=False))
    assert torch.equal(model.explain(x, target=torch.tensor([3, 2, 1, 0])), maps)
    assert model.per_class is False and "forward_branches" in model.ddp_forward_methods
    model.train()
    torch.testing.assert_close(model.output_no_grad(x), model.eval()(x))
    assert model.train().training  # output_no_grad restored the mode it found


def test_spec_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    model = build_abn("lenet5", 3, 4, 16, {"activation": "tanh"}, split=0, width=7, blocks=2)
    _randomise_bn(model)
    spec = json.loads(json.dumps(model.spec))
    assert spec == {
        "name": "abn",
        "backbone": "lenet5",
        "in_channels": 3,
        "num_classes": 4,
        "image_size": [16, 16],
        "backbone_options": {"activation": "tanh", "pool": "max", "padding": 2},
        "split": 0,
        "width": 7,
        "blocks": 2,
    }
    torch.manual_seed(1)
    again = abn_from_spec(spec)
    again.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    model.eval(), again.eval()
    with torch.no_grad():
        for a, b in zip(model.forward_branches(x), again.forward_branches(x)):
            assert torch.equal(a, b)
    assert again.spec == spec


# -- the method, on every built-in backbone ------------------------------------------------------


def _dataset(n: int, channels: int, size: int, classes: int = 4, seed: int = 0):
    from teachx.data.base import ImageDataset, Split

    rng = np.random.default_rng(seed)

    def split(k):
        return Split(rng.integers(0, 256, (k, size, size, channels)).astype(np.uint8), rng.integers(0, classes, k))

    return ImageDataset(
        "noise",
        [str(c) for c in range(classes)],
        split(n),
        split(4),
        (0.5,) * channels,
        (0.25,) * channels,
        hflip=False,
    )


def _method(backbone: str = "lenet5", model_options: dict | None = None, **options):
    from teachx.config.schema import MethodConfig, ModelConfig, RunConfig
    from teachx.training.methods import build_method

    cfg = RunConfig(
        model=ModelConfig(backbone=backbone, options=dict(model_options or {})),
        method=MethodConfig(name="abn", options=options),
    )
    return build_method(cfg)


@pytest.mark.parametrize(
    "backbone,channels,size,options,stride",
    [
        ("lenet5", 1, 28, {}, 2),
        ("lenet5", 3, 32, {}, 2),
        ("mobilenet", 3, 16, {"alpha": 0.25}, 4),
        ("efficientnet_b0", 3, 16, {}, 4),
        ("resnet18", 3, 16, {}, 4),
    ],
)
def test_builds_and_trains_on_every_backbone(backbone, channels, size, options, stride):
    from teachx.training.methods import MethodContext
    from teachx.training.trainer import DataPlan

    method = _method(backbone, options)
    assert method.name == "abn" and method.checkpoint_kind == "abn" and method.builtin_map
    plan = DataPlan(_dataset(4, channels, size), np.arange(4), np.arange(0))
    ctx = MethodContext(method.cfg, plan, torch.device("cpu"))
    method.check_data(plan)
    torch.manual_seed(0)
    model = method.build_model(ctx)
    task = method.task(model, ctx)
    net = model.backbone
    assert net.pyramid_strides[model.split_level] == stride  # the default cut: stride 2 (LeNet-5) or 4
    x, y = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 1, 2, 3])
    assert tuple(model.extract(x).shape[1:]) == tuple(net.pyramid_shapes((size, size))[model.split_level])
    opt = torch.optim.SGD(list(task.parameters()), lr=0.01)
    model.train()
    for _ in range(2):
        loss, logits, logs = task.loss(x, y, task.maps_for(torch.arange(4)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and logits.shape == (4, 4) and set(logs) == {"ce_attention", "ce_perception"}
    assert all(p.grad is not None for p in model.parameters())  # both branches are trained
    assert model.eval().explain(x).shape == (4, 1, size, size)


def test_bad_options_and_impossible_splits_are_one_line_config_errors(small_cnn):
    from teachx.training.trainer import DataPlan

    cases = [
        lambda: _method(foo=1),
        lambda: _method(lam=3.0),  # an option of another method
        lambda: _method(split=0.5),
        lambda: _method(attention_weight=-1.0),
        lambda: build_abn("lenet5", 1, 4, 16, split=1),  # LeNet-5's last level: nothing left to perceive with
        lambda: build_abn("mobilenet", 3, 4, 16, {"alpha": 0.25}, split=7),
        lambda: _method(split=1).check_data(DataPlan(_dataset(2, 1, 16), np.arange(2), np.arange(0))),
        lambda: ABN(small_cnn, 5),  # a body without pyramid levels cannot be cut
    ]
    messages = []
    for case in cases:
        with pytest.raises(ConfigError) as info:
            case()
        messages.append(str(info.value))
    assert all("\n" not in m for m in messages), messages
    assert "unknown option method.options.foo" in messages[0] and "rrr" in messages[1]
    assert all("out of range" in m and "0..0" in m for m in messages[4:7:2]) and "0..2" in messages[5]
    assert "pyramid levels" in messages[7]
    assert _method(split=0, blocks=2).opts == {"split": 0, "attention_weight": 1.0, "width": 0, "blocks": 2}


# -- the Trainer: learning and exact resume -------------------------------------------------------


class _Interrupted(Exception):
    pass


class _StopAfter(ABNTask):
    """ABNTask that fails at its ``n``-th step, like a process killed in the middle of an epoch."""

    def __init__(self, model, n):
        super().__init__(model)
        self.n = n

    def loss(self, x, y, maps):
        self.n -= 1
        if self.n < 0:
            raise _Interrupted
        return super().loss(x, y, maps)


def _fit(out: Path, seed: int, task_of=ABNTask):
    sys.path.insert(0, str(SCRIPT_DIR))
    from _train_script import synthetic_dataset

    from teachx.data.transforms import Augment
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import DataPlan, Trainer

    plan = DataPlan(synthetic_dataset(), np.arange(160), np.arange(160, 192), Augment(crop_padding=2, hflip=False))
    torch.manual_seed(seed)
    task = task_of(build_abn("lenet5", 1, 4, 16))
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=3e-3, schedule="cosine", progress=False, threads=1)
    return Trainer(task, plan, cfg, out, seed=1, device="cpu", meta={"kind": "abn"}, log=lambda s: None).fit()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("abn") / "ref"
    return out, _fit(out, 0)


def test_trainer_lowers_the_loss(reference_run):
    _, res = reference_run
    hist = res.history
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert hist[-1]["train_ce_attention"] < hist[0]["train_ce_attention"]
    assert hist[-1]["train_ce_perception"] < hist[0]["train_ce_perception"]
    for h in hist:  # the logged loss is the sum of the two logged cross-entropies (weight 1)
        assert h["train_loss"] == pytest.approx(h["train_ce_attention"] + h["train_ce_perception"], rel=1e-5)


def test_checkpoint_resumes_to_the_same_weights(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "resumed"
    with pytest.raises(_Interrupted):
        _fit(out, 0, lambda m: _StopAfter(m, 5 + 2))  # 5 steps per epoch: fails in the middle of epoch 2
    assert load_checkpoint(out / "checkpoints" / "last.safetensors").meta["epoch"] == 0
    res = _fit(out, 123)  # another initialisation: the checkpoint's weights replace it
    assert res.resumed_from == 1
    a = load_checkpoint(ref / "checkpoints" / "last.safetensors")
    b = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert a.meta["model_spec"] == b.meta["model_spec"] and a.meta["model_spec"]["name"] == "abn"
    wa, wb = a.group("model"), b.group("model")
    assert wa.keys() == wb.keys() and any(k.startswith("attention") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in _fit_history(ref)]


def _fit_history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def test_forward_all_is_the_built_in_map_contract():
    """forward_all(x) = (forward(x), explain(x)): what map_quality and teachx serve read from any built-in-map model."""
    torch.manual_seed(0)
    model = build_abn("lenet5", 1, 4, 16).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        logits, m = model.forward_all(x, target=torch.tensor([0, 1, 2]))
    assert torch.equal(logits, model(x)) and torch.equal(m, model.explain(x)) and m.shape == (3, 1, 16, 16)
