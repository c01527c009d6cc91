"""Built-in maps beyond the paper (issue 12): feature pyramids of every backbone, the decoder
registry, per-class maps, map losses, the faithfulness term and the map_quality faithfulness block.

Kept small (tiny inputs, batch 1-4, one short pipeline run on 200 bundled images).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import teachx_main

from teachx.errors import ConfigError
from teachx.models import adapt, build_model
from teachx.models.decoders import DECODERS, AdditiveDecoder, LiteAdditiveDecoder, LiteDecoder
from teachx.models.impactx import build_impactx, impactx_from_spec
from teachx.training.impactx import ImpactxTask, MapSource, SelfFaithfulness
from teachx.training.map_losses import MAP_LOSSES, MapLoss, rank_loss
from teachx.training.methods import ImpactxOptions, impactx_options


class UserNet(nn.Module):
    """A plain user module (two resolutions) for the adapter."""

    def __init__(self, in_channels: int = 3, classes: int = 5):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.r1 = nn.ReLU()
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.r2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))))


BACKBONES = [
    ("lenet5", {}, 1, (28, 28)),
    ("lenet5", {}, 3, (32, 32)),
    ("mobilenet", {"alpha": 0.25}, 3, (32, 32)),
    ("mobilenet", {"alpha": 0.25, "small_input": False}, 3, (33, 40)),
    ("efficientnet_b0", {}, 3, (32, 32)),
    ("efficientnet_b2", {}, 3, (32, 32)),
    ("resnet18", {}, 3, (32, 32)),
    ("resnet_cifar", {"depth": 8}, 3, (30, 32)),
]


def _first_conv(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name, options, ch, size", BACKBONES)
def test_default_design_on_every_backbone(name, options, ch, size):
    """The default built-in-map design (per-class unet_input, width 16, reading M) builds on every backbone: one map per
    class at the input size, the predicted class's by default, any class's on request, and the spec rebuilds it."""
    torch.manual_seed(0)
    m = build_impactx(name, ch, 5, size, backbone_options=options).eval()
    assert m.decoder_name == "unet_input" and m.decoder_reads_m and m.per_class and m.spec["decoder_width"] == 16
    x = torch.randn(2, ch, *size)
    with torch.no_grad():
        logits, maps = m.forward_all(x)
        every = m.all_maps(x)
        assert every.shape == (2, 5, 1, *size) and maps.shape == (2, 1, *size)
        torch.testing.assert_close(maps, every[torch.arange(2), logits.argmax(1)])
        torch.testing.assert_close(m.explain(x, target=torch.tensor(3)), every[:, 3])
        again = impactx_from_spec(m.spec)
        again.load_state_dict(m.state_dict())
        torch.testing.assert_close(again.eval().all_maps(x), every)


@pytest.mark.parametrize("name, options, ch, size", BACKBONES)
def test_feature_pyramid_shapes_without_running_and_one_pass(name, options, ch, size):
    torch.manual_seed(0)
    model = build_model(name, ch, 5, size, **options).eval()
    expected = model.pyramid_shapes(size)  # computed, not run
    assert [c for c, _, _ in expected] == list(model.pyramid_channels)
    calls = []
    handle = _first_conv(model).register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, ch, *size)
    with torch.no_grad():
        feats, pyramid = model.features_with_pyramid(x)
    handle.remove()
    assert len(calls) == 1  # one pass for the vector and the pyramid
    assert [tuple(p.shape[1:]) for p in pyramid] == [tuple(s) for s in expected]
    areas = [h * w for _, h, w in expected]
    assert areas == sorted(areas, reverse=True) and len(set(areas)) == len(areas)  # high -> low resolution
    with torch.no_grad():
        torch.testing.assert_close(feats, model.features(x))
        assert [tuple(p.shape) for p in model.feature_pyramid(x)] == [tuple(p.shape) for p in pyramid]


def test_adapter_pyramid_by_hooks():
    torch.manual_seed(0)
    b = adapt(UserNet())
    assert b.pyramid_shapes((16, 16)) == [(8, 16, 16), (16, 8, 8)]  # default: last conv per resolution
    assert b.pyramid_layer_names == ["c1", "c2"]
    x = torch.randn(2, 3, 16, 16)
    calls = []
    handle = b.module.c1.register_forward_hook(lambda *a: calls.append(1))
    feats, pyramid = b.features_with_pyramid(x)
    handle.remove()
    assert len(calls) == 1 and not b.module.c1._forward_hooks  # one pass, no hook left behind
    torch.testing.assert_close(feats, b.features(x))
    torch.testing.assert_close(pyramid[1], b.module.c2(b.module.p1(b.module.r1(b.module.c1(x)))))
    named = adapt(UserNet(), pyramid_layers=["r1", "r2"])
    assert named.pyramid_shapes((16, 16)) == [(8, 16, 16), (16, 8, 8)]
    with pytest.raises(ConfigError, match="not a submodule"):
        adapt(UserNet(), pyramid_layers=["nope"])


DECODER_CASES = [
    (d, pc)
    for d in ("paper", "unet", "unet_input", "additive", "lite", "lite_additive")
    for pc in (False, True)
    if not (d == "paper" and pc)
]


@pytest.mark.parametrize("decoder, per_class", DECODER_CASES)
@pytest.mark.parametrize(
    "backbone, options, ch, size", [("lenet5", {}, 1, (28, 28)), ("resnet_cifar", {"depth": 8}, 3, (32, 32))]
)
def test_decoder_shapes_and_one_forward(decoder, per_class, backbone, options, ch, size):
    torch.manual_seed(0)
    k = 4
    m = build_impactx(backbone, ch, k, size, backbone_options=options, decoder=decoder, per_class=per_class).eval()
    x = torch.randn(3, ch, *size)
    counts = {"m": 0, "lep": 0}
    hooks = [
        _first_conv(m.m).register_forward_hook(lambda *a: counts.__setitem__("m", counts["m"] + 1)),
        _first_conv(m.lep).register_forward_hook(lambda *a: counts.__setitem__("lep", counts["lep"] + 1)),
    ]
    with torch.no_grad():
        logits, maps = m.forward_all(x)
    assert counts == {"m": 1, "lep": 1}  # built-in maps: one forward pass of each branch
    counts.update(m=0, lep=0)
    explained = m.explain(x)
    assert counts == (
        {"m": 1, "lep": 1} if per_class or m.decoder_reads_m else {"m": 0, "lep": 1}
    )  # M too when D reads it
    for h in hooks:
        h.remove()
    assert logits.shape == (3, k) and maps.shape == (3, 1, *size) and explained.shape == maps.shape
    torch.testing.assert_close(explained, maps)
    assert m.all_maps(x).shape == (3, k if per_class else 1, 1, *size)
    torch.testing.assert_close(m(x), logits)  # forward (post-hoc teachers' view) is the same classifier


@pytest.mark.parametrize("decoder", ["additive", "lite_additive"])
@pytest.mark.parametrize("name, options, ch, size", BACKBONES)
def test_pyramid_decoder_on_every_backbone(name, options, ch, size, decoder):
    """The decoders reading pyramid and input (per class) fit every backbone's pyramid, odd sizes too."""
    torch.manual_seed(0)
    m = build_impactx(name, ch, 3, size, backbone_options=options, decoder=decoder, per_class=True).eval()
    x = torch.randn(1, ch, *size)
    with torch.no_grad():
        logits, maps = m.forward_all(x)
        every = m.all_maps(x)
    assert logits.shape == (1, 3) and maps.shape == (1, 1, *size) and every.shape == (1, 3, 1, *size)


