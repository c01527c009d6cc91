"""Statistics over seeds: per-arm summaries and paired comparisons.

A study trains every arm with the same seeds, so arms are compared *paired by seed* (the seed
fixes initialisation and batch order, which the arms share): the test is on the per-seed
differences ``d_i = a_i - b_i``.

Conventions (all values are plain floats; ``None`` in ``to_dict`` where a value is undefined):

- ``std`` is the sample standard deviation (ddof=1); the 95% CI is ``mean +- t_{0.975, n-1} * std / sqrt(n)``.
- Paired t-test: ``scipy.stats.ttest_rel`` (= one-sample t on ``d``). If every difference is the
  same number the t statistic is undefined (0/0) or infinite: all differences zero gives
  ``p = 1`` (identical results are no evidence of a difference; scipy returns NaN); a constant
  non-zero difference gives ``p = 0`` as scipy does.
- Wilcoxon signed-rank: ``scipy.stats.wilcoxon(d, zero_method="wilcox", method="auto")``: zero
  differences are dropped (Wilcoxon's original rule); with no ties and no zeros the exact null
  distribution is used, with ties or zeros and n <= 13 an exact permutation (sign-flip) test, else
  the normal approximation with continuity correction. All differences zero gives ``p = 1``.
  With n non-zero differences the smallest possible two-sided p is ``2 / 2**n``: 0.0625 for n = 5,
  so **with fewer than 6 seeds Wilcoxon can never reach p < 0.05**; ``wilcoxon_note`` says so.
- Effect size: Cohen's ``d_z = mean(d) / std(d)`` (paired data), and the mean difference with its
  t-based CI.
- ``holm`` adjusts a family of p-values for multiple comparisons (Holm-Bonferroni).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from teachx.errors import ConfigError
from teachx.utils.numbers import interval, p_value, signed


def _clean(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON-safe)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(list(values), dtype=np.float64)
    if a.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of numbers, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{name} contains NaN or inf; drop failed runs before computing statistics")
    return a


def t_interval(mean: float, std: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of a mean; NaN where n < 2."""
    from scipy import stats

    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


@dataclass
class Summary:
    """One arm over seeds: mean, sample std (ddof=1), standard error and t-based CI."""

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float
    confidence: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    a = _as_array(values, "values")
    n = int(a.size)
    if n == 0:
        raise ConfigError("cannot summarise an empty list of values")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if n > 1 else math.nan
    sem = std / math.sqrt(n) if n > 1 else math.nan
    lo, hi = t_interval(mean, std, n, confidence)
    return Summary(n, mean, std, sem, lo, hi, confidence, float(a.min()), float(a.max()), a.tolist())


