"""The IMPACTX model: shapes, one-pass maps, loss, ablation map sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teachx.models.impactx import MapDecoder, build_impactx, impactx_from_spec
from teachx.teachers.store import fill_store, open_store
from teachx.training.impactx import ImpactxTask, MapSource


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("size", [28, 32, 64, 96])
def test_decoder_reaches_any_size(size, scale):
    d = MapDecoder(84, (size, size), scale=scale)
    assert d(torch.randn(2, 84)).shape == (2, 1, size, size)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    # the last conv runs at (about) size / scale: seed grid * 2**(number of upsamplings)
    assert d.seed_hw[0] * 2 ** (len(convs) - 1) in range(max(4, size // scale), max(4, size // scale) + 2 ** len(convs))


@pytest.mark.parametrize("backbone, ch, size", [("lenet5", 1, 28), ("lenet5", 3, 32), ("mobilenet", 3, 32)])
def test_forward_all_matches_forward_and_explain(backbone, ch, size):
    torch.manual_seed(0)
    m = build_impactx(backbone, ch, 10, (size, size), decoder="paper").eval()
    x = torch.randn(3, ch, size, size)
    logits, maps = m.forward_all(x)
    assert logits.shape == (3, 10) and maps.shape == (3, 1, size, size)
    assert torch.allclose(m(x), logits, atol=1e-6)
    assert torch.allclose(m.explain(x), maps, atol=1e-6)
    # C reads concat[M(x), LEP(x)]: independent recomputation
    feats = torch.cat([m.m.features(x), m.lep.features(x)], 1)
    assert torch.allclose(m.classifier(feats), logits, atol=1e-6)
    again = impactx_from_spec(m.spec)
    again.load_state_dict(m.state_dict())
    assert torch.allclose(again.eval()(x), logits, atol=1e-6)


def test_loss_is_ce_plus_lambda_mse():
    torch.manual_seed(0)
    m = build_impactx("lenet5", 1, 10, (28, 28), decoder="paper")
    x, y, t = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.randn(4, 1, 28, 28)
    task = ImpactxTask(m, maps=None, lam=2.5)
    loss, logits, logs = task.loss(x, y, t)
    logits2, pred = m.forward_all(x)
    ref = F.cross_entropy(logits2, y) + 2.5 * ((pred - t) ** 2).mean()
    assert torch.allclose(loss, ref, atol=1e-5)
    # the explanation loss reaches LEP and D, but not M
    m.zero_grad()
    (loss - F.cross_entropy(logits, y)).backward()
    assert m.decoder.out.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.lep.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.m.parameters())


def test_map_sources(tmp_path):
    n = 12
    store = open_store(tmp_path, {"t": 1}, n, (1, 4, 4), log=lambda s: None)
    fill_store(
        store,
        np.arange(n),
        lambda i: torch.as_tensor(i, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 16,
        6,
        progress=False,
    )
    train_idx = np.arange(2, n)
    idx = torch.as_tensor(train_idx)
    own = MapSource(store, "teacher", train_idx, 0)(idx)
    assert torch.allclose(own[:, 0, 0, 0], idx.float() / 16, atol=1e-3)
    sh = MapSource(store, "shuffled", train_idx, 0)(idx)[:, 0, 0, 0] * 16
    assert sorted(sh.round().long().tolist()) == sorted(train_idx.tolist())  # a permutation of the training maps
    assert (sh.round().long() != idx).all()  # no image keeps its own map
    const = MapSource(store, "constant", train_idx, 0)(idx)
    assert torch.allclose(const, torch.full_like(const, float(train_idx.mean()) / 16), atol=1e-3)
    rnd = MapSource(store, "random", train_idx, 0)
    a, b = rnd(idx), rnd(idx)
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])  # fixed per image, differs between images


def test_frozen_m_stays_fixed_in_training():
    torch.manual_seed(0)
    m = build_impactx("mobilenet", 3, 10, (32, 32), decoder="paper")
    before = {k: v.clone() for k, v in m.m.state_dict().items()}
    m.freeze_m()
    m.train()
    assert not m.m.training and m.lep.training
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    opt.step()
    after = m.m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics unchanged


def test_gradcam_on_impactx_reads_m_feature_layer():
    """Grad-CAM post hoc on an IMPACTX model: by default at M's last spatial features, by hand."""
    from teachx.teachers.gradcam import GradCam

    torch.manual_seed(0)
    model = build_impactx("lenet5", 3, 10, (32, 32), decoder="paper").eval()
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    cam = GradCam().layer_cam(model, x, target)
    a = model.m.body(x).detach().requires_grad_(True)  # M's feature map, then the rest of the forward by hand
    logits = model.classifier(torch.cat([model.m.neck(a), model.lep.features(x)], 1))
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    expected = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-6)
