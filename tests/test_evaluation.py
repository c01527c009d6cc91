"""teachx.evaluation against closed forms, scipy/numpy and per-sample reference loops.

The references below are written independently of the library code (plain numpy / python
loops, step-by-step perturbation as Quantus does it), so a shared bug cannot hide.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from torch import nn

from teachx.errors import ConfigError
from teachx.evaluation import (
    CATEGORIES,
    METRICS,
    MPRT,
    Complexity,
    Deletion,
    EfficientMPRT,
    FaithfulnessCorrelation,
    Insertion,
    PixelFlippingLeRF,
    PixelFlippingMoRF,
    Sparseness,
    build_metric,
    evaluate_maps,
    gaussian_blur,
    histogram_entropy,
    map_agreement,
    pearson,
    randomisable_layers,
    randomised_models,
    rankdata,
    reconstruction_r2,
    spearman,
    ssim,
    top_k_intersection,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


def linear_model(channels=3, size=8, classes=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))
    return model.double()


def small_cnn(classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, classes),
    ).double()


def exact_contributions(model, x, y):
    """w_y * x per input element: the exact decomposition of a bias-free linear logit."""
    weight = model[1].weight[y].view_as(x)
    return (weight * x).detach()


def data(batch=5, channels=3, size=8, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels, size, size), generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


def grad_x_input(model, inputs, targets):
    inputs = inputs.clone().requires_grad_(True)
    out = model(inputs).gather(1, targets.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(out, inputs)
    return (grad * inputs).detach()


# ----------------------------------------------------------------------------- statistics


def test_rankdata_spearman_pearson_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)  # many ties
    b = rng.normal(size=(4, 30))
    ranks = rankdata(torch.from_numpy(a)).numpy()
    for i in range(4):
        np.testing.assert_allclose(ranks[i], stats.rankdata(a[i]))
        rho = spearman(torch.from_numpy(a[i : i + 1]), torch.from_numpy(b[i : i + 1]))
        np.testing.assert_allclose(rho.item(), stats.spearmanr(a[i], b[i]).statistic, atol=1e-12)
        r = pearson(torch.from_numpy(a[i : i + 1]), torch.from_numpy(b[i : i + 1]))
        np.testing.assert_allclose(r.item(), np.corrcoef(a[i], b[i])[0, 1], atol=1e-12)
    assert torch.isnan(pearson(torch.ones(1, 5), torch.randn(1, 5))).all()


def _ssim_reference(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """SSIM with explicit windows (Wang et al. 2004, skimage conventions)."""
    data_range = max(a.max(), b.max()) - min(a.min(), b.min())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            pa, pb = a[i : i + win, j : j + win].ravel(), b[i : i + win, j : j + win].ravel()
            cov = np.cov(pa, pb)  # sample covariance (ddof=1)
            ma, mb = pa.mean(), pb.mean()
            values.append(
                ((2 * ma * mb + c1) * (2 * cov[0, 1] + c2)) / ((ma**2 + mb**2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
            )
    return float(np.mean(values))


def test_ssim_matches_windowed_reference_and_skimage():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 12, 10))
    b = a + 0.5 * rng.normal(size=(2, 12, 10))
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], _ssim_reference(a[i], b[i]), atol=1e-10)
    np.testing.assert_allclose(ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy(), 1.0)
    skimage_metrics = pytest.importorskip("skimage.metrics")
    for i in range(2):
        data_range = max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min())
        ref = skimage_metrics.structural_similarity(a[i], b[i], win_size=7, data_range=data_range)
        np.testing.assert_allclose(ours[i], ref, atol=1e-10)


# ----------------------------------------------------------------------------- pixel flipping


@pytest.mark.parametrize("patch_size", [1, 2])
def test_morf_lerf_closed_form_on_linear_model(patch_size):
    """Linear logit, zero baseline, maps = w*x: after removing n features the logit is
    b + sum(all contributions) - sum(removed contributions), removed in map order."""
    model = linear_model()
    x, y = data()
    maps = torch.stack([exact_contributions(model, x[i], y[i]) for i in range(len(y))])
    steps = 8
    morf = PixelFlippingMoRF(steps=steps, patch_size=patch_size, output="logit")(model, x, y, maps)
    lerf = PixelFlippingLeRF(steps=steps, patch_size=patch_size, output="logit")(model, x, y, maps)
    p = patch_size
    for i in range(len(y)):
        per_pixel = maps[i].sum(0).numpy()
        per_feature = per_pixel.reshape(8 // p, p, 8 // p, p).sum(axis=(1, 3)).ravel()
        bias = model[1].bias[y[i]].item()
        n = per_feature.size
        for k in range(steps + 1):
            removed = n * k // steps
            top = np.sort(per_feature)[::-1][:removed].sum()
            bottom = np.sort(per_feature)[:removed].sum()
            assert morf.curves[i, k].item() == pytest.approx(bias + per_feature.sum() - top, abs=1e-9)
            assert lerf.curves[i, k].item() == pytest.approx(bias + per_feature.sum() - bottom, abs=1e-9)
    assert (morf.scores <= lerf.scores).all()
    x_axis = np.linspace(0, 1, steps + 1)
    np.testing.assert_allclose(morf.scores.numpy(), [np.trapezoid(c, x_axis) for c in morf.curves.numpy()])
    assert morf.higher_is_better is False and lerf.higher_is_better is True


def _pixel_flipping_reference(model, x, y, maps, steps, patch_size, baseline_fn, most_first, output):
    """Quantus-style: one image at a time, features perturbed cumulatively step by step."""
    curves = []
    for i in range(x.shape[0]):
        xi = x[i].numpy().copy()
        rel = maps[i].numpy().sum(0)
        p = patch_size
        rel = rel.reshape(rel.shape[0] // p, p, rel.shape[1] // p, p).sum(axis=(1, 3))
        grid_w = rel.shape[1]
        flat = rel.ravel()
        order = np.argsort(-flat if most_first else flat, kind="stable")
        base = baseline_fn(xi)
        current = xi.copy()

        def score(img):
            with torch.no_grad():
                logits = model(torch.from_numpy(img)[None])[0]
            values = torch.softmax(logits, 0) if output == "probability" else logits
            return values[y[i]].item()

        curve = [score(current)]
        done = 0
        for k in range(1, steps + 1):
            upto = flat.size * k // steps
            for f in order[done:upto]:
                r, c = divmod(int(f), grid_w)
                current[:, r * p : (r + 1) * p, c * p : (c + 1) * p] = base[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
            done = upto
            curve.append(score(current))
        curves.append(curve)
    return np.array(curves)


@pytest.mark.parametrize("most_first", [True, False])
def test_pixel_flipping_matches_per_sample_loop(most_first):
    model = small_cnn()
    x, y = data(batch=4, classes=5, seed=3)
    maps = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cls = PixelFlippingMoRF if most_first else PixelFlippingLeRF
    metric = cls(steps=5, patch_size=2, baseline="mean", output="probability", batch_size=3)
    result = metric(model, x, y, maps)
    mean_baseline = lambda img: np.broadcast_to(img.mean(axis=(1, 2), keepdims=True), img.shape)  # noqa: E731
    ref = _pixel_flipping_reference(model, x, y, maps, 5, 2, mean_baseline, most_first, "probability")
    np.testing.assert_allclose(result.curves.numpy(), ref, atol=1e-10)
    # chunking is a memory knob only
    again = cls(steps=5, patch_size=2, baseline="mean", batch_size=1000)(model, x, y, maps)
    np.testing.assert_allclose(again.curves.numpy(), result.curves.numpy(), atol=1e-12)


def test_deletion_insertion_end_points_and_blur():
    model = small_cnn()
    x, y = data(batch=3, classes=5, seed=5)
    maps = torch.rand((3, 3, 8, 8), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        p_x = torch.softmax(model(x), 1).gather(1, y[:, None]).squeeze(1)
        p_zero = torch.softmax(model(torch.zeros_like(x)), 1).gather(1, y[:, None]).squeeze(1)
        blurred = gaussian_blur(x, 1.0)
        p_blur = torch.softmax(model(blurred), 1).gather(1, y[:, None]).squeeze(1)
    deletion = Deletion(steps=4)(model, x, y, maps)
    np.testing.assert_allclose(deletion.curves[:, 0], p_x, atol=1e-12)
    np.testing.assert_allclose(deletion.curves[:, -1], p_zero, atol=1e-12)
    insertion = Insertion(steps=4, blur_sigma=1.0)(model, x, y, maps)
    np.testing.assert_allclose(insertion.curves[:, 0], p_blur, atol=1e-12)
    np.testing.assert_allclose(insertion.curves[:, -1], p_x, atol=1e-12)
    # our blur is scipy's Gaussian filter with edge replication, radius ceil(3 sigma)
    ref = np.stack(
        [[ndimage.gaussian_filter(img[c], 1.0, mode="nearest", truncate=3.0) for c in range(3)] for img in x.numpy()]
    )
    np.testing.assert_allclose(blurred.numpy(), ref, atol=1e-10)


def test_perturbation_baselines_and_errors():
    model = small_cnn()
    x, y = data(batch=2, classes=5)
    maps = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    a = PixelFlippingMoRF(steps=4, baseline="uniform", seed=3)(model, x, y, maps)
    b = PixelFlippingMoRF(steps=4, baseline="uniform", seed=3)(model, x, y, maps)
    c = PixelFlippingMoRF(steps=4, baseline="uniform", seed=4)(model, x, y, maps)
    assert torch.equal(a.curves, b.curves) and not torch.equal(a.curves, c.curves)
    const = PixelFlippingMoRF(steps=4, baseline=0.5)(model, x, y, maps)
    with torch.no_grad():
        p_half = torch.softmax(model(torch.full_like(x, 0.5)), 1).gather(1, y[:, None]).squeeze(1)
    np.testing.assert_allclose(const.curves[:, -1], p_half, atol=1e-12)
    with pytest.raises(ConfigError):
        PixelFlippingMoRF(patch_size=3)(model, x, y, maps)
    with pytest.raises(ConfigError):
        PixelFlippingMoRF(baseline="grey")
    with pytest.raises(ConfigError):
        PixelFlippingMoRF()(model, x, y, torch.rand(2, 2, 8, 8))
    with pytest.raises(ConfigError):
        PixelFlippingMoRF(steps=65)(model, x, y, maps)


# ----------------------------------------------------------------------------- faithfulness correlation


def test_faithfulness_correlation_is_one_for_exact_linear_contributions():
    model = linear_model()
    x, y = data()
    maps = torch.stack([exact_contributions(model, x[i], y[i]) for i in range(len(y))])
    metric = FaithfulnessCorrelation(n_runs=20, subset_size=10, output="logit", seed=0)
    scores = metric(model, x, y, maps).scores
    np.testing.assert_allclose(scores.numpy(), 1.0, atol=1e-10)
    # a map unrelated to the model correlates far less
    noise = torch.randn(maps.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert metric(model, x, y, noise).scores.mean() < 0.7


def test_faithfulness_correlation_matches_reference_loop_and_is_seeded():
    model = small_cnn()
    x, y = data(batch=3, classes=5, seed=7)
    maps = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    metric = FaithfulnessCorrelation(n_runs=12, subset_size=0.25, output="probability", baseline="mean", batch_size=5)
    result = metric(model, x, y, maps)
    masks = metric.subsets(3, 64, torch.device("cpu")).numpy()  # the subsets are the seeded input
    assert (masks.sum(-1) == 16).all()
    for i in range(3):
        xi = x[i].numpy()
        rel = maps[i, 0].numpy().ravel()
        with torch.no_grad():
            f0 = torch.softmax(model(x[i : i + 1]), 1)[0, y[i]].item()
        sums, drops = [], []
        for run in range(12):
            chosen = np.flatnonzero(masks[i, run])
            xp = xi.copy()
            for f in chosen:
                r, c = divmod(int(f), 8)
                xp[:, r, c] = xi[:, :, :].mean(axis=(1, 2))
            with torch.no_grad():
                fp = torch.softmax(model(torch.from_numpy(xp)[None]), 1)[0, y[i]].item()
            sums.append(rel[chosen].sum())
            drops.append(f0 - fp)
        assert result.scores[i].item() == pytest.approx(stats.pearsonr(sums, drops).statistic, abs=1e-9)
    same = FaithfulnessCorrelation(n_runs=12, subset_size=0.25, output="probability", baseline="mean", batch_size=64)
    assert torch.allclose(same(model, x, y, maps).scores, result.scores, atol=1e-12)
    other = FaithfulnessCorrelation(n_runs=12, subset_size=0.25, output="probability", baseline="mean", seed=1)
    assert not torch.allclose(other(model, x, y, maps).scores, result.scores)
    # image i's subsets do not depend on how many images follow it
    np.testing.assert_array_equal(metric.subsets(20, 64, torch.device("cpu"))[:3].numpy(), masks)


# ----------------------------------------------------------------------------- complexity


def test_complexity_closed_forms_and_scipy():
    n = 64
    uniform = torch.ones(1, 1, 8, 8) * 0.3
    one_hot = torch.zeros(1, 1, 8, 8)
    one_hot[0, 0, 2, 5] = -4.0
    assert Complexity()(None, torch.zeros(1, 3, 8, 8), None, uniform).scores.item() == pytest.approx(math.log(n))
    assert Complexity()(None, torch.zeros(1, 3, 8, 8), None, one_hot).scores.item() == pytest.approx(0.0)
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(3, 3, 8, 8))
    ours = Complexity()(None, torch.zeros(3, 3, 8, 8), None, torch.from_numpy(maps)).scores.numpy()
    ref = [stats.entropy(np.abs(m.sum(0)).ravel()) for m in maps]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert Complexity.higher_is_better is False and Complexity.needs_model is False


def _gini_mean_difference(values: np.ndarray) -> float:
    """Gini = sum_ij |x_i - x_j| / (2 n^2 mean): a definition independent of sorting."""
    v = np.abs(values.ravel())
    return float(np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size**2 * v.mean()))


def test_sparseness_gini_known_vectors():
    x = torch.zeros(1, 1, 2, 2)
    hand = torch.tensor([0.0, 0.0, 1.0, -3.0]).view(1, 1, 2, 2)
    assert Sparseness()(None, x, None, hand).scores.item() == pytest.approx(0.625)  # 10 / 16
    assert Sparseness()(None, x, None, torch.full((1, 1, 2, 2), 2.0)).scores.item() == pytest.approx(0.0)
    one_hot = torch.zeros(1, 1, 2, 2)
    one_hot[0, 0, 1, 1] = 5.0
    assert Sparseness()(None, x, None, one_hot).scores.item() == pytest.approx(3 / 4)
    assert Sparseness()(None, x, None, torch.zeros(1, 1, 2, 2)).scores.item() == 0.0
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(4, 1, 6, 6))
    ours = Sparseness()(None, torch.zeros(4, 1, 6, 6), None, torch.from_numpy(maps)).scores.numpy()
    np.testing.assert_allclose(ours, [_gini_mean_difference(m) for m in maps], atol=1e-12)


# ----------------------------------------------------------------------------- randomisation


def test_mprt_weight_independent_explanation_scores_one_and_model_is_untouched():
    model = small_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(batch=3, classes=5)
    edge_map = lambda m, inputs, targets: inputs.diff(dim=-1, prepend=inputs[..., :1]).abs()  # noqa: E731
    for order in ("top_down", "bottom_up", "independent"):
        for similarity in ("spearman", "pearson", "ssim"):
            result = MPRT(order=order, similarity=similarity)(model, x, y, None, edge_map)
            np.testing.assert_allclose(result.curves.numpy(), 1.0, atol=1e-12)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert model.training  # train flag restored


def test_mprt_layer_orders_and_gradient_explanations_change():
    model = small_cnn()
    x, y = data(batch=4, classes=5)
    layers = randomisable_layers(model)
    assert layers == ["0", "4", "6"]
    result = MPRT(order="top_down")(model, x, y, None, grad_x_input)
    assert result.extra["layers"] == ["6", "4", "0"]
    assert result.curves.shape == (4, 3)
    assert (result.scores < 0.9).all()  # fully randomised: grad x input no longer matches
    # cascading: step k has the last k+1 layers randomised; independent: only layer k
    original = dict(model.named_parameters())
    for order, expected in (("top_down", [{"6"}, {"6", "4"}, {"6", "4", "0"}]), ("independent", [{"0"}, {"4"}, {"6"}])):
        for step, (_, copy_) in enumerate(randomised_models(model, order)):
            changed = {n.split(".")[0] for n, p in copy_.named_parameters() if not torch.equal(p, original[n])}
            assert changed == expected[step]


def test_histogram_entropy_matches_numpy_and_scipy():
    rng = np.random.default_rng(4)
    maps = [
        rng.normal(size=(1, 9, 9)),
        rng.integers(0, 7, size=(1, 9, 9)).astype(float),
        np.linspace(0, 1, 81).reshape(1, 9, 9),
    ]
    for m in maps:
        for bins in (10, 100):
            ref = stats.entropy(np.histogram(m, bins=bins)[0])
            ours = histogram_entropy(torch.from_numpy(m)[None].sum(1), bins).item()
            assert ours == pytest.approx(ref, abs=1e-12)
    assert histogram_entropy(torch.ones(1, 4, 4)).item() == 0.0


def test_efficient_mprt_definition():
    model = small_cnn()
    x, y = data(batch=3, classes=5)
    edge_map = lambda m, inputs, targets: inputs.diff(dim=-1, prepend=inputs[..., :1]).abs()  # noqa: E731
    flat = EfficientMPRT()(model, x, y, None, edge_map)
    np.testing.assert_allclose(flat.scores.numpy(), 0.0, atol=1e-12)
    result = EfficientMPRT(n_bins=20)(model, x, y, None, grad_x_input)
    h0 = histogram_entropy(grad_x_input(model, x, y).sum(1), 20)
    np.testing.assert_allclose(result.extra["entropy_original"], h0, atol=1e-12)
    expected = (result.extra["entropy_randomised"] - h0) / h0
    np.testing.assert_allclose(result.scores, expected, atol=1e-12)
    assert EfficientMPRT.higher_is_better and EfficientMPRT.category == "randomisation"
    with pytest.raises(ConfigError):
        EfficientMPRT()(model, x, y, None, None)


# ----------------------------------------------------------------------------- agreement


def test_map_agreement_against_scipy_and_hand_cases():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 1, 5, 5))
    b = a + rng.normal(size=(3, 1, 5, 5))
    out = map_agreement(torch.from_numpy(a), torch.from_numpy(b), k=5)
    for i in range(3):
        fa, fb = a[i].ravel(), b[i].ravel()
        assert out["spearman"][i].item() == pytest.approx(stats.spearmanr(fa, fb).statistic, abs=1e-12)
        assert out["pearson"][i].item() == pytest.approx(stats.pearsonr(fa, fb).statistic, abs=1e-12)
        cos = fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
        assert out["cosine"][i].item() == pytest.approx(cos, abs=1e-12)
        top_a, top_b = set(np.argsort(-fa)[:5]), set(np.argsort(-fb)[:5])
        assert out["top_k_intersection"][i].item() == pytest.approx(len(top_a & top_b) / 5)
    hand_a = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).view(1, 1, 2, 2)
    hand_b = torch.tensor([[4.0, 1.0, 3.0, 2.0]]).view(1, 1, 2, 2)
    assert top_k_intersection(hand_a, hand_b, k=2).item() == 0.5  # {0,1} vs {0,2}
    # per-channel maps are summed before comparing
    c3 = torch.from_numpy(a).repeat(1, 3, 1, 1) / 3
    np.testing.assert_allclose(map_agreement(c3, torch.from_numpy(a))["pearson"].numpy(), 1.0)


def test_reconstruction_r2():
    target = torch.tensor([[1.0, 2.0, 3.0, 6.0]]).view(1, 1, 2, 2)
    mean_map = torch.full((1, 2, 2), 2.0)
    assert reconstruction_r2(target, target, mean_map).item() == 1.0
    assert reconstruction_r2(mean_map.expand_as(target), target, mean_map).item() == 0.0
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).view(1, 1, 2, 2)
    # mse(pred)=4/4=1; mse(mean)=(1+0+1+16)/4=4.5 -> 1 - 1/4.5
    assert reconstruction_r2(pred, target, mean_map).item() == pytest.approx(1 - 1 / 4.5)


# ----------------------------------------------------------------------------- registry / evaluate_maps


def test_registry_metadata():
    for name in METRICS.names():
        cls = METRICS.get(name)
        assert cls.category in CATEGORIES and isinstance(cls.higher_is_better, bool)
        assert "image" in cls.data_applicability and cls.__doc__
    assert METRICS.get("morf") is PixelFlippingMoRF and METRICS.get("emprt") is EfficientMPRT
    with pytest.raises(ConfigError, match="did you mean"):
        METRICS.get("sparsenes")


def test_evaluate_maps_report():
    model = linear_model()
    x, y = data(batch=6)
    exact = torch.stack([exact_contributions(model, x[i], y[i]) for i in range(len(y))])
    metrics = [
        build_metric("morf", steps=8, output="logit"),
        build_metric("faithfulness_correlation", n_runs=10, subset_size=8),
        "sparseness",
        "mprt",
    ]
    report = evaluate_maps(
        model,
        x,
        y,
        {"exact": exact, "shifted": exact + 0.1},
        metrics=metrics,
        explain_fns={"grad_x_input": grad_x_input},
        agreement_reference="exact",
    )
    json.dumps(report, allow_nan=False)
    assert set(report["maps"]) == {"exact", "shifted", "random"}
    assert report["metrics"]["pixel_flipping_morf"]["higher_is_better"] is False
    fc = report["maps"]["exact"]["faithfulness_correlation"]
    assert fc["mean"] == pytest.approx(1.0) and len(fc["values"]) == 6
    assert (
        report["maps"]["random"]["pixel_flipping_morf"]["mean"] > report["maps"]["exact"]["pixel_flipping_morf"]["mean"]
    )
    assert "mprt" in report["explainers"]["grad_x_input"] and "mprt" not in report["maps"]["exact"]
    assert report["agreement"]["sets"]["shifted"]["spearman"]["mean"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- Quantus, where it imports


# Quantus 0.6 is a reference only (never a dependency): tests/_quantus.py loads it with the
# narrowest shims (a stub for cv2/torchvision where they do not import; np.trapz aliased during
# use) and these tests skip cleanly where it is not installed. Models run in float32 because
# Quantus' torch wrapper feeds torch.Tensor(x) (float32); tolerances are float32-sized there.


def _load_quantus():
    from _quantus import load_quantus

    try:
        return load_quantus()
    except ImportError as error:
        pytest.skip(f"quantus unavailable: {error}")


def _quantus_case(batch=3, channels=3, seed=0):
    """float32 small CNN (eval) on 8x8 images, labels, and a strictly positive random map per image."""
    model = small_cnn().float().eval()
    x, y = data(batch=batch, classes=5)
    x = x.float()
    maps = torch.rand((batch, channels, 8, 8), generator=torch.Generator().manual_seed(seed))
    return model, x, y, maps


def _black(x):
    """Quantus' "black" baseline: the image's minimum over all channels (not 0)."""
    return x.flatten(1).min(1).values.view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps, normalise", [(4, False), (16, False), (8, True)])
def test_quantus_pixel_flipping_curve_is_ours_without_the_first_point(steps, normalise):
    """Quantus' PixelFlipping with a one-channel map == our MoRF curve, every 3rd Quantus point.

    Quantus broadcasts the map over the C=3 channels and flips C*H*W *elements*, but asserts
    that features_in_step divides H*W, so a step cannot be a whole number of pixels. With
    features_in_step = H*W/steps its curve has 3*steps points; the C copies of a pixel tie and
    sort together, so after every 3rd step exactly our H*W/steps * k pixels are flipped:
    q[:, 2::3] == ours.curves[:, 1:] (atol 1e-6, float32 model). normalise=True (by max) does
    not change the order, so not the curve either.
    """
    quantus = _load_quantus()
    model, x, y, maps = _quantus_case(channels=1)
    q_curves = np.asarray(
        quantus.PixelFlipping(features_in_step=64 // steps, normalise=normalise, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=True
        )
    )
    ours = PixelFlippingMoRF(steps=steps, baseline=_black(x))(model, x, y, maps)
    assert q_curves.shape == (3, 3 * steps)
    np.testing.assert_allclose(ours.curves[:, 1:].numpy(), q_curves[:, 2::3], atol=1e-6)


@pytest.mark.parametrize("features_in_step", [4, 16])
def test_quantus_pixel_flipping_per_channel_features_and_auc(features_in_step):
    """With per-channel maps and reduce_channels=False both flip single elements: every point of
    Quantus' curve is ours (steps = C*H*W / features_in_step, atol 1e-6). Quantus' AUC is
    trapz(curve, dx=1) without the unperturbed point (atol 1e-5); ours is the trapezoid over
    x in [0, 1] with it."""
    from _quantus import numpy_compat

    quantus = _load_quantus()
    model, x, y, maps = _quantus_case(channels=3)
    kwargs = dict(features_in_step=features_in_step, normalise=False, disable_warnings=True)
    call = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=True)
    q_curves = np.asarray(quantus.PixelFlipping(**kwargs)(**call))
    with numpy_compat():  # Quantus' calculate_auc calls np.trapz, gone in numpy 2.4
        q_auc = np.asarray(quantus.PixelFlipping(return_auc_per_sample=True, **kwargs)(**call))
    steps = 3 * 64 // features_in_step
    ours = PixelFlippingMoRF(steps=steps, baseline=_black(x), reduce_channels=False)(model, x, y, maps)
    np.testing.assert_allclose(ours.curves[:, 1:].numpy(), q_curves, atol=1e-6)
    np.testing.assert_allclose(q_auc, np.trapezoid(ours.curves[:, 1:].numpy(), dx=1, axis=1), atol=1e-5)
    x_axis = np.linspace(0, 1, steps + 1)
    np.testing.assert_allclose(ours.scores.numpy(), np.trapezoid(ours.curves.numpy(), x_axis, axis=1), atol=1e-12)


def test_quantus_pixel_flipping_with_zero_baseline_is_our_deletion():
    """Deletion (zero canvas) == Quantus PixelFlipping(perturb_baseline=0.0) without the x=0 point."""
    quantus = _load_quantus()
    model, x, y, maps = _quantus_case(channels=1)
    q_curves = quantus.PixelFlipping(features_in_step=4, perturb_baseline=0.0, normalise=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=True
    )
    ours = Deletion(steps=16)(model, x, y, maps)
    np.testing.assert_allclose(ours.curves[:, 1:].numpy(), np.asarray(q_curves)[:, 2::3], atol=1e-6)


@pytest.mark.parametrize("order, metric", [("morf", PixelFlippingMoRF), ("lerf", PixelFlippingLeRF)])
def test_quantus_region_perturbation_is_our_patch_curve_as_drops(order, metric):
    """RegionPerturbation(patch_size=p) flips one p x p patch (all channels) per step, ordered by
    the patch's relevance sum, and reports f(x) - f(x_k): ours with patch_size=p, one patch per
    step, gives curves[:, :1] - curves[:, 1:] (atol 1e-6)."""
    pytest.importorskip("skimage.util")  # Quantus builds its patches with skimage.util.view_as_blocks
    quantus = _load_quantus()
    model, x, y, maps = _quantus_case(channels=1)
    q_drops = quantus.RegionPerturbation(
        patch_size=2, order=order, regions_evaluation=16, normalise=False, disable_warnings=True
    )(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=True)
    curves = metric(steps=16, patch_size=2, baseline=_black(x))(model, x, y, maps).curves.numpy()
    np.testing.assert_allclose(curves[:, :1] - curves[:, 1:], np.asarray(q_drops), atol=1e-6)


def test_quantus_sparseness_is_our_gini_of_abs_plus_1e7():
    """Quantus' Sparseness is the Gini index of |a| + 1e-7. Ours leaves the 1e-7 out: equal to
    1e-12 once we add it, within 1e-5 on ordinary maps, and scale-free where Quantus is not."""
    quantus = _load_quantus()
    _, x, _, _ = _quantus_case()
    maps = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    maps[0, 0, :4] = 0.0  # some exact zeros

    def q_gini(a):
        return np.asarray(
            quantus.Sparseness(normalise=False, abs=True, disable_warnings=True)(
                model=None, x_batch=x.double().numpy(), y_batch=np.zeros(3, dtype=int), a_batch=a.numpy().copy()
            )
        )

    np.testing.assert_allclose(Sparseness()(None, x, None, maps.abs() + 1e-7).scores.numpy(), q_gini(maps), atol=1e-12)
    np.testing.assert_allclose(Sparseness()(None, x, None, maps).scores.numpy(), q_gini(maps), atol=1e-5)
    tiny = maps * 1e-8  # same map at a smaller scale: ours unchanged, Quantus' pulled towards 0
    ours_tiny, ours = (Sparseness()(None, x, None, a).scores.numpy() for a in (tiny, maps))
    np.testing.assert_allclose(ours_tiny, ours, atol=1e-12)
    assert (q_gini(tiny) < q_gini(maps) - 0.1).all()


def test_quantus_complexity_is_our_entropy():
    """Quantus' Complexity: -sum p log(p + 1e-12), p = |a| / sum |a|; ours: scipy.stats.entropy(|a|).
    The 1e-12 moves the value by at most n * 1e-12 (atol 1e-9)."""
    quantus = _load_quantus()
    _, x, _, _ = _quantus_case()
    maps = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    maps[1, 0, 2:] = 0.0  # a concentrated map
    q = quantus.Complexity(normalise=False, abs=True, disable_warnings=True)(
        model=None, x_batch=x.double().numpy(), y_batch=np.zeros(3, dtype=int), a_batch=maps.numpy().copy()
    )
    np.testing.assert_allclose(Complexity()(None, x, None, maps).scores.numpy(), np.asarray(q), atol=1e-9)


class _GivenSubsets(FaithfulnessCorrelation):
    """Our metric with its random subsets replaced by given masks (to share Quantus' draws)."""

    def __init__(self, masks, **kwargs):
        super().__init__(n_runs=masks.shape[1], **kwargs)
        self.masks = masks

    def _subset_blocks(self, batch, n_features):
        yield 0, self.masks


def _quantus_subsets(seed, batch, n_runs, n_features, subset_size):
    """The subsets Quantus draws after np.random.seed(seed): run by run, image by image."""
    np.random.seed(seed)
    masks = torch.zeros((batch, n_runs, n_features), dtype=torch.bool)
    for run in range(n_runs):
        for image in range(batch):
            masks[image, run, np.random.choice(n_features, subset_size, replace=False)] = True
    return masks


def test_quantus_faithfulness_correlation_on_shared_draws():
    """Quantus draws subsets from numpy's global RNG; we replay its draws (same seed) into our
    metric, with per-channel features (reduce_channels=False: Quantus' C*H*W elements), logit
    output and a zero baseline. Same Pearson correlations (atol 1e-5, float32 model). On a
    linear model with the exact contributions as maps both are 1 whatever the draws."""
    quantus = _load_quantus()
    model, x, y, maps = _quantus_case(channels=3)
    state = np.random.get_state()
    try:
        masks = _quantus_subsets(7, 3, 10, 3 * 64, 20)
        np.random.seed(7)
        options = dict(nr_runs=10, subset_size=20, perturb_baseline=0.0, normalise=False, return_aggregate=False)
        q = quantus.FaithfulnessCorrelation(**options, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), softmax=False
        )
        ours = _GivenSubsets(masks, subset_size=20, baseline="zero", output="logit", reduce_channels=False)
        np.testing.assert_allclose(ours(model, x, y, maps).scores.numpy(), np.asarray(q), atol=1e-5)

        linear = linear_model(classes=5).float().eval()
        exact = torch.stack([exact_contributions(linear, x[i], y[i]) for i in range(3)]).float()
        q_linear = quantus.FaithfulnessCorrelation(**options, disable_warnings=True)(
            model=linear, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=exact.numpy(), softmax=False
        )
        ours_linear = FaithfulnessCorrelation(n_runs=10, subset_size=20, reduce_channels=False)(linear, x, y, exact)
        np.testing.assert_allclose(np.asarray(q_linear), 1.0, atol=1e-5)
        np.testing.assert_allclose(ours_linear.scores.numpy(), 1.0, atol=1e-5)
    finally:
        np.random.set_state(state)


