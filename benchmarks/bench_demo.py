"""Wall time of ``sap demo`` from nothing (SPEC §10 budget: at most 15 minutes on a 2-core CPU).

Run pinned to two cores, e.g. ``taskset -c 0,1 python benchmarks/bench_demo.py --runs 1``. Each
run starts from an empty folder (synth included) in a fresh process with the GPU hidden; prints
the total and the per-step times recorded in ``run/manifest.json`` (``extra.last_invocation_s``), with
the SPEC budgets beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = {"pretrain": 90, "finetune": 30, "predict+finalize": 180, "report": 90, "total": 900}


def one_run(out: Path, threads: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sap.cli", "demo", "--out", str(out), "--seed", str(seed), "--no-progress"],
                   check=True, env=env)
    total = time.perf_counter() - t0
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    # durations of every step of this invocation, as shown by the progress display
    return total, manifest.get("extra", {}).get("last_invocation_s", {})


def _sensitivity_at(fppi: list[float], sensitivity: list[float], at: float) -> float:
    import numpy as np

    from sap.metrics.froc import FrocCurve, sensitivity_at

    return sensitivity_at(FrocCurve(np.asarray(fppi, float), np.asarray(sensitivity, float)), at)


def demo_targets(out: Path) -> list[str]:
    """Issue 12's targets read from a finished demo: per method the pooled values at the tuned
    threshold, FROC-AUC(>= V) against the reference detector, sensitivity at 1 FPPI, and the
    training-loss drop (mean of the first 10 steps vs the last 10, every fold); the skeletal Dice."""
    import numpy as np
    import pandas as pd

    run = out / "run"
    lines = []
    skeletal = run / "pretrain" / "skeletal" / "summary.json"
    if skeletal.is_file():
        final = json.loads(skeletal.read_text()).get("final", {})
        lines.append(f"skeletal: whole-skeleton Dice {final.get('val_skeleton_dice', float('nan')):.3f}, "
                     f"mean class Dice {final.get('val_mean_class_dice', float('nan')):.3f}")
    for method in ("baseline", "ssl", "sap", "reference"):
        evaluation = run / method / "evaluation"
        if not (evaluation / "summary.json").is_file():
            continue
        summary = json.loads((evaluation / "summary.json").read_text())
        patients = pd.read_csv(evaluation / "patients.csv")
        froc, froc_large = summary["froc"], summary["froc_1ml"]
        drops = []
        for log in sorted((run / method).glob("fold_*/log.csv")):
            loss = pd.read_csv(log)["loss"].to_numpy(float)
            drops.append(1 - np.mean(loss[-10:]) / np.mean(loss[:10]))
        lines.append(
            f"{method}: pooled sens>=V {summary.get('pooled_sensitivity_1ml')}, mean FP>=V "
            f"{summary.get('mean_fp_1ml')}, mean FP any {patients['fp'].mean():.2f}, "
            f"FROC-AUC>=V {froc_large.get('auc', float('nan')):.2f}, sens@1FPPI "
            f"{_sensitivity_at(froc['fppi'], froc['sensitivity'], 1.0):.2f}, "
            f"loss drop {', '.join(f'{d:.0%}' for d in drops) or '-'}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of runs (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads")
    parser.add_argument("--keep", default=None, help="keep the last run's output in this folder")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated demo seeds, one run each (overrides --runs; default: seed 0)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0] * args.runs
    totals = []
    for i, seed in enumerate(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            keep = Path(args.keep) / f"seed{seed}" if args.seeds and args.keep else Path(args.keep or ".")
            out = keep if args.keep and (args.seeds or i == len(seeds) - 1) else Path(tmp) / "demo"
            total, steps = one_run(out, args.threads, seed)
            targets = demo_targets(out)
        totals.append(total)
        print(f"run {i + 1} (seed {seed}): {total:.0f} s")
        for line in targets:
            print(f"  {line}")
        groups: dict[str, float] = {}
        for key, seconds in steps.items():
            kind = key.split()[0]
            groups[kind] = groups.get(kind, 0.0) + seconds
            print(f"  {key:45s} {seconds:8.1f} s")
        print("  per kind: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(groups.items())))
    print(f"median of {len(totals)}: {statistics.median(totals):.0f} s (budget {BUDGET_S['total']} s); runs: "
          + ", ".join(f"{t:.0f}" for t in totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
