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


#: columns of a study's ``candidates.csv``: one ``case`` row per case (so cases without candidates
#: or lesions still count in the FPPI denominator), one ``candidate`` row per FROC candidate
#: (score, hit, volume_ml) and one ``lesion`` row per ground-truth lesion (score = highest score of
#: a candidate hitting it, -inf when none does; volume_ml)
CANDIDATE_COLUMNS: tuple[str, ...] = ("case", "kind", "score", "hit", "volume_ml")


def candidate_rows(case_id: str, candidates: CaseCandidates) -> list[dict]:
    """Rows of ``candidates.csv`` (:data:`CANDIDATE_COLUMNS`) for one case."""
    rows: list[dict] = [{"case": case_id, "kind": "case", "score": float("nan"), "hit": False,
                         "volume_ml": float("nan")}]
    c = candidates
    rows += [{"case": case_id, "kind": "candidate", "score": float(s), "hit": bool(h), "volume_ml": float(v)}
             for s, h, v in zip(c.score, c.hit, c.volume_ml, strict=True)]
    rows += [{"case": case_id, "kind": "lesion", "score": float(s), "hit": bool(np.isfinite(s)), "volume_ml": float(v)}
             for s, v in zip(c.gt_best, c.gt_volume_ml, strict=True)]
    return rows


def candidates_from_rows(
    case: Sequence[str], kind: Sequence[str], score: Sequence[float], hit: Sequence[bool], volume_ml: Sequence[float]
) -> dict[str, CaseCandidates]:
    """Inverse of :func:`candidate_rows` over many cases (the columns of ``candidates.csv``):
    case id → :class:`CaseCandidates`, in order of first appearance. Unknown kinds are an error."""
    case_a, kind_a = np.asarray(case, dtype=str), np.asarray(kind, dtype=str)
    score_a, vol_a = np.asarray(score, dtype=np.float64), np.asarray(volume_ml, dtype=np.float64)
    hit_a = np.asarray(hit, dtype=bool)
    unknown = set(kind_a.tolist()) - {"case", "candidate", "lesion"}
    if unknown:
        raise ValueError(f"unknown candidate kinds: {', '.join(sorted(unknown))}")
    out: dict[str, CaseCandidates] = {}
    for case_id in dict.fromkeys(case_a.tolist()):
        own = case_a == case_id
        cand, les = own & (kind_a == "candidate"), own & (kind_a == "lesion")
        out[case_id] = CaseCandidates(score_a[cand], hit_a[cand], vol_a[cand], score_a[les], vol_a[les])
    return out


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
    resampled case count; resamples without any lesion are skipped. Vectorised (see
    :func:`resampled_froc_aucs`). Returns [nan, nan] when no resample has a curve.
    """
    n = len(cases)
    if n == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
    aucs = resampled_froc_aucs(cases, idx, volume_threshold_ml, limit)
    return _percentile_ci(aucs[np.isfinite(aucs)])


def paired_froc_auc_difference(
    cases_a: Sequence[CaseCandidates],
    cases_b: Sequence[CaseCandidates],
    volume_threshold_ml: float | None = None,
    limit: float = AUC_LIMIT,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, float | list[float] | int]:
    """Candidate-mode FROC-AUC of method a minus method b on the same cases, with its 95 %
    percentile-bootstrap CI from a paired bootstrap over cases.

    ``cases_a[i]`` and ``cases_b[i]`` are the same case scored by the two methods (same ground
    truth). Each resample (``idx = default_rng(seed).integers(0, n, (n_bootstrap, n))``) draws
    cases with replacement and recomputes both methods' pooled FROC on the same drawn cases;
    resamples without any lesion (≥ V with ``volume_threshold_ml``) are skipped. The difference is
    that of the AUCs on all cases (:func:`froc_candidates`, :func:`froc_auc`). Returns
    ``{"difference", "auc_a", "auc_b", "ci95": [lo, hi], "n"}`` (n = cases); NaN without lesions.
    """
    n = len(cases_a)
    if n != len(cases_b):
        raise ValueError(f"paired FROC needs the same cases for both methods ({n} and {len(cases_b)})")
    nan = float("nan")
    if n == 0:
        return {"difference": nan, "auc_a": nan, "auc_b": nan, "ci95": [nan, nan], "n": 0}
    auc_a = froc_auc(froc_candidates(cases_a, volume_threshold_ml), limit)
    auc_b = froc_auc(froc_candidates(cases_b, volume_threshold_ml), limit)
    idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
    diff = (resampled_froc_aucs(cases_a, idx, volume_threshold_ml, limit)
            - resampled_froc_aucs(cases_b, idx, volume_threshold_ml, limit))
    return {"difference": auc_a - auc_b, "auc_a": auc_a, "auc_b": auc_b,
            "ci95": _percentile_ci(diff[np.isfinite(diff)]), "n": n}


def resampled_froc_aucs(
    cases: Sequence[CaseCandidates],
    idx: np.ndarray,
    volume_threshold_ml: float | None = None,
    limit: float = AUC_LIMIT,
) -> np.ndarray:
    """Candidate-mode FROC-AUC of each resample of ``cases`` (rows of ``idx``, (B, n) case indices).

    Every case's hit and false-positive counts at every pooled score are tabulated once, and a
    resample's curve is the multiplicity-weighted sum of its cases' rows (identical to
    :func:`froc_candidates` on the resampled list; FPPI denominator n). Returns (B,) AUCs, NaN for
    a resample without any lesion.
    """
    n = len(cases)
    n_bootstrap = idx.shape[0]
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
    weights = np.zeros((n_bootstrap, n))
    np.add.at(weights, (np.repeat(np.arange(n_bootstrap), n), idx.ravel()), 1.0)
    aucs = np.full(n_bootstrap, np.nan)
    chunk = max(1, int(4e6 // max(thresholds.size, 1)))
    for lo in range(0, n_bootstrap, chunk):
        w = weights[lo:lo + chunk]
        total = w @ n_gt
        has = total > 0
        w = w[has]
        if w.shape[0] == 0:
            continue
        zeros = np.zeros((w.shape[0], 1))
        sens = np.hstack([zeros, (w @ hits) / (w @ n_gt)[:, None]])
        fppi = np.hstack([zeros, (w @ false) / n])
        aucs[lo:lo + chunk][has] = _auc_rows(fppi, sens, limit)
    return aucs


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