def test_quantus_mprt_independent_layers_match_with_aligned_seeds():
    """Quantus' MPRT re-initialises every layer under torch.manual_seed(seed + 1); ours uses
    seed + layer index. With order="independent" and our seed set per layer so that
    seed + index = 43 (Quantus' default 42 + 1), each layer gets the same weights, and the
    Spearman similarity of |gradient x input| maps agrees per layer (atol 1e-6). Quantus'
    extra "original" entry (a_batch vs the original model's maps) is 1."""
    quantus = _load_quantus()
    model, x, y, _ = _quantus_case()

    def explain(model, inputs, targets):  # torch in, torch out, one channel
        return grad_x_input(model, inputs, targets).sum(1, keepdim=True)

    def q_explain(model, inputs, targets, **kwargs):  # Quantus' explain_func: numpy in and out
        out = explain(model, torch.as_tensor(inputs), torch.as_tensor(targets).long())
        return out.numpy()

    a_batch = explain(model, x, y).numpy()
    with torch.random.fork_rng(devices=[]):
        q = quantus.MPRT(layer_order="independent", normalise=False, abs=True, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a_batch, explain_func=q_explain
        )
    layers = randomisable_layers(model)
    assert list(q) == ["original", *layers]
    np.testing.assert_allclose(q["original"], 1.0, atol=1e-12)
    for index, name in enumerate(layers):
        ours = MPRT(order="independent", seed=43 - index, layers=[name], abs=True)(model, x, y, explain_fn=explain)
        np.testing.assert_allclose(ours.scores.numpy(), np.asarray(q[name]), atol=1e-6, err_msg=name)


def test_undefined_scores_are_counted_not_averaged():
    from teachx.evaluation import MetricResult

    result = MetricResult("x", torch.tensor([1.0, float("nan"), 3.0]), True)
    summary = result.to_dict()
    assert summary["mean"] == 2.0 and summary["n_undefined"] == 1 and summary["values"][1] is None
    json.dumps(summary, allow_nan=False)
    # an all-zero map has no fractional contributions: complexity is undefined
    assert torch.isnan(Complexity()(None, torch.zeros(1, 1, 2, 2), None, torch.zeros(1, 1, 2, 2)).scores).all()
