"""``sap evaluate`` through the real command: files in, patients.csv / lesions.csv / summary.json out,
and the bad-input rows of SPEC §13 that reach it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap.cli import main
from sap.data.io import make_geometry, write_image
from sap.metrics import LESION_COLUMNS, PATIENT_COLUMNS

SHAPE = (20, 18, 12)
SPACING = (1.0, 1.5, 2.0)
GEOMETRY = make_geometry(SHAPE, SPACING)


def case_arrays():
    """Three cases: two lesions (one found, one missed), one lesion found + one FP, lesion-free + FP."""
    cases = {}
    gt = np.zeros(SHAPE, np.uint8)
    prob = np.zeros(SHAPE, np.float32)
    gt[2:5, 2:5, 2:4] = 1
    prob[2:5, 2:5, 2:4] = 0.9
    gt[10:14, 10:14, 6:9] = 1
    prob[10:14, 10:14, 6:9] = 0.3  # missed at t = 0.5, a candidate at t_min
    cases["a"] = (prob, gt)
    gt = np.zeros(SHAPE, np.uint8)
    prob = np.zeros(SHAPE, np.float32)
    gt[5:9, 5:9, 5:8] = 1
    prob[6:9, 5:9, 5:8] = 0.8
    prob[15:17, 1:3, 1:3] = 0.6  # false positive
    cases["b"] = (prob, gt)
    gt = np.zeros(SHAPE, np.uint8)
    prob = np.zeros(SHAPE, np.float32)
    prob[1:3, 14:16, 8:10] = 0.7  # false positive on a lesion-free exam
    cases["c"] = (prob, gt)
    return cases


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    for case_id, (prob, gt) in case_arrays().items():
        write_image(prob, GEOMETRY, pred_dir / f"{case_id}_prob.nii.gz")
        write_image(gt, GEOMETRY, gt_dir / case_id / "GT.nii.gz")  # case-folder layout
        write_image((prob >= 0.5).astype(np.uint8), GEOMETRY, pred_dir / f"{case_id}_lesions.nii.gz")  # ignored
    return pred_dir, gt_dir


def evaluate(*args: str) -> int:
    return main(["evaluate", "--no-progress", *args])


def test_outputs_columns_values_and_nulls(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)) == 0
    patients = pd.read_csv(out / "patients.csv", dtype={"case": str})
    assert tuple(patients.columns) == PATIENT_COLUMNS
    rows = patients.set_index("case")
    assert rows.loc["a", ["n_gt", "n_pred", "detected", "fp"]].tolist() == [2, 1, 1, 0]
    assert rows.loc["b", ["n_gt", "n_pred", "detected", "fp"]].tolist() == [1, 2, 1, 1]
    assert rows.loc["c", ["n_gt", "n_pred", "detected", "fp"]].tolist() == [0, 1, 0, 1]
    assert np.isnan(rows.loc["c", "sensitivity"])  # written as an empty cell
    voxel_ml = 1.0 * 1.5 * 2.0 / 1000
    assert rows.loc["b", "dice_detected"] == pytest.approx(2 * 36 / (48 + 36))
    assert rows.loc["a", "volume_gt_ml"] == pytest.approx((18 + 48) * voxel_ml)
    lesions = pd.read_csv(out / "lesions.csv", dtype={"case": str})
    assert tuple(lesions.columns) == LESION_COLUMNS
    assert len(lesions) == 3 + 4  # 3 gt lesions, 4 predicted components
    missed = lesions[(lesions.case == "a") & (lesions.kind == "gt") & (lesions.id == 2)].iloc[0]
    assert not missed.matched and np.isnan(missed.dice) and missed.score == pytest.approx(0.3)

    raw = (out / "summary.json").read_text()
    assert "NaN" not in raw
    summary = json.loads(raw)
    assert summary["settings"]["threshold"] == 0.5 and summary["settings"]["seed"] == 0
    assert summary["n_cases"] == 3
    assert summary["metrics"]["sensitivity_1ml"]["median"] is None  # no lesion ≥ 1 mL
    assert summary["pooled_sensitivity"] == pytest.approx(2 / 3)
    assert summary["froc"]["limit"] == 15 and summary["froc_1ml"]["limit"] == 4
    # candidates: 0.9 hit, 0.8 hit, 0.7 FP, 0.6 FP, 0.3 hit; 3 cases
    assert summary["froc"]["fppi"] == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 2 / 3])
    assert summary["froc"]["sensitivity"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    assert summary["icc_burden"]["value"] is not None


def test_refuses_to_overwrite(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    out = tmp_path / "out"
    args = ("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out))
    assert evaluate(*args) == 0
    before = (out / "summary.json").stat().st_mtime_ns
    assert evaluate(*args, "--threshold", "0.2") == 2
    assert "output exists" in capsys.readouterr().err
    assert (out / "summary.json").stat().st_mtime_ns == before
    assert evaluate(*args, "--threshold", "0.2", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["threshold"] == 0.2


def test_missing_prediction_is_an_error_unless_allowed(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    (pred_dir / "b_prob.nii.gz").unlink()
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "missing predictions for cases b" in err and not out.exists()
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--allow-missing") == 0
    rows = pd.read_csv(out / "patients.csv", dtype={"case": str}).set_index("case")
    assert rows.loc["b", "sensitivity"] == 0.0 and rows.loc["b", "n_pred"] == 0


def test_prediction_without_ground_truth_is_an_error(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    write_image(np.zeros(SHAPE, np.float32), GEOMETRY, pred_dir / "zz.nii.gz")
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "o")) == 2
    assert "predictions without ground truth" in capsys.readouterr().err


def test_prediction_on_another_grid_names_both_files(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    other = make_geometry(SHAPE, (1.0, 1.0, 2.0))
    write_image(case_arrays()["a"][0], other, pred_dir / "a_prob.nii.gz")
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "a_prob.nii.gz" in err and "GT.nii.gz" in err and "spacing" in err


def test_bad_values_are_errors(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    prob, gt = case_arrays()["a"]
    write_image(prob * 3, GEOMETRY, pred_dir / "a_prob.nii.gz")
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "o")) == 2
    assert "a_prob.nii.gz: prediction values must lie in [0, 1]" in capsys.readouterr().err
    write_image(prob, GEOMETRY, pred_dir / "a_prob.nii.gz")
    write_image(gt * 2, GEOMETRY, gt_dir / "a" / "GT.nii.gz")
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "o")) == 2
    assert "lesion mask is not binary" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_binary_predictions_give_null_froc_with_a_warning(tmp_path, capsys):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    for case_id, (prob, gt) in case_arrays().items():
        write_image((prob >= 0.5).astype(np.uint8), GEOMETRY, pred_dir / f"{case_id}.nii.gz")
        write_image(gt, GEOMETRY, gt_dir / f"{case_id}.nii.gz")
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)) == 0
    assert "binary predictions" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["froc"] is None and summary["froc_score"] is None
    assert summary["pooled_sensitivity"] == pytest.approx(2 / 3)


def test_tune_on_then_sweep_and_parallel_workers(folders, tmp_path):
    pred_dir, gt_dir = folders
    tune_list = tmp_path / "tune.txt"
    tune_list.write_text("a\n")
    out = tmp_path / "out"
    args = ("--pred", str(pred_dir), "--gt", str(gt_dir), "--tune-on", str(tune_list), "--froc", "sweep")
    assert evaluate(*args, "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    # on case a every threshold ≤ 0.3 finds both lesions with no false positive: F2 = 1
    assert summary["tuning"]["threshold"] == 0.05 and summary["settings"]["threshold"] == 0.05
    assert summary["n_cases"] == 2  # the tuning case is not evaluated
    assert summary["froc"]["mode"] == "sweep" and len(summary["froc"]["thresholds"]) == 19
    out2 = tmp_path / "out2"
    assert evaluate(*args, "--out", str(out2), "--workers", "2") == 0
    assert (out2 / "patients.csv").read_text() == (out / "patients.csv").read_text()
    assert (out2 / "lesions.csv").read_text() == (out / "lesions.csv").read_text()


def test_compare_prints_significance_table(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    runs = []
    for t in ("0.5", "0.2"):
        out = tmp_path / f"run_t{t}"
        assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--threshold", t) == 0
        runs.append(str(out))
    capsys.readouterr()
    assert evaluate("--compare", *runs, "--out", str(tmp_path / "cmp")) == 0
    printed = capsys.readouterr().out
    assert "sensitivity" in printed and "wilcoxon" in printed and "mannwhitneyu" in printed
    table = pd.read_csv(tmp_path / "cmp" / "significance.csv")
    row = table[table.metric == "sensitivity"].iloc[0]
    assert (row.method_a, row.method_b) == ("run_t0.5", "run_t0.2")
    assert row.n_a == 2  # the lesion-free case has no sensitivity: pairwise deletion


def test_python_dash_m_entry_point(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "sap.evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "3 cases at threshold 0.5" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["lesions.csv", "patients.csv", "summary.json"]


def test_results_do_not_depend_on_file_orientation(tmp_path):
    """Evaluation runs on the files' own voxel order: other orientations give the same metrics."""
    outs = []
    for axcodes in ("LPS", "RAS", "PIR"):
        geometry = make_geometry(SHAPE, SPACING, axcodes=axcodes)
        pred_dir, gt_dir = tmp_path / axcodes / "pred", tmp_path / axcodes / "gt"
        for case_id, (prob, gt) in case_arrays().items():
            write_image(prob, geometry, pred_dir / f"{case_id}.nii.gz")
            write_image(gt, geometry, gt_dir / f"{case_id}.nii.gz")
        out = tmp_path / axcodes / "out"
        assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)) == 0
        outs.append(pd.read_csv(out / "patients.csv"))
    for other in outs[1:]:
        pd.testing.assert_frame_equal(outs[0], other, rtol=1e-9)