def test_decoders_on_adapted_lep_and_per_channel_maps():
    torch.manual_seed(0)
    from teachx.models.impactx import ImpactX

    for decoder in ("unet", "unet_input", "additive"):
        model = ImpactX(
            adapt(UserNet()), adapt(UserNet()), 5, (16, 16), map_channels=3, decoder=decoder, per_class=True
        ).eval()
        x = torch.randn(2, 3, 16, 16)
        assert model.all_maps(x).shape == (2, 5, 3, 16, 16)
        assert model.explain(x, target=torch.tensor([1, 2])).shape == (2, 3, 16, 16)


def test_registry_and_bad_decoder_name():
    assert {"paper", "unet", "unet_input", "additive", "lite", "lite_additive"} <= set(DECODERS.names())
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        build_impactx("lenet5", 1, 10, (28, 28), decoder="unett")
    with pytest.raises(ConfigError, match="per_class"):
        build_impactx("lenet5", 1, 10, (28, 28), per_class=True, decoder="paper")  # the paper decoder makes one map


def test_additive_fast_is_additive_with_a_pointwise_head():
    """additive_fast: the additive form (zero where the input equals the reference) with a 1x1 head, so the
    per-class head at full resolution costs a ninth of additive's; everything else is additive's."""
    torch.manual_seed(0)
    fast = build_impactx("lenet5", 3, 10, (32, 32), decoder="additive_fast", decoder_width=16).eval()
    slow = build_impactx("lenet5", 3, 10, (32, 32), decoder="additive", decoder_width=16).eval()
    assert fast.decoder.head.kernel_size == (1, 1) and slow.decoder.head.kernel_size == (3, 3)
    assert fast.decoder.head.out_channels == slow.decoder.head.out_channels == 30  # classes x input channels
    head = lambda m: sum(p.numel() for p in m.decoder.head.parameters())  # noqa: E731
    assert head(fast) < head(slow) / 6
    x = torch.randn(2, 3, 32, 32)
    x[:, :, :8, :8] = 0.0  # the reference (0: the dataset mean)
    with torch.no_grad():
        maps = fast.all_maps(x)
    assert maps.shape == (2, 10, 1, 32, 32) and maps[..., :8, :8].abs().max() == 0
    again = impactx_from_spec(fast.spec)
    again.load_state_dict(fast.state_dict())
    torch.testing.assert_close(again.eval().all_maps(x), maps)


def test_per_class_selection_and_loss_reads_the_explained_class():
    torch.manual_seed(0)
    m = build_impactx("lenet5", 1, 4, (28, 28), decoder="unet", per_class=True).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        every = m.all_maps(x)  # (3, 4, 1, H, W)
        logits = m(x)
    target = torch.tensor([2, 0, 3])
    torch.testing.assert_close(m.explain(x, target=target), torch.stack([every[0, 2], every[1, 0], every[2, 3]]))
    torch.testing.assert_close(m.explain(x, target=torch.tensor(1)), every[:, 1])  # one class for all
    pred = logits.argmax(1)
    torch.testing.assert_close(m.explain(x), every[torch.arange(3), pred])  # default: predicted class
    torch.testing.assert_close(m.forward_all(x)[1], every[torch.arange(3), pred])

    # the loss uses the map of the class each target map explains (the source's classes, not y)
    maps = torch.randn(3, 1, 28, 28)

    class Source:
        def __call__(self, idx):
            return maps[idx]

        def classes_for(self, idx):
            return target[idx]

    y = torch.tensor([1, 1, 1])
    task = ImpactxTask(m, Source(), lam=0.7)
    idx = torch.arange(3)
    batch_maps = task.maps_for(idx)
    loss, _, logs = task.loss(x, y, batch_maps)
    chosen = torch.stack([every[0, 2], every[1, 0], every[2, 3]])
    hand = F.cross_entropy(logits, y) + 0.7 * ((chosen - maps) ** 2).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    assert "map_mse" in logs
    # without classes from the source the label is the explained class
    loss_y, _, _ = ImpactxTask(m, Source(), lam=0.7).loss(x, y, maps)
    torch.testing.assert_close(
        loss_y, F.cross_entropy(logits, y) + 0.7 * ((every[:, 1] - maps) ** 2).mean(), rtol=1e-5, atol=1e-6
    )


