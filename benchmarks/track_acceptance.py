"""Acceptance of ``sap track`` on a ``sap synth --followup`` cohort (issue 16).

For every pair of the cohort: track with the ground-truth masks (``sap track --truth``), and,
with ``--model``, with masks predicted by that model (``sap track-infer``, the study layer),
then pool the scores over pairs (:func:`sap.track.truth.pool_scores`): F1 of correspondence
statements, accuracy of the correspondence and size-change fields, diameter errors.

Usage:
    python benchmarks/track_acceptance.py --cohort COHORT [--model BUNDLE] [--out scores.json]
        [--bspline] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="scores JSON (default: print only)")
    parser.add_argument("--bspline", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from sap.cv.track import infer_and_track
    from sap.track.api import TrackOptions, track
    from sap.track.register import RegistrationOptions
    from sap.track.truth import pool_scores

    cohort = Path(args.cohort)
    pairs = json.loads((cohort / "cohort.json").read_text())["followup"]
    options = TrackOptions(registration=RegistrationOptions(bspline=args.bspline), report=False, progress=False)
    results: dict[str, dict] = {}
    modes = ["gt"] + (["model"] if args.model else [])
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            scores, seconds = [], []
            for pair in pairs:
                base, fu = cohort / "patients" / pair["baseline"], cohort / "patients" / pair["followup"]
                start = time.perf_counter()
                if mode == "gt":
                    result = track(base, fu, None, options, truth=cohort)
                else:
                    result = infer_and_track(base, fu, Path(scratch) / pair["subject_id"], args.model, options,
                                             truth=cohort, device=args.device)
                seconds.append(time.perf_counter() - start)
                s = result.summary["truth"]
                scores.append(s)
                print(f"{mode} {pair['subject_id']}: F1 {s['f1']:.3f} corr {s['correspondence_accuracy']:.3f} "
                      f"size {s['size_change_accuracy']:.3f} found {s['n_found']}/{s['n_truth_lesions']} "
                      f"tracked {s['n_tracked_lesions']} bone Dice {result.summary['registration']['skeleton_dice_after']:.3f} "
                      f"({seconds[-1]:.1f} s)", flush=True)
            results[mode] = {**pool_scores(scores), "seconds_per_pair": seconds}
            print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "seconds_per_pair"}, indent=1))
    record = {"cohort": str(cohort), "model": args.model, "bspline": args.bspline, "results": results,
              "python": sys.version.split()[0]}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
