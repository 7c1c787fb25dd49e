"""`sap synth` (SPEC §3): layout, determinism, lesion statistics, skeleton labels, CT mode, CLI."""

from __future__ import annotations

import dataclasses
import filecmp
import json
from pathlib import Path

import cc3d
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sap.cli import main
from sap.data.io import read_geometry, read_image
from sap.data.labels import N_SKELETON_CLASSES, check_lesion_mask, check_skeleton, region_name
from sap.data.synth import PRESETS, make_cohort, plan_cohort
from sap.data.synth.cohort import phantom_exam
from sap.data.synth.phantom import RIB, ExamPose, SubjectParams, build_phantom
from sap.errors import SapError

#: a very small preset for tests of behaviour rather than content (coarse, 5 exams)
MICRO = dataclasses.replace(PRESETS["tiny"], name="micro", grid=(32, 32, 64), spacing=(11.0, 8.0, 11.0), scans_per_subject=(1,), n_patients=3, n_lesion_free=1)


@pytest.fixture()
def micro(monkeypatch) -> str:
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    return "micro"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("synth") / "tiny", preset="tiny", seed=3, workers=2, progress=False)


def _cases(cohort: Path) -> list[dict]:
    return json.loads((cohort / "cohort.json").read_text())["cases"]


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_layout_and_cohort_json(tiny):
    meta = json.loads((tiny / "cohort.json").read_text())
    preset = PRESETS["tiny"]
    assert meta["preset"] == "tiny" and meta["modality"] == "mr" and meta["channels"] == ["T1", "b1000"]
    assert meta["seed"] == 3 and meta["anatomy"] == "phantom" and meta["shared_anatomy"] is False
    assert meta["grid"] == list(preset.grid) and meta["voxel_size_mm"] == list(preset.spacing)
    healthy = [c for c in meta["cases"] if c["group"] == "healthy"]
    patients = [c for c in meta["cases"] if c["group"] == "patients"]
    assert len(healthy) == preset.n_healthy and len(patients) == preset.n_patients
    assert len({c["subject_id"] for c in healthy}) == len(preset.scans_per_subject)
    for group, cases in (("healthy", healthy), ("patients", patients)):
        rows = (tiny / group / "subjects.csv").read_text().splitlines()
        assert rows[0] == "case_id,subject_id"
        assert rows[1:] == [f"{c['case_id']},{c['subject_id']}" for c in cases]
        for case in cases:
            folder = tiny / group / case["case_id"]
            expected = {"T1.nii.gz", "b1000.nii.gz", "skeleton.nii.gz"} | ({"GT.nii.gz"} if group == "patients" else set())
            assert {p.name for p in folder.iterdir()} == expected
            grids = [read_geometry(folder / name) for name in sorted(expected)]
            assert all(g.same_grid(grids[0]) is None for g in grids)
            assert grids[0].canonical_shape == preset.grid
            assert np.allclose(grids[0].canonical_spacing, preset.spacing)