def test_map_source_classes_follow_shuffled_maps(tmp_path):
    from teachx.teachers.store import fill_store, open_store

    n = 10
    store = open_store(tmp_path, {"t": 1}, n, (1, 2, 2), log=lambda s: None)
    fill_store(store, np.arange(n), lambda i: torch.zeros(len(i), 1, 2, 2), 5, progress=False)
    classes = np.arange(n) % 3
    idx = torch.arange(2, n)
    teacher = MapSource(store, "teacher", np.arange(2, n), 0, classes=classes)
    assert teacher.classes_for(idx).tolist() == classes[2:].tolist()
    sh = MapSource(store, "shuffled", np.arange(2, n), 0, classes=classes)
    assert sh.classes_for(idx).tolist() == classes[sh.perm[2:]].tolist()  # a shuffled map keeps its class
    assert MapSource(store, "teacher", np.arange(n), 0).classes_for(idx) is None


# -- losses: each against a hand-computed case ---------------------------------------------------


def test_losses_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    zero = torch.zeros_like(pred)
    assert MapLoss("mse")(pred, zero).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # Pearson: r = 1 and r = -1 -> losses 0 and 2, mean 1; one-hot maps at different pixels: r = -1/3
    up = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    both = torch.cat([up, up])
    targets = torch.cat([2 * up + 5, -up])
    assert MapLoss("pearson")(both, targets).item() == pytest.approx(1.0, abs=1e-6)
    a = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    b = torch.tensor([0.0, 1, 0, 0]).view(1, 1, 2, 2)
    assert MapLoss("pearson")(a, b).item() == pytest.approx(1 + 1 / 3, abs=1e-6)
    # cosine: [1,2,3,4] . [1,1,1,1] = 10, norms sqrt(30) and 2 -> 1 - 10 / (2 sqrt(30)); any positive scale
    # gives 0, and unlike Pearson an offset is not free: up + 5 vs up is not a perfect match, -up costs 2
    flat = torch.ones_like(up)
    assert MapLoss("cosine")(up, flat).item() == pytest.approx(1 - 10 / (2 * math.sqrt(30)), abs=1e-6)
    assert MapLoss("cosine")(both, torch.cat([3 * up, -up])).item() == pytest.approx(1.0, abs=1e-6)
    assert MapLoss("cosine")(up + 5, up).item() > 0.01 and MapLoss("pearson")(up + 5, up).item() == pytest.approx(
        0, abs=1e-6
    )
    # pearson_anchored: Pearson plus (mean/rms(p) - mean/rms(t))^2: any positive scale is free (0), an
    # offset is not: [6, 7, 8, 9] vs [1, 2, 3, 4] has r = 1 and levels 7.5/sqrt(57.5) vs 2.5/sqrt(7.5)
    assert MapLoss("pearson_anchored")(3 * up, up).item() == pytest.approx(0.0, abs=1e-6)
    hand = (7.5 / math.sqrt(57.5) - 2.5 / math.sqrt(7.5)) ** 2
    assert MapLoss("pearson_anchored")(up + 5, up).item() == pytest.approx(hand, rel=1e-5)
    assert MapLoss("pearson_anchored")(-up, up).item() == pytest.approx(2 + (2 * 2.5 / math.sqrt(7.5)) ** 2, rel=1e-5)
    # standardised target [1, 2, 3, 4] -> z with mean 0 and mean square 1: zeros -> 1, ones -> 1 + 1
    assert MapLoss("standardized_mse")(zero, up).item() == pytest.approx(1.0, abs=1e-5)
    assert MapLoss("standardized_mse")(torch.ones_like(up), up).item() == pytest.approx(2.0, abs=1e-5)
    # pooling by 2 on a 4x4 map: block means [[2.5, 4.5], [10.5, 12.5]]
    big = torch.arange(16.0).view(1, 1, 4, 4)
    assert MapLoss("mse", pool=2)(big, torch.zeros_like(big)).item() == pytest.approx(
        (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4
    )
    assert MapLoss("pearson", pool=2)(big, big * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_rank_loss_hand_computed():
    p = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, 1.0, 1.0, 3.0]).view(1, 1, 2, 2)
    i, j = torch.tensor([[0, 3, 1]]), torch.tensor([[1, 0, 2]])  # pairs (0,1), (3,0) and a tie (1,2)
    z = (torch.tensor([0.0, 1, 2, 3]) - 1.5) / math.sqrt(1.25)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # (0,1): t0 < t1 -> softplus(z0 - z1); (3,0): t3 > t0 -> softplus(-(z3 - z0)); the tie is left out
    hand = (softplus(float(z[0] - z[1])) + softplus(-float(z[3] - z[0]))) / 2
    assert rank_loss(p, t, pairs=(i, j)).item() == pytest.approx(hand, rel=1e-5)
    # scale-free in the prediction, and reversing the order costs more
    assert rank_loss(10 * p + 3, t, pairs=(i, j)).item() == pytest.approx(hand, rel=1e-4)
    assert rank_loss(-p, t, pairs=(i, j)).item() > hand
    torch.manual_seed(0)
    assert MapLoss("rank")(p, t).item() > 0  # sampled pairs


def test_loss_registry_and_bad_pool():
    assert {"mse", "pearson", "standardized_mse", "rank"} <= set(MAP_LOSSES.names())
    with pytest.raises(ConfigError, match="did you mean 'pearson'"):
        MapLoss("pearsn")
    with pytest.raises(ConfigError, match="map_target_pool"):
        MapLoss("mse", pool=0)


# -- additive form ---------------------------------------------------------------------------------


