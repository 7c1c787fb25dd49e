"""Per-case sampling index: lesion instances, body extent and label-class extents, computed once.

Patch samplers never scan whole volumes while training. Everything they need to place a patch is
computed here once per case (one ``cc3d`` labelling of the lesion mask) and kept small:

- every lesion instance (26-connected component, the E1 default) with its bounding box and the
  coordinates of its voxels (lesions are a tiny share of a scan, so this stays a few MB even for
  whole-body exams with dozens of lesions);
- the bounding box of the body mask (centres of negatives are drawn inside it by rejection);
- for label maps (skeleton classes), the classes present with their voxel counts and bounding boxes.

The index can be saved next to the memory-mapped cache (:meth:`CaseIndex.save`) and reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cc3d
import numpy as np

from sap.errors import SapError
from sap.files import atomic_write

#: bumped whenever the stored index layout changes
INDEX_VERSION = 1


def _bbox_of_mask(mask: np.ndarray) -> np.ndarray | None:
    """``[x0, y0, z0, x1, y1, z1)`` of the non-zero voxels of a 3D mask, or None if it is empty."""
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        if present.size == 0:
            return None
        bounds.append((present[0], present[-1] + 1))
    return np.array([b[0] for b in bounds] + [b[1] for b in bounds], dtype=np.int64)


@dataclass
class CaseIndex:
    """What the samplers know about one case (all coordinates in array voxel indices).

    Attributes:
        case_id: the case's identifier.
        shape: spatial shape ``(X, Y, Z)`` of the case's arrays.
        lesion_bboxes: ``(n_lesions, 6)`` int64, ``[x0, y0, z0, x1, y1, z1)`` (stop exclusive).
        lesion_voxel_counts: ``(n_lesions,)`` int64.
        lesion_coords: ``(N, 3)`` int32, the voxels of all lesions, grouped by lesion.
        lesion_offsets: ``(n_lesions + 1,)`` int64; lesion ``i`` owns
            ``lesion_coords[lesion_offsets[i]:lesion_offsets[i + 1]]``.
        body_bbox: ``(6,)`` int64 box of the body mask; the whole volume when no body mask is given
            or it is empty.
        has_body_mask: whether a (non-empty) body mask was given.
        classes: ``(n_classes,)`` label values present in the label map (0 = background included
            when present), empty without a label map.
        class_voxel_counts, class_bboxes: per entry of ``classes``; background's box is the body box.
    """

    case_id: str
    shape: tuple[int, int, int]
    lesion_bboxes: np.ndarray
    lesion_voxel_counts: np.ndarray
    lesion_coords: np.ndarray
    lesion_offsets: np.ndarray
    body_bbox: np.ndarray
    has_body_mask: bool
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_voxel_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_bboxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), np.int64))

    @property
    def n_lesions(self) -> int:
        return int(self.lesion_voxel_counts.shape[0])

    def lesion_voxels(self, lesion: int) -> np.ndarray:
        """``(n, 3)`` voxel coordinates of lesion ``lesion`` (0-based)."""
        return self.lesion_coords[self.lesion_offsets[lesion] : self.lesion_offsets[lesion + 1]]

    def lesion_voxels_in_box(self, start: np.ndarray, size: np.ndarray) -> int:
        """Number of lesion voxels inside the box ``[start, start + size)`` (exact, no mask read)."""
        if self.n_lesions == 0:
            return 0
        stop = start + size
        overlap = np.all((self.lesion_bboxes[:, :3] < stop) & (self.lesion_bboxes[:, 3:] > start), axis=1)
        total = 0
        for lesion in np.flatnonzero(overlap):
            voxels = self.lesion_voxels(int(lesion))
            total += int(np.count_nonzero(np.all((voxels >= start) & (voxels < stop), axis=1)))
        return total

    def first_lesion_free_box(self, starts: np.ndarray, size: np.ndarray) -> int | None:
        """Row of the first box ``[starts[i], starts[i] + size)`` holding no lesion voxel, or None.

        Boxes that overlap no lesion bounding box are lesion-free at once (one vectorised test);
        only boxes before the first such one are checked voxel by voxel.
        """
        if len(starts) == 0:
            return None
        if self.n_lesions == 0:
            return 0
        stops = starts + size
        overlap = np.all(
            (self.lesion_bboxes[None, :, :3] < stops[:, None])
            & (self.lesion_bboxes[None, :, 3:] > starts[:, None]),
            axis=2,
        )
        clear = np.flatnonzero(~overlap.any(axis=1))
        limit = int(clear[0]) if clear.size else len(starts)
        for row in range(limit):
            if self.lesion_voxels_in_box(starts[row], size) == 0:
                return row
        return limit if clear.size else None

    # ------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the index as one ``.npz`` (written to a temporary name, then renamed)."""
        return atomic_write(path, partial(
            np.savez,
            version=np.int64(INDEX_VERSION),
            case_id=np.array(self.case_id),
            shape=np.array(self.shape, np.int64),
            lesion_bboxes=self.lesion_bboxes,
            lesion_voxel_counts=self.lesion_voxel_counts,
            lesion_coords=self.lesion_coords,
            lesion_offsets=self.lesion_offsets,
            body_bbox=self.body_bbox,
            has_body_mask=np.bool_(self.has_body_mask),
            classes=self.classes,
            class_voxel_counts=self.class_voxel_counts,
            class_bboxes=self.class_bboxes,
        ), suffix=".tmp.npz")  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> CaseIndex:
        """Read an index written by :meth:`save`; a stale or unreadable file is a :class:`SapError`."""
        path = Path(path)
        try:
            with np.load(path) as z:
                if int(z["version"]) != INDEX_VERSION:
                    raise SapError(
                        f"{path}: sampling index version {int(z['version'])}, expected {INDEX_VERSION}"
                    )
                return cls(
                    case_id=str(z["case_id"]),
                    shape=tuple(int(s) for s in z["shape"]),
                    lesion_bboxes=z["lesion_bboxes"],
                    lesion_voxel_counts=z["lesion_voxel_counts"],
                    lesion_coords=z["lesion_coords"],
                    lesion_offsets=z["lesion_offsets"],
                    body_bbox=z["body_bbox"],
                    has_body_mask=bool(z["has_body_mask"]),
                    classes=z["classes"],
                    class_voxel_counts=z["class_voxel_counts"],
                    class_bboxes=z["class_bboxes"],
                )
        except (OSError, KeyError, ValueError) as exc:
            raise SapError(f"{path}: unreadable sampling index ({exc})") from exc