def test_same_seed_gives_identical_bytes_whatever_the_workers(tiny, tmp_path):
    again = make_cohort(tmp_path / "again", preset="tiny", seed=3, workers=1, progress=False)
    files = _files(tiny)
    assert files == _files(again) and len(files) == 2 + 1 + 4 * 3 + 6 * 4
    _, mismatch, errors = filecmp.cmpfiles(tiny, again, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_other_seed_gives_other_cohort(micro, tmp_path):
    a = make_cohort(tmp_path / "a", preset=micro, seed=1, workers=1, progress=False)
    b = make_cohort(tmp_path / "b", preset=micro, seed=2, workers=1, progress=False)
    t1 = "healthy/healthy_s01_e1/T1.nii.gz"
    assert (a / t1).read_bytes() != (b / t1).read_bytes()


def test_labels_are_valid_and_lesions_match_cohort_json(tiny):
    """GT is binary, skeleton 0–9; cohort.json lists exactly GT's 26-connected components."""
    for case in _cases(tiny):
        folder = tiny / case["group"] / case["case_id"]
        skeleton = read_image(folder / "skeleton.nii.gz")
        assert skeleton.array.dtype == np.uint8
        check_skeleton(skeleton.array, str(folder))
        if case["group"] == "healthy":
            assert case["n_lesions"] == 0 and case["lesions"] == []
            continue
        gt = read_image(folder / "GT.nii.gz")
        assert gt.array.dtype == np.uint8 and set(np.unique(gt.array)) <= {0, 1}
        check_lesion_mask(gt.array, str(folder))
        components, n = cc3d.connected_components(gt.array, connectivity=26, return_N=True)
        assert n == case["n_lesions"] == len(case["lesions"])
        if n == 0:
            continue
        stats = cc3d.statistics(components)
        voxel_ml = gt.voxel_volume_ml
        volumes = stats["voxel_counts"][1:] * voxel_ml
        centroids = gt.geometry.voxel_to_lps(stats["centroids"][1:])
        for lesion in case["lesions"]:
            # the component at the listed centroid has the listed volume and region
            distance = np.linalg.norm(centroids - np.asarray(lesion["centroid_lps_mm"]), axis=1)
            k = int(np.argmin(distance))
            assert distance[k] < 0.05
            assert volumes[k] == pytest.approx(lesion["volume_ml"], abs=1e-3)
            labels_here = skeleton.array[components == k + 1]
            assert np.unique(labels_here).size == 1  # one bone per lesion
            assert region_name(int(labels_here[0])) == lesion["region"]


def test_burden_is_heterogeneous_with_a_lesion_free_exam(tiny):
    counts = sorted(c["n_lesions"] for c in _cases(tiny) if c["group"] == "patients")
    assert counts[0] == 0
    assert counts[-1] >= 10 and counts[-1] >= 3 * max(1, int(np.median(counts)))


def test_lesion_volumes_follow_the_study_on_tiny(tiny):
    """The study's distribution times the preset's volume scale (recorded in cohort.json)."""
    scale = json.loads((tiny / "cohort.json").read_text())["lesion_volume_scale"]
    assert scale == PRESETS["tiny"].lesion_volume_scale
    volumes = np.array([lesion["volume_ml"] for c in _cases(tiny) for lesion in c["lesions"]]) / scale
    assert volumes.size >= 15
    assert 0.3 <= np.median(volumes) <= 0.8
    assert 0.15 <= np.mean(volumes >= 1.0) <= 0.35


@pytest.mark.parametrize("scale", [1.0, PRESETS["demo"].lesion_volume_scale])
def test_lesion_volumes_follow_the_study_on_a_larger_sample(scale):
    """24 patients at demo voxel size, lesions placed without rendering or writing files; with the
    demo's volume scale the distribution is the study's times the scale (the bones still hold it)."""
    preset = dataclasses.replace(PRESETS["demo"], scans_per_subject=(), n_patients=24, n_lesion_free=0,
                                 max_lesions=12, lesion_volume_scale=scale)
    jobs = plan_cohort(preset, "mr", seed=11)
    volumes, sites = [], set()
    voxel_ml = float(np.prod(preset.spacing)) / 1000
    for job in jobs:
        exam = phantom_exam(job)
        components, n = cc3d.connected_components(exam.lesions > 0, connectivity=26, return_N=True)
        assert n == len(exam.lesion_findings)
        counts = cc3d.statistics(components)["voxel_counts"][1:]
        volumes += list(counts * voxel_ml)
        bone = exam.phantom.bone
        assert np.all(bone[exam.lesions > 0] > 0), "every lesion voxel lies in bone"
        for finding in exam.lesion_findings:
            values = np.unique(bone[exam.lesions == finding.label])
            assert values.size == 1 and values[0] == finding.bone
            sites.add(finding.region)
        assert not np.any((exam.mimics > 0) & (exam.lesions > 0))
    volumes = np.array(volumes) / scale
    assert volumes.size >= 100
    assert 0.3 <= np.median(volumes) <= 0.8
    assert 0.15 <= np.mean(volumes >= 1.0) <= 0.35
    assert volumes.max() > 3.0  # a tail of large lesions
    assert {"thoracic_spine", "lumbar_spine", "pelvis", "femurs", "rib/other", "clavicles"} <= sites


@pytest.mark.parametrize("seed", range(5))
def test_phantom_at_demo_size_has_all_ten_labels_and_ribs(seed):
    rng = np.random.default_rng(seed)
    demo = PRESETS["demo"]
    phantom = build_phantom(demo.grid, demo.spacing, SubjectParams.sample(rng), ExamPose.sample(rng))
    counts = np.bincount(phantom.skeleton.ravel(), minlength=N_SKELETON_CLASSES)
    assert counts.size == N_SKELETON_CLASSES and np.all(counts > 0)
    assert (phantom.bone == RIB).sum() > 100
    # anatomy sits in anatomical order: cervical above thoracic above lumbar above pelvis above femurs
    height = [np.argwhere(phantom.skeleton == label)[:, 2].mean() for label in (1, 2, 3, 4, 5)]
    assert height == sorted(height, reverse=True)
    # left and right halves of the body are both present (paired bones)
    for label in (5, 6, 7, 8):
        x = np.argwhere(phantom.skeleton == label)[:, 0]
        assert x.min() < demo.grid[0] / 2 < x.max()


def test_healthy_exams_carry_all_ten_labels(tiny):
    for case in _cases(tiny):
        if case["group"] == "healthy":
            skeleton = read_image(tiny / "healthy" / case["case_id"] / "skeleton.nii.gz").array
            assert set(np.unique(skeleton)) == set(range(N_SKELETON_CLASSES))


def test_mr_contrast(tiny):
    """T1: lesions darker than marrow; b1000: lesions brighter than marrow, background suppressed."""
    case = max((c for c in _cases(tiny) if c["group"] == "patients"), key=lambda c: c["n_lesions"])
    folder = tiny / "patients" / case["case_id"]
    t1, dwi = (read_image(folder / f"{n}.nii.gz").array.astype(float) for n in ("T1", "b1000"))
    gt = read_image(folder / "GT.nii.gz").array > 0
    skeleton = read_image(folder / "skeleton.nii.gz").array
    marrow = (skeleton > 0) & ~gt
    assert t1[gt].mean() < 0.7 * t1[marrow].mean()
    assert dwi[gt].mean() > 3 * dwi[marrow].mean()
    corner = dwi[:4, :4, :]  # air outside the body
    assert corner.mean() < 0.2 * dwi[gt].mean()


def test_ct_mode_through_the_cli(micro, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["synth", "--out", str(out), "--preset", micro, "--modality", "ct", "--seed", "5", "--workers", "1"]) == 0
    assert "wrote 1 healthy and 3 patient exams" in capsys.readouterr().out
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["modality"] == "ct" and meta["channels"] == ["CT"]
    for case in meta["cases"]:
        folder = out / case["group"] / case["case_id"]
        ct = read_image(folder / "CT.nii.gz").array
        assert not (folder / "T1.nii.gz").exists()
        assert ct.dtype == np.int16
        skeleton = read_image(folder / "skeleton.nii.gz").array
        assert ct.min() < -900 and -150 < np.median(ct[ct > -500]) < 150  # air and soft tissue in HU
        assert 150 < np.median(ct[skeleton > 0]) < 900  # bone: marrow with cortex
        if any(m["kind"] == "implant" for m in case["mimics"]):
            assert ct.max() > 2500  # the metal implant mimic
    assert any(m["kind"] == "implant" for c in meta["cases"] for m in c["mimics"])


def test_ct_lesions_are_lytic_or_blastic():
    jobs = [j for j in plan_cohort(PRESETS["tiny"], "ct", seed=7) if j.group == "patients" and j.lesion_volumes_ml][:3]
    from sap.data.synth.cohort import synthesize_exam

    seen = set()
    for job in jobs:
        exam = synthesize_exam(job)
        ct = exam.images["CT"].astype(float)
        # marrow away from the cortex rim
        marrow = ndimage.binary_erosion(exam.skeleton > 0) & (exam.lesions == 0)
        level = np.median(ct[marrow])
        assert 100 < level < 450
        for finding in exam.lesion_findings:
            mean = ct[exam.lesions == finding.label].mean()
            if finding.kind == "lytic":
                assert mean < level - 100
            else:
                assert finding.kind == "blastic" and mean > level + 300
            seen.add(finding.kind)
    assert seen


def test_ct_lesion_kinds_mix_within_a_patient():
    """Each CT lesion draws its kind with its patient's blastic share: a predominantly lytic patient
    also has blastic lesions and the reverse, at the shares of CT_BLASTIC_SHARE."""
    from sap.data.synth.exam import CT_BLASTIC_SHARE, lesion_kinds

    job = next(j for j in plan_cohort(PRESETS["tiny"], "ct", seed=7) if j.group == "patients")
    rng = np.random.default_rng(0)
    for phenotype, share in CT_BLASTIC_SHARE.items():
        kinds = lesion_kinds(dataclasses.replace(job, phenotype=phenotype, lesion_volumes_ml=(1.0,) * 2000), rng)
        assert set(kinds) == {"lytic", "blastic"}
        assert abs(kinds.count("blastic") / 2000 - share) < 0.05


def test_mr_lesion_kinds_take_no_random_number():
    """MR lesions are all "metastasis" and draw nothing from the placement generator, so the CT
    lesion mix leaves MR cohorts byte-identical."""
    from sap.data.synth.exam import lesion_kinds

    job = next(j for j in plan_cohort(PRESETS["tiny"], "mr", seed=7) if j.group == "patients" and j.lesion_volumes_ml)
    rng = np.random.default_rng(0)
    assert lesion_kinds(job, rng) == ["metastasis"] * len(job.lesion_volumes_ml)
    assert rng.random() == np.random.default_rng(0).random()


def test_existing_output_is_refused_and_left_untouched(micro, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SapError, match="not empty; pass --overwrite"):
        make_cohort(out, preset=micro)
    assert main(["synth", "--out", str(out), "--preset", micro]) == 2
    assert "sap synth: error:" in capsys.readouterr().err
    # --overwrite replaces only a sap cohort, never an unrelated folder
    with pytest.raises(SapError, match="not a sap cohort"):
        make_cohort(out, preset=micro, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folders left behind


def test_overwrite_replaces_a_cohort(micro, tmp_path):
    out = make_cohort(tmp_path / "c", preset=micro, seed=1, workers=1, progress=False)
    first = (out / "cohort.json").read_text()
    make_cohort(out, preset=micro, seed=2, workers=1, progress=False, overwrite=True)
    assert json.loads((out / "cohort.json").read_text())["seed"] == 2 and (out / "cohort.json").read_text() != first
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modality", "pet"], "invalid choice"),
        (["--preset", "huge"], "invalid choice"),
        (["--seed", "-1"], "--seed -1"),
        (["--workers", "0"], "--workers 0"),
        (["--anatomy", "/nonexistent/scans"], "--anatomy folder not found"),
    ],
)
def test_cli_rejects_bad_arguments(micro, tmp_path, capsys, argv, message):
    out = tmp_path / "x"
    try:
        code = main(["synth", "--out", str(out), "--preset", micro, *argv])
    except SystemExit as exc:  # argparse choices
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--preset", "--modality", "--anatomy", "--seed", "--overwrite", "--workers"):
        assert option in text
    assert "default: demo" in text and "default: mr" in text and "default: 0" in text