def test_lite_decoders_by_hand():
    """``lite``: 1x1 laterals added top-down (z at the coarsest level), depthwise-separable conv and a 1x1
    head at the finest level, resized; ``lite_additive``: that output, resized to the input, multiplies
    ``x - reference`` and is summed over channels."""
    torch.manual_seed(0)
    shapes = [(4, 6, 6), (6, 3, 3)]
    z, x = torch.randn(2, 8), torch.randn(2, 2, 12, 12)
    pyramid = [torch.randn(2, 4, 6, 6), torch.randn(2, 6, 3, 3)]
    dec = LiteDecoder(8, shapes, (12, 12), head_channels=3, width=5)
    top = F.relu(dec.lateral[1](pyramid[1]) + dec.z_proj(z)[:, :, None, None])
    h = F.relu(F.interpolate(top, size=(6, 6), mode="bilinear", align_corners=False) + dec.lateral[0](pyramid[0]))
    dw, pw = dec.mix[0], dec.mix[1]
    h = F.relu(F.conv2d(F.conv2d(h, dw.weight, dw.bias, padding=1, groups=5), pw.weight, pw.bias))
    coarse = F.conv2d(h, dec.head.weight, dec.head.bias)
    torch.testing.assert_close(
        dec(z, pyramid), F.interpolate(coarse, size=(12, 12), mode="bilinear", align_corners=False)
    )

    add = LiteAdditiveDecoder(
        8, shapes, (12, 12), in_channels=2, out_channels=1, width=5, classes=3, reference=(0.5, -1.0)
    )
    g = F.interpolate(add.coarse(z, pyramid), size=(12, 12), mode="bilinear", align_corners=False).view(2, 3, 2, 12, 12)
    hand = (x[:, None, 0] - 0.5) * g[:, :, 0] + (x[:, None, 1] + 1.0) * g[:, :, 1]
    torch.testing.assert_close(add(z, pyramid, x), hand)
    assert (
        add(
            z, pyramid, torch.stack([torch.full((12, 12), 0.5), torch.full((12, 12), -1.0)])[None].expand(2, -1, -1, -1)
        )
        .abs()
        .max()
        .item()
        == 0.0
    )
    with pytest.raises(ConfigError, match="1 map or one per input channel"):
        LiteAdditiveDecoder(8, shapes, (12, 12), in_channels=3, out_channels=2)


def test_lite_decoder_costs_a_fraction_of_lenet():
    """The point of ``lite``: at width 16 its multiply-adds are well under LeNet-5's (unet_input: over 4x)."""
    from teachx.models import build_model as bm

    def macs(module: nn.Module, *inputs) -> int:
        total = [0]

        def hook(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                total[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, nn.Linear):
                total[0] += out.numel() * mod.in_features

        hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module(*inputs)
        for h_ in hs:
            h_.remove()
        return total[0]

    x = torch.randn(1, 3, 32, 32)
    lenet = bm("lenet5", 3, 10, (32, 32)).eval()
    base = macs(lenet, x)
    for name, most in (("lite", 0.5), ("lite_additive", 0.5)):
        m = build_impactx("lenet5", 3, 10, (32, 32), decoder=name, per_class=True, decoder_width=16).eval()
        z, pyramid = m.lep.features_with_pyramid(x)
        assert macs(m.decoder, z, pyramid, x) < most * base, name
    m = build_impactx(
        "lenet5", 3, 10, (32, 32), decoder="unet_input", per_class=True, decoder_width=32, decoder_reads_m=False
    ).eval()
    z, pyramid = m.lep.features_with_pyramid(x)
    assert macs(m.decoder, z, pyramid, x) > 3 * base


def test_additive_form_is_sum_of_x_minus_reference_times_g():
    torch.manual_seed(0)
    pyramid_shapes = [(4, 4, 4), (6, 2, 2)]
    dec = AdditiveDecoder(
        8, pyramid_shapes, (4, 4), in_channels=2, out_channels=1, width=8, classes=3, reference=(0.5,)
    )
    z = torch.randn(2, 8)
    pyramid = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    x = torch.randn(2, 2, 4, 4)
    g = dec.multipliers(z, pyramid, x)  # (2, 3, 2, 4, 4)
    hand = torch.zeros(2, 3, 4, 4)
    for b in range(2):
        for k in range(3):
            for c in range(2):
                hand[b, k] += (x[b, c] - 0.5) * g[b, k, c]
    torch.testing.assert_close(dec(z, pyramid, x), hand)
    # at the reference the map is exactly zero; per-channel maps keep the channels apart
    assert dec(z, pyramid, torch.full_like(x, 0.5)).abs().max().item() == 0.0
    per_ch = AdditiveDecoder(8, pyramid_shapes, (4, 4), in_channels=2, out_channels=2, width=8, reference=(0.0, 1.0))
    g1 = per_ch.multipliers(z, pyramid, x)[:, 0]
    torch.testing.assert_close(per_ch(z, pyramid, x), torch.stack([x[:, 0] * g1[:, 0], (x[:, 1] - 1.0) * g1[:, 1]], 1))


# -- faithfulness term -------------------------------------------------------------------------------


def test_self_faithfulness_term():
    torch.manual_seed(0)
    term = SelfFaithfulness(patch=4, samples=2)
    masks = term._masks(5, 16, torch.device("cpu"))
    assert masks.shape == (2, 5, 16)
    torch.testing.assert_close(masks[1], 1 - masks[0])  # paired: complements
    sizes = masks[0].sum(1)
    assert ((sizes >= 1) & (sizes <= 15)).all()
    m = build_impactx("lenet5", 1, 4, (16, 16), decoder="unet", per_class=True)
    x, target = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    _, maps = m.forward_all(x, target=target)
    torch.manual_seed(1)
    loss = term(m, x, maps, target)
    torch.manual_seed(1)
    assert term(m, x, maps * 7.0, target).item() == pytest.approx(loss.item(), rel=1e-4)  # scale-free
    assert 0 <= loss.item() <= 1.0 + 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.decoder.parameters())
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in m.m.parameters()
    )  # the model is explained, not trained, by it
    task = ImpactxTask(m, None, lam=0.0, faith_weight=0.5)
    total, _, logs = task.loss(x, target, None)
    assert "faith" in logs and total.item() >= logs["ce"].item()


