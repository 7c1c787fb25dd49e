"""Whole-body inference: probability maps, lesion instances and the lesion table (SPEC §8).

Research use only: not a medical device, not for clinical diagnosis.
"""

from __future__ import annotations

import argparse
import sys

# Help texts state their own defaults; this empty format keeps argparse from adding "(default: None)".
_OWN = " %(default).0s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True,
                        help="a case folder (one file per model channel, e.g. T1.nii.gz + b1000.nii.gz), an image "
                             "file or DICOM series folder (single-channel models), or a folder of those (required)" + _OWN)
    parser.add_argument("-o", "--output", required=True, help="output folder (created if missing; required)" + _OWN)
    parser.add_argument("--model", required=True,
                        help="a sap lesion checkpoint (.pt) or a `sap cv --export` bundle folder (fold models averaged; required)" + _OWN)
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability threshold for lesion instances (default: the value stored with the model)" + _OWN)
    parser.add_argument("--min-volume-ml", type=float, default=None,
                        help="drop lesion components smaller than this, in mL (default: the value stored with the model)" + _OWN)
    regions = parser.add_mutually_exclusive_group()
    regions.add_argument("--skeletal-model", default=None,
                         help="10-class skeletal checkpoint or bundle: adds each lesion's skeletal region and "
                              "CASE_regions.csv (default: no regions)" + _OWN)
    regions.add_argument("--skeleton", default=None,
                         help="skeleton label file (one case) or folder with CASE.nii.gz or CASE/skeleton.nii.gz per "
                              "case, labels 0-9: adds regions like --skeletal-model (default: no regions)" + _OWN)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="mirror test-time augmentation over the 8 flips (default: the model's infer.tta)" + _OWN)
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 1) (default: the model's infer.overlap, 0.5 at paper scale)" + _OWN)
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="windows per network call (default: the model's infer.sw_batch_size)" + _OWN)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="float16 autocast on CUDA (default: the model's infer.amp)" + _OWN)
    parser.add_argument("--device", default=None,
                        help="where the network runs, e.g. cpu, cuda, cuda:1 (default: CUDA when available); "
                             "stitching is always on the CPU" + _OWN)
    parser.add_argument("--series", default=None, metavar="UID",
                        help="DICOM folders holding several series: read this SeriesInstanceUID (default: refuse, "
                             "listing them)" + _OWN)
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write CASE_seg.dcm (DICOM SEG, highdicom) for DICOM-series inputs (default: off)" + _OWN)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)" + _OWN)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)" + _OWN)


def run(args: argparse.Namespace) -> int:
    from sap import RESEARCH_USE_ONLY
    from sap.infer.pipeline import InferOptions, run_inference

    options = InferOptions(
        threshold=args.threshold,
        min_volume_ml=args.min_volume_ml,
        tta=args.tta,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        amp=args.amp,
        device=args.device,
        series=args.series,
        overwrite=args.overwrite,
        dicom_seg=args.dicom_seg,
        progress=not args.quiet,
    )
    report = run_inference(
        args.input, args.output, args.model, options, skeletal_model=args.skeletal_model, skeleton=args.skeleton
    )
    for result in report.results:
        if result.ok:
            print(f"{result.case_id}: {result.n_lesions} lesions ({result.seconds:.1f} s)")
    print(f"sap infer: {report.summary()} → {args.output}. {RESEARCH_USE_ONLY}",
          file=sys.stderr if report.failed else sys.stdout)
    return 1 if report.failed else 0