def test_written_anatomy_is_where_the_world_coordinates_say(tiny):
    """Orientation end to end: nibabel's canonical view agrees with sap's reader, and in LPS world
    coordinates the neck is above the pelvis, the sternum in front of the spine, and each humerus on
    its own side."""
    import nibabel as nib

    path = tiny / "healthy" / "healthy_s01_e1" / "skeleton.nii.gz"
    image = read_image(path)
    canonical = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), image.array)
    np.testing.assert_allclose(canonical.affine, image.geometry.affine, atol=1e-4)

    def lps(label: int) -> np.ndarray:
        return image.geometry.voxel_to_lps(np.argwhere(image.array == label))

    assert lps(1)[:, 2].mean() > lps(3)[:, 2].mean() > lps(4)[:, 2].mean()  # S is +z
    spine_y = lps(2)[:, 1].mean()
    assert lps(9)[:, 1].mean() < spine_y - 40  # sternum anterior: LPS +y is posterior
    humeri = lps(6)
    left, right = humeri[humeri[:, 0] > 0], humeri[humeri[:, 0] < 0]  # LPS +x is the patient's left
    assert len(left) > 20 and len(right) > 20 and abs(len(left) - len(right)) < 0.5 * len(left)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 2.0)])
def test_shape_primitives_have_their_analytic_volume(spacing):
    from sap.data.synth.shapes import Canvas, ellipsoid, rotation, tube

    canvas = Canvas(shape=(80, 80, 60), spacing=spacing, origin=(-40.0, -40.0, -30.0))
    voxel = float(np.prod(spacing))
    radii = np.array([20.0, 12.0, 15.0])
    for axes in (None, rotation(0.4, 0.3, 0.2)):
        _, mask = ellipsoid(canvas, (0.0, 0.0, 0.0), radii, axes)
        assert mask.sum() * voxel == pytest.approx(4 / 3 * np.pi * radii.prod(), rel=0.04)
    # a straight capsule: cylinder plus two half spheres
    _, mask = tube(canvas, [(-20.0, 0.0, 0.0), (20.0, 0.0, 0.0)], 8.0)
    assert mask.sum() * voxel == pytest.approx(np.pi * 64 * 40 + 4 / 3 * np.pi * 512, rel=0.04)
    assert ellipsoid(canvas, (500.0, 0.0, 0.0), radii) is None  # off the grid


