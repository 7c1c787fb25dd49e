"""Per-case evaluation (E1–E6 and the per-case parts of E7/E8) on in-memory arrays.

:func:`evaluate_case` is the one call for a (probability or binary map, ground truth, spacing)
triple: it thresholds once, labels once per threshold with cc3d, and computes Dice/NSD on
bounding-box crops. :func:`detection_counts` is the light version (E2–E4 counts only) used by
threshold sweeps, tuning and fine-tuning validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sap.files import nan_to_none as nan_to_none  # the JSON rule, part of this API
from sap.metrics.components import (
    Components,
    Matching,
    at_least,
    drop_small,
    group_max,
    label_components,
    match_components,
    voxel_volume_ml,
)
from sap.metrics.froc import CaseCandidates
from sap.metrics.surface import normalized_surface_dice

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))

PATIENT_COLUMNS: tuple[str, ...] = (
    "case", "n_gt", "n_pred", "detected", "fp", "sensitivity", "precision", "f2",
    "n_gt_1ml", "detected_1ml", "fp_1ml", "sensitivity_1ml", "dice_detected", "nsd_detected",
    "dice_patient_mean", "dice_global", "volume_gt_ml", "volume_pred_ml",
)
LESION_COLUMNS: tuple[str, ...] = ("case", "kind", "id", "volume_ml", "matched", "dice", "nsd", "score")


@dataclass(frozen=True)
class EvaluationSettings:
    """The knobs of SPEC §9 (defaults = SPEC defaults).

    ``threshold`` t binarises predictions (pred ≥ t); ``t_min`` defines FROC candidates;
    ``tolerance_mm`` is the NSD tolerance; ``min_volume_ml`` drops smaller predicted components
    before matching; ``volume_threshold_ml`` is the V of the "≥ V mL" metrics; ``froc`` is
    ``candidate`` or ``sweep``; ``grid`` holds the sweep/tuning thresholds.
    """

    threshold: float = 0.5
    t_min: float = 0.05
    tolerance_mm: float = 2.0
    connectivity: int = 26
    min_volume_ml: float = 0.0
    volume_threshold_ml: float = 1.0
    froc: str = "candidate"
    grid: tuple[float, ...] = DEFAULT_GRID
    n_bootstrap: int = 1000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "t_min": self.t_min, "tolerance_mm": self.tolerance_mm,
            "connectivity": self.connectivity, "min_volume_ml": self.min_volume_ml,
            "volume_threshold_ml": self.volume_threshold_ml, "froc": self.froc,
            "grid": list(self.grid), "n_bootstrap": self.n_bootstrap, "seed": self.seed,
        }


# ------------------------------------------------------------------------------------ E3 rules
def sensitivity(detected: int, n_gt: int) -> float:
    """E3 sensitivity = detected / n_gt; NaN when n_gt = 0 (lesion-free case)."""
    return detected / n_gt if n_gt > 0 else float("nan")


def precision(true_candidates: int, n_pred: int) -> float:
    """E3 precision = true candidates / n_pred; NaN when n_pred = 0."""
    return true_candidates / n_pred if n_pred > 0 else float("nan")


def f2_score(detected: int, n_gt: int, true_candidates: int, n_pred: int) -> float:
    """E3 F2 = 5PR / (4P + R), with P = 0 when n_pred = 0; 0 when P + R = 0; NaN when n_gt = 0."""
    if n_gt == 0:
        return float("nan")
    r = detected / n_gt
    p = true_candidates / n_pred if n_pred > 0 else 0.0
    if p + r == 0:
        return 0.0
    return 5.0 * p * r / (4.0 * p + r)


@dataclass(frozen=True)
class DetectionCounts:
    """E2–E4 counts of one case at one (threshold, min volume)."""

    n_gt: int
    n_pred: int
    detected: int
    true_candidates: int
    n_gt_1ml: int
    detected_1ml: int
    fp_1ml: int

    @property
    def fp(self) -> int:
        return self.n_pred - self.true_candidates

    @property
    def sensitivity(self) -> float:
        return sensitivity(self.detected, self.n_gt)

    @property
    def precision(self) -> float:
        return precision(self.true_candidates, self.n_pred)

    @property
    def f2(self) -> float:
        return f2_score(self.detected, self.n_gt, self.true_candidates, self.n_pred)

    @property
    def sensitivity_1ml(self) -> float:
        return sensitivity(self.detected_1ml, self.n_gt_1ml)


def _counts(gt: Components, pred: Components, volume_threshold_ml: float) -> tuple[DetectionCounts, Any]:
    match = match_components(gt, pred)
    gt_big = at_least(gt.volume_ml, volume_threshold_ml)
    pred_big = at_least(pred.volume_ml, volume_threshold_ml)
    counts = DetectionCounts(
        n_gt=gt.n,
        n_pred=pred.n,
        detected=match.detected,
        true_candidates=match.true_candidates,
        n_gt_1ml=int(gt_big.sum()),
        detected_1ml=int((match.gt_detected & gt_big).sum()),
        fp_1ml=int((~match.pred_true & pred_big).sum()),
    )
    return counts, match


def label_ground_truth(gt: np.ndarray, spacing: Sequence[float], connectivity: int = 26) -> Components:
    """E1 on a ground-truth mask (gt > 0; integer masks are labelled without a converted copy)."""
    if gt.dtype == np.uint8 and gt.max(initial=0) <= 1:
        # a {0, 1} uint8 mask is a bool array byte for byte; numpy scans bool ~15× faster
        mask = gt.view(np.bool_)
    else:
        mask = gt if gt.dtype.kind in "bu" else gt > 0
    return label_components(mask, connectivity, voxel_volume_ml(tuple(spacing)))  # type: ignore[arg-type]


def detection_counts(
    prob: np.ndarray,
    gt: np.ndarray | Components,
    spacing: Sequence[float],
    threshold: float = 0.5,
    connectivity: int = 26,
    min_volume_ml: float = 0.0,
    volume_threshold_ml: float = 1.0,
) -> DetectionCounts:
    """E2–E4 counts of one case at one threshold (``gt`` may be pre-labelled :class:`Components`).

    Use ``.sensitivity``, ``.precision``, ``.f2`` for the E3 rates (NaN rules there).
    """
    return detection_counts_grid(
        prob, gt, spacing, [threshold], [min_volume_ml], connectivity, volume_threshold_ml
    )[(threshold, min_volume_ml)]


def detection_counts_grid(
    prob: np.ndarray,
    gt: np.ndarray | Components,
    spacing: Sequence[float],
    thresholds: Sequence[float],
    min_volumes_ml: Sequence[float] = (0.0,),
    connectivity: int = 26,
    volume_threshold_ml: float = 1.0,
) -> dict[tuple[float, float], DetectionCounts]:
    """Counts at every (threshold, min volume) pair: one cc3d call per threshold (for E8 sweep, E9)."""
    if not isinstance(gt, Components):
        gt = label_ground_truth(gt, spacing, connectivity)
    vv = voxel_volume_ml(tuple(spacing))  # type: ignore[arg-type]
    out: dict[tuple[float, float], DetectionCounts] = {}
    for t in thresholds:
        pred_all = label_components(prob >= t, connectivity, vv)
        for mv in min_volumes_ml:
            out[(t, mv)] = _counts(gt, drop_small(pred_all, mv), volume_threshold_ml)[0]
    return out


@dataclass
class CaseResult:
    """Everything :func:`evaluate_case` measures on one case (small: no volumes kept)."""

    case_id: str
    row: dict[str, Any]
    gt_lesions: dict[str, np.ndarray]
    pred_components: dict[str, np.ndarray]
    binary: bool
    candidates: CaseCandidates | None = None
    sweep: dict[tuple[float, float], DetectionCounts] = field(default_factory=dict)

    def lesion_rows(self) -> list[dict[str, Any]]:
        """Rows of ``lesions.csv`` (gt lesions first, then predicted components)."""
        rows = []
        for kind, table in (("gt", self.gt_lesions), ("pred", self.pred_components)):
            for i in range(table["id"].size):
                rows.append({
                    "case": self.case_id, "kind": kind, "id": int(table["id"][i]),
                    "volume_ml": float(table["volume_ml"][i]), "matched": bool(table["matched"][i]),
                    "dice": float(table["dice"][i]) if kind == "gt" else float("nan"),
                    "nsd": float(table["nsd"][i]) if kind == "gt" else float("nan"),
                    "score": float(table["score"][i]),
                })
        return rows


def is_binary_prediction(prob: np.ndarray, values_at_tmin: np.ndarray | None = None) -> bool:
    """A prediction is binary when its dtype is integer/bool or every value ≥ t_min equals 1.

    A float map with no value ≥ t_min is a probability map that found nothing, not binary (a
    weak model's empty case must not switch the FROC of a whole study to null).
    """
    if prob.dtype.kind in "biu":
        return True
    if values_at_tmin is None:
        values_at_tmin = prob[prob > 0]
    return bool(values_at_tmin.size > 0 and np.all(values_at_tmin == 1))


def _crop(bbox: np.ndarray, margin: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    lo = np.maximum(bbox[0::2] - margin, 0)
    hi = np.minimum(bbox[1::2] + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def lesion_dice_nsd(
    gt: Components,
    pred: Components,
    match: Matching,
    spacing: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """E5 per lesion: Dice(g, P_g) and NSD(g, P_g), P_g = union of the components overlapping g.

    Dice comes from the overlap counts of the matching (no mask at all); NSD is computed on a crop
    around g ∪ P_g padded by one voxel plus the tolerance. Returns two (n_gt,) arrays, NaN for
    missed lesions.
    """
    dice = np.full(gt.n, np.nan)
    nsd = np.full(gt.n, np.nan)
    margin = 1 + np.ceil(tolerance_mm / np.asarray(spacing)).astype(np.int64)
    order = np.argsort(match.pair_gt, kind="stable")
    pair_gt, pair_pred, pair_overlap = match.pair_gt[order], match.pair_pred[order], match.pair_overlap[order]
    ids = np.arange(1, gt.n + 1)
    starts = np.searchsorted(pair_gt, ids, side="left")
    ends = np.searchsorted(pair_gt, ids, side="right")
    for g in np.flatnonzero(match.gt_detected):
        preds = pair_pred[starts[g]:ends[g]]
        overlap = int(pair_overlap[starts[g]:ends[g]].sum())
        dice[g] = 2.0 * overlap / (gt.voxel_counts[g] + pred.voxel_counts[preds - 1].sum())
        boxes = np.vstack([gt.bboxes[g], pred.bboxes[preds - 1]])
        union = np.empty(6, dtype=np.int64)
        union[0::2], union[1::2] = boxes[:, 0::2].min(axis=0), boxes[:, 1::2].max(axis=0)
        box = _crop(union, margin, gt.labels.shape)
        lesion = gt.crop_ids(box) == g + 1
        predicted = np.isin(pred.crop_ids(box), preds)
        nsd[g] = normalized_surface_dice(lesion, predicted, spacing, tolerance_mm)
    return dice, nsd


def evaluate_case(
    prob: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    settings: EvaluationSettings | None = None,
    case_id: str = "",
    sweep: bool | None = None,
) -> CaseResult:
    """All per-case metrics of SPEC §9 for one case.

    ``prob``: (X, Y, Z) probabilities in [0, 1] or a binary mask; ``gt``: (X, Y, Z) lesion mask
    (> 0 = lesion); ``spacing``: voxel size in mm along the array axes. ``sweep`` (default: when
    ``settings.froc == "sweep"``) also computes the counts at every grid threshold.
    NaN rules: sensitivity, F2, sensitivity_1ml, dice_patient_mean are NaN without lesions;
    precision NaN without predictions; dice_detected/nsd_detected NaN without detected lesions;
    dice_global NaN when both masks are empty and 0 when exactly one is.
    """
    s = settings or EvaluationSettings()
    if prob.shape != gt.shape:
        raise ValueError(f"prediction shape {prob.shape} differs from ground truth {gt.shape}")
    spacing = tuple(float(x) for x in spacing)
    vv = voxel_volume_ml(spacing)  # type: ignore[arg-type]
    gt_c = label_ground_truth(gt, spacing, s.connectivity)
    flat_prob = prob.reshape(-1)

    # Voxels at or above t_min, read once: FROC candidates, component scores, binary detection.
    low = min(s.t_min, s.threshold)
    mask_low = prob >= low
    idx_low = np.flatnonzero(mask_low)
    vals_low = flat_prob[idx_low]
    binary = is_binary_prediction(prob, vals_low)

    above_t = vals_low >= s.threshold
    # pred ≥ t voxels are a subset of pred ≥ low: build that mask from their indices (no second
    # full-volume comparison, and only pages holding foreground are written)
    idx_t = idx_low[above_t]
    mask_t = np.zeros(prob.shape, dtype=bool)
    mask_t.reshape(-1)[idx_t] = True
    pred_all = label_components(mask_t, s.connectivity, vv, idx_t)
    del mask_t
    pred_c = drop_small(pred_all, s.min_volume_ml)
    counts, match = _counts(gt_c, pred_c, s.volume_threshold_ml)

    # Scores: max probability per predicted component and per lesion.
    pred_score = group_max(pred_c.ids_at(idx_t), vals_low[above_t], pred_c.n)
    gt_score = group_max(gt_c.ids_at(gt_c.flat_index), flat_prob[gt_c.flat_index], gt_c.n)

    gt_dice, gt_nsd = lesion_dice_nsd(gt_c, pred_c, match, spacing, s.tolerance_mm)  # type: ignore[arg-type]

    # E6: global Dice from counts only.
    gt_vox, pred_total = gt_c.total_voxels(), pred_c.total_voxels()
    inter = int(match.pair_overlap.sum())
    if gt_vox + pred_total == 0:
        dice_global = float("nan")
    else:
        dice_global = 2.0 * inter / (gt_vox + pred_total)
    lesion_dice_all = np.where(match.gt_detected, gt_dice, 0.0)

    def _mean(a: np.ndarray) -> float:
        return float(np.mean(a)) if a.size else float("nan")

    row = {
        "case": case_id, "n_gt": counts.n_gt, "n_pred": counts.n_pred, "detected": counts.detected,
        "fp": counts.fp, "sensitivity": counts.sensitivity, "precision": counts.precision,
        "f2": counts.f2, "n_gt_1ml": counts.n_gt_1ml, "detected_1ml": counts.detected_1ml,
        "fp_1ml": counts.fp_1ml, "sensitivity_1ml": counts.sensitivity_1ml,
        "dice_detected": _mean(gt_dice[match.gt_detected]),
        "nsd_detected": _mean(gt_nsd[match.gt_detected]),
        "dice_patient_mean": _mean(lesion_dice_all),
        "dice_global": dice_global,
        "volume_gt_ml": gt_vox * vv, "volume_pred_ml": pred_total * vv,
    }
    gt_table = {
        "id": np.arange(1, gt_c.n + 1), "volume_ml": gt_c.volume_ml, "matched": match.gt_detected,
        "dice": gt_dice, "nsd": gt_nsd, "score": gt_score,
    }
    pred_table = {
        "id": np.arange(1, pred_c.n + 1), "volume_ml": pred_c.volume_ml, "matched": match.pred_true,
        "score": pred_score,
    }

    candidates = None
    if not binary:
        if low == s.t_min:
            mask_tmin, idx_tmin = mask_low, idx_low
        else:
            mask_tmin = prob >= s.t_min
            idx_tmin = idx_low[vals_low >= s.t_min]
        candidates = _candidates(gt_c, mask_tmin, idx_tmin, flat_prob, s, vv)
    result = CaseResult(case_id, row, gt_table, pred_table, binary, candidates)
    if (s.froc == "sweep" if sweep is None else sweep) and not binary:
        result.sweep = detection_counts_grid(
            prob, gt_c, spacing, s.grid, [s.min_volume_ml], s.connectivity, s.volume_threshold_ml
        )
    return result


def froc_case_candidates(
    prob: np.ndarray, gt: np.ndarray, spacing: Sequence[float], t_min: float = 0.05, connectivity: int = 26
) -> CaseCandidates:
    """E8 candidates of one case alone (what :func:`evaluate_case` stores in ``candidates``):
    components of prob ≥ ``t_min`` scored by their maximum probability, matched to the lesions."""
    spacing = tuple(float(x) for x in spacing)
    vv = voxel_volume_ml(spacing)  # type: ignore[arg-type]
    gt_c = label_ground_truth(gt, spacing, connectivity)
    mask = prob >= t_min
    settings = EvaluationSettings(t_min=t_min, connectivity=connectivity)
    return _candidates(gt_c, mask, np.flatnonzero(mask), prob.reshape(-1), settings, vv)


def _candidates(
    gt_c: Components, mask: np.ndarray, index: np.ndarray, flat_prob: np.ndarray, s: EvaluationSettings, vv: float
) -> CaseCandidates:
    """E8 candidates: components of pred ≥ t_min (min_volume_ml ignored), scored by max probability."""
    cand = label_components(mask, s.connectivity, vv, index)
    score = group_max(cand.ids_at(cand.flat_index), flat_prob[cand.flat_index], cand.n)
    match = match_components(gt_c, cand)
    gt_best = np.full(gt_c.n, -np.inf)
    np.maximum.at(gt_best, match.pair_gt - 1, score[match.pair_pred - 1])
    return CaseCandidates(score, match.pred_true, cand.volume_ml, gt_best, gt_c.volume_ml)
