"""Benchmark of ``sap evaluate`` (SPEC §12, evaluation bullet).

Three synthetic whole-body cases of 448×448×460 voxels (≈ 92 M, 1×1×2 mm) with 60 lesions each
(log-normal volumes, median 0.5 mL), probability maps = perturbed lesions with soft edges, some
weak (missed) lesions and false positives, written as .nii.gz to a temporary folder outside the
repository (reused across runs). Timed, interleaved, ``--runs`` times:

* floor: a process that reads both volumes of every case with ``sap.data.io.read_source_array``
  (the reader ``sap evaluate`` uses: no reorientation copy) and labels each once with cc3d
  (ground truth > 0, prediction ≥ t);
* ``sap evaluate`` as a whole process (E1–E8 at one threshold, candidate-mode FROC), and the
  in-memory API (``sap.metrics.evaluate_case`` + ``summarize`` on arrays already loaded);
* panoptica (its own venv; see ``evaluate_panoptica_peer.py``) as a whole process on the same
  files: any-overlap many-to-one matching, instance Dice and NSD.

Usage:
    python benchmarks/bench_evaluate.py [--scale 1.0] [--runs 3] [--workers 1]
        [--data /tmp/sap_bench_evaluate] [--panoptica-python /tmp/panoptica_env/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASE_SHAPE = (448, 448, 460)
SPACING = (1.0, 1.0, 2.0)
N_CASES = 3
N_LESIONS = 60
N_FALSE_POSITIVES = 15


def _blob(shape, center, radii_vox, rng):
    """Crop slices and the normalised squared radius d² of an ellipsoid around ``center``."""
    lo = np.maximum(np.floor(center - 1.3 * radii_vox).astype(int), 0)
    hi = np.minimum(np.ceil(center + 1.3 * radii_vox).astype(int) + 1, shape)
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii_vox, strict=True))
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), d2


def make_case(shape, seed):
    """One synthetic case: (probability map float32, lesion mask uint8)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    prob = np.zeros(shape, np.float32)
    spacing = np.asarray(SPACING)
    margin = np.array([20, 20, 12])
    for _ in range(N_LESIONS):
        volume_ml = float(np.clip(rng.lognormal(np.log(0.5), 1.0), 0.03, 20.0))
        radius_mm = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        radii = radius_mm / spacing * rng.uniform(0.75, 1.3, 3)
        center = rng.uniform(margin, np.asarray(shape) - margin)
        box, d2 = _blob(shape, center, radii, rng)
        gt[box] |= (d2 <= 1.0).astype(np.uint8)
        # prediction: shifted, rescaled, soft-edged; 15 % weak (found only as FROC candidates)
        peak = rng.uniform(0.55, 0.99) if rng.random() > 0.15 else rng.uniform(0.1, 0.45)
        p_center = center + rng.normal(0, 0.8, 3)
        box, d2 = _blob(shape, p_center, radii * rng.uniform(0.85, 1.2), rng)
        value = (peak * (1 - 0.6 * d2)).astype(np.float32)
        value[d2 > 1.2] = 0
        np.maximum(prob[box], value, out=prob[box])
    for _ in range(N_FALSE_POSITIVES):
        radii = rng.uniform(1.5, 5.0) / spacing
        center = rng.uniform(margin, np.asarray(shape) - margin)
        box, d2 = _blob(shape, center, radii, rng)
        value = (rng.uniform(0.3, 0.9) * (1 - 0.6 * d2)).astype(np.float32)
        value[d2 > 1.2] = 0
        np.maximum(prob[box], value, out=prob[box])
    return prob, gt


def generate(folder: Path, scale: float) -> tuple[Path, Path]:
    """Write (or reuse) the cases; returns (pred dir, gt dir)."""
    from sap.data.io import make_geometry, write_image

    shape = tuple(int(round(s * scale)) for s in BASE_SHAPE)
    pred_dir, gt_dir = folder / "pred", folder / "gt"
    stamp = folder / "stamp.json"
    params = {"shape": shape, "spacing": SPACING, "cases": N_CASES, "lesions": N_LESIONS, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(params)):
        return pred_dir, gt_dir
    geometry = make_geometry(shape, SPACING)  # type: ignore[arg-type]
    for c in range(N_CASES):
        prob, gt = make_case(shape, seed=c)
        write_image(prob, geometry, pred_dir / f"case{c}_prob.nii.gz")
        write_image(gt, geometry, gt_dir / f"case{c}.nii.gz")
        print(f"generated case{c} {shape}", file=sys.stderr)
    stamp.write_text(json.dumps(params))
    return pred_dir, gt_dir


