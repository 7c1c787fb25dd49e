"""Paired differences between methods (SAP − SSL, SAP − Baseline, SSL − Baseline) with bootstrap CIs.

Cross-checks: the case-level bootstrap against ``scipy.stats.bootstrap`` (paired, percentile)
drawing the same resamples; the paired FROC-AUC bootstrap against recomputing both methods'
curves on every resampled case list; the report's table against patients.csv and summary.json of
a study with fabricated predictions (tests/cv_fixtures.py), with stored and recomputed candidates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sap.metrics import (
    CaseCandidates,
    candidate_rows,
    candidates_from_rows,
    evaluate_case,
    froc_auc,
    froc_auc_bootstrap_ci,
    froc_candidates,
    froc_case_candidates,
    paired_bootstrap_difference,
    paired_froc_auc_difference,
)


def _random_cases(rng: np.random.Generator, n: int = 8) -> list[CaseCandidates]:
    cases = []
    for _ in range(n):
        m, k = rng.integers(0, 8), rng.integers(0, 4)
        score = np.round(rng.random(m), 2)  # rounded: tied scores across cases
        gt_best = np.where(rng.random(k) < 0.7, np.round(rng.random(k), 2), -np.inf)
        cases.append(CaseCandidates(score, rng.random(m) < 0.4, rng.uniform(0, 3, m), gt_best, rng.uniform(0, 3, k)))
    return cases


def _other_method(cases: list[CaseCandidates], rng: np.random.Generator) -> list[CaseCandidates]:
    """The same lesions scored by another method: other candidates, other best scores."""
    out = []
    for c in cases:
        m = rng.integers(0, 6)
        gt_best = np.where(rng.random(c.gt_best.size) < 0.5, np.round(rng.random(c.gt_best.size), 2), -np.inf)
        out.append(CaseCandidates(np.round(rng.random(m), 2), rng.random(m) < 0.5, rng.uniform(0, 3, m), gt_best,
                                  c.gt_volume_ml))
    return out


def test_paired_bootstrap_equals_scipy_paired_percentile_bootstrap():
    from scipy import stats

    rng = np.random.default_rng(3)
    a = rng.uniform(size=15)
    b = a - 0.1 + rng.normal(0, 0.2, 15)
    ours = paired_bootstrap_difference(a, b, n_bootstrap=2000, seed=5)
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                          n_resamples=2000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(5))
    assert ours["difference"] == pytest.approx(np.mean(a - b), abs=1e-15)
    assert ours["n"] == 15
    # the same draws (integers(0, n, (B, n)) from the same generator): equal up to rounding
    assert ours["ci95"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=1e-12)


def test_identical_methods_differ_by_zero_with_a_zero_ci():
    values = np.array([0.0, 0.5, 1.0, np.nan, 0.25])
    assert paired_bootstrap_difference(values, values, 200, 0) == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 4}
    cases = _random_cases(np.random.default_rng(1))
    for v, limit in ((None, 15.0), (1.0, 4.0)):
        d = paired_froc_auc_difference(cases, cases, v, limit, 200, 0)
        assert d["difference"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["n"] == len(cases)


def test_a_constant_shift_is_the_difference_and_the_whole_ci():
    a = np.array([0.3, 0.9, 0.5, 0.7])
    d = paired_bootstrap_difference(a, a - 0.25, 300, 1)
    assert d["difference"] == pytest.approx(0.25) and d["ci95"] == pytest.approx([0.25, 0.25])


def test_non_finite_values_drop_the_exam_for_both_methods():
    a = np.array([1.0, np.nan, 0.5, 0.0, 2.0, 1.0])
    b = np.array([0.0, 0.5, np.inf, 0.0, 1.0, 0.5])
    d = paired_bootstrap_difference(a, b, 500, 2)
    complete = paired_bootstrap_difference(a[[0, 3, 4, 5]], b[[0, 3, 4, 5]], 500, 2)
    assert d == complete and d["n"] == 4
    assert d["difference"] == pytest.approx(np.mean([1.0, 0.0, 1.0, 0.5]))
    nothing = paired_bootstrap_difference([np.nan], [1.0], 100, 0)
    assert nothing["n"] == 0 and np.isnan(nothing["difference"]) and np.isnan(nothing["ci95"]).all()
    with pytest.raises(ValueError):
        paired_bootstrap_difference([1.0, 2.0], [1.0], 10, 0)


def test_paired_froc_difference_equals_resampling_both_case_lists_together():
    rng = np.random.default_rng(4)
    cases_a = _random_cases(rng)
    cases_b = _other_method(cases_a, rng)
    n = len(cases_a)
    for v, limit in ((None, 15.0), (1.0, 4.0)):
        d = paired_froc_auc_difference(cases_a, cases_b, v, limit, 300, 7)
        assert d["difference"] == pytest.approx(
            froc_auc(froc_candidates(cases_a, v), limit) - froc_auc(froc_candidates(cases_b, v), limit), abs=1e-12)
        idx = np.random.default_rng(7).integers(0, n, (300, n))
        diffs = []
        for row in idx:
            ca, cb = froc_candidates([cases_a[i] for i in row], v), froc_candidates([cases_b[i] for i in row], v)
            if ca is not None:  # same lesions in both: both curves exist or neither does
                diffs.append(froc_auc(ca, limit) - froc_auc(cb, limit))
        assert d["ci95"] == pytest.approx(np.percentile(diffs, [2.5, 97.5]).tolist(), abs=1e-12)
        # unpaired CIs would be wider: the paired one is not the difference of the two CIs
        ci_a = froc_auc_bootstrap_ci(cases_a, v, limit, 300, 7)
        assert d["ci95"] != pytest.approx([ci_a[0] - d["auc_b"], ci_a[1] - d["auc_b"]])


def test_candidate_rows_round_trip_keeps_cases_without_candidates_or_lesions():
    rng = np.random.default_rng(2)
    cases = _random_cases(rng, 6) + [CaseCandidates(*(np.zeros(0),) * 2, np.zeros(0), np.zeros(0), np.zeros(0))]
    rows = [r for i, c in enumerate(cases) for r in candidate_rows(f"c{i}", c)]
    table = pd.DataFrame(rows)
    back = candidates_from_rows(table["case"], table["kind"], table["score"], table["hit"], table["volume_ml"])
    assert list(back) == [f"c{i}" for i in range(len(cases))]
    for i, c in enumerate(cases):
        got = back[f"c{i}"]
        for name in ("score", "hit", "volume_ml", "gt_best", "gt_volume_ml"):
            assert np.array_equal(getattr(got, name), getattr(c, name)), name
    with pytest.raises(ValueError, match="unknown candidate kinds"):
        candidates_from_rows(["c"], ["blob"], [0.1], [False], [1.0])


def test_froc_case_candidates_are_those_of_evaluate_case():
    rng = np.random.default_rng(0)
    gt = np.zeros((20, 18, 16), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    gt[12:14, 10:12, 9:11] = 1
    prob = rng.uniform(0, 0.3, gt.shape).astype(np.float32)
    prob[3:5, 3:5, 3:5] = 0.8
    spacing = (2.0, 1.5, 3.0)
    want = evaluate_case(prob, gt, spacing).candidates
    got = froc_case_candidates(prob, gt, spacing, t_min=0.05, connectivity=26)
    for name in ("score", "hit", "volume_ml", "gt_best", "gt_volume_ml"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


# ------------------------------------------------------------------------------------ the report
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from sap.cv.report import build_report
    from tests.cv_fixtures import make_fake_study

    s = make_fake_study(tmp_path_factory.mktemp("paired"), methods=("baseline", "ssl", "sap"))
    for method in ("baseline", "ssl", "sap"):
        assert s.finalize(method)
    build_report(s.run.root, progress=False)
    return s


def test_report_differences_are_those_of_the_stored_evaluations(study):
    import json

    table = pd.read_csv(study.run.report / "tables" / "paired_differences.csv")
    assert set(table["pair"]) == {"SAP − SSL", "SAP − Baseline", "SSL − Baseline"}
    assert {"f2", "sensitivity", "fp", "dice_detected", "froc_auc", "froc_1ml_auc"} <= set(table["key"])
    patients = {m: pd.read_csv(study.run.evaluation(m) / "patients.csv", dtype={"case": str}).set_index("case")
                for m in ("baseline", "ssl", "sap")}
    summary = {m: json.loads((study.run.evaluation(m) / "summary.json").read_text()) for m in patients}
    for _, row in table.iterrows():
        a, b = row["method_a"], row["method_b"]
        if row["key"].startswith("froc"):
            key = row["key"].removesuffix("_auc")
            # candidates.csv gives back the evaluation's own FROC exactly
            assert row["difference"] == pytest.approx(summary[a][key]["auc"] - summary[b][key]["auc"], abs=1e-12)
            assert row["n"] == summary[a]["n_cases"]
        else:
            diff = (patients[a][row["key"]] - patients[b][row["key"]]).dropna()
            assert row["n"] == len(diff)
            if len(diff):
                assert row["difference"] == pytest.approx(diff.mean(), abs=1e-12)
        if np.isfinite(row["difference"]):
            assert row["ci95_lo"] <= row["ci95_hi"]
    md = (study.run.report / "report.md").read_text(encoding="utf-8")
    assert "## Paired differences between methods" in md and "| Metric | SAP − SSL | SAP − Baseline | SSL − Baseline |" in md


def test_runs_without_candidates_csv_recompute_them_from_the_maps(study, tmp_path):
    from sap.cv.paired import paired_differences
    from sap.cv.rundir import load_run_config

    cfg = load_run_config(study.run.config)
    patients = {m: pd.read_csv(study.run.evaluation(m) / "patients.csv", dtype={"case": str})
                for m in ("baseline", "sap")}
    stored = paired_differences(study.run, patients, cfg, 200, 0)
    moved = tmp_path / "candidates.csv"
    path = study.run.evaluation("sap") / "candidates.csv"
    path.rename(moved)
    try:
        recomputed = paired_differences(study.run, patients, cfg, 200, 0)
    finally:
        moved.rename(path)
    assert list(stored["pair"].unique()) == ["SAP − Baseline"]
    pd.testing.assert_frame_equal(stored, recomputed)


def test_difference_cells_are_signed_with_the_ci():
    from sap.cv.paired import difference_text

    assert difference_text(0.1234, -0.05, 0.3) == "+0.12 [-0.05, +0.30]"
    assert difference_text(-0.001, 0.0, 0.0) == "0.00 [0.00, 0.00]"
    assert difference_text(float("nan"), 0.0, 1.0) == "–"
    assert difference_text(0.5, float("nan"), 1.0) == "+0.50 [CI n/a]"