def test_config_overrides_reach_the_settings(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--config", "tiny",
                    "--set", "evaluate.tolerance_mm=1.0", "--connectivity", "6", "--min-volume-ml", "0.03") == 0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["tolerance_mm"] == 1.0 and settings["connectivity"] == 6
    assert settings["n_bootstrap"] == 200  # the tiny preset's value
    rows = pd.read_csv(out / "patients.csv", dtype={"case": str}).set_index("case")
    assert rows.loc["b", "n_pred"] == 1  # the 0.024 mL false positive is dropped by --min-volume-ml


def test_joint_tuning_of_min_volume(tmp_path):
    """A tiny false positive next to a lesion found at every threshold: only dropping components
    below 0.025 mL (the lowest such grid volume) gives F2 = 1, at the lowest threshold."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    cases = case_arrays()
    prob, gt = cases["b"]  # lesion found (0.8) plus a 0.024 mL false positive (0.6)
    write_image(prob, GEOMETRY, pred_dir / "t.nii.gz")
    write_image(gt, GEOMETRY, gt_dir / "t.nii.gz")
    for case_id in ("a", "c"):
        write_image(cases[case_id][0], GEOMETRY, pred_dir / f"{case_id}.nii.gz")
        write_image(cases[case_id][1], GEOMETRY, gt_dir / f"{case_id}.nii.gz")
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--tune-on", "t",
                    "--set", "tuning.tune_min_volume=true",
                    "--set", "tuning.min_volume_ml_grid=[0.0, 0.01, 0.025, 0.5]") == 0
    tuning = json.loads((out / "summary.json").read_text())["tuning"]
    assert (tuning["threshold"], tuning["min_volume_ml"], tuning["objective_value"]) == (0.05, 0.025, 1.0)


def test_real_pir_mask_float64(shared_data, tmp_path, capsys):
    """verse004: a float64 label map (vertebrae 16–24) on a PIR, 1 × 1 × 2 mm grid."""
    from sap.data.io import read_image

    source = shared_data / "verse004" / "vertebrae_mask.nii.gz"
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    (gt_dir / "v004.nii.gz").symlink_to(source)
    write_image(np.zeros(read_image(source).array.shape, np.float32), read_image(source).geometry,
                pred_dir / "v004.nii.gz")
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "o")) == 2
    assert "v004.nii.gz: lesion mask is not binary: values 16, 17" in capsys.readouterr().err

    image = read_image(source)
    vertebrae = image.array > 0
    write_image(vertebrae.astype(np.uint8), image.geometry, gt_dir / "v004.nii.gz", overwrite=True)
    write_image(vertebrae.astype(np.float32) * 0.9, image.geometry, pred_dir / "v004.nii.gz", overwrite=True)
    out = tmp_path / "out"
    assert evaluate("--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)) == 0
    row = pd.read_csv(out / "patients.csv").iloc[0]
    assert row["n_gt"] == row["n_pred"] == row["detected"] >= 1 and row["fp"] == 0
    assert row["dice_detected"] == 1.0 and row["nsd_detected"] == 1.0
    assert row["volume_gt_ml"] == pytest.approx(vertebrae.sum() * image.voxel_volume_ml, rel=1e-9)