def build_case_index(
    case_id: str,
    shape: tuple[int, ...],
    lesions: np.ndarray | None = None,
    body: np.ndarray | None = None,
    label_map: np.ndarray | None = None,
    connectivity: int = 26,
) -> CaseIndex:
    """Index one case for patch sampling.

    Args:
        case_id: identifier carried into the index (and into error messages).
        shape: spatial shape ``(X, Y, Z)``; a leading channel axis is ignored.
        lesions: ``(X, Y, Z)`` binary lesion mask (any non-zero = lesion), or None for a case without
            lesions. Memory-mapped arrays are read once.
        body: ``(X, Y, Z)`` body mask (non-zero = body), or None to use the whole volume.
        label_map: ``(X, Y, Z)`` integer label map (e.g. skeleton classes 0-9) for the class-balanced
            sampler, or None.
        connectivity: 6, 18 or 26 (lesion instances; 26 is the evaluation default, SPEC E1).
    """
    shape3 = tuple(int(s) for s in shape[-3:])
    for name, array in (("lesions", lesions), ("body", body), ("label_map", label_map)):
        if array is not None and tuple(array.shape) != shape3:
            raise SapError(f"case {case_id}: {name} shape {tuple(array.shape)} differs from image {shape3}")
    whole = np.array([0, 0, 0, *shape3], dtype=np.int64)

    bboxes = np.zeros((0, 6), np.int64)
    counts = np.zeros(0, np.int64)
    coords = np.zeros((0, 3), np.int32)
    offsets = np.zeros(1, np.int64)
    if lesions is not None:
        mask = np.asarray(lesions) != 0
        box = _bbox_of_mask(mask)
        if box is not None:
            # Label only the region holding lesions: whole-body volumes stay cheap.
            crop = tuple(slice(int(box[a]), int(box[a + 3])) for a in range(3))
            labels = cc3d.connected_components(np.ascontiguousarray(mask[crop]), connectivity=connectivity)
            nonzero = np.nonzero(labels)
            ids = labels[nonzero].astype(np.int64)
            order = np.argsort(ids, kind="stable")
            coords = (np.stack(nonzero, axis=1)[order] + box[:3]).astype(np.int32)
            ids = ids[order]
            n = int(ids[-1])
            counts = np.bincount(ids, minlength=n + 1)[1:].astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            starts = offsets[:-1]
            lo = np.minimum.reduceat(coords, starts, axis=0).astype(np.int64)
            hi = np.maximum.reduceat(coords, starts, axis=0).astype(np.int64) + 1
            bboxes = np.concatenate([lo, hi], axis=1)

    body_bbox = whole
    has_body = False
    if body is not None:
        found = _bbox_of_mask(np.asarray(body) != 0)
        if found is not None:
            body_bbox, has_body = found, True

    classes = np.zeros(0, np.int64)
    class_counts = np.zeros(0, np.int64)
    class_bboxes = np.zeros((0, 6), np.int64)
    if label_map is not None:
        labels = np.asarray(label_map)
        if labels.dtype.kind not in "iub":
            if not np.array_equal(labels, np.round(labels)):
                raise SapError(f"case {case_id}: label map holds non-integer values")
        labels = labels.astype(np.int64, copy=False)
        if labels.min() < 0:
            raise SapError(f"case {case_id}: label map holds negative values")
        counts_all = np.bincount(labels.ravel())
        present = np.flatnonzero(counts_all)
        boxes = []
        from scipy import ndimage

        objects = ndimage.find_objects(labels)
        for value in present:
            if value == 0:
                boxes.append(body_bbox)
            else:
                sl = objects[value - 1]
                boxes.append(np.array([s.start for s in sl] + [s.stop for s in sl], np.int64))
        classes = present.astype(np.int64)
        class_counts = counts_all[present].astype(np.int64)
        class_bboxes = np.stack(boxes) if boxes else class_bboxes

    return CaseIndex(
        case_id=case_id,
        shape=shape3,
        lesion_bboxes=bboxes,
        lesion_voxel_counts=counts,
        lesion_coords=coords,
        lesion_offsets=offsets,
        body_bbox=body_bbox,
        has_body_mask=has_body,
        classes=classes,
        class_voxel_counts=class_counts,
        class_bboxes=class_bboxes,
    )
