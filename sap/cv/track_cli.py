"""Inference with a lesion model on two exams' images, then lesion tracking (``sap track`` outputs).

Study layer: the only place that runs ``sap infer`` and ``sap track`` together
(:func:`sap.cv.track.infer_and_track`). Research use only.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sap.track.cli import add_arguments as track_arguments

    track_arguments(parser)
    parser.add_argument("--model", required=True,
                        help="a sap lesion checkpoint (.pt) or a sap cv --export bundle: predicts both exams' lesions "
                             "(required) %(default).0s")
    parser.add_argument("--device", default=None,
                        help="where the network runs, e.g. cpu or cuda (default: CUDA when available) %(default).0s")


def run(args: argparse.Namespace) -> int:
    from sap.cv.track import infer_and_track
    from sap.errors import SapError
    from sap.track.cli import options_from_args, run_and_report

    if args.baseline_lesions or args.followup_lesions:
        raise SapError("--baseline-lesions/--followup-lesions: sap track-infer predicts the lesions; use sap track to give masks")
    return run_and_report("track-infer", args.out, lambda: infer_and_track(
        args.baseline, args.followup, args.out, args.model, options_from_args(args), truth=args.truth,
        device=args.device, baseline_skeleton=args.baseline_skeleton, followup_skeleton=args.followup_skeleton,
    ))  # fmt: skip
