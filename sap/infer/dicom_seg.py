"""DICOM SEG output for DICOM-series inputs (``sap infer --dicom-seg``), written with highdicom.

One binary segment, "Bone lesion" (SNOMED CT: morphologically abnormal structure / neoplasm),
on the frames of the source series, so PACS viewers overlay it on the images it came from. The
series description and content label say "research use only".
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sap import __version__
from sap.data import dicom
from sap.data.io import Geometry, from_canonical
from sap.errors import SapError


def series_files(folder: Path, series_uid: str | None = None) -> list[str]:
    """Files of the series sap reads from ``folder`` (:func:`sap.data.dicom.series_files`: the one
    series, or ``series_uid``), in SimpleITK's slice order. Spacing was checked when it was read."""
    return dicom.series_files(folder, series_uid, tolerance=float("inf"))


def _with_sop_identity(ds):
    """De-identification tools sometimes blank SOPClassUID/SOPInstanceUID in the data set while the
    file meta keeps them; restore them in memory (the source files are never modified)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom_seg(
    mask: np.ndarray, geometry: Geometry, series_folder: Path, path: Path, series_uid: str | None = None
) -> Path:
    """Write ``mask`` (canonical ``(X, Y, Z)``, non-zero = lesion) as a DICOM SEG of the series.

    ``geometry`` must be the series' geometry (what :func:`sap.data.io.read_image` returned for
    ``series_folder``); frames follow the series' file order. Writes ``path`` directly (callers
    stage it for atomic replacement).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = series_files(series_folder, series_uid)
    if len(files) != geometry.size[2]:
        raise SapError(f"{series_folder}: {len(files)} DICOM files for {geometry.size[2]} slices")
    sources = [_with_sop_identity(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    missing = [f for f, ds in zip(files, sources, strict=True) if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID")]
    if missing:
        raise SapError(f"{missing[0]}: DICOM file without SOP Class/Instance UID; cannot reference it from a SEG")
    if not sources[0].get("SeriesInstanceUID") or not sources[0].get("StudyInstanceUID"):
        print(
            f"sap infer: warning: {series_folder}: the series has no Study/Series Instance UID (de-identified?); "
            "the SEG references its images by SOP Instance UID only",
            file=sys.stderr,
        )
    # canonical → source (x, y, z) → frames (z, rows = y, columns = x), the order of ``files``
    frames = np.ascontiguousarray(from_canonical(mask != 0, geometry).transpose(2, 1, 0)).astype(np.uint8)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Bone lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="sap", version=__version__, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sap (open source)",
        manufacturer_model_name="sap infer",
        software_versions=__version__,
        device_serial_number="none",
        content_description="Research use only; not for clinical diagnosis",
        content_label="SAP_LESIONS",
        series_description="sap lesions - research use only",
        omit_empty_frames=False,
    )
    seg.save_as(str(path))
    return path
