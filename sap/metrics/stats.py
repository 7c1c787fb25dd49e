"""E7 burden agreement (ICC(2,1)) and E10 statistics (SPEC §9).

Pinned calls (so numbers are reproducible across machines): a fresh
``numpy.random.default_rng(seed)`` per metric and method, ``idx = rng.integers(0, n, (B, n))``,
the CI = ``numpy.percentile`` of the row medians at 2.5 and 97.5 (of the row means of the paired
differences for :func:`paired_bootstrap_difference`); quartiles with
``numpy.percentile`` (linear); ``scipy.stats.wilcoxon(zero_method='wilcox')`` and
``scipy.stats.mannwhitneyu(use_continuity=True)``, both two-sided.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _scipy_stats():
    # scipy.stats takes about a second to import: only the functions that test need it.
    from scipy import stats

    return stats


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[~np.isnan(a)]


def bootstrap_median_ci(
    values: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> list[float]:
    """95 % percentile-bootstrap CI of the median (NaN dropped first); [nan, nan] when empty."""
    a = _finite(values)
    if a.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (n_bootstrap, a.size))
    medians = np.median(a[idx], axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_bootstrap_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Mean paired difference a − b with its 95 % percentile-bootstrap CI, resampling cases.

    ``a``, ``b``: one value per case, aligned (the same case at the same index). Cases where
    either value is NaN or infinite are dropped first (pairwise deletion); each resample draws the
    remaining cases with replacement (``idx = default_rng(seed).integers(0, n, (B, n))``) and so
    takes both methods' values of the same cases. The mean, not the median: per-case metrics
    such as sensitivity or FP counts are mostly tied between methods, so the median difference
    (and every resample's) is 0 even when the methods differ on some cases.
    Returns ``{"difference", "ci95": [lo, hi], "n"}``; NaN and [nan, nan] with n = 0 when no
    complete pair is left. Identical inputs give 0 and [0, 0].
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length ({x.size} and {y.size})")
    ok = np.isfinite(x) & np.isfinite(y)
    diff = x[ok] - y[ok]
    nan = float("nan")
    if diff.size == 0:
        return {"difference": nan, "ci95": [nan, nan], "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, (n_bootstrap, diff.size))
    means = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "ci95": [float(lo), float(hi)], "n": int(diff.size)}


def shapiro_p(values: Sequence[float] | np.ndarray) -> float:
    """Shapiro–Wilk p-value (NaN dropped); NaN for n < 3 or constant values."""
    a = _finite(values)
    if a.size < 3 or np.all(a == a[0]):
        return float("nan")
    return float(_scipy_stats().shapiro(a).pvalue)


def describe(values: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """E10 summary of one metric: median, ci95, q25, q75, n, shapiro_p (NaN dropped first).

    Empty input gives NaN everywhere and n = 0.
    """
    a = _finite(values)
    if a.size == 0:
        nan = float("nan")
        return {"median": nan, "ci95": [nan, nan], "q25": nan, "q75": nan, "n": 0, "shapiro_p": nan}
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {
        "median": float(med),
        "ci95": bootstrap_median_ci(a, n_bootstrap, seed),
        "q25": float(q25),
        "q75": float(q75),
        "n": int(a.size),
        "shapiro_p": shapiro_p(a),
    }


def icc_a1(gt: Sequence[float] | np.ndarray, pred: Sequence[float] | np.ndarray) -> tuple[float, list[float]]:
    """E7 ICC(2,1): two-way random effects, absolute agreement, single measures (McGraw & Wong 1996).

    ``gt``, ``pred``: per-case burdens (mL) of the same cases. Returns (ICC, [lo, hi]) with the
    F-based 95 % CI; NaN (and [nan, nan]) when n < 3 or all 2n values are equal.
    """
    y = np.column_stack([np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)])
    n, k = y.shape
    nan = float("nan")
    if n < 3 or np.all(y == y.flat[0]):
        return nan, [nan, nan]
    grand = y.mean()
    ss_rows = k * np.sum((y.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((y.mean(axis=0) - grand) ** 2)
    ss_err = np.sum((y - grand) ** 2) - ss_rows - ss_cols
    ms_r = ss_rows / (n - 1)
    ms_c = ss_cols / (k - 1)
    ms_e = ss_err / ((n - 1) * (k - 1))
    icc = (ms_r - ms_e) / (ms_r + (k - 1) * ms_e + k * (ms_c - ms_e) / n)
    if ms_e <= 0:  # perfect agreement up to rounding: no F distribution to invert
        return float(icc), [float(icc), float(icc)]
    # McGraw & Wong (1996), case 2A: approximate degrees of freedom of the denominator. Strongly
    # negative ICCs can give v <= 0, where the F quantiles (and so the CI) are undefined: NaN.
    with np.errstate(invalid="ignore", divide="ignore"):
        f_j = ms_c / ms_e
        v_num = (k - 1) * (n - 1) * (k * icc * f_j + n * (1 + (k - 1) * icc) - k * icc) ** 2
        v_den = (n - 1) * k**2 * icc**2 * f_j**2 + (n * (1 + (k - 1) * icc) - k * icc) ** 2
        v = v_num / v_den
        stats = _scipy_stats()
        f_lo = stats.f.ppf(0.975, n - 1, v)
        f_hi = stats.f.ppf(0.975, v, n - 1)
        lower = n * (ms_r - f_lo * ms_e) / (f_lo * (k * ms_c + (k * n - k - n) * ms_e) + n * ms_r)
        upper = n * (f_hi * ms_r - ms_e) / (k * ms_c + (k * n - k - n) * ms_e + n * f_hi * ms_r)
    return float(icc), [float(lower), float(upper)]


def wilcoxon_paired(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p for paired case-level values (pairwise deletion of NaN).

    All differences zero → 1.0; no complete pair → NaN.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if a.size == 0:
        return float("nan")
    if np.all(a - b == 0):
        return 1.0
    return float(_scipy_stats().wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def mann_whitney(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Two-sided Mann–Whitney U p (with continuity correction) for lesion-level values; NaN dropped.

    NaN when either sample is empty.
    """
    a, b = _finite(x), _finite(y)
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(_scipy_stats().mannwhitneyu(a, b, alternative="two-sided", use_continuity=True).pvalue)


