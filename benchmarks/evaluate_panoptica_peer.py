"""The panoptica peer of ``bench_evaluate.py`` (and the recorder of the panoptica numbers in
``tests/test_metrics_peers.py``). Runs ONLY in panoptica's own environment, never in sap's:

    python -m venv /tmp/panoptica_env && /tmp/panoptica_env/bin/pip install panoptica
    /tmp/panoptica_env/bin/python benchmarks/evaluate_panoptica_peer.py --pred P --gt G [--threshold 0.5]
    /tmp/panoptica_env/bin/python benchmarks/evaluate_panoptica_peer.py --record-test-cases

Configuration matching SPEC §12: semantic input, connected components (cc3d backend), any-overlap
many-to-one matching (IoU > 0, many-to-one allowed), instance Dice and NSD, global Dice.
Files are read with nibabel (what panoptica users do). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def make_evaluator():
    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        NaiveThresholdMatching,
        Panoptica_Evaluator,
    )
    from panoptica.metrics import Metric
    from panoptica.utils.constants import CCABackend

    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
        instance_matcher=NaiveThresholdMatching(
            matching_metric=Metric.IOU, matching_threshold=0.0, allow_many_to_one=True, strict_threshold=True
        ),
        instance_metrics=[Metric.DSC, Metric.NSD],
        global_metrics=[Metric.DSC],
        verbose=False,
    )


def evaluate(evaluator, pred: np.ndarray, gt: np.ndarray) -> dict:
    result = evaluator.evaluate(pred, gt, verbose=False)["ungrouped"]
    return {
        "tp": int(result.tp),
        "fp": int(result.fp),
        "fn": int(result.fn),
        "sq_dsc": float(result.sq_dsc),
        "global_dsc": float(result.global_bin_dsc),
    }


def test_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Small cases without merges or splits; the same boxes are written in
    tests/test_metrics_peers.py (PANOPTICA_CASES)."""
    cases = [
        # (gt boxes, pred boxes) as (x0, x1, y0, y1, z0, z1), shape 32³
        (
            [(2, 6, 2, 6, 2, 6), (12, 17, 10, 15, 10, 14), (20, 26, 20, 27, 3, 9)],
            [(3, 7, 2, 6, 2, 6), (12, 16, 11, 15, 10, 15), (28, 30, 28, 30, 28, 30)],
        ),
        ([(5, 10, 5, 10, 5, 10)], [(5, 10, 5, 10, 6, 11), (20, 22, 2, 4, 2, 4), (25, 27, 25, 28, 10, 12)]),
        ([(1, 4, 1, 4, 1, 4), (10, 20, 10, 20, 10, 20)], [(11, 19, 11, 21, 9, 19)]),
    ]
    out = []
    for gt_boxes, pred_boxes in cases:
        gt = np.zeros((32, 32, 32), np.uint8)
        pred = np.zeros((32, 32, 32), np.uint8)
        for arr, boxes in ((gt, gt_boxes), (pred, pred_boxes)):
            for x0, x1, y0, y1, z0, z1 in boxes:
                arr[x0:x1, y0:y1, z0:z1] = 1
        out.append((pred, gt))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred")
    parser.add_argument("--gt")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--record-test-cases", action="store_true")
    args = parser.parse_args()
    evaluator = make_evaluator()
    if args.record_test_cases:
        for i, (pred, gt) in enumerate(test_cases()):
            print(json.dumps({"case": i, **evaluate(evaluator, pred, gt)}))
        return 0
    import nibabel as nib

    for gt_path in sorted(Path(args.gt).glob("*.nii.gz")):
        case = gt_path.name[: -len(".nii.gz")]
        pred_path = Path(args.pred) / f"{case}_prob.nii.gz"
        gt = np.asarray(nib.load(gt_path).dataobj).astype(np.uint8, copy=False)
        pred = (np.asarray(nib.load(pred_path).dataobj) >= args.threshold).astype(np.uint8)
        print(json.dumps({"case": case, **evaluate(evaluator, pred, gt)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
