"""sap.metrics on hand-computed small volumes (SPEC §9, rules E1–E10)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from sap.metrics import (
    CaseCandidates,
    DetectionCounts,
    EvaluationSettings,
    FrocCurve,
    at_least,
    bonferroni,
    compare_methods,
    describe,
    detection_counts,
    evaluate_case,
    f2_score,
    froc_auc,
    froc_candidates,
    froc_score,
    froc_sweep,
    icc_a1,
    mann_whitney,
    normalized_surface_dice,
    sensitivity_at,
    shapiro_p,
    stars,
    summarize,
    tune_threshold,
    wilcoxon_paired,
)

SHAPE = (16, 16, 12)


def volume(*boxes, value=1, dtype=np.uint8, shape=SHAPE):
    a = np.zeros(shape, dtype=dtype)
    for box in boxes:
        a[box] = value
    return a


def box(x0, x1, y0, y1, z0, z1):
    return np.s_[x0:x1, y0:y1, z0:z1]


def test_metrics_import_without_torch():
    code = "import sys; import sap.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------- E1, E2
def test_bridging_prediction_detects_both_lesions():
    gt = volume(box(2, 4, 2, 4, 2, 4), box(2, 4, 5, 7, 2, 4))  # two 8-voxel lesions, gap at y=4
    pred = volume(box(2, 4, 2, 7, 2, 4), dtype=np.float32, value=0.9)  # one 20-voxel bridge
    row = evaluate_case(pred, gt, (1, 1, 1)).row
    assert (row["n_gt"], row["n_pred"], row["detected"], row["fp"]) == (2, 1, 2, 0)
    assert row["sensitivity"] == 1 and row["precision"] == 1 and row["f2"] == 1
    assert row["dice_detected"] == pytest.approx(16 / 28)  # 2·8 / (8 + 20) for each lesion
    assert row["dice_patient_mean"] == pytest.approx(16 / 28)
    assert row["dice_global"] == pytest.approx(32 / 36)


def test_split_lesion_detected_once_and_pieces_are_not_false_positives():
    gt = volume(box(2, 8, 2, 4, 2, 4))  # 24 voxels
    pred = volume(box(2, 4, 2, 4, 2, 4), box(6, 8, 2, 4, 2, 4), dtype=np.float32, value=0.7)
    r = evaluate_case(pred, gt, (1, 1, 1))
    row = r.row
    assert (row["n_gt"], row["n_pred"], row["detected"], row["fp"]) == (1, 2, 1, 0)
    assert row["precision"] == 1.0
    assert row["dice_detected"] == pytest.approx(2 * 16 / (24 + 16))
    assert r.pred_components["matched"].tolist() == [True, True]


def test_lesion_free_case_counts_false_positives_and_nan_rules():
    gt = volume()
    pred = volume(box(1, 3, 1, 3, 1, 3), dtype=np.float32, value=0.8)
    row = evaluate_case(pred, gt, (1, 1, 1)).row
    assert row["n_gt"] == 0 and row["fp"] == 1 and row["precision"] == 0.0
    for key in ("sensitivity", "f2", "sensitivity_1ml", "dice_detected", "dice_patient_mean"):
        assert np.isnan(row[key]), key
    assert row["dice_global"] == 0.0


def test_empty_prediction():
    gt = volume(box(1, 3, 1, 3, 1, 3))
    row = evaluate_case(np.zeros(SHAPE, np.float32), gt, (1, 1, 1)).row
    assert row["sensitivity"] == 0.0 and np.isnan(row["precision"])
    assert row["f2"] == 0.0  # P = 0 when n_pred = 0, and P + R = 0 → F2 = 0
    assert row["dice_patient_mean"] == 0.0 and row["dice_global"] == 0.0
    assert np.isnan(row["dice_detected"]) and np.isnan(row["nsd_detected"])


def test_both_empty():
    row = evaluate_case(np.zeros(SHAPE, np.float32), volume(), (1, 1, 1)).row
    assert row["fp"] == 0 and np.isnan(row["dice_global"]) and np.isnan(row["precision"])


def test_f2_formula():
    assert f2_score(1, 2, 1, 4) == pytest.approx(5 * 0.25 * 0.5 / (4 * 0.25 + 0.5))
    assert np.isnan(f2_score(0, 0, 0, 3))


def test_volume_exactly_one_ml_counts():
    assert at_least(1.0 - 1e-12, 1.0) and not at_least(0.999, 1.0)
    shape = (14, 14, 14)
    gt = volume(box(1, 11, 1, 11, 1, 11), box(12, 13, 12, 13, 12, 13), shape=shape)  # 1000 voxels = 1 mL
    pred = volume(box(1, 11, 1, 11, 1, 11), dtype=np.float32, value=0.9, shape=shape)
    row = evaluate_case(pred, gt, (1, 1, 1)).row
    assert row["n_gt_1ml"] == 1 and row["detected_1ml"] == 1 and row["sensitivity_1ml"] == 1.0
    # the same 1000 voxels at a spacing whose float product falls just below 1 mL
    spacing = (0.3, 0.3, 1 / 0.09)
    assert float(np.prod(np.asarray(spacing))) < 1.0
    counts = detection_counts(pred, gt, spacing)
    assert counts.n_gt_1ml == 1 and counts.detected_1ml == 1
    # 999 voxels is below 1 mL
    gt[1, 1, 1] = 0
    assert detection_counts(pred, gt, (1, 1, 1)).n_gt_1ml == 0


def test_fp_1ml_and_min_volume_drop():
    shape = (24, 24, 24)
    gt = volume(box(1, 3, 1, 3, 1, 3), shape=shape)
    big_fp = box(10, 20, 10, 20, 10, 20)  # 1000 voxels = 1 mL, no ground truth
    small_fp = box(22, 23, 22, 23, 22, 23)  # 1 voxel
    pred = volume(box(1, 3, 1, 3, 1, 3), big_fp, small_fp, dtype=np.float32, value=0.8, shape=shape)
    row = evaluate_case(pred, gt, (1, 1, 1)).row
    assert (row["n_pred"], row["fp"], row["fp_1ml"]) == (3, 2, 1)
    kept = evaluate_case(pred, gt, (1, 1, 1), EvaluationSettings(min_volume_ml=0.005))
    assert (kept.row["n_pred"], kept.row["fp"]) == (2, 1)
    assert kept.row["volume_pred_ml"] == pytest.approx(1.008)
    # candidate-mode FROC ignores min_volume_ml: the 1-voxel component is still a candidate
    assert kept.candidates.score.size == 3


def test_lesion_table_scores_and_ids():
    gt = volume(box(2, 4, 2, 4, 2, 4), box(8, 10, 8, 10, 8, 10))
    pred = np.zeros(SHAPE, np.float32)
    pred[2:4, 2:4, 2:4] = 0.6
    pred[2, 2, 2] = 0.95
    pred[8:10, 8:10, 8:10] = 0.3  # below t: missed, but a FROC candidate
    r = evaluate_case(pred, gt, (1, 1, 1))
    rows = r.lesion_rows()
    gt_rows = [x for x in rows if x["kind"] == "gt"]
    assert [x["matched"] for x in gt_rows] == [True, False]
    assert gt_rows[0]["score"] == pytest.approx(0.95) and gt_rows[1]["score"] == pytest.approx(0.3)
    assert gt_rows[0]["dice"] == 1.0 and np.isnan(gt_rows[1]["dice"])
    assert [x["kind"] for x in rows] == ["gt", "gt", "pred"]


# ------------------------------------------------------------------------------------------ E5
def test_nsd_hand_cases():
    a = volume(box(4, 8, 4, 8, 4, 8))
    assert normalized_surface_dice(a.astype(bool), a.astype(bool), (1, 2, 3), 0.0) == 1.0
    b = volume(box(5, 9, 4, 8, 4, 8))
    assert normalized_surface_dice(a.astype(bool), b.astype(bool), (1, 1, 1), 1.0) == 1.0
    assert normalized_surface_dice(a.astype(bool), b.astype(bool), (1, 1, 1), 0.5) < 1.0
    far = volume(box(0, 1, 0, 1, 0, 1))
    assert normalized_surface_dice(a.astype(bool), far.astype(bool), (1, 1, 1), 2.0) == 0.0
    empty = np.zeros(SHAPE, bool)
    assert np.isnan(normalized_surface_dice(empty, empty, (1, 1, 1), 2.0))
    assert normalized_surface_dice(a.astype(bool), empty, (1, 1, 1), 2.0) == 0.0


def test_nsd_on_crop_equals_full_volume_nsd():
    rng = np.random.default_rng(3)
    gt = volume(box(3, 9, 4, 10, 2, 7))
    pred = np.zeros(SHAPE, np.float32)
    pred[4:10, 3:9, 3:8] = rng.uniform(0.5, 1, (6, 6, 5))
    spacing = (0.8, 1.3, 2.5)
    r = evaluate_case(pred, gt, spacing, EvaluationSettings(tolerance_mm=1.5))
    full = normalized_surface_dice(gt.astype(bool), pred >= 0.5, spacing, 1.5)
    assert r.row["nsd_detected"] == pytest.approx(full, abs=1e-12)


# ------------------------------------------------------------------------------------------ E8
def tied_cases():
    case_a = CaseCandidates(
        score=np.array([0.9, 0.9, 0.6]), hit=np.array([True, False, True]), volume_ml=np.array([2.0, 2.0, 0.1]),
        gt_best=np.array([0.9, 0.6]), gt_volume_ml=np.array([1.5, 0.2]),
    )
    case_b = CaseCandidates(  # lesion-free: counts in the FPPI denominator
        score=np.array([0.6]), hit=np.array([False]), volume_ml=np.array([0.5]),
        gt_best=np.zeros(0), gt_volume_ml=np.zeros(0),
    )
    return [case_a, case_b]


def test_froc_candidates_tied_scores_enter_together():
    curve = froc_candidates(tied_cases())
    assert curve.fppi.tolist() == [0.0, 0.5, 1.0]
    assert curve.sensitivity.tolist() == [0.0, 0.5, 1.0]
    assert froc_auc(curve, 15) == pytest.approx(0.125 + 0.375 + 14.0)
    assert froc_score(curve) == pytest.approx((0.25 + 0.5 + 1 + 1 + 1 + 1) / 6)


def test_froc_1ml_curve():
    # lesions ≥ 1 mL: only the first (best score 0.9); FPs ≥ 1 mL: the 0.9 candidate of case A
    curve = froc_candidates(tied_cases(), volume_threshold_ml=1.0)
    assert curve.fppi.tolist() == [0.0, 0.5]
    assert curve.sensitivity.tolist() == [0.0, 1.0]
    assert froc_auc(curve, 4) == pytest.approx(0.25 + 3.5)


def test_froc_without_lesions_is_none():
    case = CaseCandidates(np.array([0.5]), np.array([False]), np.array([1.0]), np.zeros(0), np.zeros(0))
    assert froc_candidates([case]) is None and np.isnan(froc_auc(None)) and np.isnan(froc_score(None))


def test_interpolation_on_vertical_steps():
    curve = FrocCurve(np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 0.2, 0.6, 0.8]))
    assert sensitivity_at(curve, 0.5) == pytest.approx(0.1)  # towards the lowest point at FPPI 1
    assert sensitivity_at(curve, 1.0) == pytest.approx(0.6)  # highest point at FPPI 1
    assert sensitivity_at(curve, 1.5) == pytest.approx(0.7)
    assert sensitivity_at(curve, 9.0) == pytest.approx(0.8)  # flat beyond the last point
    # area: 0→1 with (0,0),(1,0.2): 0.1; vertical step: 0; 1→2: 0.7; 2→3 flat: 0.8
    assert froc_auc(curve, 3.0) == pytest.approx(0.1 + 0.7 + 0.8)
    assert froc_auc(curve, 1.5) == pytest.approx(0.1 + 0.5 * (0.6 + 0.7) * 0.5)


def test_froc_sweep_sorts_and_keeps_non_monotone_points():
    curve = froc_sweep([2.0, 0.5, 1.0], [0.8, 0.4, 0.3])
    assert curve.fppi.tolist() == [0.0, 0.5, 1.0, 2.0]
    assert curve.sensitivity.tolist() == [0.0, 0.4, 0.3, 0.8]


def test_candidates_from_arrays():
    gt = volume(box(2, 4, 2, 4, 2, 4), box(8, 10, 8, 10, 8, 10))
    pred = np.zeros(SHAPE, np.float32)
    pred[2:4, 2:4, 2:4] = 0.9
    pred[8:10, 8:10, 8:10] = 0.04  # below t_min: never a candidate
    pred[12:14, 12:14, 2:4] = 0.2  # false-positive candidate
    c = evaluate_case(pred, gt, (1, 1, 1)).candidates
    assert sorted(c.score.round(6).tolist()) == [0.2, 0.9]
    assert c.gt_best[0] == pytest.approx(0.9) and np.isneginf(c.gt_best[1])


def test_binary_prediction_gives_null_froc():
    gt = volume(box(2, 4, 2, 4, 2, 4))
    r = evaluate_case(volume(box(2, 4, 2, 4, 2, 4)), gt, (1, 1, 1))
    assert r.binary and r.row["detected"] == 1
    summary = summarize([r])
    assert summary["froc"] is None and summary["froc_score"] is None


# ------------------------------------------------------------------------------------------ E9
def counts(detected, n_gt, true_candidates, n_pred):
    return DetectionCounts(n_gt, n_pred, detected, true_candidates, 0, 0, 0)


def test_tuning_ties_lowest_threshold_then_lowest_volume():
    case = {
        (0.3, 0.0): counts(1, 2, 1, 1), (0.3, 0.5): counts(1, 2, 1, 1),
        (0.5, 0.0): counts(2, 2, 2, 3), (0.5, 0.5): counts(2, 2, 2, 2),
        (0.7, 0.0): counts(2, 2, 2, 2), (0.7, 0.5): counts(2, 2, 2, 2),
    }
    t, mv, best, table = tune_threshold([case])
    assert (t, mv, best) == (0.5, 0.5, 1.0)
    assert table[(0.7, 0.0)] == 1.0


def test_tuning_ties_within_1e12():
    a = {(0.2, 0.0): counts(1, 3, 1, 1), (0.4, 0.0): counts(1, 3, 1, 1)}
    t, _, _, _ = tune_threshold([a])
    assert t == 0.2


def test_tuning_objectives_and_lesion_free_cases():
    with_lesion = {(0.3, 0.0): counts(1, 1, 1, 1), (0.6, 0.0): counts(1, 1, 1, 1)}
    lesion_free = {(0.3, 0.0): counts(0, 0, 0, 5), (0.6, 0.0): counts(0, 0, 0, 0)}
    assert tune_threshold([with_lesion, lesion_free], "mean_f2")[0] == 0.3  # lesion-free ignored
    assert tune_threshold([with_lesion, lesion_free], "pooled_f2")[0] == 0.6  # its FPs count
    with pytest.raises(ValueError):
        tune_threshold([lesion_free])


def test_tuning_on_arrays_picks_lowest_threshold_of_the_plateau():
    from sap.metrics import detection_counts_grid

    gt = volume(box(2, 4, 2, 4, 2, 4))
    pred = volume(box(2, 4, 2, 4, 2, 4), dtype=np.float32, value=0.8)
    pred[10, 10, 10] = 0.4  # a false positive below 0.45
    grid = detection_counts_grid(pred, gt, (1, 1, 1), [0.3, 0.4, 0.45, 0.8, 0.85])
    t, _, best, _ = tune_threshold([grid])
    assert (t, best) == (0.45, 1.0)


# ----------------------------------------------------------------------------------------- E10
def test_describe_pinned_bootstrap():
    values = np.array([0.1, 0.5, np.nan, 0.9, 0.3, 0.7])
    d = describe(values, n_bootstrap=1000, seed=0)
    clean = values[~np.isnan(values)]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, clean.size, (1000, clean.size))
    expected = np.percentile(np.median(clean[idx], axis=1), [2.5, 97.5])
    assert d["ci95"] == pytest.approx(expected.tolist())
    assert d["median"] == 0.5 and d["n"] == 5
    assert d["q25"] == np.percentile(clean, 25) and d["q75"] == np.percentile(clean, 75)
    assert d["shapiro_p"] == pytest.approx(stats.shapiro(clean).pvalue)
    empty = describe([np.nan])
    assert empty["n"] == 0 and np.isnan(empty["median"])


def test_statistical_tests_match_scipy_and_edge_cases():
    x = np.array([0.2, 0.4, 0.5, 0.9, 0.1, 0.6, 0.3])
    y = np.array([0.3, 0.5, 0.4, 1.0, 0.4, 0.8, np.nan])
    expected = stats.wilcoxon(x[:6], y[:6], zero_method="wilcox", alternative="two-sided").pvalue
    assert wilcoxon_paired(x, y) == pytest.approx(expected)
    assert wilcoxon_paired(x, x) == 1.0
    assert mann_whitney(x, y) == pytest.approx(
        stats.mannwhitneyu(x, y[:6], alternative="two-sided", use_continuity=True).pvalue
    )
    assert np.isnan(mann_whitney([], y)) and np.isnan(shapiro_p([1.0, 2.0]))
    assert bonferroni(0.02, 3) == pytest.approx(0.06) and bonferroni(0.5, 3) == 1.0
    assert [stars(p) for p in (0.0005, 0.005, 0.04, 0.2, np.nan)] == ["***", "**", "*", "", ""]


def test_compare_methods_bonferroni_over_pairs():
    rng = np.random.default_rng(0)
    values = {m: rng.uniform(size=12) for m in ("baseline", "ssl", "sap")}
    rows = compare_methods(values, paired=True)
    assert [(r["method_a"], r["method_b"]) for r in rows] == [("baseline", "ssl"), ("baseline", "sap"), ("ssl", "sap")]
    for r in rows:
        assert r["p_adj"] == pytest.approx(min(1.0, 3 * r["p"]))


def test_icc_edge_cases():
    assert np.isnan(icc_a1([1, 2], [1, 2])[0])  # n < 3
    assert np.isnan(icc_a1([0, 0, 0], [0, 0, 0])[0])  # all values equal
    value, ci = icc_a1([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert value == pytest.approx(1.0) and ci == pytest.approx([1.0, 1.0])


def test_summary_pools_and_counts_lesion_free_cases():
    gt1 = volume(box(2, 4, 2, 4, 2, 4), box(8, 10, 8, 10, 8, 10))
    pred1 = volume(box(2, 4, 2, 4, 2, 4), dtype=np.float32, value=0.9)
    gt2 = volume()
    pred2 = volume(box(5, 6, 5, 6, 5, 6), dtype=np.float32, value=0.7)
    results = [evaluate_case(pred1, gt1, (1, 1, 1), case_id="a"), evaluate_case(pred2, gt2, (1, 1, 1), case_id="b")]
    s = summarize(results)
    assert s["n_cases"] == 2 and s["pooled_sensitivity"] == 0.5 and s["mean_fp"] == 0.5
    assert s["metrics"]["sensitivity"]["n"] == 1  # NaN of the lesion-free case dropped
    assert s["metrics"]["dice_detected"]["n"] == 1  # lesion level: one detected lesion
    # candidate FROC: the 0.9 hit then the 0.7 FP over 2 cases
    assert s["froc"]["fppi"] == [0.0, 0.0, 0.5] and s["froc"]["sensitivity"] == [0.0, 0.5, 0.5]
    assert np.isnan(s["icc_burden"]["value"])  # n < 3


def test_froc_auc_bootstrap_ci_equals_resampling_the_case_list():
    from sap.metrics import froc_auc_bootstrap_ci

    rng = np.random.default_rng(0)
    cases = []
    for _ in range(7):
        m, n = rng.integers(0, 8), rng.integers(0, 4)
        score = np.round(rng.random(m), 2)  # rounded: tied scores across cases
        gt_best = np.where(rng.random(n) < 0.7, np.round(rng.random(n), 2), -np.inf)
        cases.append(CaseCandidates(score, rng.random(m) < 0.4, rng.uniform(0, 3, m), gt_best, rng.uniform(0, 3, n)))
    for v, limit in ((None, 15.0), (1.0, 4.0), (None, 1.0)):
        idx = np.random.default_rng(0).integers(0, len(cases), (300, len(cases)))
        curves = [froc_candidates([cases[i] for i in row], v) for row in idx]
        aucs = [froc_auc(c, limit) for c in curves if c is not None]
        expected = np.percentile(aucs, [2.5, 97.5])
        assert froc_auc_bootstrap_ci(cases, v, limit, 300, 0) == pytest.approx(expected.tolist(), abs=1e-12)


def test_float_map_with_nothing_above_t_min_is_not_binary():
    gt = volume(box(2, 4, 2, 4, 2, 4))
    r = evaluate_case(np.full(SHAPE, 0.01, np.float32), gt, (1, 1, 1))
    assert not r.binary and r.candidates.score.size == 0
    curve = summarize([r])["froc"]
    assert curve is not None and curve["sensitivity"] == [0.0]


def test_cumulative_volume_curves_by_hand():
    from sap.metrics import cumulative_volume_curves

    curves = cumulative_volume_curves(
        gt_volume_ml=np.array([0.2, 1.0, 3.0]), gt_detected=np.array([False, True, True]),
        pred_volume_ml=np.array([0.5, 2.0, 1.0]), pred_true=np.array([False, False, True]),
        n_cases=2, volumes_ml=[0.0, 1.0, 2.5, 5.0],
    )
    assert curves["n_gt"] == [3, 2, 1, 0]
    assert curves["sensitivity"][:3] == pytest.approx([2 / 3, 1.0, 1.0]) and np.isnan(curves["sensitivity"][3])
    assert curves["fp_per_case"] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_sweep_mode_summary_by_hand():
    gt = volume(box(2, 4, 2, 4, 2, 4))
    pred = np.zeros(SHAPE, np.float32)
    pred[2:4, 2:4, 2:4] = 0.8
    pred[10:12, 10:12, 8:10] = 0.3  # a false positive at thresholds ≤ 0.3
    settings = EvaluationSettings(froc="sweep", grid=(0.2, 0.5, 0.9), n_bootstrap=50)
    r = evaluate_case(pred, gt, (1, 1, 1), settings)
    s = summarize([r], settings)
    # thresholds 0.2: (fp 1, sens 1); 0.5: (0, 1); 0.9: (0, 0); with (0, 0) prepended, sorted
    assert s["froc"]["fppi"] == [0.0, 0.0, 1.0] and s["froc"]["sensitivity"] == [0.0, 1.0, 1.0]
    assert s["froc"]["auc"] == pytest.approx(15.0)
    assert s["froc"]["mode"] == "sweep" and s["froc"]["thresholds"] == [0.2, 0.5, 0.9]
