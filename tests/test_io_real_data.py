"""Every file of the real data folder loads with the expected result and round-trips to disk."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from sap.data.io import read_geometry, read_image, write_image
from sap.data.labels import (
    check_skeleton,
    convert_totalseg,
    load_class_map,
    read_label_map,
)
from sap.errors import SapError

# (relative path, expected source orientation, expected canonical shape or None, kind)
FILES = [
    ("ct_abdomen_pelvis/ct.nii.gz", "RAS", (122, 101, 112), "image"),
    ("ct_abdomen_pelvis/labels_totalseg.nii.gz", "RAS", (122, 101, 112), "labels"),
    ("ct_abdomen_pelvis/labels_vertebral_body.nii.gz", "RAS", (122, 101, 112), "labels"),
    ("ct_small/ct.nii.gz", "RAS", (122, 101, 30), "image"),
    ("ct_small/labels_totalseg.nii.gz", "RAS", (122, 101, 30), "labels"),
    ("ct_upper_abdomen_dicom/labels_totalseg.nii.gz", "LAS", (512, 512, 20), "labels"),
    ("mr_abdomen/mr.nii.gz", "LPS", (117, 91, 20), "image"),
    ("mr_abdomen/labels_totalseg_mr.nii.gz", "LPS", (117, 91, 20), "labels"),
    ("ct_chest_crop/ct.nii.gz", "LPS", (120, 126, 164), "image"),
    ("ct_heart_crop/ct.nii.gz", "LPS", (122, 102, 112), "image"),
    ("verse004/vertebrae_mask.nii.gz", "PIR", None, "labels"),
]


def _nib_canonical(path):
    return nib.as_closest_canonical(nib.load(str(path)))


@pytest.mark.parametrize("relative,axcodes,shape,kind", FILES)
def test_reads_canonical_like_nibabel(shared_data, relative, axcodes, shape, kind):
    path = shared_data / relative
    image = read_label_map(path) if kind == "labels" else read_image(path)
    reference = _nib_canonical(path)
    assert image.geometry.axcodes == axcodes
    if shape is not None:
        assert image.array.shape == shape
    assert image.array.shape == reference.shape
    # Same voxels in the same order as nibabel's canonical image, same affine, spacing in axis order.
    np.testing.assert_array_equal(image.array, np.asarray(reference.dataobj).astype(image.array.dtype))
    np.testing.assert_allclose(image.geometry.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(image.spacing, reference.header.get_zooms()[:3], atol=1e-5)
    assert "".join(nib.aff2axcodes(image.geometry.affine)) == "RAS"


def test_verse_spacing_is_permuted(shared_data):
    """PIR storage: SimpleITK's (x, y, z) spacing must be permuted to the canonical axis order."""
    path = shared_data / "verse004/vertebrae_mask.nii.gz"
    image = read_label_map(path)
    header_zooms = nib.load(str(path)).header.get_zooms()[:3]
    assert sorted(image.spacing) == sorted(header_zooms)
    reference = _nib_canonical(path)
    np.testing.assert_allclose(image.spacing, reference.header.get_zooms()[:3], atol=1e-6)
    assert image.spacing != tuple(float(z) for z in header_zooms)  # really permuted


def test_verse_is_generic_label_map_but_not_a_skeleton(shared_data):
    path = shared_data / "verse004/vertebrae_mask.nii.gz"
    assert nib.load(str(path)).get_data_dtype() == np.float64
    labels = read_label_map(path)
    assert labels.array.dtype == np.int32
    assert set(np.unique(labels.array)) == {0, *range(16, 25)}
    with pytest.raises(SapError, match=r"vertebrae_mask.nii.gz: not a SAP skeleton: values 16"):
        check_skeleton(read_image(path).array, str(path))


