"""The k-fold cross-validated study over the three initialisations (SPEC §10).

Pretrains (when missing), fine-tunes one model per test fold and method, predicts the tuning and
test folds, tunes the threshold on the tuning fold, evaluates all test folds pooled and writes
the report; finished steps are reused when run again with the same config.
"""

from __future__ import annotations

import argparse

from sap.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of baseline (alias scratch), ssl, sap; none = cv.methods")
    parser.add_argument("--folds", default=None,
                        help="comma-separated test folds to run on this machine, e.g. 1,2; none = all "
                             "(then finish with sap report --run RUN)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write one ensemble bundle per method (fold models, ensemble-tuned threshold) "
                             "to DIR/<method> for sap infer; none = no export")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo steps whose stored results come from another config; without it such steps are refused")
    parser.add_argument("--no-report", action="store_true", help="skip building the report")
    parser.add_argument("--no-progress", action="store_true", help="hide the stage display and the progress bars")


def run(args: argparse.Namespace) -> int:
    from sap.cli import config_from_args
    from sap.cv.study import run_study

    cfg = config_from_args(args)
    run_dir = run_study(cfg, methods=args.methods, folds=args.folds, export=args.export,
                        overwrite=args.overwrite, report=not args.no_report, progress=not args.no_progress)
    print(f"sap cv: study in {run_dir}" + (f"; report in {run_dir / 'report'}" if not args.no_report else ""))
    return 0
