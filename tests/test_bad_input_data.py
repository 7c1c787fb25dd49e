"""SPEC §13 data rows, each through the real command (`sap check-data`, `sap labels`)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest

from sap.cli import main
from sap.data.io import make_geometry, read_image, write_image
from tests.datafactory import write_case, write_cohort


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _check(root, capsys, *extra):
    before = _listing(root)
    code = main(["check-data", "--config", "tiny", "--data", str(root), "--quiet", *extra])
    captured = capsys.readouterr()
    assert _listing(root) == before, "check-data must write nothing"
    return code, captured.out, captured.err


def test_valid_cohort_passes_and_empty_mask_is_a_lesion_free_exam(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=2, n_patients=4)  # p0 has an empty mask
    assert not read_image(root / "patients/p0/GT.nii.gz").array.any()
    code, out, err = _check(root, capsys)
    assert code == 0, err
    assert "6 cases passed every check" in out


def test_truncated_image(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    target = root / "patients/p1/b1000.nii.gz"
    raw = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    code, _, err = _check(root, capsys)
    assert code != 0
    assert "p1/b1000.nii.gz" in err and "cannot read" in err


def test_unreadable_file(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    (root / "patients/p0/T1.nii.gz").write_bytes(b"not an image at all")
    code, _, err = _check(root, capsys)
    assert code != 0 and "p0/T1.nii.gz: cannot read image" in err


def test_grid_mismatch(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    shifted = make_geometry((16, 16, 20), (2.0, 2.0, 3.0), origin=(5.0, 0.0, 0.0))
    write_image(np.zeros((16, 16, 20), np.float32), shifted, root / "patients/p1/b1000.nii.gz")
    code, _, err = _check(root, capsys)
    assert code != 0
    assert "p1/b1000.nii.gz and" in err and "p1/T1.nii.gz are on different grids (origin" in err
    code, _, err = _check(root, capsys, "--set", "data.resample_channels=true")
    assert code == 0, err


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_inf_voxels(tmp_path, capsys, bad):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    image = read_image(root / "patients/p0/T1.nii.gz")
    image.array[3, 3, 3] = float(bad)
    write_image(image.array, image.geometry, root / "patients/p0/T1.nii.gz")
    code, _, err = _check(root, capsys)
    assert code != 0 and "p0/T1.nii.gz: 1 NaN/Inf voxels" in err


def test_non_binary_lesion_mask_and_binarize(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    mask = read_image(root / "patients/p1/GT.nii.gz")
    write_image((mask.array * 255).astype(np.uint8), mask.geometry, root / "patients/p1/GT.nii.gz")
    code, _, err = _check(root, capsys)
    assert code != 0 and "p1/GT.nii.gz: lesion mask is not binary: values 255" in err
    code, _, err = _check(root, capsys, "--binarize")
    assert code == 0, err


def test_skeleton_value_above_nine(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=2, n_patients=1)
    skeleton = read_image(root / "healthy/h1/skeleton.nii.gz")
    skeleton.array[5, 5, 5] = 12
    write_image(skeleton.array, skeleton.geometry, root / "healthy/h1/skeleton.nii.gz")
    code, _, err = _check(root, capsys)
    assert code != 0 and "h1/skeleton.nii.gz: not a SAP skeleton: values 12" in err


def test_missing_channel_and_id_collision(tmp_path, capsys):
    root = write_cohort(tmp_path, n_healthy=1, n_patients=2)
    (root / "patients/p0/b1000.nii.gz").unlink()
    code, _, err = _check(root, capsys)
    assert code != 0 and "p0: missing channel b1000" in err
    root2 = write_cohort(tmp_path / "b", n_healthy=1, n_patients=1)
    write_case(root2 / "healthy" / "p0", lesions=None)
    code, _, err = _check(root2, capsys)
    assert code != 0 and "case id collision: 'p0'" in err


def test_subject_in_two_folds_via_splits_file(tmp_path, capsys):
    import json

    root = write_cohort(tmp_path / "c", n_healthy=1, n_patients=6)
    (root / "patients/subjects.csv").write_text("case_id,subject_id\np0,A\np1,A\n")
    splits = {"k": 3, "seed": 0, "folds": {"0": ["p0", "p2"], "1": ["p1", "p3"], "2": ["p4", "p5"]},
              "subjects": {"p0": "A", "p1": "A", "p2": "p2", "p3": "p3", "p4": "p4", "p5": "p5"}}
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    code, _, err = _check(root, capsys, "--splits", str(path))
    assert code != 0 and "subject A is in folds 0 and 1" in err


def test_labels_refuses_verse_as_skeleton_and_existing_output(shared_data, tmp_path, capsys):
    verse = shared_data / "verse004/vertebrae_mask.nii.gz"
    assert main(["labels", "check", str(verse), "--as", "skeleton"]) == 2
    assert "vertebrae_mask.nii.gz: not a SAP skeleton" in capsys.readouterr().err
    assert main(["labels", "check", str(verse)]) == 0
    assert "values 0, 16, 17" in capsys.readouterr().out
    out = tmp_path / "skeleton.nii.gz"
    out.write_bytes(b"precious")
    source = shared_data / "ct_abdomen_pelvis/labels_totalseg.nii.gz"
    assert main(["labels", "from-totalseg", str(source), str(out)]) == 2
    assert "output exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["labels", "from-totalseg", str(source), str(out), "--overwrite"]) == 0
    converted = read_image(out)
    assert {2, 3, 4, 5} <= set(np.unique(converted.array))
    assert not list(tmp_path.glob(".*tmp*"))


def test_labels_refuses_total_mr_without_rule(shared_data, tmp_path, capsys):
    source = shared_data / "mr_abdomen/labels_totalseg_mr.nii.gz"
    out = tmp_path / "s.nii.gz"
    assert main(["labels", "from-totalseg", str(source), str(out), "--table", "total_mr"]) == 2
    assert "--vertebrae-rule" in capsys.readouterr().err and not out.exists()
    assert main(["labels", "from-totalseg", str(source), str(out), "--table", "total_mr",
                 "--vertebrae-rule", "split-by-height"]) == 0
    assert read_image(out).geometry.axcodes == "LPS"


def test_console_script_and_module_entry_points():
    result = subprocess.run(["sap", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check-data" in result.stdout and "Research use only" in result.stdout
    result = subprocess.run([sys.executable, "-m", "sap", "check-data", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--data" in result.stdout and "default" in result.stdout
    result = subprocess.run(["sap", "check-data", "--data", "/nonexistent/cohort"], capture_output=True, text=True)
    assert result.returncode == 2 and "cohort folder not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