def test_dicom_series_matches_its_label_grid(shared_data):
    folder = shared_data / "ct_upper_abdomen_dicom/dicom"
    ct = read_image(folder)
    labels = read_label_map(shared_data / "ct_upper_abdomen_dicom/labels_totalseg.nii.gz")
    assert ct.array.shape == labels.array.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing, (0.977, 0.977, 2.0), atol=1e-3)
    assert ct.geometry.same_grid(labels.geometry) is None
    # HU values: air far below zero, bone far above.
    assert ct.array.min() < -900 and ct.array.max() > 500
    # Bone labels (vertebrae) sit on dense voxels: the two grids really align.
    table = load_class_map(shared_data / "totalseg_class_map.json")["total"]
    vertebra_values = [v for v, n in table.items() if n.startswith("vertebrae_T")]
    bone = np.isin(labels.array, vertebra_values)
    assert bone.sum() > 100
    assert np.median(ct.array[bone]) > 150


@pytest.mark.parametrize("relative,axcodes,shape,kind", FILES)
def test_round_trip_keeps_source_geometry(shared_data, tmp_path, relative, axcodes, shape, kind):
    path = shared_data / relative
    image = read_label_map(path) if kind == "labels" else read_image(path)
    out = tmp_path / "copy.nii.gz"
    write_image(image.array, image.geometry, out)
    written = read_geometry(out)
    assert written.same_grid(image.geometry) is None
    assert written.axcodes == axcodes
    # Source voxel order on disk is unchanged: nibabel sees the same raw array as the original.
    original = np.asarray(nib.load(str(path)).dataobj)
    copy = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(copy, original.astype(copy.dtype))


def test_total_labels_convert_to_sap_regions(shared_data, tmp_path):
    table = load_class_map(shared_data / "totalseg_class_map.json")["total"]
    labels = read_label_map(shared_data / "ct_abdomen_pelvis/labels_totalseg.nii.gz")
    skeleton = convert_totalseg(labels.array, table)
    present = set(np.unique(skeleton))
    assert {2, 3, 4, 5} <= present  # thoracic, lumbar, pelvis, femurs
    # Ribs are background in the SAP scheme.
    ribs = np.isin(labels.array, [v for v, n in table.items() if n.startswith("rib_")])
    assert ribs.any() and not skeleton[ribs].any()
    # by name: every sacrum voxel is pelvis
    sacrum = labels.array == next(v for v, n in table.items() if n == "sacrum")
    assert (skeleton[sacrum] == 4).all()


def test_total_mr_needs_a_vertebrae_rule(shared_data):
    table = load_class_map(shared_data / "totalseg_class_map.json")["total_mr"]
    labels = read_label_map(shared_data / "mr_abdomen/labels_totalseg_mr.nii.gz")
    with pytest.raises(SapError, match="vertebrae-rule"):
        convert_totalseg(labels.array, table, source="mr")
    skeleton = convert_totalseg(labels.array, table, vertebrae_rule="lumbar")
    assert (skeleton[labels.array == 19] == 3).all()
    assert (skeleton[labels.array == 18] == 4).all()  # sacrum → pelvis


def test_shipped_class_map_matches_shared_copy(shared_data):
    shipped = load_class_map(None)
    shared = load_class_map(shared_data / "totalseg_class_map.json")
    assert shipped == shared


def test_verse_centroids_lie_in_their_vertebra(shared_data):
    """LPS conversion: VerSe centroids (voxel indices of the PIR file) land inside the labelled vertebra."""
    path = shared_data / "verse004/vertebrae_mask.nii.gz"
    raw = json.loads((shared_data / "verse004/centroids.json").read_text())
    labels = read_label_map(path)
    entries = [e for e in (raw if isinstance(raw, list) else raw.get("centroids", raw)) if isinstance(e, dict) and "label" in e]
    if not entries:
        pytest.skip("centroids.json has no per-label entries")
    source = nib.load(str(path))
    canonical = _nib_canonical(path)
    to_canonical = np.linalg.inv(canonical.affine) @ source.affine
    hits = 0
    for entry in entries:
        xyz = np.array([entry["X"], entry["Y"], entry["Z"], 1.0])
        ijk = np.rint(to_canonical @ xyz)[:3].astype(int)
        if np.all(ijk >= 0) and np.all(ijk < labels.array.shape):
            hits += labels.array[tuple(ijk)] == entry["label"]
    assert hits >= len(entries) - 1