def test_builtin_map_faithfulness_block():
    from teachx.evaluation.builtin_maps import builtin_map_faithfulness

    torch.manual_seed(0)
    m = build_impactx("lenet5", 1, 4, (16, 16), decoder="unet").eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        logits, maps = m.forward_all(x)
    out = builtin_map_faithfulness(m, x, logits.argmax(1), maps, torch.zeros(1, 16, 16), post_hoc=maps.clone(), steps=4)
    assert out["images"] == 6 and out["corr_self"] == pytest.approx(1.0)
    auc = out["auc"]
    assert set(auc) == {"pixel_flipping_morf", "pixel_flipping_lerf", "insertion"}
    assert set(auc["pixel_flipping_morf"]) == {"built_in", "mean_map", "teacher_post_hoc", "random"}
    assert auc["pixel_flipping_morf"]["built_in"] == pytest.approx(auc["pixel_flipping_morf"]["teacher_post_hoc"])
    json.dumps(out)


def test_best_post_hoc_names_the_most_faithful_reference_map():
    """The built-in maps are measured against the most faithful cheap post-hoc map of the same model, not only
    against the (possibly smoothed) teacher method: the block names it, with the MoRF ratio and the agreement."""
    from teachx.evaluation.builtin_maps import builtin_map_faithfulness
    from teachx.teachers import build as build_teacher

    torch.manual_seed(0)
    m = build_impactx("lenet5", 1, 4, (16, 16), decoder="unet").eval()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        logits, maps = m.forward_all(x)
    target = logits.argmax(1)
    gxi = build_teacher("gradient_x_input").attribute(m, x, target)
    noise = torch.rand_like(gxi)
    out = builtin_map_faithfulness(
        m, x, target, gxi, None, post_hoc=maps, steps=4, references={"noise": noise, "gxi": gxi}
    )
    morf = out["auc"]["pixel_flipping_morf"]
    assert {"post_hoc_noise", "post_hoc_gxi"} <= set(morf)
    best = out["best_post_hoc"]
    assert best["method"] == "gxi" and morf["post_hoc_gxi"] < morf["post_hoc_noise"]
    assert best["morf_ratio"] == pytest.approx(1.0) and best["corr_self"] == pytest.approx(1.0)
    assert best["morf_by_method"] == {"noise": morf["post_hoc_noise"], "gxi": morf["post_hoc_gxi"]}
    json.dumps(out)


def test_reference_maps_are_the_cheap_unsmoothed_methods():
    from types import SimpleNamespace

    from teachx.config.loader import from_dict
    from teachx.config.schema import RunConfig
    from teachx.runs.evaluation import REFERENCE_METHODS, reference_maps

    torch.manual_seed(0)
    cfg = from_dict(RunConfig, {"teacher": {"method": "lrp", "smooth": 2.0}})
    m = build_impactx("lenet5", 1, 4, (16, 16)).eval()
    x = torch.randn(3, 1, 16, 16)
    errors: list[str] = []
    refs = reference_maps(cfg, SimpleNamespace(), m, x, torch.tensor([0, 1, 2]), torch.device("cpu"), errors)
    assert errors == [] and set(refs) == set(REFERENCE_METHODS) == {
        "gradient_x_input",
        "lrp_epsilon",
        "integrated_gradients",
    }
    assert all(r.shape == (3, 1, 16, 16) for r in refs.values())
    # unsmoothed even though the teacher is smoothed: gradient x input is exactly the product, max-abs normalised
    grad_x = build_teacher_gxi(m, x)
    torch.testing.assert_close(refs["gradient_x_input"], grad_x)


def build_teacher_gxi(m, x):
    from teachx.teachers import build as build_teacher
    from teachx.teachers.postprocess import postprocess

    raw = build_teacher("gradient_x_input").attribute(m, x, torch.tensor([0, 1, 2]))
    return postprocess(raw, reduce="sum", normalize="maxabs", smooth=0.0)


# -- checkpoints and config --------------------------------------------------------------------------


def test_checkpoint_without_decoder_keys_still_loads(tmp_path):
    from teachx.runs.explain import load_impactx
    from teachx.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = build_impactx("lenet5", 3, 10, (32, 32), decoder="paper").eval()
    # the paper decoder's parameters keep their names (checkpoints written before this change)
    assert {k for k in m.state_dict() if k.startswith("decoder.")} == {
        "decoder.fc.0.weight",
        "decoder.fc.0.bias",
        "decoder.up.1.weight",
        "decoder.up.1.bias",
        "decoder.up.4.weight",
        "decoder.up.4.bias",
        "decoder.out.weight",
        "decoder.out.bias",
    }
    old_spec = {k: v for k, v in m.spec.items() if k not in ("decoder", "per_class", "additive_reference")}
    path = tmp_path / "old.safetensors"
    save_checkpoint(
        path,
        {f"model.{k}": v for k, v in m.state_dict().items()},
        {"kind": "impactx", "model_spec": old_spec, "mean": [0.0] * 3, "std": [1.0] * 3},
    )
    loaded, _ = load_impactx(path)
    assert loaded.decoder_name == "paper" and not loaded.per_class
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.explain(x), m.explain(x))
    new = impactx_from_spec(build_impactx("lenet5", 3, 10, (32, 32), decoder="additive", per_class=True).spec)
    assert new.decoder_name == "additive" and new.per_class