def bonferroni(p: float, m: int) -> float:
    """Bonferroni-adjusted p = min(1, m·p) (NaN stays NaN)."""
    return float("nan") if np.isnan(p) else float(min(1.0, m * p))


def stars(p: float) -> str:
    """Significance marks: * < 0.05, ** < 0.01, *** < 0.001, '' otherwise (and for NaN)."""
    if np.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def compare_methods(values: dict[str, Sequence[float] | np.ndarray], paired: bool) -> list[dict[str, Any]]:
    """E10 between methods for one metric: every pair of methods, Bonferroni over the pairs.

    ``values``: method → values. ``paired`` (case-level metrics): arrays aligned by case (NaN where
    a case lacks the metric; pairwise deletion), Wilcoxon signed-rank. Otherwise (lesion-level
    metrics): independent samples, Mann–Whitney U. Returns one row per pair: method_a, method_b,
    test, n_a, n_b, p, p_adj, stars.
    """
    names = list(values)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rows = []
    for a, b in pairs:
        x, y = np.asarray(values[a], dtype=np.float64), np.asarray(values[b], dtype=np.float64)
        if paired:
            if x.shape != y.shape:
                raise ValueError(f"paired values of {a} and {b} differ in length")
            ok = ~(np.isnan(x) | np.isnan(y))
            p, n_a, n_b = wilcoxon_paired(x, y), int(ok.sum()), int(ok.sum())
        else:
            p, n_a, n_b = mann_whitney(x, y), int((~np.isnan(x)).sum()), int((~np.isnan(y)).sum())
        p_adj = bonferroni(p, len(pairs))
        rows.append({
            "method_a": a, "method_b": b, "test": "wilcoxon" if paired else "mannwhitneyu",
            "n_a": n_a, "n_b": n_b, "p": p, "p_adj": p_adj, "stars": stars(p_adj),
        })
    return rows
