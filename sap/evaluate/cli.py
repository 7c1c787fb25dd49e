"""Lesion evaluation of prediction files: detection, segmentation, burden ICC, FROC (SPEC §9).

Examples:
  sap evaluate --pred preds/ --gt cohort/patients/ --out eval/
  sap evaluate --pred preds/ --gt gt/ --out eval/ --tune-on tuning_cases.txt --froc sweep
  sap evaluate --compare eval_baseline/ eval_sap/
"""

from __future__ import annotations

import argparse
import sys

from sap.cli import add_config_arguments
from sap.config import EvaluateConfig, TuningConfig

_EVAL = EvaluateConfig()
_TUNE = TuningConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Options that also live in the config default to SUPPRESS: given → override the config.
    keep = argparse.SUPPRESS
    parser.add_argument("--pred", help="folder of predictions: CASE.nii.gz or CASE_prob.nii.gz (probability "
                        "maps in [0,1] or binary masks; *_lesions.nii.gz ignored). Required unless --compare")
    parser.add_argument("--gt", help="folder of ground-truth lesion masks: CASE.nii.gz, CASE/GT.nii.gz, a cohort "
                        "(patients/) or nnU-Net labelsTr/. Required unless --compare")
    parser.add_argument("--out", help="output folder for patients.csv, lesions.csv, summary.json "
                        "(with --compare: optional, writes significance.csv)")
    parser.add_argument("--threshold", type=float, default=keep,
                        help=f"binarisation threshold t, pred >= t (default: evaluate.threshold, {_EVAL.threshold})")
    parser.add_argument("--t-min", type=float, default=keep,
                        help=f"FROC candidate threshold (default: evaluate.t_min, {_EVAL.t_min})")
    parser.add_argument("--tolerance-mm", type=float, default=keep,
                        help=f"NSD tolerance in mm (default: evaluate.tolerance_mm, {_EVAL.tolerance_mm})")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=keep,
                        help=f"component connectivity (default: evaluate.connectivity, {_EVAL.connectivity})")
    parser.add_argument("--min-volume-ml", type=float, default=keep,
                        help="drop predicted components smaller than this before matching "
                        f"(default: evaluate.min_volume_ml, {_EVAL.min_volume_ml})")
    parser.add_argument("--froc", choices=("candidate", "sweep"), default=keep,
                        help=f"FROC mode (default: evaluate.froc, {_EVAL.froc})")
    parser.add_argument("--tune-on", default=None, metavar="CASES",
                        help="tune the threshold (E9) on these cases (a file with one id per line, or a comma "
                        "list), then evaluate the other cases at it")
    parser.add_argument("--allow-missing", action="store_true",
                        help="treat a missing prediction as empty instead of an error")
    parser.add_argument("--workers", type=int, default=keep,
                        help=f"cases evaluated in parallel processes (default: evaluate.workers, {_EVAL.workers})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (otherwise refuse)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                        help="print the significance table between two or more evaluate output folders")
    add_config_arguments(parser, data=False, out=False)


def _settings(args: argparse.Namespace):
    from sap.cli import config_from_args
    from sap.metrics import EvaluationSettings

    cfg = config_from_args(args)
    ev = cfg.evaluate
    for name in ("threshold", "t_min", "tolerance_mm", "connectivity", "min_volume_ml", "froc", "workers"):
        if hasattr(args, name):
            setattr(ev, name, getattr(args, name))
    settings = EvaluationSettings(
        threshold=ev.threshold, t_min=ev.t_min, tolerance_mm=ev.tolerance_mm, connectivity=ev.connectivity,
        min_volume_ml=ev.min_volume_ml, volume_threshold_ml=ev.volume_threshold_ml, froc=ev.froc,
        grid=tuple(float(t) for t in cfg.tuning.grid), n_bootstrap=ev.n_bootstrap, seed=ev.seed,
    )
    return cfg, settings


def run(args: argparse.Namespace) -> int:
    from sap.errors import SapError

    if args.compare:
        return _run_compare(args)
    if not args.pred or not args.gt or not args.out:
        raise SapError("--pred, --gt and --out are required (or use --compare RUN_A RUN_B …)")
    from pathlib import Path

    from sap.evaluate.api import evaluate_folders, parse_case_list

    cfg, settings = _settings(args)
    for name, value in (("threshold", settings.threshold), ("t_min", settings.t_min)):
        if not 0.0 <= value <= 1.0:
            raise SapError(f"--{name.replace('_', '-')} {value} must lie in [0, 1]")
    if settings.tolerance_mm < 0 or settings.min_volume_ml < 0:
        raise SapError("--tolerance-mm and --min-volume-ml must not be negative")
    summary = evaluate_folders(
        args.pred, args.gt, args.out, settings,
        tune_on=parse_case_list(args.tune_on),
        tuning_objective=cfg.tuning.objective,
        tune_min_volume=cfg.tuning.tune_min_volume,
        min_volume_grid=tuple(cfg.tuning.min_volume_ml_grid),
        allow_missing=args.allow_missing,
        workers=cfg.evaluate.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tune_on_file=args.tune_on if args.tune_on and Path(args.tune_on).is_file() else None,
    )
    _print_summary(summary, Path(args.out))
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _print_summary(summary: dict, out) -> None:
    m = summary["metrics"]
    lines = [
        f"{summary['n_cases']} cases at threshold {summary['settings']['threshold']:g}",
        f"  sensitivity median {_fmt(m['sensitivity']['median'])}, pooled {_fmt(summary['pooled_sensitivity'])}; "
        f"FP/case mean {_fmt(summary['mean_fp'])}",
        f"  >= 1 mL: pooled sensitivity {_fmt(summary['pooled_sensitivity_1ml'])}, "
        f"FP/case mean {_fmt(summary['mean_fp_1ml'])}",
        f"  Dice of detected lesions median {_fmt(m['dice_detected']['median'])}, "
        f"NSD median {_fmt(m['nsd_detected']['median'])}; burden ICC {_fmt(summary['icc_burden']['value'])}",
        f"  FROC score {_fmt(summary['froc_score'])}, >= 1 mL {_fmt(summary['froc_score_1ml'])}",
        f"  written: {out / 'patients.csv'}, {out / 'lesions.csv'}, {out / 'summary.json'}",
    ]
    print("\n".join(lines))


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sap.evaluate.api import check_out_folder
    from sap.evaluate.compare import compare_runs
    from sap.files import atomic_write_text

    if args.out:
        check_out_folder(args.out)
    table = compare_runs(args.compare)
    shown = table.copy()
    for col in ("median_a", "median_b", "p", "p_adj"):
        shown[col] = shown[col].map(lambda v: "n/a" if v != v else f"{v:.4g}")
    sys.stdout.write(shown.to_string(index=False) + "\n")
    if args.out:
        from sap.files import check_not_input

        out = Path(args.out) / "significance.csv"
        check_not_input([out], [Path(run) / name for run in args.compare for name in ("patients.csv", "lesions.csv")])
        atomic_write_text(out, table.to_csv(index=False, na_rep=""), overwrite=args.overwrite)
    return 0
