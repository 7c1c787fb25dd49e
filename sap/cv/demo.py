"""``sap demo``: synthetic cohort + the whole study + report at demo scale (SPEC §10).

At most 15 minutes on a 2-core CPU, and the models learn: about 2 minutes of skeletal pretraining,
six fine-tunes of 60 steps (≈ 75 s each), predictions, evaluation, t-SNE and report (measured
per stage in BENCHMARKS.md; settings and their deviations from the paper in docs/report.md). Re-running reuses every
finished step (the cohort too), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sap.config import load_config
from sap.cv.progress import Progress


def run_demo(out: str | Path = "sap-demo", seed: int = 0, overrides: list[str] | None = None,
             progress: bool = True, overwrite: bool = False) -> Path:
    """Write ``OUT/cohort`` (synthetic, demo preset), ``OUT/run`` (study + report) and
    ``OUT/models`` (one ensemble bundle per method); returns ``OUT``."""
    from sap.cv.study import run_study

    out = Path(out)
    cfg = load_config("demo", list(overrides or []))
    cohort = out / "cohort"
    cfg.data.root = str(cohort)
    cfg.out = str(out / "run")
    runner = Progress(enabled=progress, prefix="sap demo", done_before=1)
    t0 = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        if progress:
            from sap.cv.rundir import parse_methods
            from sap.run_layout import PRETRAIN_OF

            chosen = parse_methods(None, cfg.cv.methods)
            # the steps plan_tasks builds: pretraining, 2 per fold, finalize, t-SNE, report, export,
            # and the reference detector's prediction per fold and its finalize
            stages = (len({PRETRAIN_OF[m] for m in chosen} - {None}) + len(chosen) * (2 * (cfg.cv.k - 1) + 2)
                      + cfg.cv.k + int("ssl" in chosen and "sap" in chosen) + 1)
            print(f"sap demo [1/{stages + 1}] synth: demo cohort (9 patients, 6 healthy scans) | then: pretraining, "
                  "fine-tuning, prediction, evaluation, report", file=sys.stderr, flush=True)
        from sap.data.synth import make_cohort

        make_cohort(cohort, preset="demo", modality=cfg.data.modality, seed=seed, overwrite=True,
                    progress=progress)
    run_study(cfg, export=out / "models", progress=runner, overwrite=overwrite)
    if progress:
        print(f"sap demo: finished in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return out
