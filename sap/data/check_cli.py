"""Validate a cohort against every data rule (SPEC §2, §13); reads everything, writes nothing.

Exit status 0 when every case passes, 2 otherwise (each problem printed on its own line).
"""

from __future__ import annotations

import argparse
import sys

from sap.cli import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, out=False)
    parser.add_argument("--layout", choices=["auto", "case_folders", "nnunet", "datalist"], default=None,
                        help="force the input layout (default: data.layout, auto-detected)")
    parser.add_argument("--label-kind", choices=["lesions", "skeleton"], default=None,
                        help="what nnU-Net/datalist labels hold (default: data.label_kind)")
    parser.add_argument("--binarize", action="store_true", help="accept any non-zero lesion value as lesion")
    parser.add_argument("--splits", default=None, help="also validate this splits.json against the cohort")
    parser.add_argument("--series", default=None, metavar="UID",
                        help="DICOM folders holding several series: read this SeriesInstanceUID (data.dicom_series)")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the verdict")


def run(args: argparse.Namespace) -> int:
    from sap.data.check import check_cohort
    from sap.errors import SapError

    cfg = config_from_args(args)
    if args.layout:
        cfg.data.layout = args.layout
    if args.label_kind:
        cfg.data.label_kind = args.label_kind
    if args.binarize:
        cfg.data.binarize = True
    if args.series:
        cfg.data.dicom_series = args.series
    if not cfg.data.root and not cfg.data.healthy and not cfg.data.patients:
        raise SapError("no data: pass --data COHORT")

    def show(summary) -> None:
        if args.quiet:
            return
        extra = []
        if summary.n_lesions is not None:
            extra.append(f"{summary.n_lesions} lesions")
        if summary.skeleton_labels is not None:
            extra.append(f"skeleton labels {summary.skeleton_labels}")
        spacing = "×".join(f"{s:g}" for s in summary.spacing)
        shape = "×".join(map(str, summary.shape))
        print(f"ok  {summary.group:<8} {summary.case_id} (subject {summary.subject_id}): {shape} at {spacing} mm"
              + (f", {', '.join(extra)}" if extra else ""))

    report = check_cohort(cfg, splits_file=args.splits, progress=not args.quiet, on_case=show)
    for problem in report.errors:
        print(f"sap check-data: error: {problem}", file=sys.stderr)
    n = len(report.summaries)
    if report.ok:
        print(f"{n} cases passed every check")
        return 0
    print(f"{len(report.errors)} problem(s) found in {cfg.data.root or cfg.data.patients}", file=sys.stderr)
    return 2
