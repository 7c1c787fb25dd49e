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
    import sys
    import warnings

    from sap import RESEARCH_USE_ONLY
    from sap.cv.track import infer_and_track
    from sap.errors import SapError
    from sap.track.api import print_summary
    from sap.track.cli import options_from_args, print_truth

    if args.baseline_lesions or args.followup_lesions:
        raise SapError("--baseline-lesions/--followup-lesions: sap track-infer predicts the lesions; use sap track to give masks")

    def show(message, *_args, **_kwargs) -> None:
        print(f"sap track-infer: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        result = infer_and_track(args.baseline, args.followup, args.out, args.model, options_from_args(args),
                                 truth=args.truth, device=args.device, baseline_skeleton=args.baseline_skeleton,
                                 followup_skeleton=args.followup_skeleton)
    print_summary(result)
    if "truth" in result.summary:
        print_truth(result.summary["truth"])
    print(f"sap track-infer: wrote {args.out}. {RESEARCH_USE_ONLY}")
    return 0
