"""Skeletal or self-supervised pretraining of Swin UNETR on the healthy cohort (SPEC §6).

Writes RUN/pretrain/{skeletal,ssl}/: last.pt (weights + training state), best.pt, log.csv,
tensorboard/, config.yaml (resolved) and summary.json. Runs unchanged under
`accelerate launch -m sap.pretrain ...`.
"""

from __future__ import annotations

import argparse

from sap.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--stage",
        required=True,
        choices=("skeletal", "ssl"),
        help="skeletal: 10-class skeleton segmentation (SAP); ssl: Tang et al. inpainting + rotation + contrastive",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN/pretrain/STAGE/last.pt (model, optimiser, schedule, sampler and RNG state)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs of this stage")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="skeletal stage on CPU: return freed memory to the OS at once (steps about 25%% slower, "
        "about 20%% less resident memory)",
    )


def run(args: argparse.Namespace) -> int:
    from sap.cli import config_from_args
    from sap.pretrain import run_pretrain

    cfg = config_from_args(args)
    result = run_pretrain(
        cfg, args.stage, resume=args.resume, overwrite=args.overwrite, progress=args.progress, keep_memory=not args.low_memory
    )
    if not result.main_process:  # one line per run, not per rank
        return 0
    final = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if k in _HEADLINE)
    print(
        f"sap pretrain {args.stage}: {result.steps} steps, best at step {result.best_step}"
        + (f" ({final})" if final else "")
        + f"; outputs in {result.out_dir}"
    )
    return 0


_HEADLINE = ("val_skeleton_dice", "val_mean_class_dice", "val_loss")
