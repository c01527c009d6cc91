"""teachx.reveal against independent references: the spectral pipeline and the eigengap on blobs of known
number, the pattern CAV against the closed form, the SVM CAV against a planted direction, the retrieval AUROC
against scikit-learn, and localisation (LRP from a layer and gradient x input) on a model where the answer is
computable by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from sklearn.metrics import adjusted_rand_score, roc_auc_score  # noqa: E402

from teachx.errors import DataError  # noqa: E402
from teachx.reveal.cav import auroc, cav_scores, classifier_cav, fit_cav, pattern_cav  # noqa: E402
from teachx.reveal.features import check_layer, layer_shapes, pooled_activations  # noqa: E402
from teachx.reveal.localise import (  # noqa: E402
    artefact_mask,
    concept_masks,
    contrast,
    localise,
    mask_iou,
    otsu_masks,
    reference_indices,
)
from teachx.reveal.spectral import (  # noqa: E402
    cluster_embedding,
    eigengap,
    knn_affinity,
    spectral_embedding,
)
from teachx.teachers.lrp import Lrp  # noqa: E402


def blobs(k: int = 3, per: int = 40, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, dim)) * 6
    x = np.concatenate([rng.normal(c, 0.3, (per, dim)) for c in centres])
    return x, np.repeat(np.arange(k), per)


@pytest.mark.parametrize("per", [40, 600])  # the dense eigensolver, and ARPACK above 1500 samples
def test_three_separated_blobs_give_three_groups(per):
    x, truth = blobs(per=per)
    lam, vec = spectral_embedding(knn_affinity(x, 10), 8)
    assert np.allclose(lam[:3], 0, atol=1e-6) and lam[3] > 0.05  # one zero eigenvalue per connected blob
    assert eigengap(lam, 8) == 3
    assert adjusted_rand_score(truth, cluster_embedding(vec, 3)) == 1.0


def test_eigengap_reads_the_largest_jump():
    assert eigengap(np.array([0, 0.01, 0.02, 0.9, 0.95]), 4) == 3
    assert eigengap(np.array([0, 0.8, 0.85, 0.9]), 3) == 1
    assert eigengap(np.array([0, 0.1, 0.2, 0.3, 0.4, 5.0]), 3) == 1  # only the first max_groups gaps count


def test_pattern_cav_is_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (200, 6)) @ rng.normal(0, 1, (6, 6))  # correlated features
    y = rng.random(200) < 0.3
    x[y] += np.array([2.0, 0, -1, 0, 0, 0.5])
    ref = np.cov(np.column_stack([x, y.astype(float)]).T)[:-1, -1]  # cov(x_j, y) for every j
    ref = ref / np.linalg.norm(ref)
    assert np.allclose(pattern_cav(x, y), ref, atol=1e-12)
    cav = fit_cav(x, y, "pattern", "layer")
    assert np.allclose(cav.direction, ref) and cav.concept_mean > cav.rest_mean and cav.layer == "layer"


@pytest.mark.parametrize("kind", ["svm", "logistic"])
def test_classifier_cav_separates_a_planted_direction(kind):
    rng = np.random.default_rng(1)
    d = np.zeros(10)
    d[3], d[7] = 0.6, -0.8
    x = rng.normal(0, 1, (300, 10))
    y = rng.random(300) < 0.25
    x[y] += 4 * d
    w = classifier_cav(x, y, kind)
    assert np.isclose(np.linalg.norm(w), 1.0)
    assert w @ d > 0.8  # close to the planted direction
    assert roc_auc_score(y, cav_scores(x, w)) > 0.97
    flipped = fit_cav(x, ~y, kind)  # always oriented towards the concept
    assert flipped.concept_mean > flipped.rest_mean


def test_cav_needs_two_on_each_side():
    x = np.zeros((5, 3))
    with pytest.raises(DataError, match="at least 2 concept samples"):
        pattern_cav(x, np.array([1, 0, 0, 0, 0], bool))


def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(0, 1, 500), 1)  # many ties
    t = rng.random(500) < (0.2 + 0.5 * (s > 0))
    assert auroc(s, t) == pytest.approx(roc_auc_score(t, s), abs=1e-12)
    assert np.isnan(auroc(s, np.zeros(500, bool)))


class PlantedModel(nn.Module):
    """A 1x1 conv copying both input channels (identity weights, no bias), a ReLU, pooling and a linear
    head: the concept 'channel 0 at the layer' is exactly the positive part of input channel 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))

    def forward(self, x):
        return self.head(self.act(self.conv(x)))


