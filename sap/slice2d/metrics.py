"""2D slice metrics of SPEC §11: Dice and IoU per slice, per-volume Dice, HD95 and normalised HD.

Empty-slice rule (Dice, IoU): both masks empty → NaN, excluded from the mean and counted
separately (``n_both_empty``); ground truth empty and prediction not → 0 (and the reverse → 0).
Boundary distances use MONAI's ``compute_hausdorff_distance`` in millimetres (pixel spacing given
as (row, col) mm): HD95 = the larger of the two directed 95th-percentile distances; NaN when either
mask is empty (counted separately). The normalised Hausdorff distance is the (full, 100th
percentile) Hausdorff distance divided by the image diagonal in mm, as paper 000 reports it.

3D scoring of restacked volumes is not here: the lesion rules of SPEC §9 live in ``sap.metrics``
(see :func:`sap.slice2d.predict.score_restacked_volumes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (any shape). Both empty → (nan, nan); one empty → (0, 0)."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    inter = int(np.count_nonzero(p & g))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return math.nan, math.nan
    return 2.0 * inter / total, inter / (total - inter)


def volume_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice over a whole (restacked) volume: NaN when both are empty, 0 when exactly one is."""
    return dice_iou(pred, gt)[0]


def _hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float], percentile: float | None) -> float:
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if not p.any() or not g.any():
        return math.nan
    from monai.metrics import compute_hausdorff_distance  # torch-backed; imported only when used

    value = compute_hausdorff_distance(
        p[None, None].astype(np.float32),
        g[None, None].astype(np.float32),
        include_background=True,
        percentile=percentile,
        spacing=[float(s) for s in spacing],
    )
    return float(value.reshape(-1)[0])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm of two 2D masks; NaN if either is empty."""
    return _hausdorff(pred, gt, spacing, 95.0)


def hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """Hausdorff distance (maximum) in mm of two 2D masks; NaN if either is empty."""
    return _hausdorff(pred, gt, spacing, None)


def image_diagonal_mm(shape: tuple[int, int], spacing: tuple[float, float]) -> float:
    """Length of the image diagonal in mm: sqrt((H·row mm)² + (W·col mm)²)."""
    return float(math.hypot(shape[0] * spacing[0], shape[1] * spacing[1]))


def normalised_hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """Hausdorff distance / image diagonal (both mm), in [0, 1]; NaN if either mask is empty."""
    return hausdorff(pred, gt, spacing) / image_diagonal_mm(np.shape(pred), spacing)


@dataclass
class SliceScore:
    """Scores of one slice (NaN where the rules above say so)."""

    dice: float
    iou: float
    hd95_mm: float
    nhd: float

    @property
    def both_empty(self) -> bool:
        return math.isnan(self.dice)


def score_slice(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0), distances: bool = True) -> SliceScore:
    """All per-slice metrics of one 2D prediction; ``distances=False`` skips HD95/NHD (NaN)."""
    d, i = dice_iou(pred, gt)
    if distances:
        return SliceScore(d, i, hd95(pred, gt, spacing), normalised_hausdorff(pred, gt, spacing))
    return SliceScore(d, i, math.nan, math.nan)


def summarise(scores: list[SliceScore]) -> dict[str, float | int]:
    """Means over slices with the empty-slice rule; counts of excluded slices.

    Returns ``dice``, ``iou`` (means over slices not both empty), ``hd95_mm``, ``nhd`` (means over
    slices where both masks are non-empty), ``n_slices``, ``n_both_empty``, ``n_distance_undefined``.
    """
    dice = np.array([s.dice for s in scores], dtype=np.float64)
    iou = np.array([s.iou for s in scores], dtype=np.float64)
    hd = np.array([s.hd95_mm for s in scores], dtype=np.float64)
    nhd = np.array([s.nhd for s in scores], dtype=np.float64)

    def mean(values: np.ndarray) -> float:
        finite = values[~np.isnan(values)]
        return float(finite.mean()) if finite.size else math.nan

    return {
        "dice": mean(dice),
        "iou": mean(iou),
        "hd95_mm": mean(hd),
        "nhd": mean(nhd),
        "n_slices": len(scores),
        "n_both_empty": int(np.isnan(dice).sum()),
        "n_distance_undefined": int(np.isnan(hd).sum()),
    }


def score_volume_slices(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float], distances: bool = True
) -> dict[str, float | int]:
    """Slice-wise metrics of a restacked (X, Y, Z) prediction against its reference, axial slices.

    Returns :func:`summarise` over the axial slices (pixel spacing = the first two entries of
    ``spacing``, mm) plus ``volume_dice`` over the whole volume.
    """
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    pixel = (float(spacing[0]), float(spacing[1]))
    scores = [score_slice(p[:, :, k], g[:, :, k], pixel, distances) for k in range(p.shape[2])]
    return {**summarise(scores), "volume_dice": volume_dice(p, g)}