FLOOR_CODE = """
import sys, cc3d
from pathlib import Path
from sap.data.io import read_source_array
pred_dir, gt_dir, t = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
for gt_path in sorted(gt_dir.glob('*.nii.gz')):
    case = gt_path.name[:-7]
    gt = read_source_array(gt_path)[0].T
    prob = read_source_array(pred_dir / f"{case}_prob.nii.gz")[0].T
    cc3d.connected_components(gt > 0, connectivity=26)
    cc3d.connected_components(prob >= t, connectivity=26)
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return elapsed, done.stdout


def in_memory(pred_dir: Path, gt_dir: Path) -> float:
    """Seconds of ``evaluate_case`` × 3 + ``summarize`` on arrays already in memory."""
    from sap.evaluate.api import find_case_pairs, load_pair
    from sap.metrics import EvaluationSettings, evaluate_case, summarize

    cases = [(pair.case_id, *load_pair(pair)) for pair in find_case_pairs(pred_dir, gt_dir)]
    start = time.perf_counter()
    settings = EvaluationSettings()
    results = [evaluate_case(p, g, s, settings, case_id=c) for c, p, g, s in cases]
    summarize(results, settings)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description="benchmark sap evaluate against panoptica and the cc3d floor"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="linear scale of the 448×448×460 grid")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma list of sap evaluate --workers values to time")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "sap_bench_evaluate"))
    parser.add_argument("--panoptica-python", default="/tmp/panoptica_env/bin/python")
    parser.add_argument("--skip-panoptica", action="store_true")
    args = parser.parse_args()

    folder = Path(args.data) / f"scale_{args.scale:g}"
    pred_dir, gt_dir = generate(folder, args.scale)
    out_dir = folder / "eval_out"
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    workers = [int(w) for w in args.workers.split(",")]
    times: dict[str, list[float]] = {"floor": [], **{f"sap_w{w}": [] for w in workers},
                                     "sap_in_memory": [], "panoptica": []}
    peer_counts = ""
    for run in range(args.runs):
        t, _ = timed([sys.executable, "-c", FLOOR_CODE, str(pred_dir), str(gt_dir), "0.5"], env)
        times["floor"].append(t)
        for w in workers:
            command = [sys.executable, "-m", "sap.evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir),
                       "--out", str(out_dir), "--overwrite", "--no-progress", "--workers", str(w)]
            times[f"sap_w{w}"].append(timed(command, env)[0])
        times["sap_in_memory"].append(in_memory(pred_dir, gt_dir))
        if not args.skip_panoptica:
            t, peer_counts = timed(
                [
                    args.panoptica_python,
                    str(here / "evaluate_panoptica_peer.py"),
                    "--pred",
                    str(pred_dir),
                    "--gt",
                    str(gt_dir),
                ],
                env,
            )
            times["panoptica"].append(t)
        print(
            f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
            file=sys.stderr,
        )

    med = {k: statistics.median(v) for k, v in times.items() if v}
    shape = tuple(int(round(s * args.scale)) for s in BASE_SHAPE)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}; grid {shape} ({np.prod(shape) / 1e6:.1f} M voxels), "
        f"{N_CASES} cases × {N_LESIONS} lesions; median of {args.runs} runs"
    )
    print("| what | median s | runs s | this / floor | panoptica / this |")
    print("|---|---|---|---|---|")
    rows = [("floor", "floor: read both volumes + cc3d once (process)")]
    rows += [(f"sap_w{w}", f"`sap evaluate --workers {w}`, whole process") for w in workers]
    rows += [("sap_in_memory", "sap.metrics in-memory API (evaluate_case × 3 + summarize)"),
             ("panoptica", "panoptica 2.1.7 (own venv), whole process")]
    for key, label in rows:
        if key in med:
            ratio = med["panoptica"] / med[key] if "panoptica" in med else float("nan")
            runs = ", ".join(f"{v:.1f}" for v in times[key])
            print(f"| {label} | {med[key]:.1f} | {runs} | {med[key] / med['floor']:.2f}× | {ratio:.1f}× |")
    summary = json.loads((out_dir / "summary.json").read_text())
    patients = (out_dir / "patients.csv").read_text().splitlines()
    print("\nsap per case (case, n_gt, n_pred, detected, fp):")
    for line in patients[1:]:
        print("  " + ",".join(line.split(",")[:5]))
    print(f"sap pooled sensitivity {summary['pooled_sensitivity']:.3f}, froc_score {summary['froc_score']}")
    if peer_counts:
        print(
            "panoptica per case:\n  "
            + "\n  ".join(line for line in peer_counts.splitlines() if line.startswith("{"))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
