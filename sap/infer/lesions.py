"""From a probability map to the lesion table a radiologist reads (SPEC §8).

* :func:`lesion_instances`: binarise at the threshold (``prob >= t``, rule E1), label connected
  components (26-connectivity, cc3d), drop components below ``min_volume_ml`` with E1's
  ``>= V`` rule (:func:`sap.metrics.components.at_least`, so volumes agree with ``sap evaluate``)
  and number the rest 1…n from the largest to the smallest.
* :func:`lesion_table`: one row per lesion: volume (mL), centroid in LPS millimetres (DICOM/ITK
  world coordinates), maximum and mean probability, the 3D maximum Feret diameter and the longest
  axial in-plane diameter (mm, :mod:`sap.metrics.diameters`) with the size flag
  ``axial_diameter_ge_10mm``, and the skeletal region when a skeleton is given (the majority label among the lesion's voxels; ribs, skull and soft tissue are
  ``"rib/other"``).
* :func:`region_summary`: per reading region, the number of lesions, their total volume and the
  largest: the MET-RADS-P-style reading list.

Everything works on the voxels of the lesions only (flat indices of the foreground), never on a
full-volume mask per lesion.
"""

from __future__ import annotations

import csv
import io

import cc3d
import numpy as np

from sap.data.io import Geometry
from sap.data.labels import N_SKELETON_CLASSES, OUTSIDE_REGION, SKELETON_CLASSES, region_name
from sap.metrics.components import at_least
from sap.metrics.diameters import instance_sizes

LESION_COLUMNS = (
    "lesion_id",
    "volume_ml",
    "centroid_lps_x_mm",
    "centroid_lps_y_mm",
    "centroid_lps_z_mm",
    "max_prob",
    "mean_prob",
    "feret_diameter_mm",
    "axial_diameter_mm",
    "axial_diameter_ge_10mm",
)
REGION_COLUMNS = ("region", "n_lesions", "total_volume_ml", "largest_lesion_ml")
#: Reading regions in report order: the nine skeletal regions, then everything else.
REGIONS: tuple[str, ...] = (*SKELETON_CLASSES[1:], OUTSIDE_REGION)


