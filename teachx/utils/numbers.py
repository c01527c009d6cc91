"""Numbers as people read them: accuracies, differences, intervals and p-values.

One place for the formats, so the study summary, the report, the verdicts, the CLI summaries and the scripts
that make the documentation's tables print the same number the same way. Missing values read ``n/a``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

NA = "n/a"


def number(x: Optional[float], nd: int = 4) -> str:
    """An accuracy, an AUC, a time: fixed ``nd`` decimals (``0.8672``)."""
    return NA if x is None else f"{x:.{nd}f}"


def signed(x: Optional[float], nd: int = 4) -> str:
    """A difference, with its sign (``+0.0391``)."""
    return NA if x is None else f"{x:+.{nd}f}"


def p_value(p: Optional[float]) -> str:
    """A p-value: three significant digits, or two in exponent form below 0.001 (``0.605``, ``2.3e-05``)."""
    if p is None:
        return NA
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def mean_std(summary: Optional[Mapping[str, Any]], nd: int = 4, sep: str = " ± ") -> str:
    """A summary over seeds (``mean``, ``std``) as ``mean ± std``; the mean alone when there is no std."""
    if not summary:
        return NA
    if summary.get("std") is None:
        return number(summary["mean"], nd)
    return f"{number(summary['mean'], nd)}{sep}{number(summary['std'], nd)}"


def interval(lo: Optional[float], hi: Optional[float], sign: bool = False, nd: int = 4, sep: str = ", ") -> str:
    """A confidence interval ``[lo, hi]`` (signed bounds for an interval of a difference)."""
    if lo is None or hi is None:
        return NA
    f = signed if sign else number
    return f"[{f(lo, nd)}{sep}{f(hi, nd)}]"


def points(x: Optional[float], nd: int = 1, sign: bool = False) -> str:
    """A fraction as percentage points (``0.8672`` -> ``86.7``), for the documentation's tables."""
    if x is None:
        return NA
    return signed(100 * x, nd) if sign else number(100 * x, nd)