def planted_inputs(n: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 2, 12, 12)
    x[:, 1] = torch.rand(n, 12, 12, generator=g) + 0.5  # channel 1: everywhere, not the concept
    truth = np.zeros((n, 12, 12), bool)
    for i in range(n):
        r, c = 2 + i, 3 + i
        x[i, 0, r : r + 3, c : c + 4] = 1.0 + 0.2 * i  # channel 0: the planted feature
        truth[i, r : r + 3, c : c + 4] = True
    return x, truth


@pytest.mark.parametrize("method", ["lrp", "gradient"])
def test_localisation_finds_the_planted_feature(method):
    model = PlantedModel().eval()
    x, truth = planted_inputs()
    heat = localise(model, x, model.act, np.array([1.0, 0.0]), method)
    assert heat.shape == (4, 12, 12)
    assert torch.allclose(heat, x[:, 0], atol=1e-5)  # relevance = positive part of channel 0, by hand
    masks = artefact_mask(heat)
    assert np.array_equal(mask_iou(masks, truth), np.ones(4))
    assert mask_iou(masks, np.roll(truth, 6, axis=2)).max() < 0.5


def test_otsu_masks_keep_the_high_part_of_each_heatmaps_positive_values():
    """By hand: positive values 1, 1, 5, 5 split at 3 (the two levels); equal positive values are all kept; an
    image without positive relevance gets an empty mask; negative values are never in a mask."""
    h = np.zeros((3, 2, 4))
    h[0] = [[1, 1, 5, 5], [0, -9, 0, 0]]
    h[1] = [[2, 2, 2, 0], [-1, 0, 0, 0]]
    h[2] = -1.0
    masks = otsu_masks(h)
    assert np.array_equal(masks[0], [[0, 0, 1, 1], [0, 0, 0, 0]])
    assert np.array_equal(masks[1], [[1, 1, 1, 0], [0, 0, 0, 0]])
    assert not masks[2].any()


