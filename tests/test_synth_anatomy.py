"""`sap synth --anatomy DIR`: lesions simulated on real CT/MR with TotalSegmentator labels."""

from __future__ import annotations

import dataclasses
import json

import cc3d
import numpy as np
import pytest

from sap.data.io import read_geometry, read_image
from sap.data.labels import convert_totalseg, default_class_map, region_name
from sap.data.synth import PRESETS, make_cohort, plan_cohort
from sap.data.synth.anatomy import discover_sources
from sap.data.synth.cohort import synthesize_exam
from sap.errors import SapError

#: 1 healthy scan, 3 patients (one lesion-free): enough to exercise every path quickly
SMALL = dataclasses.replace(PRESETS["tiny"], name="small", scans_per_subject=(1,), n_patients=3, n_lesion_free=1)


@pytest.fixture()
def small(monkeypatch) -> str:
    monkeypatch.setitem(PRESETS, "small", SMALL)
    return "small"


def test_real_ct_anatomy(shared_data, small, tmp_path):
    source = shared_data / "ct_abdomen_pelvis"
    with pytest.warns(UserWarning, match="share anatomy"):
        out = make_cohort(tmp_path / "real", preset=small, modality="ct", anatomy=source, seed=2, workers=1, progress=False)
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["shared_anatomy"] is True and meta["anatomy"] == str(source.resolve())
    assert meta["channels"] == ["CT"]
    # the demo/tiny volume scale compensates the phantom's coarse grid; real scans keep their voxels
    assert meta["lesion_volume_scale"] == 1.0
    src = read_image(source / "ct.nii.gz")
    labels = read_image(source / "labels_totalseg.nii.gz").array
    expected_skeleton = convert_totalseg(labels, default_class_map()["total"])
    names = default_class_map()["total"]
    ribs = np.isin(labels, [v for v, n in names.items() if n.startswith("rib_")])
    n_lesions = 0
    for case in meta["cases"]:
        folder = out / case["group"] / case["case_id"]
        assert case["anatomy_source"] == "ct_abdomen_pelvis"
        ct = read_image(folder / "CT.nii.gz")
        # written in the source's own orientation and voxel grid (a few mm of table shift aside)
        assert ct.geometry.axcodes == src.geometry.axcodes and ct.geometry.size == src.geometry.size
        assert np.allclose(ct.geometry.spacing, src.geometry.spacing)
        skeleton = read_image(folder / "skeleton.nii.gz").array
        np.testing.assert_array_equal(skeleton, expected_skeleton)
        if case["group"] == "healthy":
            continue
        gt = read_image(folder / "GT.nii.gz").array > 0
        assert np.all(((skeleton > 0) | ribs)[gt]), "lesions lie in real bone"
        components, n = cc3d.connected_components(gt, connectivity=26, return_N=True)
        assert n == case["n_lesions"]
        n_lesions += n
        for label in range(1, n + 1):
            values = np.unique(skeleton[components == label])
            assert values.size == 1
        regions = {region_name(int(v)) for v in np.unique(skeleton[gt])}
        assert {lesion["region"] for lesion in case["lesions"]} <= regions | {"rib/other"}
        # lesions changed the HU; the anatomy around them is the real scan
        far = ~gt & (np.abs(ct.array.astype(float) - src.array) > 0)
        assert np.mean(np.abs(ct.array.astype(float) - src.array)[far]) < 30
    assert n_lesions > 0
    # the source files are read, never copied into the cohort
    assert not list(out.rglob("labels_totalseg*")) and not list(out.rglob("ct.nii.gz"))


def test_real_mr_anatomy_from_total_mr_labels(shared_data):
    sources = discover_sources(shared_data / "mr_abdomen", "mr")
    assert [(s.table, s.modality) for s in sources] == [("total_mr", "mr")]
    jobs = [j for j in plan_cohort(SMALL, "mr", seed=4, sources=sources) if j.group == "patients" and j.lesion_volumes_ml]
    exam = synthesize_exam(jobs[0])
    assert set(exam.images) == {"T1", "b1000"}
    source_grid = read_geometry(shared_data / "mr_abdomen" / "mr.nii.gz")
    assert exam.geometry.size == source_grid.size and exam.geometry.axcodes == source_grid.axcodes == "LPS"
    lesion = exam.lesions > 0
    assert lesion.any() and np.all(exam.skeleton[lesion] > 0)
    t1, dwi = (exam.images[n].astype(float) for n in ("T1", "b1000"))
    marrow = (exam.skeleton > 0) & ~lesion
    assert t1[lesion].mean() < t1[marrow].mean() and dwi[lesion].mean() > 2 * dwi[marrow].mean()


