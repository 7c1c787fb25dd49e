"""Property tests (hypothesis) of sap.metrics: invariances, monotone FROC, ranges."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sap.metrics import evaluate_case, froc_auc, froc_candidates, label_components, summarize

SHAPE = (14, 12, 10)
SPACING = (0.8, 1.0, 2.0)


def random_case(seed: int, density: float):
    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.random(SHAPE), 1.2) > 0.5 + 0.1 * density
    prob = ndimage.gaussian_filter(rng.random(SHAPE) + 0.6 * gt, 1.0)
    prob = np.clip((prob - prob.min()) / max(np.ptp(prob), 1e-9), 0, 1).astype(np.float32)
    return prob, gt.astype(np.uint8)


case_strategy = st.tuples(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))


def rows_close(a: dict, b: dict) -> bool:
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, str):
            if va != vb:
                return False
        elif not (np.isnan(va) and np.isnan(vb)) and not np.isclose(va, vb, rtol=1e-9, atol=1e-12):
            return False
    return True


@settings(deadline=None, max_examples=30)
@given(case_strategy)
def test_invariant_to_relabelling_ground_truth_instances(case):
    prob, gt = random_case(*case)
    labels = label_components(gt > 0, 26).labels.astype(np.int32)
    rng = np.random.default_rng(case[0])
    permuted = np.concatenate([[0], rng.permutation(labels.max()) + 1]) if labels.max() else np.array([0])
    relabelled = permuted[labels]
    a = evaluate_case(prob, gt, SPACING).row
    b = evaluate_case(prob, relabelled, SPACING).row
    assert rows_close(a, b)


@settings(deadline=None, max_examples=30)
@given(case_strategy, st.sampled_from([0, 1, 2]))
def test_invariant_to_flipping_both_volumes(case, axis):
    prob, gt = random_case(*case)
    a = evaluate_case(prob, gt, SPACING).row
    b = evaluate_case(np.flip(prob, axis).copy(), np.flip(gt, axis).copy(), SPACING).row
    assert rows_close(a, b)


@settings(deadline=None, max_examples=30)
@given(st.lists(case_strategy, min_size=1, max_size=3))
def test_candidate_froc_is_monotone_and_metrics_in_range(cases):
    results = [evaluate_case(*random_case(*c), SPACING) for c in cases]
    for r in results:
        row = r.row
        for key in ("sensitivity", "precision", "f2", "sensitivity_1ml", "dice_detected", "nsd_detected",
                    "dice_patient_mean", "dice_global"):
            assert np.isnan(row[key]) or 0.0 <= row[key] <= 1.0, key
        assert 0 <= row["detected"] <= row["n_gt"] and 0 <= row["fp"] <= row["n_pred"]
        assert row["fp_1ml"] <= row["fp"]
    curve = froc_candidates([r.candidates for r in results])
    if curve is None:
        assert sum(r.row["n_gt"] for r in results) == 0
        return
    assert np.all(np.diff(curve.fppi) >= 0) and np.all(np.diff(curve.sensitivity) >= 0)
    assert curve.fppi[0] == 0 and curve.sensitivity[0] == 0 and curve.sensitivity[-1] <= 1
    assert 0.0 <= froc_auc(curve, 15.0) <= 15.0
    summary = summarize(results)
    assert summary["froc_score"] is None or 0.0 <= summary["froc_score"] <= 1.0
