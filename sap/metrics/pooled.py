"""Aggregation over cases: E4 pooled values and cumulative curves, E7 ICC, E8 curves, E10 summary.

:func:`summarize` turns a list of :class:`~sap.metrics.case.CaseResult` into the ``summary.json``
document of SPEC §9 (NaN kept as float NaN; write it with :func:`~sap.metrics.case.nan_to_none`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sap.metrics.case import CaseResult, EvaluationSettings
from sap.metrics.components import at_least
from sap.metrics.froc import (
    AUC_LIMIT,
    AUC_LIMIT_1ML,
    FROC_SCORE_FPPI,
    FROC_SCORE_FPPI_1ML,
    FrocCurve,
    froc_auc,
    froc_auc_bootstrap_ci,
    froc_candidates,
    froc_score,
    froc_sweep,
    sweep_auc_bootstrap_ci,
)
from sap.metrics.stats import describe, icc_a1

#: case-level metrics (bootstrap over cases) and lesion-level metrics (bootstrap over lesions)
CASE_METRICS: tuple[str, ...] = (
    "sensitivity", "precision", "f2", "fp", "sensitivity_1ml", "fp_1ml",
    "dice_patient_mean", "dice_global",
)
LESION_METRICS: dict[str, str] = {"dice_detected": "dice", "nsd_detected": "nsd"}

#: volumes (mL) at which the cumulative curves of Fig. 6 are evaluated
CUMULATIVE_VOLUMES_ML: tuple[float, ...] = (0.0, *np.round(np.geomspace(0.01, 100.0, 41), 6).tolist())


def pooled_sensitivity(detected: Sequence[int], n_gt: Sequence[int]) -> float:
    """Pooled sensitivity = Σ detected / Σ n_gt over cases (NaN when there is no lesion)."""
    total = int(np.sum(n_gt))
    return float(np.sum(detected)) / total if total else float("nan")


def cumulative_volume_curves(
    gt_volume_ml: np.ndarray,
    gt_detected: np.ndarray,
    pred_volume_ml: np.ndarray,
    pred_true: np.ndarray,
    n_cases: int,
    volumes_ml: Sequence[float] = CUMULATIVE_VOLUMES_ML,
) -> dict[str, list[float]]:
    """E4 over V: pooled sensitivity of lesions ≥ V (detected by a component of any size), false
    positives ≥ V per case, and the number of lesions ≥ V, for every V in ``volumes_ml``."""
    sens, fp, n = [], [], []
    for v in volumes_ml:
        big = at_least(gt_volume_ml, v)
        n.append(int(big.sum()))
        sens.append(float(gt_detected[big].mean()) if big.any() else float("nan"))
        fp.append(float((at_least(pred_volume_ml, v) & ~pred_true).sum()) / n_cases if n_cases else float("nan"))
    return {"volume_ml": [float(v) for v in volumes_ml], "sensitivity": sens, "fp_per_case": fp, "n_gt": n}


def _curve_dict(curve: FrocCurve | None, auc: float, ci: list[float], score: float, limit: float) -> dict:
    base = curve.to_dict() if curve is not None else {"fppi": [], "sensitivity": []}
    return {**base, "auc": auc, "auc_ci95": ci, "limit": limit, "froc_score": score}


def summarize(results: Sequence[CaseResult], settings: EvaluationSettings | None = None) -> dict[str, Any]:
    """Pool per-case results into the summary of SPEC §9 (metrics, ICC, pooled ≥ 1 mL, FROC).

    FROC entries are None when any prediction is binary (no scores) or no case has a lesion.
    """
    s = settings or EvaluationSettings()
    n_cases = len(results)
    rows = [r.row for r in results]
    metrics: dict[str, Any] = {}
    for name in CASE_METRICS:
        metrics[name] = describe([row[name] for row in rows], s.n_bootstrap, s.seed)
    for name, column in LESION_METRICS.items():
        values = np.concatenate([r.gt_lesions[column][r.gt_lesions["matched"]] for r in results]) if results else []
        metrics[name] = describe(values, s.n_bootstrap, s.seed)

    icc, icc_ci = icc_a1([row["volume_gt_ml"] for row in rows], [row["volume_pred_ml"] for row in rows])
    cat = (lambda key, table: np.concatenate([getattr(r, table)[key] for r in results])) if results else None
    if results:
        gt_vol, gt_det = cat("volume_ml", "gt_lesions"), cat("matched", "gt_lesions").astype(bool)
        pred_vol, pred_true = cat("volume_ml", "pred_components"), cat("matched", "pred_components").astype(bool)
    else:
        gt_vol = gt_det = pred_vol = pred_true = np.zeros(0)
    summary: dict[str, Any] = {
        "settings": s.to_dict(),
        "n_cases": n_cases,
        "metrics": metrics,
        "icc_burden": {"value": icc, "ci95": icc_ci},
        "pooled_sensitivity": pooled_sensitivity([r["detected"] for r in rows], [r["n_gt"] for r in rows]),
        "pooled_sensitivity_1ml": pooled_sensitivity(
            [r["detected_1ml"] for r in rows], [r["n_gt_1ml"] for r in rows]
        ),
        "mean_fp": float(np.mean([r["fp"] for r in rows])) if rows else float("nan"),
        "mean_fp_1ml": float(np.mean([r["fp_1ml"] for r in rows])) if rows else float("nan"),
        "cumulative": cumulative_volume_curves(gt_vol, gt_det, pred_vol, pred_true, n_cases),
    }
    summary.update(froc_summary(results, s))
    return summary


def froc_summary(results: Sequence[CaseResult], settings: EvaluationSettings) -> dict[str, Any]:
    """``froc``, ``froc_1ml``, ``froc_score``, ``froc_score_1ml`` (None with binary predictions)."""
    s = settings
    none = {"froc": None, "froc_1ml": None, "froc_score": None, "froc_score_1ml": None}
    if not results or any(r.binary for r in results):
        return none
    out: dict[str, Any] = {}
    if s.froc == "candidate":
        cands = [r.candidates for r in results]
        for key, v, limit, points in (
            ("froc", None, AUC_LIMIT, FROC_SCORE_FPPI),
            ("froc_1ml", s.volume_threshold_ml, AUC_LIMIT_1ML, FROC_SCORE_FPPI_1ML),
        ):
            curve = froc_candidates(cands, v)  # type: ignore[arg-type]
            ci = froc_auc_bootstrap_ci(cands, v, limit, s.n_bootstrap, s.seed)  # type: ignore[arg-type]
            score = froc_score(curve, points)
            out[key] = _curve_dict(curve, froc_auc(curve, limit), ci, score, limit)
            out[f"froc_score{key[4:]}"] = score
        out["froc"]["mode"] = out["froc_1ml"]["mode"] = "candidate"
        return out
    # Sweep mode: one point per grid threshold, at the evaluation's minimum volume.
    keys = [(t, s.min_volume_ml) for t in s.grid]
    arrays = {
        name: np.array([[getattr(r.sweep[k], name) for k in keys] for r in results], dtype=np.float64)
        for name in ("detected", "n_gt", "fp", "detected_1ml", "n_gt_1ml", "fp_1ml")
    }
    n = len(results)
    for key, suffix, limit, points in (
        ("froc", "", AUC_LIMIT, FROC_SCORE_FPPI), ("froc_1ml", "_1ml", AUC_LIMIT_1ML, FROC_SCORE_FPPI_1ML)
    ):
        det, ngt, fp = arrays[f"detected{suffix}"], arrays[f"n_gt{suffix}"], arrays[f"fp{suffix}"]
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = det.sum(axis=0) / ngt.sum(axis=0)
        curve = froc_sweep(fp.sum(axis=0) / n, sens)
        ci = sweep_auc_bootstrap_ci(det, ngt, fp, limit, s.n_bootstrap, s.seed)
        score = froc_score(curve, points)
        out[key] = {**_curve_dict(curve, froc_auc(curve, limit), ci, score, limit), "mode": "sweep",
                    "thresholds": list(s.grid)}
        out[f"froc_score{suffix}"] = score
    return out