@dataclass
class PairedComparison:
    """``a`` vs ``b`` paired by seed; every difference is ``a - b``."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    std_diff: float
    ci_low: float  # CI of the mean difference
    ci_high: float
    confidence: float
    t_stat: float
    p_ttest: float
    w_stat: float  # min(R+, R-) as scipy reports it
    p_wilcoxon: float
    wilcoxon_method: str  # exact | permutation | normal | all-zero | n<2
    n_zero_diffs: int
    cohen_dz: float
    wins: int  # seeds with a > b
    losses: int  # seeds with a < b
    differences: list[float] = field(default_factory=list)
    wilcoxon_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def min_wilcoxon_p(n_nonzero: int) -> float:
    """Smallest two-sided exact Wilcoxon p-value reachable with n non-zero differences: 2 / 2**n."""
    return min(1.0, 2.0 / 2**n_nonzero) if n_nonzero > 0 else 1.0


def paired_compare(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired t-test, Wilcoxon signed-rank, Cohen's d_z and the CI of the mean difference."""
    from scipy import stats

    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.shape != xb.shape:
        raise ConfigError(f"paired comparison needs equally many values, got {xa.size} and {xb.size}")
    d = xa - xb
    n = int(d.size)
    if n == 0:
        raise ConfigError("cannot compare empty lists of values")
    mean_d = float(d.mean())
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n_zero = int((d == 0).sum())
    common = dict(
        n=n,
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        mean_diff=mean_d,
        confidence=confidence,
        n_zero_diffs=n_zero,
        wins=wins,
        losses=losses,
        differences=d.tolist(),
    )
    if n < 2:
        return PairedComparison(
            **common,
            std_diff=math.nan,
            ci_low=math.nan,
            ci_high=math.nan,
            t_stat=math.nan,
            p_ttest=math.nan,
            w_stat=math.nan,
            p_wilcoxon=math.nan,
            wilcoxon_method="n<2",
            cohen_dz=math.nan,
            wilcoxon_note="one seed: no test is possible",
        )
    sd = float(d.std(ddof=1))
    lo, hi = t_interval(mean_d, sd, n, confidence)
    # t-test (scipy), with the degenerate zero-variance cases made explicit
    if sd == 0.0:
        if mean_d == 0.0:
            t_stat, p_t, dz = 0.0, 1.0, 0.0
        else:
            t_stat, p_t, dz = math.copysign(math.inf, mean_d), 0.0, math.copysign(math.inf, mean_d)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # near-constant differences: precision warning
            res = stats.ttest_rel(xa, xb)
        t_stat, p_t, dz = float(res.statistic), float(res.pvalue), mean_d / sd
    # Wilcoxon (scipy), zeros dropped
    nonzero = n - n_zero
    if nonzero == 0:
        w_stat, p_w, method = 0.0, 1.0, "all-zero"
    else:
        if n > 50:
            method = "normal"  # scipy's "auto" rule
        elif n_zero == 0 and not _has_ties(np.abs(d)):
            method = "exact"
        else:
            method = "permutation" if n <= 13 else "normal"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.wilcoxon(d, zero_method="wilcox", method="auto")
        w_stat, p_w = float(res.statistic), float(res.pvalue)
    note = ""
    floor = min_wilcoxon_p(nonzero)
    if floor >= 0.05:
        note = f"with {nonzero} non-zero differences the smallest possible Wilcoxon p is {floor:.4g} (>= 0.05): use >= 6 seeds"
    return PairedComparison(
        **common,
        std_diff=sd,
        ci_low=lo,
        ci_high=hi,
        t_stat=t_stat,
        p_ttest=p_t,
        w_stat=w_stat,
        p_wilcoxon=p_w,
        wilcoxon_method=method,
        cohen_dz=dz,
        wilcoxon_note=note,
    )


def _has_ties(x: np.ndarray) -> bool:
    x = x[x != 0]
    return bool(np.unique(x).size < x.size)


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); None entries stay None."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not (isinstance(p, float) and math.isnan(p))]
    out: list[Optional[float]] = [None] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def verdict(cmp: PairedComparison | dict[str, Any], alpha: float = 0.05, higher_is_better: bool = True) -> str:
    """A one-line reading of a comparison (or its ``to_dict()``), by the paired t-test at ``alpha``."""
    c = cmp.to_dict() if isinstance(cmp, PairedComparison) else cmp
    p, diff = c.get("p_ttest"), c.get("mean_diff")
    if c.get("n", 0) < 2 or p is None or (isinstance(p, float) and math.isnan(p)):
        return "not testable (fewer than 2 seeds)"
    ci = ""
    if c.get("ci_low") is not None:
        ci = f", 95% CI {interval(c['ci_low'], c['ci_high'], sign=True)}"
    better = (diff > 0) == higher_is_better
    if p < alpha and diff != 0:
        return f"{'better' if better else 'worse'}: mean difference {signed(diff)}{ci}, p={p_value(p)} < {alpha}"
    return f"no significant difference: mean difference {signed(diff)}{ci}, p={p_value(p)} >= {alpha}"