def test_config_validation():
    from teachx.config.schema import RunConfig
    from teachx.config.loader import from_dict

    cfg = from_dict(
        RunConfig, {"impactx": {"decoder": "unet_input", "per_class": True, "map_loss": "rank", "map_target_pool": 2}}
    )
    assert impactx_options(cfg).decoder == "unet_input"
    for bad, match in [
        ({"impactx": {"decoder": "unet", "map_target_pool": 0}}, "map_target_pool"),
        ({"impactx": {"faith_weight": -1.0}}, "faith_weight"),
        ({"teacher": {"faith_images": -1}}, "faith_images"),
        (
            {
                "impactx": {"decoder": "unet", "per_class": True, "self_teach_every": 2},
                "teacher": {"target": "predicted"},
            },
            "target=label",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(RunConfig, bad)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["impactx.decoder=unett"], "did you mean 'unet'"),
        (["impactx.decoder=paper", "impactx.per_class=true"], "impactx.per_class=true needs a decoder"),
        (["impactx.map_loss=pearsn"], "did you mean 'pearson'"),
        (["impactx.decoder=paper", "impactx.map_loss=pearsn"], "did you mean 'pearson'"),
        (["impactx.decoder_width=0"], "impactx.decoder_width must be an integer >= 1"),
        (["impactx.decoder_reads_m=maybe"], "decoder_reads_m"),
        (
            ["impactx.lep_backbone=mobilenet", "impactx.decoder_reads_m=true"],
            None,
        ),  # accepted here; the model build says why not
    ],
)
def test_bad_options_exit_2_via_cli(overrides, fragment, capsys):
    code, _, err = teachx_main(capsys, "config", *overrides)  # in-process (a subprocess costs seconds here)
    if fragment is None:
        assert code == 0, err
        return
    assert code == 2
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("teachx: error:") and fragment in err, err


def test_default_design_is_the_studys_and_the_paper_is_one_option_away(capsys):
    """The default decoder is the built-in-maps studies' design (per-class U-Net + input, 1 - Pearson, reading M),
    at width 16 and self-taught every epoch with gradient x input; impactx.decoder=paper alone gives the paper's
    method (one map, MSE, no self-teaching); explicit keys win; the written config states the resolved values."""
    from teachx.config.schema import RunConfig
    from teachx.runs.resolve import resolve_config
    from teachx.models.decoders import DECODERS

    ic = impactx_options(RunConfig())
    assert (ic.decoder, ic.per_class, ic.map_loss, ic.decoder_width, ic.decoder_reads_m) == (
        "unet_input",
        True,
        "pearson",
        16,
        True,
    )
    assert (ic.self_teach_every, ic.self_teach_method) == (1, "gradient_x_input")
    paper = impactx_options(resolve_config(overrides=["impactx.decoder=paper"]))
    assert (paper.per_class, paper.map_loss, paper.decoder_width, paper.decoder_reads_m) == (False, "mse", 32, False)
    assert (paper.self_teach_every, paper.self_teach_method) == (0, "teacher")
    additive = impactx_options(resolve_config(overrides=["impactx.decoder=additive"]))  # others: no self-teaching
    assert (additive.decoder_width, additive.decoder_reads_m, additive.self_teach_every) == (32, False, 0)
    narrow = impactx_options(resolve_config(overrides=["impactx.decoder_width=32", "impactx.decoder_reads_m=false"]))
    assert (narrow.decoder, narrow.decoder_width, narrow.decoder_reads_m) == (
        "unet_input",
        32,
        False,
    )  # explicit keys win
    mixed = impactx_options(
        resolve_config(overrides=["impactx.decoder=unet", "impactx.per_class=false", "impactx.map_loss=rank"])
    )
    assert (mixed.per_class, mixed.map_loss) == (False, "rank")
    assert ImpactxOptions(decoder="paper", per_class=None).per_class is False  # the Python API resolves too
    for name in DECODERS.names():  # every decoder's recommendation is one it can train with
        rec = DECODERS.get(name).recommended
        assert impactx_options(resolve_config(overrides=[f"impactx.decoder={name}"])).per_class is rec["per_class"]
        assert not rec["per_class"] or DECODERS.get(name).supports_per_class
    code, text, err = teachx_main(capsys, "config", "impactx.decoder=paper")
    assert code == 0, err
    assert "decoder: paper" in text and "per_class: false" in text and "map_loss: mse" in text
    assert "decoder_width: 32" in text and "decoder_reads_m: false" in text and "self_teach_every: 0" in text


# -- the pipeline: per-class unet_input maps with a scale-free loss and the faithfulness term ----------


def test_pipeline_records_builtin_map_faithfulness(tmp_path, monkeypatch):
    from teachx.runs.resolve import resolve_config
    from teachx.runs.pipeline import run_pipeline

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        overrides=[
            "data.train_size=200",
            "train.epochs=1",
            "train.batch_size=50",
            "train.progress=false",
            "teacher.method=lrp",
            "teacher.eval_images=40",
            "teacher.faith_images=12",
            "impactx.decoder=unet_input",
            "impactx.per_class=true",
            "impactx.map_loss=pearson",
            "impactx.map_target_pool=2",
            "impactx.faith_weight=0.1",
            "impactx.decoder_width=8",
        ]
    )
    out = run_pipeline(cfg, tmp_path / "run", log=lambda s: None, progress=False, figures=False)
    q = out.results["map_quality"]
    assert q["images"] == 40 and -1 <= q["corr"] <= 1
    f = q["faithfulness"]
    assert f["images"] == 12 and f["target"] == "predicted" and "errors" not in f, f
    for metric in ("pixel_flipping_morf", "pixel_flipping_lerf", "insertion"):
        assert set(f["auc"][metric]) == {
            "built_in",
            "teacher_post_hoc",
            "mean_map",
            "random",
            "post_hoc_gradient_x_input",
            "post_hoc_lrp_epsilon",
            "post_hoc_integrated_gradients",
        }
    assert -1 <= f["corr_self"] <= 1 and -1 <= f["corr_self_mean_map"] <= 1
    best = f["best_post_hoc"]
    morf = f["auc"]["pixel_flipping_morf"]
    assert morf[f"post_hoc_{best['method']}"] == best["pixel_flipping_morf"] == min(best["morf_by_method"].values())
    assert best["morf_ratio"] == pytest.approx(morf["built_in"] / best["pixel_flipping_morf"])
    assert -1 <= best["corr_self"] <= 1
    history = json.loads((tmp_path / "run" / "impactx" / "history.json").read_text())
    assert "train_map_pearson" in history[0] and "train_faith" in history[0]


