"""Write a synthetic cohort: procedural whole-body phantom or real anatomy, MR (T1, b1000) or CT.

The command line is a thin shell over :func:`sap.data.synth.make_cohort`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sap.data.synth.presets import PRESETS

    presets = "; ".join(p.describe() for p in PRESETS.values())
    parser.add_argument("--out", required=True, help="cohort folder to write (refused when it exists and is not empty, unless --overwrite)")
    parser.add_argument("--preset", default="demo", choices=list(PRESETS), help=f"cohort size and voxel size ({presets})")
    parser.add_argument("--modality", default="mr", choices=["mr", "ct"], help="mr: channels T1 and b1000; ct: one channel CT in HU")
    parser.add_argument(
        "--anatomy", default=None, metavar="DIR",
        help="real scans with TotalSegmentator labels (a folder with e.g. ct.nii.gz + labels_totalseg.nii.gz, or "
        "folders of them) instead of the procedural phantom",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cohort written by sap synth; refused when the folder holds "
                        "anything its cohort.json does not list")
    parser.add_argument(
        "--followup", action="store_true",
        help="each patient becomes a baseline and a follow-up exam (PATIENT_t0, PATIENT_t1) with known lesion "
        "correspondences, a pose change and a smooth deformation; the truth goes under 'followup' in cohort.json "
        "(for sap track --truth; phantom only)",
    )
    parser.add_argument(
        "--difficulty", default=None, metavar="FEATURES",
        help="difficulty features to keep on, comma-separated (low_contrast, marrow, bone_mimics; 'none' for "
        "none); default: the preset's own (study-cpu: all three; other presets: none). For measuring what each does",
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 4, at most the CPU count); results do not depend on it")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import warnings

    from sap.data.synth import make_cohort

    def show(message, *_args, **_kwargs) -> None:  # one line, printed when it happens
        print(f"sap synth: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        out = make_cohort(
            args.out,
            preset=args.preset,
            modality=args.modality,
            anatomy=args.anatomy,
            seed=args.seed,
            overwrite=args.overwrite,
            workers=args.workers,
            followup=args.followup,
            difficulty=None if args.difficulty is None else [f for f in args.difficulty.split(",") if f and f != "none"],
        )
    meta = json.loads((out / "cohort.json").read_text())
    print(
        f"sap synth: wrote {meta['n_healthy']} healthy and {meta['n_patients']} patient exams "
        f"({meta['n_lesions']} lesions, {meta['modality']}: {', '.join(meta['channels'])}) to {out}"
    )
    return 0