def test_inconsistent_presets_are_refused():
    with pytest.raises(SapError, match="lesion-free"):
        dataclasses.replace(PRESETS["tiny"], n_patients=2, n_lesion_free=3)
    with pytest.raises(SapError, match="grid"):
        dataclasses.replace(PRESETS["tiny"], grid=(64, 64))


@settings(deadline=None, max_examples=30)
@example(n_voxels=4, seed=273, block=(4, 3, 3))  # the threshold jumps 2 -> 7 voxels here
@given(
    n_voxels=st.integers(1, 120),
    seed=st.integers(0, 2**16),
    block=st.tuples(st.integers(3, 12), st.integers(3, 12), st.integers(3, 12)),
)
def test_grow_blob_is_one_component_of_the_asked_size_inside_the_bone(n_voxels, seed, block):
    from sap.data.synth.lesions import grow_blob

    rng = np.random.default_rng(seed)
    allowed = np.zeros((16, 16, 16), dtype=bool)
    allowed[2 : 2 + block[0], 2 : 2 + block[1], 2 : 2 + block[2]] = True  # a box of bone
    allowed[rng.random(allowed.shape) < 0.05] = False  # with a few holes
    seed_voxel = (2, 2, 2)
    allowed[seed_voxel] = True
    blob = grow_blob(allowed, seed_voxel, n_voxels, (1.0, 1.5, 2.0), rng)
    assert blob[seed_voxel] and not np.any(blob & ~allowed)
    _, n_components = cc3d.connected_components(blob, connectivity=26, return_N=True)
    assert n_components == 1
    reachable = cc3d.connected_components(allowed, connectivity=26)
    room = int((reachable == reachable[seed_voxel]).sum())
    # exact when the bone has room; otherwise as large as the bone allows
    assert int(blob.sum()) == min(n_voxels, room)
