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


def one_run(out: Path, threads: int) -> tuple[float, dict[str, float]]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sap.cli", "demo", "--out", str(out), "--no-progress"], check=True, env=env)
    total = time.perf_counter() - t0
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    # durations of every step of this invocation, as shown by the progress display
    return total, manifest.get("extra", {}).get("last_invocation_s", {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of runs (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads")
    parser.add_argument("--keep", default=None, help="keep the last run's output in this folder")
    args = parser.parse_args()
    totals = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.keep) if args.keep and i == args.runs - 1 else Path(tmp) / "demo"
            total, steps = one_run(out, args.threads)
        totals.append(total)
        print(f"run {i + 1}: {total:.0f} s")
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
