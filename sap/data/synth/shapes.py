"""Vectorised shape primitives painted on crops of a voxel grid (millimetre coordinates).

A :class:`Canvas` maps canonical array indices (RAS+: axis 0 → patient Right, 1 → Anterior,
2 → Superior) to body millimetres. Every primitive is evaluated only inside its bounding box, as
an open (broadcast) coordinate grid, so painting a rib costs its box, never the whole volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Canvas:
    """A grid of ``shape`` voxels, ``spacing`` mm (array axis order), voxel (0,0,0) at ``origin`` mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, a: int) -> np.ndarray:
        return self.origin[a] + np.arange(self.shape[a]) * self.spacing[a]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Slices of the voxels whose centres lie in [lo, hi] mm (None when outside the grid)."""
        slices = []
        for a in range(3):
            start = int(np.ceil((lo[a] - self.origin[a]) / self.spacing[a]))
            stop = int(np.floor((hi[a] - self.origin[a]) / self.spacing[a])) + 1
            start, stop = max(start, 0), min(stop, self.shape[a])
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)  # type: ignore[return-value]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open grids (broadcastable X, Y, Z in mm) of the voxel centres inside ``box``."""
        x = self.axis(0)[box[0]][:, None, None]
        y = self.axis(1)[box[1]][None, :, None]
        z = self.axis(2)[box[2]][None, None, :]
        return x, y, z

    def index_of(self, point_mm: np.ndarray) -> np.ndarray:
        """Nearest voxel index of a body-mm point (not clipped)."""
        return np.round((np.asarray(point_mm) - np.asarray(self.origin)) / np.asarray(self.spacing)).astype(int)


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rows are the rotated unit axes: yaw about z, then pitch about x, then roll about y (radians)."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return (rz @ rx @ ry).T


def ellipsoid(
    canvas: Canvas, center, radii, axes: np.ndarray | None = None
) -> tuple[Box, np.ndarray] | None:
    """Voxels inside an ellipsoid: (box, boolean mask on the box) or None when off the grid.

    ``axes`` rows are the ellipsoid's unit axes (default: the grid axes); ``radii`` in mm.
    """
    center = np.asarray(center, dtype=float)
    radii = np.asarray(radii, dtype=float)
    reach = radii.max() if axes is not None else radii
    box = canvas.box(center - reach, center + reach)
    if box is None:
        return None
    x, y, z = canvas.coords(box)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if axes is None:
        q = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
    else:
        q = 0.0
        for row, r in zip(axes, radii, strict=True):
            q = q + ((row[0] * dx + row[1] * dy + row[2] * dz) / r) ** 2
    return box, q <= 1.0


def tube(canvas: Canvas, points, radii) -> tuple[Box, np.ndarray] | None:
    """Voxels within a (linearly varying) radius of a polyline: a chain of tapered capsules.

    ``points`` (K, 3) mm, ``radii`` scalar or (K,) mm.
    """
    points = np.asarray(points, dtype=float)
    radii = np.broadcast_to(np.asarray(radii, dtype=float), (len(points),))
    reach = radii.max()
    box = canvas.box(points.min(axis=0) - reach, points.max(axis=0) + reach)
    if box is None:
        return None
    x, y, z = canvas.coords(box)
    inside = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    for k in range(len(points) - 1):
        a, b = points[k], points[k + 1]
        ab = b - a
        length2 = float(ab @ ab) or 1e-9
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        r = radii[k] + t * (radii[k + 1] - radii[k])
        inside |= d2 <= r * r
    return box, inside


def paint(target: np.ndarray, value: int, shape: tuple[Box, np.ndarray] | None, where: np.ndarray | None = None) -> None:
    """Set ``target`` to ``value`` inside a primitive (optionally only where ``where`` is true)."""
    if shape is None:
        return
    box, mask = shape
    if where is not None:
        mask = mask & where[box]
    target[box][mask] = value


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 6) -> np.ndarray:
    """A smooth random field with values in about [-1, 1] (low-resolution noise, trilinearly zoomed)."""
    from scipy import ndimage

    low = rng.standard_normal(tuple(max(2, -(-s // coarse) + 1) for s in shape))
    zoomed = ndimage.zoom(low, [s / n for s, n in zip(shape, low.shape, strict=True)], order=1, grid_mode=True, mode="nearest")
    out = zoomed[tuple(slice(0, s) for s in shape)]
    return np.clip(out / 1.5, -1.0, 1.0)
