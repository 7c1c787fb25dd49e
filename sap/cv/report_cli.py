"""(Re)build the report of a cv run from its stored results (merges folds run on several machines).

Completes every method whose test folds are all on disk (threshold tuning and pooled evaluation),
then writes RUN/report/report.md, report.html, figures/ and tables/.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder of sap cv")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo steps whose stored results come from another config; without it such steps are refused")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sap.cv.report import build_report, check_report_folder
    from sap.cv.study import finalize_run
    from sap.run_layout import RunDir

    check_report_folder(RunDir(Path(args.run)))  # before any work: the folder is rebuilt whole
    finalize_run(Path(args.run), overwrite=args.overwrite)
    path = build_report(Path(args.run))
    print(f"sap report: {path}")
    return 0
