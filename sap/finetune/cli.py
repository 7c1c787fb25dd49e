"""Lesion fine-tuning from scratch, SSL or SAP weights, one model per test fold (SPEC §7).

Writes RUN/{baseline|ssl|sap}/fold_K/: last.pt (weights + optimiser, schedule, sampler state),
best.pt (highest mean validation F2), log.csv, tensorboard/, config.yaml (resolved) and
summary.json. Runs unchanged on several GPUs (or CPU processes) with
`accelerate launch [--multi_gpu --num_processes N] -m sap.finetune ...`; on a CPU-only machine
`accelerate launch --multi_gpu --num_processes 2 -m sap.finetune ...` gives two gloo processes
(`--cpu --num_processes 2` starts only one). Without a launcher it runs as one process.
"""

from __future__ import annotations

import argparse

from sap.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--init",
        required=True,
        choices=("scratch", "baseline", "ssl", "sap"),
        help="scratch (alias baseline): random weights, finetune.lr_scratch; ssl: SSL encoder, "
        "finetune.lr_ssl_encoder/decoder; sap: skeletal encoder and decoder with a new 2-class head, "
        "finetune.lr_sap_encoder/decoder",
    )
    parser.add_argument(
        "--fold",
        type=int,
        required=True,
        help="test fold K (1 … cv.k-1); trains on the other folds, RUN/splits.json is created when missing",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        metavar="CKPT",
        help="pretrained weights for --init ssl/sap (default: RUN/pretrain/ssl/best.pt or "
        "RUN/pretrain/skeletal/best.pt); sap, MONAI-SSL and reference-SAP files are accepted",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN/METHOD/fold_K/last.pt (model, optimiser, schedule, AMP scaler, sampler position)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace earlier outputs of this method and fold"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="on CPU: return freed memory to the OS at once (steps about 25%% slower, less resident memory)",
    )


def run(args: argparse.Namespace) -> int:
    from sap.cli import config_from_args
    from sap.finetune import run_finetune

    cfg = config_from_args(args)
    result = run_finetune(
        cfg,
        args.init,
        args.fold,
        pretrained=args.pretrained,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
        keep_memory=not args.low_memory,
    )
    final = ", ".join(
        f"{k} {v:.4f}"
        for k, v in result.final_metrics.items()
        if k in ("val_f2", "val_sensitivity", "val_dice")
    )
    print(
        f"sap finetune {result.summary['method']} fold {args.fold}: {result.steps} steps in {result.seconds:.1f} s, "
        f"best at step {result.best_step}"
        + (f" ({final})" if final else "")
        + f"; outputs in {result.out_dir}"
    )
    return 0