def test_ct_mode_refuses_mr_only_sources(shared_data, tmp_path):
    with pytest.raises(SapError, match="no CT scan with TotalSegmentator labels"):
        make_cohort(tmp_path / "x", preset="tiny", modality="ct", anatomy=shared_data / "mr_abdomen")
    assert not (tmp_path / "x").exists()


def test_folder_without_labels_is_refused(shared_data, tmp_path):
    with pytest.raises(SapError, match="ct_chest_crop: no scan with TotalSegmentator labels"):
        make_cohort(tmp_path / "x", preset="tiny", anatomy=shared_data / "ct_chest_crop")


def test_discovery_in_a_folder_of_scans(shared_data):
    sources = {s.name: s for s in discover_sources(shared_data, "mr")}
    assert {"ct_abdomen_pelvis", "ct_small", "ct_upper_abdomen_dicom", "mr_abdomen"} <= set(sources)
    assert sources["ct_upper_abdomen_dicom"].image.endswith("dicom")
    assert "verse004" not in sources and "ct_chest_crop" not in sources


def test_labels_on_another_grid_are_refused(tmp_path):
    from sap.data.io import make_geometry, write_image

    scan = tmp_path / "scan"
    write_image(np.zeros((8, 8, 8), np.int16), make_geometry((8, 8, 8), (3.0, 3.0, 3.0)), scan / "ct.nii.gz")
    write_image(np.zeros((8, 8, 9), np.uint8), make_geometry((8, 8, 9), (3.0, 3.0, 3.0)), scan / "labels_totalseg.nii.gz")
    with pytest.raises(SapError, match=r"labels_totalseg.nii.gz: not on the grid of .*ct.nii.gz \(size"):
        make_cohort(tmp_path / "out", preset="tiny", modality="ct", anatomy=scan)
    assert not (tmp_path / "out").exists()


def test_labels_outside_the_class_table_are_refused(tmp_path):
    from sap.data.io import make_geometry, write_image

    scan = tmp_path / "scan"
    geometry = make_geometry((8, 8, 8), (3.0, 3.0, 3.0))
    write_image(np.zeros((8, 8, 8), np.int16), geometry, scan / "ct.nii.gz")
    labels = np.zeros((8, 8, 8), np.uint16)
    labels[2:4, 2:4, 2:4] = 999  # no such TotalSegmentator class
    write_image(labels, geometry, scan / "labels_totalseg.nii.gz")
    with pytest.raises(SapError, match="label values \\[999\\] are not in the class map"):
        make_cohort(tmp_path / "out", preset="tiny", modality="ct", anatomy=scan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


def test_cli_warns_about_shared_anatomy(shared_data, small, tmp_path, capsys):
    from sap.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--preset", small, "--modality", "ct", "--anatomy", str(shared_data / "ct_small"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "sap synth: warning:" in captured.err and "share anatomy" in captured.err
    assert "wrote 1 healthy and 3 patient exams" in captured.out
    assert json.loads((out / "cohort.json").read_text())["shared_anatomy"] is True


def test_generic_image_name_is_classified_by_its_values(tmp_path):
    from sap.data.io import make_geometry, write_image

    geometry = make_geometry((8, 8, 8), (3.0, 3.0, 3.0))
    for name, low in (("ctlike", -1000), ("mrlike", 0)):
        folder = tmp_path / name
        write_image(np.full((8, 8, 8), low, np.int16), geometry, folder / "image.nii.gz")
        write_image(np.zeros((8, 8, 8), np.uint8), geometry, folder / "labels_totalseg.nii.gz")
    found = {s.name: s.modality for s in discover_sources(tmp_path, "mr")}
    assert found == {"ctlike": "ct", "mrlike": "mr"}
    assert [s.name for s in discover_sources(tmp_path, "ct")] == ["ctlike"]
