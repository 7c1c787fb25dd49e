"""E1 components and E2 matching (SPEC §9), on whole volumes, without a mask per lesion.

Components are labelled once with cc3d; everything later works on the label array through the
flat indices of foreground voxels and on bounding-box crops from ``cc3d.statistics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import numpy as np

#: relative slack of the "≥ V mL" rule (E1): ``volume >= V * (1 - VOLUME_RTOL)``
VOLUME_RTOL = 1e-9


def at_least(volume_ml: np.ndarray | float, threshold_ml: float) -> np.ndarray:
    """E1's "≥ V": ``volume >= V * (1 - 1e-9)``, so a lesion of exactly V mL (in voxels) counts."""
    return np.asarray(volume_ml) >= threshold_ml * (1.0 - VOLUME_RTOL)


def voxel_volume_ml(spacing: tuple[float, float, float]) -> float:
    """Volume of one voxel in mL (spacing in mm)."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


@dataclass
class Components:
    """Connected components of a binary volume.

    ``labels``: the cc3d label array (0 = background, raw ids 1…n_raw). ``lut`` maps raw ids to the
    kept components 1…n (0 = dropped, e.g. by ``min_volume_ml``); ``voxel_counts`` (n,) and
    ``bboxes`` (n, 6: lo0, hi0, lo1, hi1, lo2, hi2, inclusive) describe the kept components, in order.
    """

    labels: np.ndarray
    lut: np.ndarray
    voxel_counts: np.ndarray
    bboxes: np.ndarray
    voxel_volume_ml: float
    _flat_index: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.voxel_counts.size)

    @property
    def volume_ml(self) -> np.ndarray:
        """Volume of each kept component (mL), shape (n,)."""
        return self.voxel_counts.astype(np.float64) * self.voxel_volume_ml

    @property
    def flat_index(self) -> np.ndarray:
        """Flat indices of the voxels of raw components (computed once, sorted)."""
        if self._flat_index is None:
            self._flat_index = np.flatnonzero(self.labels)
        return self._flat_index

    def ids_at(self, flat_index: np.ndarray) -> np.ndarray:
        """Kept component id (0 = none) at the given flat voxel indices."""
        return self.lut[self.labels.reshape(-1)[flat_index]]

    def crop_ids(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Kept component ids inside a crop."""
        return self.lut[self.labels[box]]

    def total_voxels(self) -> int:
        return int(self.voxel_counts.sum())


def label_components(
    binary: np.ndarray,
    connectivity: int = 26,
    voxel_volume_ml: float = 1.0,
    flat_index: np.ndarray | None = None,
) -> Components:
    """E1: connected components of a binary 3D array (``connectivity`` 6, 18 or 26).

    ``binary`` may be bool or any integer/float array (non-zero = foreground). ``flat_index``:
    the sorted flat indices of its foreground voxels when the caller already has them. Voxel
    counts and bounding boxes come from the foreground voxels only (no second full-volume pass).
    """
    if binary.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {binary.shape}")
    labels, n = cc3d.connected_components(binary, connectivity=connectivity, return_N=True, binary_image=True)
    if flat_index is None:
        flat_index = np.flatnonzero(binary)
    ids = labels.reshape(-1)[flat_index].astype(np.int64)
    counts = np.bincount(ids, minlength=n + 1)[1:]
    boxes = np.zeros((n, 6), dtype=np.int64)
    if n:
        coords = np.unravel_index(flat_index, binary.shape)
        for axis, coord in enumerate(coords):
            lo = np.full(n + 1, np.iinfo(np.int64).max)
            hi = np.full(n + 1, -1)
            np.minimum.at(lo, ids, coord)
            np.maximum.at(hi, ids, coord)
            boxes[:, 2 * axis], boxes[:, 2 * axis + 1] = lo[1:], hi[1:]
    lut = np.arange(n + 1, dtype=np.int64)
    return Components(labels, lut, counts, boxes, voxel_volume_ml, flat_index)


def drop_small(components: Components, min_volume_ml: float) -> Components:
    """Drop components smaller than ``min_volume_ml`` (E2 option); kept ones are renumbered 1…n.

    The label array is shared, not copied: dropped components disappear through the lookup table.
    """
    if min_volume_ml <= 0 or components.n == 0:
        return components
    keep = at_least(components.volume_ml, min_volume_ml)
    kept_ids = np.cumsum(keep) * keep  # old kept id → new id; dropped → 0
    lut = np.concatenate([[0], kept_ids])[components.lut]
    return Components(
        components.labels, lut, components.voxel_counts[keep], components.bboxes[keep],
        components.voxel_volume_ml, components._flat_index,
    )


@dataclass
class Matching:
    """E2 result. ``gt_detected`` (n_gt,) bool, ``pred_true`` (n_pred,) bool, and the overlapping
    (gt id, pred id, voxel overlap) pairs (ids 1-based)."""

    gt_detected: np.ndarray
    pred_true: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_overlap: np.ndarray

    @property
    def detected(self) -> int:
        return int(self.gt_detected.sum())

    @property
    def true_candidates(self) -> int:
        return int(self.pred_true.sum())


def match_components(gt: Components, pred: Components) -> Matching:
    """E2: a lesion is detected if any of its voxels lies in any predicted component; a predicted
    component is a true candidate if it overlaps any ground-truth voxel, else a false positive.

    A component bridging two lesions detects both; a lesion split into pieces is detected once and
    none of its pieces is a false positive. Only the ground-truth voxels are visited.
    """
    index = gt.flat_index
    g = gt.ids_at(index)
    p = pred.ids_at(index)
    both = (g > 0) & (p > 0)
    g, p = g[both], p[both]
    key = g.astype(np.int64) * (pred.n + 1) + p
    pairs, overlap = np.unique(key, return_counts=True)
    pair_gt, pair_pred = pairs // (pred.n + 1), pairs % (pred.n + 1)
    gt_detected = np.zeros(gt.n, dtype=bool)
    gt_detected[pair_gt - 1] = True
    pred_true = np.zeros(pred.n, dtype=bool)
    pred_true[pair_pred - 1] = True
    return Matching(gt_detected, pred_true, pair_gt, pair_pred, overlap)


def group_max(ids: np.ndarray, values: np.ndarray, n: int, empty: float = np.nan) -> np.ndarray:
    """Maximum of ``values`` per id 1…n (``empty`` where an id has no value); shape (n,)."""
    out = np.full(n + 1, -np.inf, dtype=np.float64)
    np.maximum.at(out, ids, values.astype(np.float64, copy=False))
    out = out[1:]
    out[np.isneginf(out)] = empty
    return out
