"""2D CT slice models (SPEC §11): ``sap slice2d train | predict | prompt-bench``.

* ``train``: a 2D U-Net, a foundation encoder + head, or prompt-free SAM on axial bone-window
  slices of a CT cohort (patient-level split); writes a model folder.
* ``predict``: slice-wise prediction restacked into volumes (``CASE_prob.nii.gz``,
  ``CASE_lesions.nii.gz``) for ``sap evaluate``; optionally refined by SAM from detector boxes
  (paper 003).
* ``prompt-bench``: zero-shot SAM/MedSAM prompting strategies (paper 001) scored per slice;
  ``--list-strategies`` prints the 32 strategy names.
"""

from __future__ import annotations

import argparse
import sys

from sap.cli import add_config_arguments, config_from_args

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    train = sub.add_parser("train", help="train a 2D model on axial CT slices", formatter_class=FORMATTER)
    add_config_arguments(train)
    train.add_argument("--model", choices=("unet", "foundation", "sam"), default=None,
                       help="model kind; unset uses the config's slice2d.model ('unet' in the presets)")
    train.add_argument("--target", choices=("lesions", "bone"), default=None,
                       help="what to segment, lesion masks (GT) or bone (skeleton > 0); unset uses slice2d.target ('lesions')")
    train.add_argument("--checkpoint", default=None,
                       help="local transformers folder with pretrained DINOv3/DINOv2 (foundation) or SAM/MedSAM (sam) weights")
    train.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    train.add_argument("--resume", action="store_true", help="continue a killed run from --out/last.pt")

    predict = sub.add_parser("predict", help="predict CT volumes slice by slice and restack", formatter_class=FORMATTER)
    predict.add_argument("--model-dir", default=None, help="folder written by `sap slice2d train` (the 2D model / detector)")
    predict.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, case folder or folder of case folders")
    predict.add_argument("-o", "--output", required=True, help="output folder for CASE_prob.nii.gz and CASE_lesions.nii.gz")
    predict.add_argument("--threshold", type=float, default=None,
                         help="probability threshold for the masks; unset uses the model's (0.5 unless tuned)")
    predict.add_argument("--sam-refine", default=None, metavar="SAM_DIR",
                         help="refine detector boxes with SAM/MedSAM from this local transformers folder (paper 003)")
    predict.add_argument("--sam-family", choices=("sam", "medsam"), default="sam", help="preprocessing of the SAM weights")
    predict.add_argument("--boxes-from", default=None, metavar="PRED_DIR",
                         help="take boxes from a 3D model's CASE_lesions/CASE_prob files instead of the 2D detector")
    predict.add_argument("--expansion", type=float, default=1.1, help="box expansion factor about the box centre")
    predict.add_argument("--crop-factor", type=float, default=2.0,
                         help="prompt SAM on a crop this many times the expanded box (paper 003); 0 = whole slice")
    predict.add_argument("--gt", default=None, metavar="DIR",
                         help="reference folder (CASE.nii.gz or case folders): also write metrics2d.csv with the 2D metrics")
    predict.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    bench = sub.add_parser("prompt-bench", help="zero-shot SAM-family prompting strategies (paper 001)",
                           formatter_class=FORMATTER)
    bench.add_argument("--list-strategies", action="store_true", help="print the 32 strategy names, one a line, and exit")
    bench.add_argument("--checkpoint", default=None, metavar="SAM_DIR", help="local transformers SAM/MedSAM folder")
    add_config_arguments(bench)
    bench.add_argument("--target", choices=("lesions", "bone"), default="bone",
                       help="prompt each skeleton region (bone) or the lesion mask (lesions)")
    bench.add_argument("--family", choices=("sam", "medsam"), default=None,
                       help="SAM or MedSAM (box strategies only); unset uses slice2d.sam_family ('sam')")
    bench.add_argument("--strategies", default=None,
                       help="comma-separated strategy names; unset runs all 32 (MedSAM: box_1C,box_5C)")
    bench.add_argument("--max-slices", type=int, default=None, help="prompt at most this many slices (seeded choice)")
    bench.add_argument("--component-rule", choices=("and", "or"), default=None,
                       help="component filter, 'and' (authors' code) or 'or' (paper text); unset uses slice2d.component_rule ('and')")
    bench.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    from sap.errors import SapError

    action = getattr(args, "action", None)
    if action is None:
        args._parser.print_help()
        return 2
    if action == "prompt-bench" and args.list_strategies:
        from sap.slice2d.prompts import STRATEGIES

        sys.stdout.write("\n".join(STRATEGIES) + "\n")
        return 0
    if action == "train":
        from sap.slice2d.train import train_slice_model

        if not args.out:
            raise SapError("train needs --out DIR for the model folder")
        cfg = config_from_args(args)
        result = train_slice_model(
            cfg, args.out, args.model, args.target, args.checkpoint, args.overwrite, resume=args.resume
        )
        best = result["best_val_dice"]
        print(
            f"sap slice2d train: {result['steps']} steps on {result['n_train_slices']} slices; "
            f"best validation Dice {'n/a' if best is None else f'{best:.3f}'} at step {result['best_step']}; "
            f"model in {result['model_dir']}"
        )
        return 0
    if action == "predict":
        from sap.slice2d.predict import predict_cases

        written = predict_cases(
            args.input,
            args.output,
            model_dir=args.model_dir,
            sam_dir=args.sam_refine,
            sam_family=args.sam_family,
            boxes_from=args.boxes_from,
            threshold=args.threshold,
            expansion=args.expansion,
            crop_factor=args.crop_factor or None,
            overwrite=args.overwrite,
            gt=args.gt,
        )
        print(f"sap slice2d predict: {len(written)} case(s) written to {args.output}")
        return 0
    # prompt-bench
    from sap.slice2d.bench import prompt_bench

    if not args.checkpoint:
        raise SapError("prompt-bench needs --checkpoint SAM_DIR (a local transformers SAM/MedSAM folder)")
    if not args.out:
        raise SapError("prompt-bench needs --out DIR")
    cfg = config_from_args(args)
    if args.family:
        cfg.slice2d.sam_family = args.family
    if args.component_rule:
        cfg.slice2d.component_rule = args.component_rule
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None
    summary = prompt_bench(cfg, args.checkpoint, args.out, args.target, strategies, args.max_slices, args.overwrite)
    best = max(summary, key=lambda r: -1 if r["dice"] != r["dice"] else r["dice"])
    print(f"sap slice2d prompt-bench: {len(summary)} strategies; best mean Dice {best['dice']:.3f} ({best['strategy']}, "
          f"{best['seconds_per_slice']:.3f} s per slice); results in {args.out}")
    return 0
