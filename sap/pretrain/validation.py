"""Skeletal validation scores and the intensity-threshold baseline (SPEC §6).

Pure numpy on label maps: per-class Dice for the nine skeleton regions and the whole-skeleton
binary Dice (any region vs background, :func:`sap.metrics.dice`; the paper reports 0.90), plus a
trivial baseline that segments the skeleton by thresholding one image channel, so a short
pretraining run can be judged against something that knows no anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sap.data.labels import SKELETON_CLASSES
from sap.metrics import CumulativeMean, dice

N_CLASSES = 10  #: background + nine regions


def per_class_dice(pred: np.ndarray, gt: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Dice of classes 1 … n_classes-1 between two label maps, shape ``(n_classes - 1,)``.

    One pass with ``bincount`` over the joint labels; a class absent from both maps is NaN.
    """
    pred = np.asarray(pred, np.int64).ravel()
    gt = np.asarray(gt, np.int64).ravel()
    joint = np.bincount(pred * n_classes + gt, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    inter = np.diag(joint)[1:].astype(float)
    sizes = joint.sum(1)[1:] + joint.sum(0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2.0 * inter / np.maximum(sizes, 1), np.nan)


@dataclass
class SkeletalScores:
    """Validation scores over cases: per-class Dice (mean over cases, NaN skipped) and the
    whole-skeleton Dice (mean over cases)."""

    class_dice: np.ndarray  #: (9,) regions 1 … 9
    skeleton_dice: float
    n_cases: int

    @property
    def mean_class_dice(self) -> float:
        finite = self.class_dice[np.isfinite(self.class_dice)]
        return float(finite.mean()) if finite.size else float("nan")

    def as_dict(self) -> dict[str, float]:
        out = {"val_skeleton_dice": self.skeleton_dice, "val_mean_class_dice": self.mean_class_dice}
        for label, value in enumerate(self.class_dice, start=1):
            out[f"val_dice_{SKELETON_CLASSES[label]}"] = float(value)
        return out


def score_cases(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> SkeletalScores:
    """Per-class and whole-skeleton Dice of predicted vs true skeleton label maps, each averaged
    over the cases where it is defined (:class:`sap.metrics.CumulativeMean`)."""
    scores = CumulativeMean()
    for pred, gt in zip(preds, gts, strict=True):
        scores.append(class_dice=per_class_dice(pred, gt), skeleton=dice(pred > 0, gt > 0))
    if not len(scores):
        return SkeletalScores(np.full(N_CLASSES - 1, np.nan), float("nan"), 0)
    means = scores.aggregate()
    return SkeletalScores(np.asarray(means["class_dice"]), float(means["skeleton"]), len(scores))


# ------------------------------------------------------------------------------------ baseline
@dataclass
class ThresholdBaseline:
    """Skeleton = ``channel`` ≥ (or ≤) ``threshold`` inside the body, tuned on training cases."""

    channel: int
    threshold: float
    above: bool
    train_dice: float
    val_dice: float

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "channel": self.channel,
            "threshold": self.threshold,
            "above": self.above,
            "train_skeleton_dice": self.train_dice,
            "val_skeleton_dice": self.val_dice,
        }


def _threshold_mask(image: np.ndarray, body: np.ndarray | None, channel: int, t: float, above: bool) -> np.ndarray:
    values = np.asarray(image[channel])
    mask = values >= t if above else values <= t
    return mask & (np.asarray(body) > 0) if body is not None else mask


def intensity_threshold_baseline(
    train: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    val: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    grid: Sequence[float] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)),
) -> ThresholdBaseline:
    """Tune (channel, threshold, direction) for the mean whole-skeleton Dice on ``train``
    (``(image (C, X, Y, Z), body mask or None, skeleton labels)`` triples), score it on ``val``.

    Images are normalised to [0, 1] (the cache's percentile normalisation), hence the grid.
    """
    best: tuple[float, int, float, bool] | None = None
    n_channels = np.asarray(train[0][0]).shape[0]
    for channel in range(n_channels):
        for above in (True, False):
            for t in grid:
                score = float(
                    np.nanmean([dice(_threshold_mask(img, body, channel, t, above), sk > 0) for img, body, sk in train])
                )
                if best is None or score > best[0]:
                    best = (score, channel, float(t), above)
    assert best is not None
    score, channel, t, above = best
    val_scores = [dice(_threshold_mask(img, body, channel, t, above), sk > 0) for img, body, sk in val]
    return ThresholdBaseline(channel, t, above, score, float(np.nanmean(val_scores)) if val_scores else float("nan"))
