"""Benchmark of ``sap track``: seconds per exam pair at the demo and paper grid sizes (issue 16).

One follow-up pair per preset (patient 1 of seed 0, written once by ``sap.data.synth.followup``
into ``--data``, reused across runs) is tracked with the ground-truth masks through
:func:`sap.track.api.track`, outputs and report included, ``--runs`` times; the median is
reported, with the registration's own share (rigid + affine, and with ``--bspline`` the B-spline
stage).

Usage:
    python benchmarks/bench_track.py [--presets demo,paper] [--runs 3] [--bspline] [--data /tmp/sap_bench_track]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def pair_folder(data: Path, preset: str) -> tuple[Path, Path]:
    from sap.data.synth.cohort import plan_cohort
    from sap.data.synth.followup import pair_jobs, write_any
    from sap.data.synth.presets import get_preset

    root = data / preset
    done = root / "pair.json"
    if not done.is_file():
        job = [j for j in pair_jobs(plan_cohort(get_preset(preset), "mr", 0)) if j.group == "patients"][0]
        written = write_any(job, root)
        rows = "".join(f"{r['case_id']},{r['subject_id']}\n" for r in written["exams"])
        (root / "patients" / "subjects.csv").write_text("case_id,subject_id\n" + rows)
        done.write_text(json.dumps(written["pair"]))
    pair = json.loads(done.read_text())
    return root / "patients" / pair["baseline"], root / "patients" / pair["followup"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,paper")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bspline", action="store_true")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "sap_bench_track"))
    args = parser.parse_args(argv)

    from sap.track.api import TrackOptions, track
    from sap.track.register import RegistrationOptions

    options = TrackOptions(registration=RegistrationOptions(bspline=args.bspline), overwrite=True, progress=False)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for preset in args.presets.split(","):
        base, fu = pair_folder(Path(args.data), preset)
        totals, registrations = [], []
        with tempfile.TemporaryDirectory() as scratch:
            for _ in range(args.runs):
                start = time.perf_counter()
                result = track(base, fu, Path(scratch) / "out", options)
                totals.append(time.perf_counter() - start)
                registrations.append(result.summary["registration"]["seconds"])
        shape = "x".join(map(str, result.baseline.image.array.shape))
        print(f"{preset} ({shape}, {result.baseline.n}+{result.followup.n} lesions, bspline={args.bspline}): "
              f"median {statistics.median(totals):.1f} s per pair (registration {statistics.median(registrations):.1f} s); "
              f"runs {', '.join(f'{t:.1f}' for t in totals)}; bone Dice "
              f"{result.summary['registration']['skeleton_dice_before']:.3f} -> {result.summary['registration']['skeleton_dice_after']:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