def test_map_quality_scale_free_r2_matches_per_image_least_squares():
    """r2_vs_mean_map_affine against an independent reference: per-image least-squares fits (numpy lstsq)
    of the built-in map and of the mean map to the teacher's map; a rescaled copy of the teacher's map
    scores 1 there while its plain R^2 does not."""
    from types import SimpleNamespace

    from teachx.runs.evaluation import map_quality

    rng = np.random.default_rng(0)
    n, h, w = 6, 5, 4
    target = torch.from_numpy(rng.normal(size=(n, 1, h, w))).float()
    mean_map = torch.from_numpy(rng.normal(size=(1, h, w))).float()
    built = torch.from_numpy(rng.normal(size=(n, 1, h, w))).float() + 0.7 * target

    class Model(torch.nn.Module):
        per_class = False

        def __init__(self, maps):
            super().__init__()
            self.maps = maps

        def explain(self, x, target=None):
            return self.maps[: len(x)]

    class Store:
        done = np.ones(n, bool)

        def read(self, idx):
            return target[torch.as_tensor(np.asarray(idx))]

        def mean_map(self, idx):
            return mean_map

    plan = SimpleNamespace(
        dataset=SimpleNamespace(test=SimpleNamespace(images=np.zeros((n, h, w, 1), np.uint8))),
        mean=[0.0],
        std=[1.0],
        train_idx=np.arange(3),
        augment=None,
    )

    def reference(maps):
        resid = {"p": 0.0, "m": 0.0}
        for i in range(n):
            t = target[i].flatten().numpy().astype(np.float64)
            for key, m in (("p", maps[i].flatten().numpy()), ("m", mean_map.flatten().numpy())):
                a = np.stack([m, np.ones_like(m)], 1).astype(np.float64)
                coef, *_ = np.linalg.lstsq(a, t, rcond=None)
                resid[key] += float(((a @ coef - t) ** 2).mean())
        return 1 - resid["p"] / resid["m"]

    q = map_quality(Model(built), plan, Store(), Store(), torch.device("cpu"))
    assert q["r2_vs_mean_map_affine"] == pytest.approx(reference(built), abs=1e-5)
    assert "corr_mean_map_augmented" not in q  # no augmentation: the mean map is what a constant map learns

    # trained with crops and flips: a constant map learns the mean map averaged over them (numpy, every draw)
    from teachx.data.transforms import Augment

    p = 1
    padded = np.pad(mean_map.numpy().astype(np.float64), ((0, 0), (p, p), (p, p)))
    crops = [padded[:, t : t + h, lft : lft + w] for t in range(2 * p + 1) for lft in range(2 * p + 1)]
    blurred = np.mean(crops + [cr[:, :, ::-1] for cr in crops], axis=0).ravel()
    want = np.mean([np.corrcoef(blurred, target[i].double().numpy().ravel())[0, 1] for i in range(n)])
    q = map_quality(
        Model(built),
        SimpleNamespace(**{**vars(plan), "augment": Augment(p, hflip=True)}),
        Store(),
        Store(),
        torch.device("cpu"),
    )
    assert q["corr_mean_map_augmented"] == pytest.approx(want, abs=1e-5)
    scaled = map_quality(Model(0.01 * target - 3.0), plan, Store(), Store(), torch.device("cpu"))
    assert scaled["r2_vs_mean_map_affine"] == pytest.approx(1.0, abs=1e-6) and scaled["r2_vs_mean_map"] < 0


def test_every_map_loss_declares_what_it_leaves_free():
    """Viewers compare a built-in map with the teacher's on the loss's own terms (``comparable``): checked by
    hand, and against each loss: a map changed only in what the loss leaves free keeps its loss value."""
    from teachx.training.map_losses import INVARIANCE, MAP_LOSSES, comparable

    assert set(INVARIANCE) == set(MAP_LOSSES.names())
    np.testing.assert_allclose(comparable(np.array([[-2.0, 1.0]]), "scale"), [[-1.0, 0.5]])
    np.testing.assert_allclose(comparable(np.array([1.0, 3.0]), "affine"), [-1.0, 1.0])
    np.testing.assert_allclose(comparable(np.array([1.0, 3.0]), "none"), [1.0, 3.0])
    np.testing.assert_allclose(comparable(np.zeros(3), "affine"), np.zeros(3))
    torch.manual_seed(0)
    pred, target = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    changed = {"none": pred, "scale": 3 * pred, "affine": 3 * pred - 2}
    for name, inv in INVARIANCE.items():
        if name == "standardized_mse":  # trained towards the z-scored target: z-scores are its terms, not a free offset
            assert MapLoss(name)(torch.from_numpy(comparable(target.numpy()[0], inv))[None], target[:1]).item() < 1e-6
            continue
        if name == "rank":  # sampled pairs: compare with one fixed set
            from teachx.training.map_losses import rank_loss, sample_pairs

            pairs = sample_pairs(2, 36, 64, torch.device("cpu"))
            assert rank_loss(changed[inv], target, pairs=pairs).item() == pytest.approx(
                rank_loss(pred, target, pairs=pairs).item(), rel=1e-4
            )
            continue
        assert MapLoss(name)(changed[inv], target).item() == pytest.approx(
            MapLoss(name)(pred, target).item(), rel=1e-4, abs=1e-6
        ), name


