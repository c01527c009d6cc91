"""teachx.evaluation.stats against closed forms, brute-force enumeration and scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from teachx.evaluation.stats import holm, min_wilcoxon_p, paired_compare, summarize, verdict


def brute_force_wilcoxon(d: list[float]) -> float:
    """Two-sided sign-flip p-value of R+ with zeros dropped, by enumerating all 2**n sign patterns."""
    d = np.asarray([x for x in d if x != 0], float)
    ranks = sps.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    dist = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))])
    lower, upper = np.mean(dist <= observed + 1e-9), np.mean(dist >= observed - 1e-9)
    return min(1.0, 2 * min(lower, upper))


def test_summary_closed_form():
    s = summarize([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == 2.0 and s.std == pytest.approx(1.0) and s.sem == pytest.approx(1 / math.sqrt(3))
    # t_{0.975, 2} = sqrt(2 * 0.95**2 / (1 - 0.95**2)) = 4.3027 (the df=2 t quantile has a closed form)
    q = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert s.ci_low == pytest.approx(2 - q / math.sqrt(3)) and s.ci_high == pytest.approx(2 + q / math.sqrt(3))
    one = summarize([0.7])
    assert one.std != one.std and one.to_dict()["ci_low"] is None  # undefined -> None in JSON


def test_summary_matches_scipy():
    x = np.random.default_rng(0).normal(0.6, 0.02, 7)
    s = summarize(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (
        s.std == pytest.approx(np.std(x, ddof=1)) and s.ci_low == pytest.approx(lo) and s.ci_high == pytest.approx(hi)
    )


def test_paired_t_closed_form_df2():
    # d = [1, 2, 3]: t = 2 / (1/sqrt 3) = 2 sqrt 3; for df=2, two-sided p = 1 - t / sqrt(t^2 + 2)
    c = paired_compare([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert c.t_stat == pytest.approx(t) and c.p_ttest == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert c.cohen_dz == pytest.approx(2.0) and c.mean_diff == pytest.approx(2.0) and c.wins == 3


@pytest.mark.parametrize("seed, n", [(0, 3), (1, 5), (2, 8), (3, 20)])
def test_paired_matches_scipy(seed, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.60, 0.02, n)
    b = a - rng.normal(0.005, 0.01, n)
    c = paired_compare(a, b)
    t = sps.ttest_rel(a, b)
    w = sps.wilcoxon(a - b)
    assert c.p_ttest == pytest.approx(t.pvalue) and c.t_stat == pytest.approx(t.statistic)
    assert c.p_wilcoxon == pytest.approx(w.pvalue) and c.w_stat == pytest.approx(w.statistic)
    d = a - b
    lo, hi = sps.t.interval(0.95, n - 1, loc=d.mean(), scale=sps.sem(d))
    assert c.ci_low == pytest.approx(lo) and c.ci_high == pytest.approx(hi)
    assert c.cohen_dz == pytest.approx(d.mean() / d.std(ddof=1))


@pytest.mark.parametrize(
    "diffs, expected",
    [
        ([1, 2, 3, 4, 5], 2 / 32),  # all positive, n=5: the smallest possible p, above 0.05
        ([1, 2, 3, 4, 5, 6], 2 / 64),  # n=6: the first n where p < 0.05 is reachable
        ([1, -2, 3, 4, 5], 2 * 3 / 32),  # R- = 2: subsets of {1..5} summing to <= 2 are {}, {1}, {2}
        ([0, 2, 3, 4, 5, 6], 2 / 32),  # the zero is dropped (wilcox): n=5 remain
        ([1, 1, 2, 3], None),  # ties -> exact sign-flip permutation
        ([0, -1, 1, 2, 2, 3, 0], None),  # zeros and ties
    ],
)
def test_wilcoxon_hand_and_brute_force(diffs, expected):
    c = paired_compare(np.asarray(diffs, float), np.zeros(len(diffs)))
    ref = brute_force_wilcoxon(diffs)
    assert c.p_wilcoxon == pytest.approx(ref)
    if expected is not None:
        assert c.p_wilcoxon == pytest.approx(expected)
    if any(x == 0 for x in diffs) or len(set(map(abs, diffs))) < len(diffs):
        assert c.wilcoxon_method == "permutation"
    else:
        assert c.wilcoxon_method == "exact"


def test_small_n_note_and_floor():
    assert min_wilcoxon_p(5) == pytest.approx(0.0625) and min_wilcoxon_p(6) == pytest.approx(0.03125)
    c = paired_compare([0.71, 0.72, 0.73, 0.74, 0.75], [0.70] * 5)
    assert c.p_wilcoxon == pytest.approx(0.0625) and "6 seeds" in c.wilcoxon_note
    assert c.p_ttest < 0.05 and verdict(c).startswith("better")
    assert paired_compare(np.arange(6.0) + 1, np.zeros(6)).wilcoxon_note == ""


def test_all_zero_and_constant_differences():
    c = paired_compare([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert c.p_ttest == 1.0 and c.p_wilcoxon == 1.0 and c.wilcoxon_method == "all-zero" and c.cohen_dz == 0.0
    assert np.isnan(sps.ttest_rel([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).pvalue)  # what scipy alone gives
    k = paired_compare([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # constant +0.1 (up to float rounding)
    assert k.mean_diff == pytest.approx(0.1) and k.p_ttest < 1e-6
    one = paired_compare([0.6], [0.5])
    assert one.wilcoxon_method == "n<2" and one.to_dict()["p_ttest"] is None and verdict(one).startswith("not testable")


def test_holm_against_hand_computation():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    out = holm([0.5, None, 0.01])
    assert out[1] is None and out[0] == pytest.approx(0.5) and out[2] == pytest.approx(0.02)


def test_bad_input_is_a_config_error():
    from teachx.errors import ConfigError

    with pytest.raises(ConfigError):
        paired_compare([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError):
        summarize([1.0, float("nan")])


def test_one_number_format_for_people():
    """The report, the study summary, the verdicts and the scripts share one format per kind of number."""
    from teachx.evaluation.stats import verdict
    from teachx.utils.numbers import interval, mean_std, number, p_value, points, signed

    assert (number(0.86719), number(None), number(0.5, 3)) == ("0.8672", "n/a", "0.500")
    assert (p_value(0.60491), p_value(2.345e-5), p_value(None)) == ("0.605", "2.3e-05", "n/a")
    assert (signed(0.0391), interval(-0.5, 0.7, sign=True), interval(None, 1.0)) == (
        "+0.0391",
        "[-0.5000, +0.7000]",
        "n/a",
    )
    assert (mean_std({"mean": 0.9, "std": 0.1}), mean_std({"mean": 0.9, "std": None})) == ("0.9000 ± 0.1000", "0.9000")
    assert (points(0.8672), points(0.047, sign=True)) == ("86.7", "+4.7")
    text = verdict({"n": 8, "p_ttest": 2.345e-5, "mean_diff": 0.05, "ci_low": 0.04, "ci_high": 0.06})
    assert text == "better: mean difference +0.0500, 95% CI [+0.0400, +0.0600], p=2.3e-05 < 0.05"
