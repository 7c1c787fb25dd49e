"""Benchmark `sap synth`: wall time of a whole cohort, against the floor of writing its files.

    python benchmarks/bench_synth.py --preset demo --workers 2 --runs 3
    taskset -c 0,1 python benchmarks/bench_synth.py ...      # pin to two cores

Rows (median of ``--runs`` runs each, same process, same machine):

* ``make_cohort`` with ``--workers`` processes (what ``sap synth`` does, progress bar off);
* ``make_cohort`` with one process;
* the floor: writing the same images and labels again with :func:`sap.data.io.write_image`
  (gzip-compressed NIfTI), one process: the part of the time no synthesis speed-up removes.

The acceptance target (issue 2) is ``--preset demo`` in at most 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sap.data.io import read_image, write_image
from sap.data.synth import make_cohort


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="demo", help="cohort preset")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the main row")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (the median is reported)")
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows: dict[str, list[float]] = {f"make_cohort, {args.workers} workers": [], "make_cohort, 1 worker": [], "floor: write the same files": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for run in range(args.runs):
            out = root / f"w{run}"
            rows[f"make_cohort, {args.workers} workers"].append(
                _timed(lambda out=out: make_cohort(out, preset=args.preset, workers=args.workers, progress=False))
            )
            rows["make_cohort, 1 worker"].append(
                _timed(lambda run=run: make_cohort(root / f"s{run}", preset=args.preset, workers=1, progress=False))
            )
        files = sorted(p for p in (root / "w0").rglob("*.nii.gz"))
        images = [(read_image(p), p.relative_to(root / "w0")) for p in files]
        for run in range(args.runs):
            target = root / f"floor{run}"
            rows["floor: write the same files"].append(
                _timed(lambda target=target: [write_image(im.array, im.geometry, target / rel) for im, rel in images])
            )
    print(f"machine: {platform.processor() or platform.machine()}, {cpus} usable CPUs, Python {platform.python_version()}")
    print(f"preset {args.preset}: {len(files)} image files\n")
    print("| row | median s | runs (s) |\n|---|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {statistics.median(times):.1f} | {', '.join(f'{t:.1f}' for t in times)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