def lesion_instances(
    prob: np.ndarray, threshold: float, min_volume_ml: float, voxel_volume_ml: float, connectivity: int = 26
) -> tuple[np.ndarray, int]:
    """Instance labels of a probability map.

    Args:
        prob: ``(X, Y, Z)`` foreground probability.
        threshold: voxels with ``prob >= threshold`` are lesion.
        min_volume_ml: components smaller than this are dropped (E1's ``>= V * (1 - 1e-9)``).
        voxel_volume_ml: volume of one voxel (mL).

    Returns ``(instances, n)``: ``instances`` uint16 (uint32 beyond 65 535 lesions), 0 =
    background, lesions 1…n ordered by decreasing volume (ties: raster order).
    """
    # cc3d directly (not sap.metrics.label_components, which keeps 8-byte indices of every
    # foreground voxel): a poor model that marks much of the body must not blow the memory bound.
    labels, n_raw = cc3d.connected_components(
        prob >= threshold, connectivity=connectivity, return_N=True, binary_image=True
    )
    counts = np.asarray(cc3d.statistics(labels, no_slice_conversion=True)["voxel_counts"][1:], dtype=np.int64)
    keep = at_least(counts * voxel_volume_ml, min_volume_ml) if min_volume_ml > 0 else np.ones(n_raw, dtype=bool)
    kept = np.flatnonzero(keep)
    n = int(kept.size)
    dtype = np.uint16 if n < np.iinfo(np.uint16).max else np.uint32
    # raw id → rank by volume among the kept ones (1 = largest; stable: raster order for ties), 0 = dropped
    order = kept[np.argsort(-counts[kept], kind="stable")]
    lut = np.zeros(n_raw + 1, dtype=dtype)
    lut[order + 1] = np.arange(1, n + 1, dtype=dtype)
    instances = np.empty(labels.shape, dtype=dtype)
    # slab by slab: indexing with the whole label array would make a full-size int64 index copy
    step = max(1, (1 << 22) // max(1, labels.shape[1] * labels.shape[2]))
    for start in range(0, labels.shape[0], step):
        instances[start : start + step] = lut[labels[start : start + step]]
    return instances, n


def lesion_table(
    instances: np.ndarray,
    n: int,
    prob: np.ndarray,
    geometry: Geometry,
    skeleton: np.ndarray | None = None,
) -> list[dict[str, float | int | str]]:
    """One row per lesion 1…n (columns :data:`LESION_COLUMNS`, plus ``region`` with a skeleton).

    ``instances``, ``prob`` and ``skeleton`` are canonical arrays on ``geometry``'s grid (what
    :func:`sap.data.io.read_image` returns). Volumes in mL, centroids (mean voxel position) in
    LPS mm via :meth:`Geometry.voxel_to_lps`. Diameters in mm on the exam's own (possibly
    anisotropic) grid by the boundary-face convention of :mod:`sap.metrics.diameters`;
    ``axial_diameter_ge_10mm`` is a size flag (axial diameter ≥ 10 mm), not an assessment of
    MET-RADS-P measurability. The region is the most frequent skeleton label
    among the lesion's voxels, background included (ties go to the lower label), named with
    :func:`sap.data.labels.region_name`.
    """
    if n == 0:
        return []
    voxel_ml = float(np.prod(geometry.canonical_spacing)) / 1000.0
    stats = cc3d.statistics(instances, no_slice_conversion=True)
    counts = np.asarray(stats["voxel_counts"][1 : n + 1], dtype=np.int64)
    centroids = np.asarray(stats["centroids"][1 : n + 1], dtype=np.float64)
    lps = geometry.voxel_to_lps(centroids)
    sums = np.zeros(n + 1, dtype=np.float64)
    maxima = np.full(n + 1, -np.inf, dtype=np.float64)
    votes = np.zeros((n + 1) * N_SKELETON_CLASSES, dtype=np.int64) if skeleton is not None else None
    # Slab by slab along the first axis, so the per-voxel temporaries (8-byte indices and values)
    # stay small even when a poor model marks a large part of the body.
    step = max(1, (1 << 22) // max(1, instances.shape[1] * instances.shape[2]))
    for start in range(0, instances.shape[0], step):
        slab = instances[start : start + step].reshape(-1)
        flat = np.flatnonzero(slab)
        if flat.size == 0:
            continue
        ids = slab[flat].astype(np.intp)
        values = prob[start : start + step].reshape(-1)[flat].astype(np.float64)
        sums += np.bincount(ids, weights=values, minlength=n + 1)
        np.maximum.at(maxima, ids, values)
        if votes is not None:
            labels = skeleton[start : start + step].reshape(-1)[flat].astype(np.intp)  # type: ignore[index]
            votes += np.bincount(ids * N_SKELETON_CLASSES + labels, minlength=votes.size)
    sums, maxima = sums[1:], maxima[1:]
    regions = None if votes is None else votes.reshape(n + 1, N_SKELETON_CLASSES)[1:].argmax(axis=1)
    sizes = instance_sizes(instances, geometry.canonical_spacing, n)
    rows = []
    for i in range(n):
        row: dict[str, float | int | str] = {
            "lesion_id": i + 1,
            "volume_ml": float(counts[i]) * voxel_ml,
            "centroid_lps_x_mm": float(lps[i, 0]),
            "centroid_lps_y_mm": float(lps[i, 1]),
            "centroid_lps_z_mm": float(lps[i, 2]),
            "max_prob": float(maxima[i]),
            "mean_prob": float(sums[i] / counts[i]),
            "feret_diameter_mm": sizes[i].feret_diameter_mm,
            "axial_diameter_mm": sizes[i].axial_diameter_mm,
            "axial_diameter_ge_10mm": sizes[i].axial_diameter_ge_10mm,
        }
        if regions is not None:
            row["region"] = region_name(int(regions[i]))
        rows.append(row)
    return rows


def region_summary(rows: list[dict[str, float | int | str]]) -> list[dict[str, float | int | str]]:
    """Per reading region (all ten, in :data:`REGIONS` order, zeros included): ``n_lesions``,
    ``total_volume_ml`` and ``largest_lesion_ml`` (0 when the region has none)."""
    summary = []
    for region in REGIONS:
        volumes = [float(r["volume_ml"]) for r in rows if r.get("region") == region]
        summary.append(
            {
                "region": region,
                "n_lesions": len(volumes),
                "total_volume_ml": float(sum(volumes)),
                "largest_lesion_ml": float(max(volumes, default=0.0)),
            }
        )
    return summary


_FORMATS = {
    "volume_ml": "{:.6f}",
    "total_volume_ml": "{:.6f}",
    "largest_lesion_ml": "{:.6f}",
    "centroid_lps_x_mm": "{:.3f}",
    "centroid_lps_y_mm": "{:.3f}",
    "centroid_lps_z_mm": "{:.3f}",
    "max_prob": "{:.6f}",
    "mean_prob": "{:.6f}",
    "feret_diameter_mm": "{:.2f}",
    "axial_diameter_mm": "{:.2f}",
}


def to_csv(rows: list[dict[str, float | int | str]], columns: tuple[str, ...] | list[str]) -> str:
    """CSV text (header always present, also without rows) with fixed number formats."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_FORMATS.get(c, "{}").format(row[c]) for c in columns])
    return buffer.getvalue()
