"""Lesion diameters (sap.metrics.diameters) against analytic ellipsoids at anisotropic spacing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sap.metrics.diameters import axial_diameter_mm, feret_diameter_mm, instance_sizes


def _ellipsoid(semi_axes, rotation, spacing, rng, pad=2.0):
    """Voxelised ellipsoid (voxels whose centre is inside) with a random sub-voxel offset, and
    its analytic 3D and axial diameters (mm)."""
    a = np.asarray(semi_axes, dtype=float)
    extent = a.max() + pad
    grids = [np.arange(-extent + rng.uniform(0, s), extent, s) for s in spacing]
    points = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1)
    body = points @ rotation  # world → ellipsoid frame (rotation columns are its axes)
    mask = ((body / a) ** 2).sum(axis=-1) <= 1.0
    # the largest axial section is the central one: x^T A x = 1 restricted to z = 0
    quadric = rotation @ np.diag(1.0 / a**2) @ rotation.T
    axial = 2.0 / np.sqrt(np.linalg.eigvalsh(quadric[:2, :2]).min())
    return mask, 2.0 * a.max(), axial, 4.0 / 3.0 * np.pi * np.prod(a) / 1000.0


@pytest.mark.parametrize("seed", range(12))
def test_diameters_match_analytic_ellipsoids(seed):
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.5, 1.0, size=3))  # anisotropic, <= 1 mm
    semi_axes = np.sort(rng.uniform(2.5, 14.0, size=3))[::-1]
    rotation = Rotation.random(random_state=seed).as_matrix()
    mask, feret, axial, volume = _ellipsoid(semi_axes, rotation, spacing, rng)
    assert abs(feret_diameter_mm(mask, spacing) - feret) <= 1.0
    assert abs(axial_diameter_mm(mask, spacing) - axial) <= 1.0
    size = instance_sizes(mask.astype(np.uint16), spacing)[0]
    assert size.feret_diameter_mm == pytest.approx(feret_diameter_mm(mask, spacing))
    assert size.volume_ml == pytest.approx(volume, rel=0.05)
    assert size.axial_diameter_ge_10mm == (size.axial_diameter_mm >= 10.0)


def test_axis_aligned_box_and_single_voxel():
    spacing = (0.8, 0.5, 2.0)
    mask = np.zeros((20, 20, 10), dtype=bool)
    mask[2:12, 3:7, 4:6] = True  # 8 x 2 x 4 mm box
    # faces centres span the box: in-plane the longest chord is the rectangle's diagonal less
    # nothing along the axes; 3D adds the height
    assert axial_diameter_mm(mask, spacing) == pytest.approx(np.hypot(8.0, 2.0 - 0.5), abs=0.6)
    assert feret_diameter_mm(mask, spacing) <= np.sqrt(8.0**2 + 2.0**2 + 4.0**2) + 1e-9
    assert feret_diameter_mm(mask, spacing) >= 8.0
    one = np.zeros((3, 3, 3), dtype=bool)
    one[1, 1, 1] = True
    assert feret_diameter_mm(one, spacing) == pytest.approx(2.0)
    assert axial_diameter_mm(one, spacing) == pytest.approx(0.8)
    assert feret_diameter_mm(np.zeros((3, 3, 3), bool), spacing) == 0.0


def test_instance_sizes_per_label_and_missing_ids():
    spacing = (1.0, 1.0, 1.0)
    labels = np.zeros((30, 30, 30), dtype=np.uint16)
    labels[2:14, 2:4, 2:4] = 1  # 12 mm long along x
    labels[20:23, 20:23, 5:25] = 3  # 20 mm long along z: axial diameter only ~3-4 mm
    sizes = instance_sizes(labels, spacing, n=3)
    assert [s.voxels for s in sizes] == [48, 0, 180]
    assert sizes[0].axial_diameter_mm >= 11.5 and sizes[0].axial_diameter_ge_10mm
    assert sizes[2].feret_diameter_mm >= 19.5 and sizes[2].axial_diameter_mm < 5.0
    assert not sizes[2].axial_diameter_ge_10mm
    assert sizes[1].volume_ml == 0.0
    assert instance_sizes(np.zeros((4, 4, 4), np.uint16), spacing) == []
