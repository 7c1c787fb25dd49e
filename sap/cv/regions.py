"""Per-region attribution of lesions and false positives (SPEC §10 report: per-region results).

A component's region is the skeleton label (SPEC §2 scheme) covering most of its voxels,
background included, so a rib lesion (ribs are background in the scheme) reads "rib/other".
Component ids follow :func:`sap.metrics.label_components`, the same labelling ``lesions.csv``
uses, so rows join on (case, kind, id).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sap.data.labels import N_SKELETON_CLASSES, region_name
from sap.errors import SapError
from sap.files import atomic_write_text

REGION_COLUMNS = ("case", "fold", "kind", "id", "volume_ml", "matched", "region")
UNKNOWN_REGION = "unknown"


def majority_labels(ids: np.ndarray, n: int, skeleton: np.ndarray) -> np.ndarray:
    """Most frequent skeleton label (0–9) under each component 1…n of the label map ``ids``.

    Ties go to the lower label. Vectorised: one bincount over (component, label) pairs.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    inside = ids > 0
    pair = (ids[inside].astype(np.int64) - 1) * N_SKELETON_CLASSES + skeleton[inside].astype(np.int64)
    table = np.bincount(pair, minlength=n * N_SKELETON_CLASSES).reshape(n, N_SKELETON_CLASSES)
    return table.argmax(axis=1)


def region_rows(
    case_id: str,
    fold: int,
    prob: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    skeleton_path: Path | None,
    threshold: float,
    min_volume_ml: float,
    connectivity: int = 26,
) -> list[dict]:
    """Rows (gt lesions, then predicted components) with their region for one case.

    ``prob`` and ``gt`` are in the files' own voxel order, as :func:`sap.evaluate.api.load_pair`
    returns them; the skeleton is read in that order too, so ids match ``lesions.csv``.
    """
    from sap.metrics import (
        drop_small,
        label_components,
        label_ground_truth,
        match_components,
        voxel_volume_ml,
    )

    gt_c = label_ground_truth(gt, spacing, connectivity)
    pred_c = drop_small(label_components(prob >= threshold, connectivity, voxel_volume_ml(tuple(spacing))),
                        min_volume_ml)
    match = match_components(gt_c, pred_c)
    # same voxel order as ``prob``/``gt`` (sap.evaluate reads files in their own order)
    from sap.cv.stages import read_evaluation_order

    skeleton = read_evaluation_order(skeleton_path)[0] if skeleton_path is not None else None
    if skeleton is not None and skeleton.shape != gt.shape:
        raise SapError(f"{skeleton_path}: skeleton grid {skeleton.shape} differs from the lesion mask's {gt.shape}")
    rows = []
    for kind, comp, matched in (("gt", gt_c, match.gt_detected), ("pred", pred_c, match.pred_true)):
        if skeleton is not None:
            labels = comp.lut[comp.labels]  # kept ids 1…n, dropped components 0
            regions = [region_name(int(v)) for v in majority_labels(labels, comp.n, skeleton)]
        else:
            regions = [UNKNOWN_REGION] * comp.n
        for i in range(comp.n):
            rows.append({"case": case_id, "fold": fold, "kind": kind, "id": i + 1,
                         "volume_ml": float(comp.volume_ml[i]), "matched": bool(matched[i]), "region": regions[i]})
    return rows


def write_regions(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(REGION_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