def test_contrast_subtracts_the_nearest_references_where_the_image_changed():
    """Two references, one image nearer to each: each heatmap loses its nearest reference's heatmap (one
    neighbour), and keeps only the pixels where the image differs from that reference by more than 0.1."""
    refs = np.zeros((2, 1, 2, 2))
    refs[1] += 10.0
    ref_heat = np.array([[[1.0, 1.0], [1.0, 1.0]], [[4.0, 4.0], [4.0, 4.0]]])
    images = np.stack([refs[0], refs[1]]).copy()
    images[0, 0, 0, 0] += 3.0  # near reference 0, changed at one pixel
    images[1, 0, 1, 1] += 0.05  # near reference 1, changed by less than the tolerance
    heat = np.array([[[5.0, 2.0], [2.0, 2.0]], [[9.0, 9.0], [9.0, 9.0]]])
    got = contrast(heat, images, ref_heat, refs, neighbours=1, changed=0.1)
    assert np.array_equal(got, [[[4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # two neighbours: the mean of both references' heatmaps and images
    got = contrast(heat, images, ref_heat, refs, neighbours=2, changed=0.1)
    assert np.allclose(got[0], (heat[0] - 2.5) * (np.abs(images[0, 0] - 5.0) > 0.1))


def test_reference_indices_are_the_lowest_scores():
    scores = np.array([0.5, -1.0, 2.0, -3.0, 0.0])
    indices = np.array([10, 11, 12, 13, 14])
    assert reference_indices(scores, indices, limit=2).tolist() == [13, 11]
    assert reference_indices(scores, indices, limit=10).tolist() == [13, 11, 14, 10, 12]


def test_an_image_is_never_its_own_reference():
    """An image among the references would cancel itself: its nearest other reference stands in."""
    refs = np.array([[[[0.0]]], [[[1.0]]], [[[5.0]]]])
    ref_heat = np.array([[[0.0]], [[1.0]], [[5.0]]])
    same = np.array([[False, True, False]])  # the image is reference 1
    got = contrast(np.array([[[1.0]]]), refs[1:2], ref_heat, refs, neighbours=1, same=same)
    assert got.tolist() == [[[1.0]]]  # minus reference 0's heatmap (the nearest other), not its own


def garment_inputs(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """(images with the planted artefact, its masks, references without it): every image has the same bright
    block (a "garment", 2.0 +- 0.02: brighter than the artefact, and seen by the concept channel too); the
    artefact images add a 2x3 patch of 1.0-1.5 at a different place each."""
    g = torch.Generator().manual_seed(seed)

    def garment(k: int) -> torch.Tensor:
        x = torch.zeros(k, 2, 12, 12)
        x[:, 0, 4:9, 4:9] = 2.0 + 0.02 * (2 * torch.rand(k, 5, 5, generator=g) - 1)
        return x

    x, truth = garment(n), np.zeros((n, 12, 12), bool)
    for i in range(n):
        r, c = [(0, 0), (0, 9), (10, 0), (10, 9), (1, 5), (9, 4)][i % 6]
        x[i, 0, r : r + 2, c : c + 3] = 1.0 + 0.1 * i
        truth[i, r : r + 2, c : c + 3] = True
    return x, truth, garment(8)


@pytest.mark.parametrize("method", ["lrp", "gradient"])
def test_concept_masks_find_the_planted_artefact_beside_a_brighter_shared_feature(method):
    """The concept channel sees the artefact and the garment every image shares. A share of each heatmap's
    maximum marks the garment (brighter) and misses the artefact; contrasted with references without the
    artefact, the garment cancels and the masks are the artefact exactly."""
    model = PlantedModel().eval()
    x, truth, refs = garment_inputs()
    images = torch.cat([x, refs])

    def batches(idx: np.ndarray) -> torch.Tensor:
        return images[torch.as_tensor(np.asarray(idx))]

    chosen, references = np.arange(len(x)), np.arange(len(x), len(images))
    heat, masks = concept_masks(model, batches, chosen, references, model.act, np.array([1.0, 0.0]), method, 4)
    assert np.allclose(heat, x[:, 0].numpy(), atol=1e-5)  # the concept heatmap: channel 0, by hand
    assert mask_iou(artefact_mask(heat), truth).max() < 0.5  # the former rule: the garment
    assert np.array_equal(mask_iou(masks, truth), np.ones(len(x)))


def test_lrp_from_a_layer_conserves_the_start(small_cnn, inputs):
    """Relevance started at an inner layer adds up to the start at the input (epsilon rules, no biases)."""
    for m in small_cnn.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    layer = small_cnn.body[4]
    start = lambda a: a.clamp(min=0) * 0.5  # noqa: E731
    rel = Lrp(composite="epsilon", epsilon=1e-9).attribute_from_layer(small_cnn, inputs, layer, start)
    with torch.no_grad():
        a = small_cnn.body(inputs)
    assert rel.shape == inputs.shape
    assert torch.allclose(rel.sum((1, 2, 3)), start(a).sum((1, 2, 3)), rtol=1e-3)
    assert not any(m._forward_hooks for m in small_cnn.modules())  # no hooks left behind


def test_layers_are_listed_and_checked(small_cnn, inputs):
    shapes = layer_shapes(small_cnn, inputs)
    assert shapes["body.3"] == (16, 8, 8) and "classifier" in shapes
    assert check_layer(None, shapes) == "body"  # the last feature maps
    from teachx.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"unknown layer 'body.33' \(did you mean 'body.3'\?\); valid layers: body.0,"
    ):
        check_layer("body.33", shapes)
    acts = pooled_activations(small_cnn, lambda idx: inputs[idx], np.arange(6), "body.4", batch_size=4)
    with torch.no_grad():
        ref = small_cnn.body(inputs).amax((2, 3))
    assert np.allclose(acts, ref.numpy(), atol=1e-6)


def test_pooled_relevances_conserve_the_target_logit(small_cnn, inputs):
    """LRP relevance read at an inner layer, summed over its channels, is the target logit (epsilon rules, no
    biases), and a channel's relevance is zero where the layer is zero."""
    from teachx.reveal.features import pooled_relevances

    for m in small_cnn.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    targets = np.array([0, 1, 2, 3, 4, 0])
    rel = pooled_relevances(
        small_cnn, lambda idx: inputs[idx], np.arange(6), targets, "body.4", batch_size=4, composite="epsilon"
    )
    with torch.no_grad():
        logits = small_cnn(inputs)[torch.arange(6), torch.as_tensor(targets)]
        dead = small_cnn.body(inputs).amax((2, 3)) == 0
    assert rel.shape == (6, 16)
    assert np.allclose(rel.sum(1), logits.numpy(), rtol=1e-3, atol=1e-5)
    assert np.all(rel[dead.numpy()] == 0)


def test_sample_scores_follow_the_group_ranking():
    """Each sample scores as its group, its own silhouette breaking ties within the group only: every member
    of a higher-ranked group scores above every member of a lower-ranked one (the detection AUROC then
    measures the ranking; scores by each sample's silhouette mixed loose groups' cores above the top group)."""
    from sklearn.metrics import silhouette_samples

    from teachx.reveal.spectral import rank_groups

    rng = np.random.default_rng(0)
    # a tight minority, a loose main body, and a loose middle group whose core sits near its centre
    x = np.concatenate([rng.normal(0, 0.2, (20, 4)), rng.normal(4, 1.5, (60, 4)), rng.normal(-4, 1.2, (40, 4))])
    labels = np.repeat([0, 1, 2], [20, 60, 40])
    groups, scores = rank_groups(x, labels, np.arange(len(x)) + 7)
    assert groups[0].group == 0  # the tight minority first
    for hi, lo in zip(groups, groups[1:]):
        a, b = labels == hi.group, labels == lo.group
        assert scores[a].min() > scores[b].max(), (hi, lo)
    sil = silhouette_samples(x, labels)
    for g in groups:  # within a group, the typical (high-silhouette) members first
        rows = labels == g.group
        assert np.argsort(scores[rows]).tolist() == np.argsort(sil[rows]).tolist()


def test_otsu_threshold_cuts_between_the_two_modes():
    from teachx.reveal.cav import otsu_threshold

    # by hand: [0, 0, 0 | 1, 1] has between-part variance 0.4 * 0.6 * 1 = 0.24, every other cut less
    assert otsu_threshold(np.array([1.0, 0.0, 0.0, 1.0, 0.0])) == 0.5
    # [0, 0 | 4, 5]: 0.25 * 4.5**2 = 5.06 beats [0, 0, 4 | 5] (0.1875 * 3.67**2 = 2.52)
    assert otsu_threshold(np.array([0.0, 5.0, 0.0, 4.0])) == 2.0


def test_grown_concept_takes_in_the_rest_of_a_partial_pure_seed():
    """A pure seed holding half of a concept's images, which also share a corner the others lack (as a
    clustering group holds the timestamps of one corner): grown against the other classes, the set becomes
    exactly the concept's four images (by hand: the other classes vary in the corner and never carry feature
    0, so the CAV rests on feature 0; the class's scores are then about 2w for the four and 0 for the eight
    clean images, and the Otsu cut falls between them), and stays so; with the rest of its own class as
    negatives the seed's CAV would rank the concept's other images no higher than the clean ones."""
    from teachx.reveal.cav import grow_concept

    class_x = np.zeros((12, 2))
    class_x[:4, 0] = 2.0  # the concept (e.g. the timestamp)
    class_x[:2, 1] = 0.5  # only the seed: its corner
    seed = np.zeros(12, bool)
    seed[:2] = True
    other_x = np.zeros((20, 2))
    other_x[:, 1] = np.tile([1.0, -1.0], 10)  # the other classes: anything in the corner, never the concept
    grown = grow_concept(class_x, seed, other_x, rounds=5)
    assert grown.tolist() == [True] * 4 + [False] * 8
    assert grow_concept(class_x, seed, other_x, rounds=0).tolist() == seed.tolist()
    within = fit_cav(class_x, seed, "logistic").scores(class_x)
    assert within[2:4].max() < within[:2].min()


def test_concept_cav_against_the_other_classes_ranks_them_below_the_concept():
    """Feature 0 marks the concept within its class, but the other classes have it too; only feature 1 (0 in
    the class, 1 in the other classes) tells them apart. Fitted against the rest of the class alone, feature 1
    is constant among the fitted rows, so the CAV rests on feature 0 and scores the other classes as high as
    the concept (retrieval AUROC over all images 0.5 for them); fitted against them too, it weighs feature 1
    down and the concept's images rank above every other image."""
    from teachx.reveal.cav import auroc, fit_concept_cav

    rng = np.random.default_rng(0)
    class_x = np.zeros((40, 2))
    class_x[:20, 0] = 1.0  # the concept
    other_x = np.c_[np.tile([1.0, 0.0], 30), np.ones(60)]  # half of the other classes' images carry feature 0
    class_x += rng.normal(0, 0.05, class_x.shape)
    other_x += rng.normal(0, 0.05, other_x.shape)
    concept = np.arange(40) < 20
    truth = np.r_[concept, np.zeros(60, bool)]
    everything = np.r_[class_x, other_x]
    alone = fit_cav(class_x, concept, "logistic").scores(everything)
    against_all = fit_concept_cav(class_x, concept, other_x, "logistic")
    assert auroc(alone, truth) < 0.9
    assert auroc(against_all.scores(everything), truth) == 1.0
    assert against_all.direction[1] < 0 < against_all.direction[0]


def test_growing_a_concept_never_reads_the_ground_truth():
    """It takes features and a seed only: no argument could carry which images hold the artefact, and its
    module does not read the benchmark's ground truth."""
    import inspect

    import teachx.reveal.cav as cav_module

    assert list(inspect.signature(cav_module.grow_concept).parameters) == ["class_x", "seed", "other_x", "rounds"]
    assert "artefacts" not in inspect.getsource(cav_module) and "ground_truth" not in inspect.getsource(cav_module)


def test_classifier_input_is_the_last_layer_not_shaped_like_the_output(small_cnn, inputs):
    from teachx.reveal.features import classifier_input

    assert classifier_input(layer_shapes(small_cnn, inputs)) == "neck"
    # a head whose last module and its container both give the logits: the layer before them
    shapes = {"body": (8, 4, 4), "pool": (8,), "head.0": (5,), "head": (5,)}
    assert classifier_input(shapes) == "pool"


class SpotModel(nn.Module):
    """One 1x1 conv (the pixel and its negative), a ReLU, and a linear head: its ReLU's maps are the image."""

    def __init__(self, side: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.zero_()
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * side * side, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


def spot_images(n: int = 200, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Garments of varying brightness; half of them carry a bright 2x2 spot in a random corner."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 1, side, side)) * rng.uniform(0.3, 1.0, (n, 1, 1, 1))
    planted = np.zeros(n, bool)
    planted[rng.choice(n, n // 2, replace=False)] = True
    for i in np.flatnonzero(planted):
        r, c = rng.choice([0, side - 2]), rng.choice([0, side - 2])
        x[i, 0, r : r + 2, c : c + 2] = 3.0
    return torch.as_tensor(x, dtype=torch.float32), planted


def test_max_pooling_keeps_a_small_spot_that_mean_pooling_dilutes():
    """The artefact fills 4 of 256 pixels at a random corner: the spatial maximum of the layer responds fully, so
    a pattern CAV on the stacked (max-pooled) activations retrieves the spotted images; the spatial mean moves
    by the spot's area only, under the spread of the garments' brightness, and a CAV on it does not."""
    from teachx.reveal.features import LayerStack, activation_layers, stacked_activations

    model = SpotModel().eval()
    x, planted = spot_images()
    shapes = layer_shapes(model, x[:1])
    layers = activation_layers(model, shapes)
    assert layers == ["act"]  # the nonlinearity's output
    raw = stacked_activations(model, lambda idx: x[idx], np.arange(len(x)), layers, batch_size=64)
    assert raw.shape == (len(x), 2)
    stack = LayerStack.fit(layers, [2], raw)
    on_max = fit_cav(stack.transform(raw), planted, "pattern").scores(stack.transform(raw))
    assert auroc(on_max, planted) >= 0.95
    with torch.no_grad():
        mean = model.act(model.conv(x)).mean((2, 3)).numpy()
    assert auroc(fit_cav(mean, planted, "pattern").scores(mean), planted) < 0.7


def test_stacked_activations_are_each_layers_pooled_activations(small_cnn, inputs):
    from teachx.reveal.features import activation_layers, check_layers, stacked_activations

    shapes = layer_shapes(small_cnn, inputs)
    layers = activation_layers(small_cnn, shapes)
    assert layers and all(isinstance(dict(small_cnn.named_modules())[n], nn.ReLU) for n in layers)
    assert check_layers(None, small_cnn, shapes) == layers
    assert check_layers("body.4, neck", small_cnn, shapes) == ["body.4", "neck"]
    stacked = stacked_activations(small_cnn, lambda idx: inputs[idx], np.arange(6), ["body.4", "neck"], batch_size=4)
    one = [
        pooled_activations(small_cnn, lambda idx: inputs[idx], np.arange(6), n, batch_size=4)
        for n in ("body.4", "neck")
    ]
    assert np.allclose(stacked, np.concatenate(one, 1), atol=1e-6)
    from teachx.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown layer 'nek'"):
        check_layers("body.4,nek", small_cnn, shapes)


def test_layer_stack_weighs_every_layer_the_same_and_localises_where_the_concept_is():
    """Standardised units, each layer scaled by 1/sqrt(width): a 2-unit layer and a 50-unit layer contribute
    the same squared length on average, whatever their raw scales; ``dominant`` names the layer that carries
    most of a direction and maps that part back to the layer's raw units."""
    from teachx.reveal.features import LayerStack

    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(5, 100, (400, 2)), rng.normal(0, 0.01, (400, 50))], 1)
    stack = LayerStack.fit(["a", "b"], [2, 50], raw)
    z = stack.transform(raw)
    assert np.allclose((z[:, :2] ** 2).sum(1).mean(), 1.0) and np.allclose((z[:, 2:] ** 2).sum(1).mean(), 1.0)
    direction = np.zeros(52)
    direction[0], direction[2 + 7] = 0.3, 0.95
    layer, raw_dir = stack.dominant(direction / np.linalg.norm(direction))
    assert layer == "b" and raw_dir.shape == (50,) and np.isclose(np.linalg.norm(raw_dir), 1.0)
    assert np.argmax(np.abs(raw_dir)) == 7
    # the first layer's part (where the study localises), mapped back to its raw units: direction / scale
    layer, raw_dir = stack.part(direction / np.linalg.norm(direction), 0)
    assert layer == "a" and np.allclose(raw_dir, [1.0, 0.0])
    with pytest.raises(ValueError):
        LayerStack.fit(["a"], [3], raw)


def test_specificity_puts_the_artefact_half_above_the_clean_half():
    """Half of a class carries a feature no other class has. Split into its two halves, both are equally tight
    and large (a class-only ranking cannot tell them apart); the artefact half's direction is specific to it,
    the clean half's is what the other classes have too, so ranking by specificity puts the artefact first
    even when the method ranked the clean half first, and every member of it scores above the clean half."""
    from teachx.reveal.base import CandidateGroup, RevealResult
    from teachx.reveal.specificity import rank_by_specificity, specificity

    rng = np.random.default_rng(0)
    cls = rng.normal(0, 1, (200, 6))
    artefact = np.arange(200) < 100
    cls[artefact, 0] += 4.0
    others = rng.normal(0, 1, (600, 6))
    others[:, 1] -= 1.0  # the other classes differ from this one in their own ways too
    indices = np.arange(200) + 1000
    clean_first = (
        CandidateGroup(0, tuple(indices[~artefact]), tuple(indices[~artefact][:4]), 0.3),
        CandidateGroup(1, tuple(indices[artefact]), tuple(indices[artefact][:4]), 0.2),
    )
    result = RevealResult(
        method="spray_latent",
        indices=indices,
        scores=np.where(artefact, 0.2, 0.3) + 1e-3 * rng.uniform(size=200),
        labels=np.where(artefact, 1, 0),
        embedding=np.zeros((200, 2)),
        groups=clean_first,
    )
    assert specificity(cls, artefact, others) > 0.95
    assert specificity(cls, ~artefact, others) < 0.75
    ranked = rank_by_specificity(result, cls, others)
    assert ranked.groups[0].group == 1 and ranked.groups[0].parts["method_score"] == 0.2
    assert ranked.groups[0].score == ranked.groups[0].parts["specificity"]
    assert ranked.scores[artefact].min() > ranked.scores[~artefact].max()
    assert ranked.options["rank"] == "specificity"
    # within a group, the method's order is kept
    rows = np.flatnonzero(artefact)
    assert np.argsort(ranked.scores[rows]).tolist() == np.argsort(result.scores[rows]).tolist()


def test_the_top_group_takes_in_the_other_pieces_of_its_artefact():
    """A clustering in four groups splits an artefact (dimension 0, absent from the other classes) in two pieces
    (they differ in dimension 2, as timestamps in two corners) and the clean images in two: with ``merge``, the
    most specific piece takes in the other artefact piece, whose union is as specific, but no clean group, which
    would make it less so."""
    from teachx.reveal.base import CandidateGroup, RevealResult
    from teachx.reveal.specificity import rank_by_specificity

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (400, 6))
    piece = np.repeat([0, 1, 2, 3], 100)  # 0, 1: the artefact's pieces; 2, 3: clean
    x[piece <= 1, 0] += 4.0
    x[piece == 0, 2] += 3.0
    x[piece == 1, 2] -= 3.0
    x[piece == 2, 3] += 3.0
    x[piece == 3, 3] -= 3.0
    others = rng.normal(0, 1, (800, 6))
    others[:, 3] += rng.choice([-3.0, 3.0], 800)  # the other classes look like the clean groups
    indices = np.arange(400) + 50
    groups = tuple(
        CandidateGroup(g, tuple(indices[piece == g]), tuple(indices[piece == g][:4]), 0.1 * (4 - g))
        for g in (3, 2, 1, 0)
    )
    result = RevealResult(
        method="spray_latent",
        indices=indices,
        scores=rng.uniform(size=400),
        labels=piece.copy(),
        embedding=np.zeros((400, 2)),
        groups=groups,
    )
    alone = rank_by_specificity(result, x, others)
    assert alone.groups[0].group in (0, 1) and alone.groups[0].size == 100
    merged = rank_by_specificity(result, x, others, merge=0.02)
    top = merged.groups[0]
    assert sorted(top.members) == sorted(indices[piece <= 1].tolist()) and top.parts["merged"] == 1.0
    assert [g.group for g in merged.groups[1:]] and all(g.group in (2, 3) for g in merged.groups[1:])
    assert set(merged.labels[piece <= 1]) == {top.group}
    assert merged.scores[piece <= 1].min() > merged.scores[piece >= 2].max()
    assert merged.options["merge"] == 0.02