def test_decoder_reads_m_sees_m_but_never_trains_it():
    """impactx.decoder_reads_m: the decoder's pyramid joins M's levels (detached) to LEP's. Changing M's weights
    changes the map; the map loss puts no gradient on M; the spec rebuilds the model; bad pairings are one-line errors."""
    from teachx.config.schema import RunConfig
    from teachx.config.loader import from_dict

    torch.manual_seed(0)
    m = build_impactx("lenet5", 3, 10, (32, 32), decoder_reads_m=True).eval()
    plain = build_impactx("lenet5", 3, 10, (32, 32), decoder_reads_m=False)
    first = m.decoder.lateral[0].in_channels if hasattr(m.decoder, "lateral") else None
    assert first is None or first == 2 * plain.decoder.lateral[0].in_channels
    x = torch.randn(3, 3, 32, 32)
    before = m.all_maps(x)
    with torch.no_grad():
        for p in m.m.body.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(m.all_maps(x), before)  # the map reads M
    m.train()
    m.zero_grad()
    _, pred = m.forward_all(x, target=torch.tensor([1, 2, 3]))
    pred.square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in m.m.parameters())
    assert any(p.grad is not None and p.grad.any() for p in m.lep.parameters())
    again = impactx_from_spec(m.spec)
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(
        again.eval().explain(x, target=torch.tensor(4)), m.eval().explain(x, target=torch.tensor(4))
    )
    assert "decoder_reads_m" not in plain.spec  # other models' specs are as before
    default = build_impactx("lenet5", 3, 10, (32, 32))  # the default design (unet_input) reads M, at width 16
    assert default.decoder_reads_m and default.spec["decoder_reads_m"] and default.spec["decoder_width"] == 16
    other_lep = build_impactx(
        "lenet5", 3, 10, (32, 32), lep_backbone="resnet_cifar"
    )  # pyramids differ: the default leaves M out
    assert not other_lep.decoder_reads_m
    assert impactx_options(from_dict(RunConfig, {"impactx": {"lep_backbone": "resnet_cifar"}})).decoder_reads_m is False
    assert impactx_options(from_dict(RunConfig, {})).decoder_reads_m is True
    old = dict(
        plain.spec, decoder_width=32
    )  # a checkpoint's spec from before: no decoder_reads_m key -> built without M
    assert not impactx_from_spec(old).decoder_reads_m and impactx_from_spec(old).decoder.lateral[0].out_channels == 32
    with pytest.raises(ConfigError, match="reads feature pyramids"):
        from_dict(RunConfig, {"impactx": {"decoder": "paper", "decoder_reads_m": True}})
    with pytest.raises(ConfigError, match="same levels"):
        build_impactx("lenet5", 3, 10, (32, 32), lep_backbone="mobilenet", decoder_reads_m=True)


def test_map_trust_against_a_linear_model_whose_gradient_is_known():
    """map_trust correlates the channel-summed built-in map with the channel-summed gradient x input: for
    f(x) = W x that is W[y] * x summed over channels, written out here. A built-in map equal to it scores 1,
    its negative -1 (flagged at the default threshold), and a smaller built-in map is compared with the
    post-hoc map averaged down to its size."""
    from teachx.evaluation.builtin_maps import TRUST_THRESHOLD, disagrees, map_trust

    torch.manual_seed(0)
    n, c, h, w, k = 4, 3, 8, 8, 5
    lin = nn.Linear(c * h * w, k, bias=False)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.randn(n, c, h, w)
    y = torch.arange(n) % k
    gxi = (lin.weight.detach()[y].reshape(n, c, h, w) * x).sum(1, keepdim=True)  # the closed form, channels summed
    assert map_trust(model, x, y, gxi).tolist() == pytest.approx([1.0] * n, abs=1e-6)
    assert map_trust(model, x, y, -gxi.expand(n, 2, h, w)).tolist() == pytest.approx([-1.0] * n, abs=1e-6)
    noise = torch.randn(n, 1, h, w)
    expected = [float(np.corrcoef(noise[i].flatten(), gxi[i].flatten())[0, 1]) for i in range(n)]
    assert map_trust(model, x, y, noise).tolist() == pytest.approx(expected, abs=1e-6)
    small = F.avg_pool2d(gxi, 2)
    assert map_trust(model, x, y, small).tolist() == pytest.approx([1.0] * n, abs=1e-6)
    assert TRUST_THRESHOLD == 0.0 and disagrees(-0.01) is True and disagrees(0.0) is False and disagrees(None) is None
    # the CLI writes the choices and the default out (no torch import for --help): they must agree
    from teachx.cli.main import TRUST_METHODS as cli_methods
    from teachx.cli.main import explain
    from teachx.cli.serve import serve
    from teachx.evaluation.builtin_maps import TRUST_METHOD, TRUST_METHODS

    assert cli_methods == TRUST_METHODS and TRUST_METHODS[0] == TRUST_METHOD
    for command in (explain, serve):
        assert next(p for p in command.params if p.name == "trust_threshold").default == TRUST_THRESHOLD


def test_study_summary_reads_blocks_with_and_without_best_post_hoc():
    """Faithfulness blocks written before best_post_hoc existed still summarise; new ones add its two measures."""
    from teachx.studies.statistics import _builtin_faith_summary

    old = {"corr_self": 0.5, "auc": {"pixel_flipping_morf": {"built_in": 0.2, "teacher_post_hoc": 0.1}}}
    new = {**old, "best_post_hoc": {"method": "gradient_x_input", "corr_self": 0.4, "morf_ratio": 1.3}}
    assert "best_post_hoc.corr_self" not in _builtin_faith_summary([old, old])
    assert _builtin_faith_summary([old, new])["corr_self"]["mean"] == pytest.approx(0.5)  # a mix: common keys only
    both = _builtin_faith_summary([new, new])
    assert both["best_post_hoc.corr_self"]["mean"] == pytest.approx(0.4)
    assert both["best_post_hoc.morf_ratio"]["mean"] == pytest.approx(1.3)
