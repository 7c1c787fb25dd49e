"""Synth + cross-validated study + report at demo scale on a CPU, from nothing (SPEC §10).

Demo scale shows the pipeline, not evidence: about ten fine-tuning steps per model.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="sap-demo", help="output folder (cohort/, run/, models/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo config, e.g. --set finetune.max_steps=20 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo steps whose stored results come from another config; without it they are refused")
    parser.add_argument("--no-progress", action="store_true", help="hide the stage display and the progress bars")


def run(args: argparse.Namespace) -> int:
    from sap.cv.demo import run_demo

    out = run_demo(args.out, seed=args.seed, overrides=args.overrides, progress=not args.no_progress,
                   overwrite=args.overwrite)
    print(f"sap demo: report in {out / 'run' / 'report' / 'report.md'}")
    return 0
