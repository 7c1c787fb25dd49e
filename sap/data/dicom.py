"""DICOM series folders: the series to read when a folder holds several."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from sap.errors import SapError


def series_files(folder: Path) -> list[str]:
    """Files of the image series in ``folder``: the series with the most files (others are often
    localisers)."""
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise SapError(f"{folder}: folder holds no DICOM series")
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len)
    return list(files)
