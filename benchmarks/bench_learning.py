"""Fine-tuning learning curves: does each initialisation learn, and how fast? (issue 12)

For each init (scratch, ssl, sap) the real stage, ``sap.finetune.run_finetune``, fine-tunes one
fold of a cohort for ``--steps`` optimiser steps and validates every ``--val-every`` steps on its
validation exams (sliding window, per-case sensitivity and F2 at threshold 0.5, voxel Dice); the
curve is read back from the stage's ``log.csv``. Pretraining (skeletal for sap, SSL for ssl) runs
first when the run folder lacks it.

The peer, in the same run, is a plain MONAI loop on the same training exams: the same Swin UNETR
built from scratch (MONAI's head initialisation), ``DiceCELoss(include_background=False)`` with
MONAI's default smoothing, AdamW at ``finetune.lr_scratch`` with no schedule, and patches from
``RandCropByPosNegLabeld`` (pos 1 : neg 1), validated by the same function on the same exams at
the same steps.

Usage (the numbers in BENCHMARKS.md)::

    sap synth --preset demo --seed 3 --out COHORT
    python benchmarks/bench_learning.py --cohort COHORT --run RUN --config configs/demo.yaml \\
        --steps 80 --val-every 20 --out learning.json --plot learning.png

Extra config changes go through ``--set key=value`` (as for the commands).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _curve_from_log(log_csv: Path) -> dict:
    import pandas as pd

    log = pd.read_csv(log_csv)
    val = log.dropna(subset=["val_f2"]) if "val_f2" in log else log.iloc[0:0]
    losses = log["loss"].to_numpy(float)
    n = min(10, max(1, len(losses) // 2))
    return {
        "step": val["step"].astype(int).tolist(),
        "sensitivity": val["val_sensitivity"].astype(float).tolist(),
        "f2": val["val_f2"].astype(float).tolist(),
        "dice": val["val_dice"].astype(float).tolist(),
        "fp": val["val_fp"].astype(float).tolist(),
        "loss_first": float(np.mean(losses[:n])),
        "loss_last": float(np.mean(losses[-n:])),
    }


def run_stage_curves(cfg, inits: list[str], fold: int) -> dict[str, dict]:
    from sap.finetune import run_finetune
    from sap.pretrain import run_pretrain

    curves = {}
    for init in inits:
        if init in ("ssl", "sap"):
            stage = "skeletal" if init == "sap" else "ssl"
            if not (Path(cfg.out) / "pretrain" / stage / "best.pt").is_file():
                t0 = time.perf_counter()
                run_pretrain(cfg, stage, overwrite=True, progress=False)
                print(f"pretrain {stage}: {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        result = run_finetune(cfg, init, fold, overwrite=True, progress=False)
        curve = _curve_from_log(result.out_dir / "log.csv")
        curve["seconds"] = time.perf_counter() - t0
        curves[init] = curve
        print(f"{init}: {curve}")
    return curves


def run_peer_curve(cfg, fold: int) -> dict:
    """A plain MONAI loop on the stage's training exams, validated like the stage."""
    import torch
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld

    from sap.finetune.train import load_fold_data, validate_lesions
    from sap.models.swin import build_swin_unetr

    f = cfg.finetune
    data = load_fold_data(cfg, fold, progress=False)
    torch.manual_seed(f.seed)
    model = build_swin_unetr(cfg.model, len(data.channels), 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=f.lr_scratch, weight_decay=f.weight_decay)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    crop = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=cfg.model.patch_size,
                                  pos=1, neg=1, num_samples=f.batch_size, allow_smaller=True)
    crop.set_random_state(f.seed)
    rng = np.random.default_rng(f.seed)
    items = []
    for case in data.train:
        label = np.asarray(case.lesions if case.lesions is not None else np.zeros(case.shape, np.uint8))[None]
        items.append({"image": np.asarray(case.image), "label": label.astype(np.uint8)})
    curve: dict = {"step": [], "sensitivity": [], "f2": [], "dice": [], "fp": []}
    losses = []
    started = time.perf_counter()
    device = torch.device("cpu")
    for step in range(1, f.max_steps + 1):
        model.train()
        patches = crop(items[int(rng.integers(len(items)))])
        image = torch.stack([torch.as_tensor(np.asarray(p["image"])) for p in patches]).float()
        label = torch.stack([torch.as_tensor(np.asarray(p["label"])) for p in patches]).long()
        loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % f.val_every_steps == 0 or step == f.max_steps:
            model.eval()
            values = validate_lesions(model, data.val, cfg, device)
            curve["step"].append(step)
            for key in ("sensitivity", "f2", "dice", "fp"):
                curve[key].append(values[f"val_{key}"])
    n = min(10, max(1, len(losses) // 2))
    curve["loss_first"] = float(np.mean(losses[:n]))
    curve["loss_last"] = float(np.mean(losses[-n:]))
    curve["seconds"] = time.perf_counter() - started
    print(f"peer: {curve}")
    return curve


def markdown_table(curves: dict[str, dict]) -> str:
    steps = sorted({s for c in curves.values() for s in c["step"]})
    head = "| step | " + " | ".join(f"{name} sens / F2 / Dice" for name in curves) + " |"
    rule = "|---|" + "---|" * len(curves)
    rows = []
    for s in steps:
        cells = []
        for c in curves.values():
            if s in c["step"]:
                i = c["step"].index(s)
                cells.append(" / ".join("–" if not math.isfinite(c[k][i]) else f"{c[k][i]:.2f}"
                                        for k in ("sensitivity", "f2", "dice")))
            else:
                cells.append("")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    loss = "| loss first 10 → last 10 | " + " | ".join(
        f"{c['loss_first']:.3f} → {c['loss_last']:.3f}" for c in curves.values()) + " |"
    secs = "| wall s | " + " | ".join(f"{c['seconds']:.0f}" for c in curves.values()) + " |"
    return "\n".join([head, rule, *rows, loss, secs])


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for name, c in curves.items():
        for ax, key in zip(axes, ("sensitivity", "f2", "dice"), strict=True):
            ax.plot(c["step"], c[key], marker="o", label=name)
    for ax, key in zip(axes, ("validation sensitivity", "validation F2", "validation voxel Dice"), strict=True):
        ax.set_xlabel("optimiser step")
        ax.set_title(key)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--run", required=True, help="run folder (pretraining reused when present)")
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "demo.yaml"))
    parser.add_argument("--inits", default="scratch,ssl,sap")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--val-every", type=int, default=20)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--from-run", action="store_true",
                        help="read the inits' curves from RUN/{method}/fold_F/log.csv of a finished run "
                             "(e.g. a sap demo with the same settings) instead of fine-tuning again")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="learning.json")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)

    from sap.cli import config_from_args

    overrides = [*args.set, f"finetune.max_steps={args.steps}", f"finetune.val_every_steps={args.val_every}"]
    cfg = config_from_args(argparse.Namespace(config=args.config, overrides=overrides, data=args.cohort,
                                              out=args.run))
    inits = [i for i in args.inits.split(",") if i]
    if args.from_run:
        method_of = {"scratch": "baseline", "ssl": "ssl", "sap": "sap"}
        curves = {}
        for init in inits:
            log = Path(args.run) / method_of[init] / f"fold_{args.fold}" / "log.csv"
            curves[init] = _curve_from_log(log)
            curves[init]["seconds"] = json.loads((log.parent / "summary.json").read_text()).get("seconds", float("nan"))
    else:
        curves = run_stage_curves(cfg, inits, args.fold)
    if not args.no_peer:
        curves["MONAI peer (scratch)"] = run_peer_curve(cfg, args.fold)
    import torch

    result = {
        "command": "python benchmarks/bench_learning.py " + " ".join(argv if argv is not None else []),
        "commit": _commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "cohort": str(args.cohort),
        "overrides": overrides,
        "curves": curves,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(curves))
    if args.plot:
        plot(curves, Path(args.plot), f"fold {args.fold}, {Path(args.cohort).name}, commit {result['commit']}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
