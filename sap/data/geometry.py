"""Where an image's voxels are: its source grid and the canonical RAS+ orientation sap works in.

A :class:`Geometry` is the grid of the file an array came from (size, spacing, origin and direction
in ITK's LPS convention) plus the reorientation to nibabel's canonical RAS+ array; arrays move
between the two with :func:`to_canonical` and :func:`from_canonical`. :func:`make_geometry` makes
one for arrays sap creates (synthetic cohorts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a source image lie: enough to write an array back onto that grid.

    ``size``, ``spacing``, ``origin`` and ``direction`` are SimpleITK's (x, y, z order, LPS world).
    ``ornt`` is the nibabel orientation transform from the source array (x, y, z index order)
    to the canonical RAS+ array.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    ornt: tuple[tuple[float, float], ...]

    @property
    def source_affine_ras(self) -> np.ndarray:
        """Voxel (x, y, z source index) → RAS world millimetres."""
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS → RAS

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        ornt = np.asarray(self.ornt)
        shape = [0, 0, 0]
        for src_axis, (dst_axis, _) in enumerate(ornt):
            shape[int(dst_axis)] = self.size[src_axis]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Canonical array index → RAS world millimetres (what nibabel's canonical image holds)."""
        inv = nib.orientations.inv_ornt_aff(np.asarray(self.ornt), self.size)
        return self.source_affine_ras @ inv

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore

    @property
    def axcodes(self) -> str:
        """Orientation of the source image, e.g. ``"LPS"`` (nibabel's convention: RAS = +x is Right)."""
        return "".join(nib.orientations.aff2axcodes(self.source_affine_ras))

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> str | None:
        """Name the first field that differs from ``other`` (None when the grids agree).

        Grids are compared in canonical space, so a label stored with flipped axes over the
        same voxels (e.g. LAS beside an LPS DICOM series) is the same grid.
        """
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        if self.canonical_shape != other.canonical_shape:
            return f"size {self.canonical_shape} vs {other.canonical_shape}"
        a, b = self.affine, other.affine
        spacing_a, spacing_b = np.asarray(self.canonical_spacing), np.asarray(other.canonical_spacing)
        if np.max(np.abs(spacing_a - spacing_b)) > tol:
            return f"spacing {fmt(spacing_a)} vs {fmt(spacing_b)}"
        if np.max(np.abs(a[:3, :3] / spacing_a - b[:3, :3] / spacing_b)) > tol:
            return f"direction {fmt(np.asarray(self.direction))} vs {fmt(np.asarray(other.direction))}"
        if np.max(np.abs(a[:3, 3] - b[:3, 3])) > tol:
            return f"origin {fmt(self.origin)} vs {fmt(other.origin)}"
        return None

    def voxel_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Canonical array indices (N, 3) → LPS world millimetres (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        ras = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return ras * np.array([-1.0, -1.0, 1.0])


def _canonical_ornt(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction.reshape(3, 3) * spacing[None, :]
    affine[:3, 3] = origin
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    current = nib.orientations.io_orientation(affine_ras)
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))


def geometry_of(image: Any) -> Geometry:
    """The geometry of a SimpleITK image, or of an ``ImageFileReader`` after
    ``ReadImageInformation()`` (both answer ``GetSize``/``GetSpacing``/``GetOrigin``/``GetDirection``)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    ornt = _canonical_ornt(direction, spacing, origin)
    return Geometry(
        size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction),
        ornt=tuple((float(a), float(f)) for a, f in ornt),
    )


def to_canonical(source_xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Source array in (x, y, z) index order → canonical RAS+ array (a view where possible)."""
    return nib.orientations.apply_orientation(source_xyz, np.asarray(geometry.ornt))


def from_canonical(canonical: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    inverse = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), _source_ornt(geometry)
    )
    return nib.orientations.apply_orientation(canonical, inverse)


def _source_ornt(geometry: Geometry) -> np.ndarray:
    return nib.orientations.io_orientation(geometry.source_affine_ras)


def make_geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    axcodes: str = "LPS",
) -> Geometry:
    """A geometry for arrays we create (synthetic cohorts): canonical ``shape`` and ``spacing``.

    ``axcodes`` is the orientation written to disk (``"LPS"`` is the identity direction in ITK).
    """
    ornt_target = nib.orientations.axcodes2ornt(axcodes)  # source axis → (RAS axis, flip)
    size = [0, 0, 0]
    src_spacing = [0.0, 0.0, 0.0]
    direction = np.zeros((3, 3))
    for src_axis, (ras_axis, flip) in enumerate(ornt_target):
        ras_axis = int(ras_axis)
        size[src_axis] = shape[ras_axis]
        src_spacing[src_axis] = spacing[ras_axis]
        lps_sign = -1.0 if ras_axis < 2 else 1.0  # RAS → LPS flips x and y
        direction[ras_axis, src_axis] = flip * lps_sign
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in src_spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(direction.flatten().tolist())
    return geometry_of(image)
