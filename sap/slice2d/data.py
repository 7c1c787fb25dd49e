"""Axial CT slices from 3D volumes: bone window, display orientation, slice sets, restacking (SPEC §11).

Orientation: volumes arrive as canonical RAS+ arrays ``(X, Y, Z)`` from :mod:`sap.data.io`
(axis 0 towards the patient's Right, axis 1 Anterior, axis 2 Superior), so the axial slice ``k``
is ``volume[:, :, k]``. Models see slices in the radiological display orientation (rows from
anterior to posterior, columns from the patient's right to left, as a viewer shows them and as
SAM-family models were trained on): :func:`to_display` and its inverse :func:`from_display`.

Splits are by patient (subject): every slice of a subject goes to the same side (paper 000 split
by slice; we never do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sap.errors import SapError

BONE_WINDOW_LEVEL = 400.0  #: HU
BONE_WINDOW_WIDTH = 1800.0  #: HU → [-500, 1300]
SLICE_FILTERS = ("all", "foreground", "balanced")
TARGETS = ("lesions", "bone")


def bone_window(hu: np.ndarray, level: float = BONE_WINDOW_LEVEL, width: float = BONE_WINDOW_WIDTH) -> np.ndarray:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale to [0, 1] (float32).

    Level 400 / width 1800 maps -500 HU to 0 and 1300 HU to 1; values outside saturate.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def to_display(axial: np.ndarray) -> np.ndarray:
    """Canonical axial slice (X=R, Y=A) → display orientation (rows anterior→posterior, cols right→left)."""
    return np.ascontiguousarray(np.asarray(axial)[::-1, ::-1].T)


def from_display(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    return np.ascontiguousarray(np.asarray(image).T[::-1, ::-1])


def volume_to_slices(volume: np.ndarray) -> np.ndarray:
    """Canonical (X, Y, Z) volume → (Z, H, W) stack of display-oriented axial slices."""
    return np.ascontiguousarray(np.asarray(volume)[::-1, ::-1, :].transpose(2, 1, 0))


def slices_to_volume(slices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: (Z, H, W) display slices → canonical (X, Y, Z) volume."""
    return np.ascontiguousarray(np.asarray(slices).transpose(2, 1, 0)[::-1, ::-1, :])


def target_mask(lesions: np.ndarray | None, skeleton: np.ndarray | None, target: str, source: str) -> np.ndarray:
    """Binary target volume: the lesion mask, or bone = skeleton label > 0."""
    if target == "lesions":
        if lesions is None:
            raise SapError(f"{source}: no lesion mask (GT) for --target lesions")
        return lesions.astype(bool)
    if target == "bone":
        if skeleton is None:
            raise SapError(f"{source}: no skeleton label map for --target bone")
        return skeleton > 0
    raise SapError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")


def select_slices(has_foreground: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of the slices to keep: ``all``; ``foreground`` (target present); ``balanced``
    (every foreground slice plus as many randomly chosen background slices)."""
    has_foreground = np.asarray(has_foreground, dtype=bool)
    if mode == "all":
        return np.arange(has_foreground.size)
    fg = np.flatnonzero(has_foreground)
    if mode == "foreground":
        return fg
    if mode == "balanced":
        bg = np.flatnonzero(~has_foreground)
        extra = rng.choice(bg, size=min(len(bg), max(len(fg), 1)), replace=False) if len(bg) else bg
        return np.sort(np.concatenate([fg, extra]).astype(np.int64))
    raise SapError(f"slice filter {mode!r}: choose one of {', '.join(SLICE_FILTERS)}")


@dataclass
class SliceSet:
    """Display-oriented axial slices of several cases, possibly of different in-plane sizes.

    ``images[i]`` is float16 in [0, 1] (bone window; half precision keeps a paper-scale training set
    in memory, ~0.9 HU steps), ``masks[i]`` uint8 {0, 1}; ``case_ids[i]`` and
    ``slice_index[i]`` say where slice i came from; ``spacing[i]`` is (row, col) pixel size in mm.
    """

    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)
    slice_index: list[int] = field(default_factory=list)
    spacing: list[tuple[float, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def add_volume(
        self,
        case_id: str,
        hu: np.ndarray,
        mask: np.ndarray,
        spacing_xyz: tuple[float, float, float],
        slice_filter: str = "all",
        rng: np.random.Generator | None = None,
        level: float = BONE_WINDOW_LEVEL,
        width: float = BONE_WINDOW_WIDTH,
    ) -> int:
        """Append the selected axial slices of one canonical volume; returns how many were added."""
        if hu.shape != mask.shape:
            raise SapError(f"{case_id}: image {hu.shape} and mask {mask.shape} differ in shape")
        images = volume_to_slices(bone_window(hu, level, width))
        masks = volume_to_slices(mask.astype(np.uint8))
        keep = select_slices(masks.reshape(len(masks), -1).any(axis=1), slice_filter, rng or np.random.default_rng(0))
        # display rows run along Y (anterior), columns along X (right)
        pixel = (float(spacing_xyz[1]), float(spacing_xyz[0]))
        for k in keep:
            self.images.append(images[k].astype(np.float16))
            self.masks.append(masks[k])
            self.case_ids.append(case_id)
            self.slice_index.append(int(k))
            self.spacing.append(pixel)
        return len(keep)


def split_by_patient(
    case_ids: list[str], subject_ids: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Train/validation case ids with every subject entirely on one side.

    The shared subject-grouped rule of :func:`sap.data.splits.pretrain_split`: n_val subjects =
    max(1, round(val_fraction × subjects)) when there are at least two subjects (else no
    validation cases), drawn by a seeded permutation of the sorted subject ids.
    """
    from sap.data.cases import Case
    from sap.data.splits import pretrain_split

    if len(case_ids) != len(subject_ids):
        raise ValueError("case_ids and subject_ids differ in length")
    cases = [Case(case_id=c, subject_id=s, group="patients", channels={}) for c, s in zip(case_ids, subject_ids, strict=True)]
    train, val = pretrain_split(cases, val_fraction, seed)
    return [c.case_id for c in train], [c.case_id for c in val]
