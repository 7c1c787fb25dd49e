"""Follow-up exams: register the follow-up onto the baseline, track lesions, measure size change.

The command line is a thin shell over :func:`sap.track.api.track`. Research use only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sap.track.api import TrackOptions, TrackResult

_OWN = " %(default).0s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sap.track.match import MatchOptions
    from sap.track.register import RegistrationOptions

    m, r = MatchOptions(), RegistrationOptions()
    parser.add_argument("--baseline", required=True,
                        help="baseline case folder: channel images (T1 + b1000, or CT), GT.nii.gz lesion mask, optional "
                             "skeleton.nii.gz (required)" + _OWN)
    parser.add_argument("--followup", required=True, help="follow-up case folder, same layout (required)" + _OWN)
    parser.add_argument("-o", "--out", required=True,
                        help="output folder, published whole: lesions.csv, regions.csv, summary.json, "
                             "followup_lesions_in_baseline.nii.gz, transform.h5, report.html (required)" + _OWN)
    for side in ("baseline", "followup"):
        parser.add_argument(f"--{side}-lesions", default=None,
                            help=f"{side} lesion mask: a file, or a sap infer output folder with CASE_lesions.nii.gz "
                                 "(default: GT.nii.gz in the case folder)" + _OWN)
        parser.add_argument(f"--{side}-skeleton", default=None,
                            help=f"{side} skeleton labels 0-9 (default: skeleton.nii.gz in the case folder, if any)" + _OWN)
    parser.add_argument("--channel", default=None,
                        help="channel to register, e.g. T1 or CT (default: T1, else CT, else the first image)" + _OWN)
    parser.add_argument("--bspline", action=argparse.BooleanOptionalAction, default=r.bspline,
                        help="add a B-spline stage after rigid and affine (slower)")
    parser.add_argument("--bspline-grid-mm", type=float, default=r.bspline_grid_mm,
                        help="B-spline control-point spacing in mm (ours)")
    parser.add_argument("--min-skeleton-dice", type=float, default=r.min_skeleton_dice,
                        help="registration fails when the bone Dice after it is lower (with skeletons; ours)")
    parser.add_argument("--min-overlap", type=float, default=m.min_overlap,
                        help="overlap, as a fraction of the smaller lesion, that links two lesions (ours)")
    parser.add_argument("--max-distance-mm", type=float, default=m.max_distance_mm,
                        help="cap of the centroid-distance pairing of lesions left after overlap (ours)")
    parser.add_argument("--enlarging-pct", type=float, default=m.enlarging_pct,
                        help="volume increase (%%) from which a track is 'enlarging' (ours)")
    parser.add_argument("--shrinking-pct", type=float, default=m.shrinking_pct,
                        help="volume decrease (%%) from which a track is 'shrinking' (ours)")
    parser.add_argument("--truth", default=None,
                        help="a sap synth --followup cohort (folder or cohort.json): score the tracking against its "
                             "truth (written to summary.json and printed; default: no scoring)" + _OWN)
    parser.add_argument("--no-report", action="store_true", help="skip report.html (default: write it)" + _OWN)
    parser.add_argument("--force", action="store_true",
                        help="track exams whose subject ids differ (default: refuse)" + _OWN)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder (default: refuse)" + _OWN)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)" + _OWN)


def options_from_args(args: argparse.Namespace) -> TrackOptions:
    """The :class:`~sap.track.api.TrackOptions` of parsed arguments (also used by ``sap track-infer``)."""
    from sap.errors import SapError
    from sap.track.api import TrackOptions
    from sap.track.match import MatchOptions
    from sap.track.register import RegistrationOptions

    if not 0 < args.min_overlap <= 1:
        raise SapError(f"--min-overlap {args.min_overlap}: must be in (0, 1]")
    for name in ("max_distance_mm", "enlarging_pct", "shrinking_pct", "bspline_grid_mm"):
        if not getattr(args, name) > 0:
            raise SapError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    return TrackOptions(
        match=MatchOptions(args.min_overlap, args.max_distance_mm, args.enlarging_pct, args.shrinking_pct),
        registration=RegistrationOptions(bspline=args.bspline, bspline_grid_mm=args.bspline_grid_mm,
                                         min_skeleton_dice=args.min_skeleton_dice),
        channel=args.channel, force=args.force, overwrite=args.overwrite, report=not args.no_report,
        progress=not args.quiet,
    )


def print_truth(scores: dict) -> None:
    print(f"truth: F1 {scores['f1']:.3f} (precision {scores['precision']:.3f}, recall {scores['recall']:.3f}); "
          f"correspondence accuracy {scores['correspondence_accuracy']:.3f}, size-change accuracy "
          f"{scores['size_change_accuracy']:.3f}; mean |Feret error| {scores['feret_abs_error_mm_mean']:.2f} mm")


def run_and_report(command: str, out: str, compute: Callable[[], TrackResult]) -> int:
    """Run ``compute()`` with its warnings printed as ``sap COMMAND: warning: …`` lines, then print
    the summary (and the truth scores when asked); shared by ``sap track`` and ``sap track-infer``."""
    import sys
    import warnings

    from sap import RESEARCH_USE_ONLY
    from sap.track.api import print_summary

    def show(message, *_args, **_kwargs) -> None:
        print(f"sap {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        result = compute()
    print_summary(result)
    if "truth" in result.summary:
        print_truth(result.summary["truth"])
    print(f"sap {command}: wrote {out}. {RESEARCH_USE_ONLY}")
    return 0


def run(args: argparse.Namespace) -> int:
    from sap.track.api import track

    return run_and_report("track", args.out, lambda: track(
        args.baseline, args.followup, args.out, options_from_args(args),
        baseline_lesions=args.baseline_lesions, followup_lesions=args.followup_lesions,
        baseline_skeleton=args.baseline_skeleton, followup_skeleton=args.followup_skeleton, truth=args.truth,
    ))  # fmt: skip
