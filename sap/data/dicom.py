"""DICOM series folders: which series to read, and whether its slices are evenly spaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sap.errors import SapError


def series_files(folder: Path, series_uid: str | None = None, tolerance: float = 0.01) -> list[str]:
    """Files of the image series in ``folder``, sorted along the slice normal.

    A folder holding several series is an error listing their SeriesInstanceUIDs unless
    ``series_uid`` picks one (``data.dicom_series``; ``--series`` on the commands that read DICOM).
    Slices must be evenly spaced (:func:`check_slice_spacing`): a missing slice is refused instead
    of being read with an averaged spacing.
    """
    reader = sitk.ImageSeriesReader()
    series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        raise SapError(f"{folder}: folder holds no DICOM series")
    if series_uid is not None:
        if series_uid not in series_ids:
            raise SapError(f"{folder}: no DICOM series {series_uid} here (series: {', '.join(series_ids)})")
        chosen = series_uid
    elif len(series_ids) > 1:
        raise SapError(
            f"{folder}: holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); pick one with --series UID "
            "(data.dicom_series) or give each series its own folder"
        )
    else:
        chosen = series_ids[0]
    files = list(reader.GetGDCMSeriesFileNames(str(folder), chosen))
    check_slice_spacing(folder, files, tolerance)
    return files


def check_slice_spacing(folder: Path, files: list[str], tolerance: float) -> None:
    """Refuse a series whose slice positions along the slice normal are not evenly spaced.

    Gaps may differ from the median gap by ``tolerance`` × the median gap; a larger gap (a missing
    or unreadable slice) or a repeated position is named with the two files around it.
    """
    if len(files) < 3:
        return
    header = sitk.ImageFileReader()
    positions = []
    normal = None
    for name in files:
        header.SetFileName(name)
        try:
            header.ReadImageInformation()
        except Exception as exc:
            raise SapError(f"{name}: cannot read DICOM header ({str(exc).strip().splitlines()[-1][:120]})") from exc
        if normal is None:
            direction = np.asarray(header.GetDirection(), dtype=np.float64).reshape(3, 3)
            normal = np.cross(direction[:, 0], direction[:, 1])
        positions.append(float(np.dot(np.asarray(header.GetOrigin(), dtype=np.float64), normal)))
    gaps = np.diff(np.asarray(positions))
    median = float(np.median(np.abs(gaps)))
    if median <= 0:
        raise SapError(f"{folder}: DICOM slices share one position; not a 3D series")
    bad = np.flatnonzero(np.abs(np.abs(gaps) - median) > tolerance * median)
    if bad.size:
        i = int(bad[0])
        raise SapError(
            f"{folder}: slice spacing is not uniform: {abs(gaps[i]):.4g} mm between {Path(files[i]).name} and "
            f"{Path(files[i + 1]).name}, {median:.4g} mm elsewhere ({bad.size} uneven gap(s); a missing slice?). "
            f"Tolerance data.dicom_slice_tolerance={tolerance:g} of the median gap"
        )
