"""The contract every registered reveal method keeps (teachx.reveal.base), run on each method by name: typed
results of the right shapes, groups ranked most suspicious first and disjoint, deterministic, a one-line error
for a class too small to analyse, and a planted group of alike samples ranked first."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from teachx.errors import ConfigError, DataError  # noqa: E402
from teachx.reveal import REVEAL_METHODS, CandidateGroup, Evidence, RevealResult, build  # noqa: E402

N = 96
#: how many planted samples each kind of method is made to find (RevealMethod.finds)
PLANTED = {"groups": 16, "rare": 3}


def planted_evidence(seed: int = 0, planted_n: int = 16) -> tuple[Evidence, np.ndarray]:
    """96 samples of one class: noisy maps with evidence in the centre, and activations spread over 12
    channels; ``planted_n`` of them (shuffled in) instead have their evidence in a corner / in two channels
    of their own."""
    rng = np.random.default_rng(seed)
    PLANTED = planted_n
    maps = rng.normal(0, 0.3, (N, 16, 16))
    maps[:, 5:11, 5:11] += rng.uniform(0.5, 1.5, (N, 1, 1))
    acts = np.abs(rng.normal(1, 0.3, (N, 12)))
    planted = np.zeros(N, bool)
    planted[rng.choice(N, PLANTED, replace=False)] = True
    maps[planted, 5:11, 5:11] = rng.normal(0, 0.3, (PLANTED, 6, 6))
    maps[planted, :4, :4] += 3.0
    acts[planted, :2] += 4.0
    return Evidence(indices=np.arange(N) * 3 + 100, maps=maps, activations=acts, label=1), planted


@pytest.fixture(params=REVEAL_METHODS.names())
def method(request):
    return build(request.param)


def test_result_is_typed_with_the_right_shapes(method):
    ev, _ = planted_evidence()
    res = method.reveal(ev)
    assert isinstance(res, RevealResult) and res.method == method.name
    assert np.array_equal(res.indices, ev.indices)
    assert res.scores.shape == (N,) and np.isfinite(res.scores).all()
    assert res.labels.shape == (N,) and res.labels.dtype.kind == "i"
    assert res.embedding.shape == (N, 2) and np.isfinite(res.embedding).all()
    assert res.groups and all(isinstance(g, CandidateGroup) for g in res.groups)
    json.dumps(res.options)  # JSON-able: part of the saved results' key
    json.dumps([g.to_dict() for g in res.groups])


def test_groups_are_ranked_disjoint_and_cover_the_labelled_samples(method):
    ev, _ = planted_evidence()
    res = method.reveal(ev)
    scores = [g.score for g in res.groups]
    assert scores == sorted(scores, reverse=True)
    seen: set[int] = set()
    for g in res.groups:
        assert not seen & set(g.members)
        seen |= set(g.members)
        assert set(g.prototypes) <= set(g.members) and g.prototypes
        rows = np.isin(ev.indices, g.members)
        assert (res.labels[rows] == g.group).all()
        assert CandidateGroup.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert seen == set(ev.indices[res.labels >= 0].tolist())


def test_deterministic(method):
    ev, _ = planted_evidence()
    a, b = method.reveal(ev), method.reveal(ev)
    assert np.array_equal(a.labels, b.labels) and np.allclose(a.scores, b.scores)
    assert [g.members for g in a.groups] == [g.members for g in b.groups]


def test_too_small_a_class_is_one_line(method):
    ev, _ = planted_evidence()
    small = Evidence(indices=ev.indices[:3], maps=ev.maps[:3], activations=ev.activations[:3], label=4)
    with pytest.raises(DataError) as info:
        method.reveal(small)
    msg = str(info.value)
    assert "\n" not in msg and "class 4" in msg and str(method.min_samples) in msg


def test_planted_group_is_ranked_first(method):
    ev, planted = planted_evidence(planted_n=PLANTED[method.finds])
    res = method.reveal(ev)
    top = set(res.groups[0].members)
    truth = set(ev.indices[planted].tolist())
    assert len(top & truth) >= 0.75 * len(truth) and len(top & truth) >= 0.75 * len(top), (res.groups[0], truth)
    # and the per-sample scores put the planted samples high
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(planted, res.scores) > 0.9


def test_unknown_method_and_bad_options_are_one_line():
    with pytest.raises(ConfigError, match="unknown reveal method 'sprey'.*did you mean 'spray'"):
        build("sprey")
    with pytest.raises(ConfigError, match="bad options for reveal method 'spray'"):
        build("spray", colour="red")


@pytest.mark.parametrize("planted_n", [16, 48])  # a minority (1/6 of the class) and half the class
def test_planted_group_is_ranked_first_as_minority_and_as_half_the_class(planted_n):
    """The ranking (silhouette x (1 - share)) on evidence whose answer is known: a planted group of alike
    samples is ranked first whether it is a small minority or half of the class (an artefact in p = 0.5 of a
    class's images), by the map method and the latent one."""
    for name in ("spray", "spray_latent"):
        ev, planted = planted_evidence(seed=1, planted_n=planted_n)
        res = build(name).reveal(ev)
        top = np.isin(ev.indices, res.groups[0].members)
        assert (top & planted).sum() >= 0.9 * planted.sum() and (top & planted).sum() >= 0.9 * top.sum(), name
