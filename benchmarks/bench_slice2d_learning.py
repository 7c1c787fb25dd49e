"""2D slice U-Net learning curves: validation lesion Dice against step and CPU-seconds (issue 12).

``sap`` is the real training loop, :func:`sap.slice2d.train.fit`, on the slices ``sap slice2d
train`` reads (patient-level split, the config's slice filter, bone window), with the U-Net of
``create_model``. Its validation hook is wrapped so that every validation point records, with the
same function for every recipe and every sap version:

* ``dice``: the mean per-slice Dice of SPEC §11 (slices where both masks are empty are left out;
  a prediction on a lesion-free slice scores 0), what ``log.csv`` calls ``val_dice``;
* ``dice_pooled``: one Dice over every pixel of the validation slices (the lesion foreground of
  the validation set as a whole);
* ``cpu_s``: CPU-seconds of the training process since the first step, validation excluded
  (``time.process_time``; run with one thread).

The peer, in the same process on the same slices, is a plain MONAI loop: ``BasicUNet``
(features 16-32-64-128-128-16, 2 classes), ``DiceCELoss(to_onehot_y=True, softmax=True)`` with
MONAI's defaults, Adam at 1e-3 without schedule, batches from one shuffled order of the training
slices, no augmentation, the same image size and batch size (``--peer-loss batch`` swaps in
nnU-Net's batch Dice over the foreground channel).

The "before" curve is this script run against an older sap: export that commit
(``git archive COMMIT | tar -x -C DIR``) and run with ``PYTHONPATH=DIR``; the JSON records which
sap it measured. ``--report A.json B.json`` prints the Markdown tables of several result files.

    sap synth --preset demo --modality ct --out /tmp/ct_demo
    OMP_NUM_THREADS=1 python benchmarks/bench_slice2d_learning.py --data /tmp/ct_demo --config demo \\
        --steps 1500 --every 100 --runs 3 --recipes sap,peer --out after.json
    python benchmarks/bench_slice2d_learning.py --report before.json after.json --plot curves.png

``--plot`` draws the per-slice Dice of every result file against CPU-seconds, one panel per
cohort, with the target (0.5) and the 5-CPU-minute budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def commit_of(path: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=path, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sap/slice2d", "sap/configs", "sap/config.py"],
            capture_output=True, text=True, cwd=path, check=True,
        )  # fmt: skip
        changed = [line[3:] for line in dirty.stdout.splitlines()]
        return out.stdout.strip() + (f" + uncommitted {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def scores(probs: list[np.ndarray], masks: list[np.ndarray], threshold: float = 0.5) -> dict[str, float]:
    """Mean per-slice Dice (SPEC §11 empty-slice rule) and the pooled Dice of a slice set."""
    from sap.slice2d.metrics import score_slice, summarise

    per_slice, inter, total = [], 0, 0
    lesion_slice_dice, false_positive_slices = [], 0
    for p, m in zip(probs, masks, strict=True):
        pred, gt = p >= threshold, m > 0
        score = score_slice(pred, gt, distances=False)
        per_slice.append(score)
        if gt.any():
            lesion_slice_dice.append(score.dice)
        elif pred.any():
            false_positive_slices += 1
        inter += int(np.count_nonzero(pred & gt))
        total += int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return {
        "dice": summarise(per_slice)["dice"],
        "dice_pooled": 2.0 * inter / total if total else math.nan,
        # where the per-slice Dice is lost: the lesion slices' own mean, and lesion-free slices
        # with a false positive (each scores 0)
        "dice_lesion_slices": float(np.mean(lesion_slice_dice)) if lesion_slice_dice else math.nan,
        "fp_slices": false_positive_slices,
    }


def without_small_components(probs: list[np.ndarray], threshold: float, min_pixels: int) -> list[np.ndarray]:
    """Predictions with every 8-connected component of fewer than ``min_pixels`` pixels removed
    (as probability 0), so :func:`scores` at the same threshold scores the filtered masks."""
    from scipy import ndimage

    out = []
    for p in probs:
        labels, n = ndimage.label(p >= threshold, structure=np.ones((3, 3), dtype=bool))
        if n:
            small = np.flatnonzero(np.bincount(labels.ravel())[1:] < min_pixels) + 1
            p = np.where(np.isin(labels, small), 0.0, p)
        out.append(p)
    return out


def min_pixels_sweep(probs: list[np.ndarray], masks: list[np.ndarray], threshold: float, sizes: tuple[int, ...] = (2, 3, 5)) -> dict[str, float]:
    """Per-slice Dice after removing predicted components below each size (free: no extra training)."""
    return {f"dice_min{k}": scores(without_small_components(probs, threshold, k), masks, threshold)["dice"] for k in sizes}


def threshold_sweep(probs: list[np.ndarray], masks: list[np.ndarray], thresholds: tuple[float, ...] = (0.3, 0.4, 0.6, 0.7)) -> dict[str, float]:
    """Per-slice Dice of the same predictions at other thresholds (free: no extra training)."""
    return {f"dice_t{t:g}": scores(probs, masks, t)["dice"] for t in thresholds}


class Clock:
    """Training CPU-seconds: process time since start, minus the time spent validating."""

    def __init__(self) -> None:
        self.start = time.process_time()
        self.excluded = 0.0

    def now(self) -> float:
        return time.process_time() - self.start - self.excluded


def run_sap(cfg, train, val, seed: int, steps: int, every: int) -> list[dict]:
    import torch

    import sap.slice2d.train as T

    settings = replace(cfg.slice2d, seed=seed, max_steps=steps, val_every_steps=every)
    torch.manual_seed(seed)
    model, spec = T.create_model("unet", settings)
    curve: list[dict] = []
    clock = Clock()
    step = {"n": 0}
    real_step, real_validate = T.batch_loss, T.validate

    def counting_step(*a, **k):
        step["n"] += 1
        return real_step(*a, **k)

    def recording_validate(model, kind, val_set, size, threshold, device):
        t0, cpu = time.process_time(), clock.now()
        probs = T.predict_slices(model, kind, val_set.images, size, device=device)
        point = {"step": step["n"], "cpu_s": cpu, **scores(probs, val_set.masks, threshold), **threshold_sweep(probs, val_set.masks), **min_pixels_sweep(probs, val_set.masks, threshold)}
        curve.append(point)
        print(json.dumps({"recipe": "sap", "seed": seed, **point}), flush=True)
        clock.excluded += time.process_time() - t0
        return {"dice": point["dice"], "iou": math.nan, "dice_pooled": point["dice_pooled"]}

    T.validate, T.batch_loss = recording_validate, counting_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clock.start = time.process_time()
            T.fit(model, spec, train, val, settings, Path(tmp), "lesions", progress=False)
    finally:
        T.validate, T.batch_loss = real_validate, real_step
    return curve


def run_peer(cfg, train, val, seed: int, steps: int, every: int, loss_kind: str) -> list[dict]:
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    from sap.slice2d.train import predict_slices, to_batch

    s = cfg.slice2d
    torch.manual_seed(seed)
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(16, 32, 64, 128, 128, 16))
    if loss_kind == "batch":
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(train)), 0
    curve: list[dict] = []
    clock = Clock()
    for step in range(1, steps + 1):
        if cursor + s.batch_size > len(order):
            order, cursor = rng.permutation(len(train)), 0
        idx = order[cursor : cursor + s.batch_size]
        cursor += s.batch_size
        x, y = to_batch([train.images[i] for i in idx], [train.masks[i] for i in idx], s.image_size)
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            t0, cpu = time.process_time(), clock.now()
            probs = predict_slices(model, "unet", val.images, s.image_size)
            point = {"step": step, "cpu_s": cpu, **scores(probs, val.masks, s.threshold), **threshold_sweep(probs, val.masks), **min_pixels_sweep(probs, val.masks, s.threshold)}
            curve.append(point)
            print(json.dumps({"recipe": f"peer-{loss_kind}", "seed": seed, **point}), flush=True)
            clock.excluded += time.process_time() - t0
    return curve


def measure(args: argparse.Namespace) -> dict:
    import torch

    import sap
    from sap.config import load_config
    from sap.slice2d.train import load_slice_sets

    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data.root={args.data}", *args.set])
    train, val, split = load_slice_sets(cfg, "lesions", progress=False)
    sap_dir = Path(sap.__file__).resolve().parents[1]
    result = {
        "label": args.label,
        "command": "python benchmarks/bench_slice2d_learning.py " + " ".join(args.argv),
        "sap": str(sap_dir),
        "commit": commit_of(sap_dir),
        "machine": machine(),
        "config": args.config,
        "overrides": args.set,
        "slice2d": {k: getattr(cfg.slice2d, k) for k in ("image_size", "batch_size", "unet_lr", "unet_base_filters", "unet_max_filters", "slice_filter", "augment")},
        "data": {
            "root": str(args.data),
            "n_train": len(train),
            "n_train_lesion": sum(bool(m.any()) for m in train.masks),
            "n_val": len(val),
            "n_val_lesion": sum(bool(m.any()) for m in val.masks),
            "val_lesion_pixels": int(sum(int(m.sum()) for m in val.masks)),
            "split": split,
        },
        "steps": args.steps,
        "every": args.every,
        "curves": {},
    }
    print(json.dumps({k: result[k] for k in ("sap", "commit", "machine", "data")}), flush=True)
    for recipe in args.recipes.split(","):
        runs = []
        for r in range(args.runs):
            seed = args.seed + r
            if recipe == "sap":
                runs.append(run_sap(cfg, train, val, seed, args.steps, args.every))
            elif recipe == "peer":
                runs.append(run_peer(cfg, train, val, seed, args.steps, args.every, args.peer_loss))
            else:
                raise SystemExit(f"unknown recipe {recipe!r}")
        name = recipe if recipe == "sap" else f"peer-{args.peer_loss}"
        result["curves"][name] = runs
    return result


# ----------------------------------------------------------------------------------- report
def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _first_reaching(runs: list[list[dict]], key: str, level: float) -> str:
    hits = []
    for curve in runs:
        hit = next((p for p in curve if p[key] >= level), None)
        hits.append(hit)
    reached = [h for h in hits if h is not None]
    if len(reached) * 2 <= len(runs):
        return f"not reached ({len(reached)}/{len(runs)} runs)"
    steps = sorted(h["step"] for h in reached) + [math.inf] * (len(runs) - len(reached))
    cpus = sorted(h["cpu_s"] for h in reached) + [math.inf] * (len(runs) - len(reached))
    return f"step {statistics.median(steps):g}, {statistics.median(cpus):.0f} CPU-s ({len(reached)}/{len(runs)} runs)"


def report(results: list[dict]) -> str:
    lines = []
    for res in results:
        d = res["data"]
        lines += [
            f"**{res['label']}** — sap at `{res['commit']}` ({res['sap']}); {res['machine']}",
            "",
            f"`{res['command']}`",
            "",
            f"Config `{res['config']}` {' '.join(res['overrides'])}: {json.dumps(res['slice2d'])}. "
            f"Slices: {d['n_train']} training ({d['n_train_lesion']} with lesion), {d['n_val']} validation "
            f"({d['n_val_lesion']} with lesion, {d['val_lesion_pixels']} lesion pixels).",
            "",
            "| recipe | runs | step | CPU-s (median) | val Dice per slice, median [min–max] | val Dice pooled, median [min–max] |",
            "|---|---|---|---|---|---|",
        ]
        for name, runs in res["curves"].items():
            steps = sorted({p["step"] for c in runs for p in c})
            for s in steps:
                pts = [p for c in runs for p in c if p["step"] == s]
                dice = [p["dice"] for p in pts]
                pooled = [p["dice_pooled"] for p in pts]
                lines.append(
                    f"| {name} | {len(pts)} | {s} | {_median([p['cpu_s'] for p in pts]):.0f} | "
                    f"{_median(dice):.3f} [{min(dice):.3f}–{max(dice):.3f}] | {_median(pooled):.3f} [{min(pooled):.3f}–{max(pooled):.3f}] |"
                )
        lines.append("")
        for name, runs in res["curves"].items():
            best = [max((p["dice"] for p in c), default=math.nan) for c in runs]
            best_pooled = [max((p["dice_pooled"] for p in c), default=math.nan) for c in runs]
            lines.append(
                f"- {name}: best per-slice Dice, median of {len(runs)} runs {_median(best):.3f} "
                f"(pooled {_median(best_pooled):.3f}); per-slice Dice ≥ 0.5 first at: "
                f"{_first_reaching(runs, 'dice', 0.5)}; pooled ≥ 0.5 at: {_first_reaching(runs, 'dice_pooled', 0.5)}"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Per-slice validation Dice against training CPU-seconds, one panel per cohort (``data.root``);
    a curve per result file and recipe, each label in the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(res: dict, name: str) -> str:
        return res["label"] if name == "sap" else f"MONAI {name} (run of {res['label']})"

    labels = list(dict.fromkeys(label(res, name) for res in results for name in res["curves"]))
    colour = {name: plt.cm.tab10(k % 10) for k, name in enumerate(labels)}
    roots = list(dict.fromkeys(res["data"]["root"] for res in results))
    fig, axes = plt.subplots(1, len(roots), figsize=(4.2 * len(roots), 4.0), sharey=True, squeeze=False)
    for ax, root in zip(axes[0], roots, strict=True):
        for res in (r for r in results if r["data"]["root"] == root):
            for name, runs in res["curves"].items():
                for k, curve in enumerate(runs):
                    ax.plot([p["cpu_s"] for p in curve], [p["dice"] for p in curve], marker=".", color=colour[label(res, name)],
                            label=label(res, name) if k == 0 else None)  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.axvline(300, color="grey", lw=0.8, ls=":")
        ax.set_title(Path(root).name, fontsize=9)
        ax.set_xlabel("training CPU-seconds (1 thread)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("validation Dice per slice (SPEC §11)")
    fig.suptitle("2D U-Net on demo CT cohorts: dashed = target 0.5, dotted = 5 CPU-minutes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="CT cohort (sap synth --modality ct)")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42, help="training seed of the first run (+1 per run)")
    parser.add_argument("--recipes", default="sap,peer")
    parser.add_argument("--peer-loss", choices=("default", "batch"), default="default")
    parser.add_argument("--label", default="sap")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--report", nargs="+", type=Path, help="print the Markdown tables of result files and exit")
    parser.add_argument("--plot", type=Path, help="with --report: also draw the per-slice Dice curves to this PNG")
    args = parser.parse_args()
    if args.report:
        results = [json.loads(p.read_text()) for p in args.report]
        print(report(results))
        if args.plot:
            plot(results, args.plot)
        return
    if args.data is None:
        parser.error("--data is required")
    args.argv = sys.argv[1:]
    result = measure(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(report([result]))


if __name__ == "__main__":
    main()
