"""Demo-scale pretraining wall time (the ≤ 90 s budget of SPEC §10) and the skeletal Dice vs an
intensity-threshold baseline.

Runs the real command ``python -m sap.pretrain --config configs/demo.yaml --stage STAGE --data
COHORT --out RUN`` ``--repeats`` times per stage (each in a fresh run folder) and reports the
median wall time and CPU time (user + sys of the child). The peer, measured in the same run, is a
plain MONAI loop (SwinUNETR + DiceCELoss + AdamW on in-memory random patches) doing the same
number of optimiser steps at the same scale, so the table shows what the pipeline adds (data,
validation, checkpoints, logs). The skeletal rows also give the validation whole-skeleton Dice and
the intensity-threshold baseline on the same validation exams (from ``summary.json``).

    python benchmarks/bench_pretrain_demo.py --cohort COHORT [--stages skeletal,ssl] [--repeats 3]
        [--set pretrain.max_steps=300] [--json out.json]

Without ``--cohort`` a demo cohort is synthesised first (``sap synth --preset demo``). Pin the
cores yourself for the "2 CPU cores" figure: ``taskset -c 0,1 env OMP_NUM_THREADS=2
CUDA_VISIBLE_DEVICES= python benchmarks/bench_pretrain_demo.py …``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: str, cohort: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "sap.pretrain", "--config", str(REPO / "configs" / "demo.yaml"), "--stage", stage,
           "--data", str(cohort), "--out", str(out), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    cpu0, t0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "pretrain" / stage / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "summary": summary, "command": " ".join(cmd[1:])}


def peer_loop(steps: int, ssl: bool) -> float:
    """Plain MONAI loop, same scale and step count; returns wall seconds (in-process)."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    from sap.config import load_config

    demo = load_config(str(REPO / "configs" / "demo.yaml")).model  # the same network as the demo preset
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=2, out_channels=10, feature_size=demo.feature_size, num_heads=tuple(demo.num_heads))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batch = 4 if ssl else 1  # SSL: 2 crops x 2 views through the encoder
    x = torch.rand(batch, 2, 64, 64, 64)
    y = torch.randint(0, 10, (batch, 1, 64, 64, 64))
    start = time.perf_counter()
    for _ in range(steps):
        if ssl:
            loss = model.swinViT(x, True)[4].mean()
        else:
            loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=None, help="demo cohort (default: synthesise one)")
    parser.add_argument("--stages", default="skeletal,ssl", help="comma-separated stages to time")
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage (median reported)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip the plain MONAI loop")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sap_bench_pretrain_"))
    try:
        cohort = args.cohort
        if cohort is None:
            cohort = work / "cohort"
            subprocess.run([sys.executable, "-m", "sap.data.synth", "--preset", "demo", "--out", str(cohort)],
                           check=True, cwd=REPO)
        results = {"machine": f"{os.cpu_count()} CPUs visible, affinity {len(os.sched_getaffinity(0))} cores",
                   "threads": os.environ.get("OMP_NUM_THREADS", "default"), "stages": {}}
        print(results["machine"], "| OMP_NUM_THREADS", results["threads"], flush=True)
        for stage in args.stages.split(","):
            runs = [run_stage(stage, cohort, work / f"{stage}_{i}", args.overrides) for i in range(args.repeats)]
            walls = [r["wall_s"] for r in runs]
            row = {
                "median_wall_s": statistics.median(walls),
                "walls": walls,
                "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                "steps": runs[0]["summary"]["steps"],
                "command": runs[0]["command"],
                "summary": runs[0]["summary"],
            }
            if args.peer:
                peers = [peer_loop(row["steps"], stage == "ssl") for _ in range(args.repeats)]
                row["peer_median_wall_s"] = statistics.median(peers)
            results["stages"][stage] = row
            line = f"{stage}: {row['steps']} steps, median wall {row['median_wall_s']:.1f} s " \
                   f"(runs {', '.join(f'{w:.1f}' for w in walls)}), median CPU {row['median_cpu_s']:.1f} s"
            if args.peer:
                line += f"; plain MONAI loop, same steps: {row['peer_median_wall_s']:.1f} s"
            print(line, flush=True)
            final = row["summary"].get("final", {})
            if stage == "skeletal":
                base = row["summary"].get("intensity_threshold_baseline") or {}
                print(f"  whole-skeleton Dice (validation) {final.get('val_skeleton_dice')}, mean class Dice "
                      f"{final.get('val_mean_class_dice')}; threshold baseline {base.get('val_skeleton_dice')} "
                      f"(channel {base.get('channel')}, t {base.get('threshold')}, tuned on training exams)", flush=True)
            else:
                print(f"  validation SSL loss {final.get('val_loss')}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
