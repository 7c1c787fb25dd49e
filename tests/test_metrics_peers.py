"""sap.metrics cross-checked against independent implementations where the definitions agree.

* NSD: MONAI ``compute_surface_dice(use_subvoxels=True)`` on anisotropic spacing (our surfel
  triangulation is our own; it agrees to ~1e-4, so the tolerance is 1e-3).
* ICC(2,1): pingouin's ``ICC(A,1)`` row (``ICC2`` in older releases), CI rounded to 2 decimals there.
* Wilcoxon / Mann–Whitney / Shapiro: scipy (see test_metrics.py for the pinned calls).
* panoptica: recorded numbers (panoptica pins old numpy/cc3d and must never be a sap dependency).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sap.metrics import evaluate_case, icc_a1, normalized_surface_dice


def random_blob(rng, shape, sigma=2.0, level=0.55):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (2.0, 0.5, 1.0)])
def test_nsd_matches_monai_subvoxels(spacing):
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(int(sum(spacing) * 10))
    for tolerance in (1.0, 2.0):
        gt = random_blob(rng, (24, 22, 18))
        pred = random_blob(rng, (24, 22, 18))
        ours = normalized_surface_dice(gt, pred, spacing, tolerance)
        theirs = compute_surface_dice(
            torch.as_tensor(pred)[None, None].float(), torch.as_tensor(gt)[None, None].float(),
            [tolerance], spacing=spacing, use_subvoxels=True,
        ).item()
        assert ours == pytest.approx(theirs, abs=1e-3)


def test_icc_matches_pingouin():
    pd = pytest.importorskip("pandas")
    pg = pytest.importorskip("pingouin")
    rng = np.random.default_rng(7)
    for n in (5, 12, 30):
        gt = rng.gamma(2.0, 2.0, n)
        pred = gt * rng.uniform(0.6, 1.2) + rng.normal(0, 1.0, n)
        table = pd.DataFrame({
            "case": np.repeat(np.arange(n), 2),
            "rater": np.tile(["gt", "pred"], n),
            "burden": np.column_stack([gt, pred]).ravel(),
        })
        icc = pg.intraclass_corr(table, targets="case", raters="rater", ratings="burden")
        row = icc[icc["Type"].isin(["ICC(A,1)", "ICC2"])].iloc[0]
        ci_column = "CI95" if "CI95" in icc.columns else "CI95%"
        value, ci = icc_a1(gt, pred)
        assert value == pytest.approx(row["ICC"], abs=1e-9)
        assert ci == pytest.approx(list(row[ci_column]), abs=0.0051)  # pingouin rounds to 2 decimals


# Recorded with panoptica 2.1.7 by `benchmarks/evaluate_panoptica_peer.py --record-test-cases`
# (semantic input, cc3d components, IoU > 0 many-to-one matching). The boxes below are the ones
# of that script's test_cases(); none of these cases has a merge or a split, where the two
# definitions agree: tp = detected, fp = fp, fn = n_gt - detected, sq_dsc = mean Dice of detected.
PANOPTICA_CASES = [
    ([(2, 6, 2, 6, 2, 6), (12, 17, 10, 15, 10, 14), (20, 26, 20, 27, 3, 9)],
     [(3, 7, 2, 6, 2, 6), (12, 16, 11, 15, 10, 15), (28, 30, 28, 30, 28, 30)]),
    ([(5, 10, 5, 10, 5, 10)], [(5, 10, 5, 10, 6, 11), (20, 22, 2, 4, 2, 4), (25, 27, 25, 28, 10, 12)]),
    ([(1, 4, 1, 4, 1, 4), (10, 20, 10, 20, 10, 20)], [(11, 19, 11, 21, 9, 19)]),
]
PANOPTICA_RECORDED = [
    {"tp": 2, "fp": 1, "fn": 1, "sq_dsc": 0.7305555555555556, "global_dsc": 0.39436619718309857},
    {"tp": 1, "fp": 2, "fn": 0, "sq_dsc": 0.8, "global_dsc": 0.7407407407407407},
    {"tp": 1, "fp": 0, "fn": 1, "sq_dsc": 0.72, "global_dsc": 0.7093596059113301},
]


@pytest.mark.parametrize("case", range(len(PANOPTICA_CASES)))
def test_counts_match_recorded_panoptica(case):
    gt_boxes, pred_boxes = PANOPTICA_CASES[case]
    gt = np.zeros((32, 32, 32), np.uint8)
    pred = np.zeros((32, 32, 32), np.float32)
    for array, boxes in ((gt, gt_boxes), (pred, pred_boxes)):
        for x0, x1, y0, y1, z0, z1 in boxes:
            array[x0:x1, y0:y1, z0:z1] = 1
    row = evaluate_case(pred, gt, (1.0, 1.0, 1.0)).row
    expected = PANOPTICA_RECORDED[case]
    assert row["detected"] == expected["tp"]
    assert row["fp"] == expected["fp"]
    assert row["n_gt"] - row["detected"] == expected["fn"]
    assert row["dice_detected"] == pytest.approx(expected["sq_dsc"], abs=1e-12)
    assert row["dice_global"] == pytest.approx(expected["global_dsc"], abs=1e-12)


def test_cumulative_mean_matches_monai_mean_batch_reduction():
    """CumulativeMean = MONAI's MEAN_BATCH reduction (NaN left out, per class) of the stacked cases."""
    torch = pytest.importorskip("torch")
    from monai.metrics.utils import do_metric_reduction
    from monai.utils import MetricReduction

    from sap.metrics import CumulativeMean

    rng = np.random.default_rng(4)
    per_case = rng.random((5, 3))
    per_case[rng.random((5, 3)) < 0.3] = np.nan
    per_case[:, 2] = np.nan  # a class no case defines
    acc = CumulativeMean()
    for row in per_case:
        acc.append(class_dice=row, skeleton=float(np.nanmax(np.r_[row, 0.0])))
    # MONAI zeroes the NaN of its input in place: the accumulator must hold copies
    theirs, _ = do_metric_reduction(torch.from_numpy(per_case), MetricReduction.MEAN_BATCH)
    ours = acc.aggregate()
    np.testing.assert_allclose(ours["class_dice"][:2], theirs.numpy()[:2], rtol=1e-6)  # theirs: float32
    assert np.isnan(ours["class_dice"][2]) and len(acc) == 5  # MONAI gives 0 where nothing is defined
    assert isinstance(ours["skeleton"], float)
    acc.reset()
    assert len(acc) == 0 and acc.aggregate() == {}
