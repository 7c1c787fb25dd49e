"""E8 FROC (SPEC §9): pooled curves in candidate and sweep mode, FROC-AUC and ``froc_score``.

A curve is a pair of arrays (FPPI, sensitivity) starting at (0, 0), ordered by FPPI then
sensitivity. It may have vertical steps (several points at one FPPI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sap.metrics.components import at_least

#: FPPI points of ``froc_score`` for all lesions and for lesions ≥ 1 mL
FROC_SCORE_FPPI: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_SCORE_FPPI_1ML: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: FROC-AUC limits (FPPI) for all lesions and for lesions ≥ 1 mL
AUC_LIMIT = 15.0
AUC_LIMIT_1ML = 4.0


@dataclass(frozen=True)
class CaseCandidates:
    """One case's FROC candidates (components of pred ≥ t_min) and ground-truth lesions.

    ``score`` (m,): max probability per candidate; ``hit`` (m,): overlaps any ground-truth voxel;
    ``volume_ml`` (m,): candidate volume at t_min. ``gt_best`` (n,): highest score of a candidate
    hitting each lesion (-inf when none does); ``gt_volume_ml`` (n,).
    """

    score: np.ndarray
    hit: np.ndarray
    volume_ml: np.ndarray
    gt_best: np.ndarray
    gt_volume_ml: np.ndarray


@dataclass(frozen=True)
class FrocCurve:
    fppi: np.ndarray
    sensitivity: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {"fppi": [float(x) for x in self.fppi], "sensitivity": [float(y) for y in self.sensitivity]}


def froc_candidates(
    cases: Sequence[CaseCandidates], volume_threshold_ml: float | None = None
) -> FrocCurve | None:
    """Candidate-mode FROC pooled over ``cases`` (lesion-free cases count in the FPPI denominator).

    For every distinct score s (descending; tied scores enter together): sensitivity = lesions hit
    by a candidate with score ≥ s / all lesions; FPPI = non-hitting candidates with score ≥ s /
    number of cases. With ``volume_threshold_ml`` V: lesions ≥ V (hit by a candidate of any size)
    and false positives = non-hitting candidates ≥ V. Returns None when there is no lesion (the
    sensitivity is undefined) or no case.
    """
    if not cases:
        return None
    best = np.concatenate([c.gt_best for c in cases]) if cases else np.zeros(0)
    fp_scores = np.concatenate([c.score[~c.hit] for c in cases])
    if volume_threshold_ml is not None:
        gt_vol = np.concatenate([c.gt_volume_ml for c in cases])
        best = best[at_least(gt_vol, volume_threshold_ml)]
        fp_vol = np.concatenate([c.volume_ml[~c.hit] for c in cases])
        fp_scores = fp_scores[at_least(fp_vol, volume_threshold_ml)]
    if best.size == 0:
        return None
    return _curve_from_scores(best, fp_scores, len(cases))


def _curve_from_scores(gt_best: np.ndarray, fp_scores: np.ndarray, n_cases: int) -> FrocCurve:
    hit_scores = np.sort(gt_best[np.isfinite(gt_best)])
    fp_sorted = np.sort(fp_scores)
    thresholds = np.unique(np.concatenate([hit_scores, fp_sorted]))[::-1]
    # number of values ≥ s in a sorted array = size - searchsorted(left)
    n_hit = hit_scores.size - np.searchsorted(hit_scores, thresholds, side="left")
    n_fp = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
    fppi = np.concatenate([[0.0], n_fp / n_cases])
    sens = np.concatenate([[0.0], n_hit / gt_best.size])
    return _dedupe(fppi, sens)


def froc_sweep(fppi: Sequence[float], sensitivity: Sequence[float]) -> FrocCurve | None:
    """Sweep-mode FROC: one (mean FP per case, pooled sensitivity) point per threshold.

    (0, 0) is prepended and points are sorted by FPPI, then sensitivity; the curve need not be
    monotone. Points with a NaN coordinate (no lesion) are dropped; None when none remain.
    """
    x = np.asarray(fppi, dtype=np.float64)
    y = np.asarray(sensitivity, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return None
    x = np.concatenate([[0.0], x[ok]])
    y = np.concatenate([[0.0], y[ok]])
    order = np.lexsort((y, x))
    return _dedupe(x[order], y[order])


def _dedupe(x: np.ndarray, y: np.ndarray) -> FrocCurve:
    """Drop points equal to their predecessor (they add no area and no step)."""
    keep = np.ones(x.size, dtype=bool)
    keep[1:] = (np.diff(x) != 0) | (np.diff(y) != 0)
    return FrocCurve(x[keep], y[keep])


def sensitivity_at(curve: FrocCurve, fppi: float) -> float:
    """Sensitivity at ``fppi``: linear interpolation between the last point with FPPI ≤ f (its
    highest sensitivity) and the first point with FPPI > f (its lowest); flat beyond the last point."""
    x, y = curve.fppi, curve.sensitivity
    i = int(np.searchsorted(x, fppi, side="right")) - 1
    if i < 0:
        return float("nan")
    if i + 1 >= x.size:
        return float(y[i])
    x0, y0, x1, y1 = x[i], y[i], x[i + 1], y[i + 1]
    return float(y0 + (y1 - y0) * (fppi - x0) / (x1 - x0))


def froc_auc(curve: FrocCurve | None, limit: float = AUC_LIMIT) -> float:
    """Trapezoidal area under the curve from FPPI 0 to ``limit`` (not normalised; max = limit).

    Points with FPPI ≤ limit are kept in order and the curve is closed at the limit with
    :func:`sensitivity_at` (flat beyond the last point). NaN for a missing curve.
    """
    if curve is None:
        return float("nan")
    keep = curve.fppi <= limit
    x = np.concatenate([curve.fppi[keep], [limit]])
    y = np.concatenate([curve.sensitivity[keep], [sensitivity_at(curve, limit)]])
    return float(np.trapezoid(y, x))


def froc_score(curve: FrocCurve | None, fppi_points: Sequence[float] = FROC_SCORE_FPPI) -> float:
    """Mean sensitivity at the given FPPI points (NaN for a missing curve)."""
    if curve is None:
        return float("nan")
    return float(np.mean([sensitivity_at(curve, f) for f in fppi_points]))


def froc_auc_bootstrap_ci(
    cases: Sequence[CaseCandidates],
    volume_threshold_ml: float | None = None,
    limit: float = AUC_LIMIT,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[float]:
    """95 % percentile-bootstrap CI of candidate-mode FROC-AUC, resampling cases (E10).

    ``idx = default_rng(seed).integers(0, n, (n_bootstrap, n))``; the FPPI denominator is the
    resampled case count; resamples without any lesion are skipped. Vectorised: every case's hit
    and false-positive counts at every pooled score are tabulated once, and a resample's curve is
    the multiplicity-weighted sum of its cases' rows (identical to :func:`froc_candidates` on the
    resampled list). Returns [nan, nan] when no resample has a curve.
    """
    n = len(cases)
    if n == 0:
        return [float("nan"), float("nan")]
    bests, fps = [], []
    for c in cases:
        best, fp_scores = c.gt_best, c.score[~c.hit]
        if volume_threshold_ml is not None:
            best = best[at_least(c.gt_volume_ml, volume_threshold_ml)]
            fp_scores = fp_scores[at_least(c.volume_ml[~c.hit], volume_threshold_ml)]
        bests.append(best)
        fps.append(fp_scores)
    thresholds = np.unique(np.concatenate([*bests, *fps, [np.inf]]))[::-1][1:]  # descending
    hits = np.zeros((n, thresholds.size))
    false = np.zeros((n, thresholds.size))
    n_gt = np.zeros(n)
    for i, (best, fp_scores) in enumerate(zip(bests, fps, strict=True)):
        hit_sorted, fp_sorted = np.sort(best[np.isfinite(best)]), np.sort(fp_scores)
        hits[i] = hit_sorted.size - np.searchsorted(hit_sorted, thresholds, side="left")
        false[i] = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
        n_gt[i] = best.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_bootstrap, n))
    weights = np.zeros((n_bootstrap, n))
    np.add.at(weights, (np.repeat(np.arange(n_bootstrap), n), idx.ravel()), 1.0)
    aucs = []
    chunk = max(1, int(4e6 // max(thresholds.size, 1)))
    for lo in range(0, n_bootstrap, chunk):
        w = weights[lo:lo + chunk]
        total = w @ n_gt
        w = w[total > 0]
        if w.shape[0] == 0:
            continue
        zeros = np.zeros((w.shape[0], 1))
        sens = np.hstack([zeros, (w @ hits) / (w @ n_gt)[:, None]])
        fppi = np.hstack([zeros, (w @ false) / n])
        aucs.append(_auc_rows(fppi, sens, limit))
    return _percentile_ci(np.concatenate(aucs) if aucs else [])


def _auc_rows(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """:func:`froc_auc` for many monotone curves at once; rows of ``x`` are non-decreasing from 0."""
    rows = np.arange(x.shape[0])
    m = x.shape[1]
    k = (x <= limit).sum(axis=1) - 1  # last point with FPPI ≤ limit
    segments = 0.5 * (y[:, 1:] + y[:, :-1]) * np.diff(x, axis=1)
    area = np.hstack([np.zeros((x.shape[0], 1)), np.cumsum(segments, axis=1)])[rows, k]
    xk, yk = x[rows, k], y[rows, k]
    nxt = np.minimum(k + 1, m - 1)
    x1, y1 = x[rows, nxt], y[rows, nxt]
    with np.errstate(invalid="ignore", divide="ignore"):
        y_limit = np.where(k + 1 < m, yk + (y1 - yk) * (limit - xk) / (x1 - xk), yk)
    return area + 0.5 * (yk + y_limit) * (limit - xk)


def sweep_auc_bootstrap_ci(
    detected: np.ndarray,
    n_gt: np.ndarray,
    fp: np.ndarray,
    limit: float = AUC_LIMIT,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[float]:
    """Bootstrap CI of sweep-mode FROC-AUC; arrays are (n_cases, n_thresholds) per-case counts."""
    n = detected.shape[0]
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_bootstrap, n))
    aucs = []
    for row in idx:
        total_gt = n_gt[row].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = detected[row].sum(axis=0) / total_gt
        curve = froc_sweep(fp[row].sum(axis=0) / n, sens)
        if curve is not None:
            aucs.append(froc_auc(curve, limit))
    return _percentile_ci(aucs)


def _percentile_ci(values: Sequence[float]) -> list[float]:
    if len(values) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(np.asarray(values), [2.5, 97.5])
    return [float(lo), float(hi)]
