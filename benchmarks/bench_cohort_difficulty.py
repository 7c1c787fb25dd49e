"""What each difficulty feature of the study cohort does (issue 15, docs/cohort.md).

For each cohort variant (the same preset and seed with some difficulty features switched off,
``sap synth --difficulty``), through the study's own code (:class:`sap.cv.study.Study`):

* the non-learning reference detector predicts the tuning fold and one test fold;
* a model from scratch (method ``baseline``) is fine-tuned on that test fold's training folds
  (the tuning fold left out, ``cv.tuning_in_training=false``) with the config's budget and
  predicts the same exams;

and both are scored on those exams, none of which the model trained on (candidate-mode FROC, SPEC E8): large-lesion sensitivity at
1 false positive per exam and the large-lesion FROC-AUC. The same budget, split, seed and
training settings for every variant, so the difference between two rows is the feature.

Usage (the numbers in docs/cohort.md and BENCHMARKS.md)::

    for f in all none low_contrast marrow bone_mimics; do
        sap synth --preset study-cpu --seed 1 --difficulty $f --out /tmp/coh_$f   # all: omit --difficulty
    done
    python benchmarks/bench_cohort_difficulty.py --config configs/study-cpu.yaml \\
        --variant all=/tmp/coh_all --variant none=/tmp/coh_none ... --work /tmp/difficulty --out difficulty.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure_variant(name: str, cohort: Path, config: str, overrides: list[str], work: Path, fold: int,
                    train: bool) -> dict:
    from sap.config import load_config
    from sap.cv import stages
    from sap.cv.report import sensitivity_at_fppi
    from sap.cv.study import Study, evaluation_settings

    # the tuning fold stays out of training, so all 16 scored exams are held out
    cfg = load_config(config, ["cv.tuning_in_training=false", *overrides, f"data.root={cohort}", f"out={work / name}"])
    study = Study(cfg)
    cases = study.splits.tuning_cases() + study.splits.test_cases(fold)
    methods = ["reference"] + (["baseline"] if train else [])
    n_lesions = {r["case_id"]: r["n_lesions"] for r in json.loads((cohort / "cohort.json").read_text())["cases"]}
    row: dict = {"variant": name, "cohort": str(cohort), "fold": fold, "n_exams": len(cases),
                 "n_exams_with_lesions": sum(n_lesions[c] > 0 for c in cases)}
    for method in methods:
        t0 = time.perf_counter()
        if method != "reference":
            study.finetune(method, fold)
        study.predict(method, fold)
        pairs = []
        for case_id in cases:
            folder = (study.run.tuning_predictions(method, fold) if case_id in study.splits.tuning_cases()
                      else study.run.predictions(method))
            pairs.append((case_id, study.cases[case_id].lesions, folder / f"{case_id}_prob.nii.gz"))
        settings = evaluation_settings(cfg)
        _, summary = stages.evaluate_pairs(pairs, dict.fromkeys(cases, settings), settings,
                                           work / name / f"difficulty_{method}")
        large = summary.get("froc_1ml") or {}
        row[method] = {
            "sensitivity_large_at_1fppi": sensitivity_at_fppi(large, 1.0),
            "froc_auc_large": large.get("auc"),
            "sensitivity_all_at_1fppi": sensitivity_at_fppi(summary.get("froc") or {}, 1.0),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{name} {method}: {row[method]}", flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| cohort variant | reference: large sens. at 1 FP/exam | reference: large FROC-AUC | "
            "scratch: large sens. at 1 FP/exam | scratch: large FROC-AUC | scratch: all-lesion sens. at 1 FP/exam |")
    lines = [head, "|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "–" if v is None or v != v else f"{v:.2f}"

    for r in rows:
        ref, net = r["reference"], r.get("baseline", {})
        lines.append(f"| {r['variant']} | {f(ref['sensitivity_large_at_1fppi'])} | {f(ref['froc_auc_large'])} | "
                     f"{f(net.get('sensitivity_large_at_1fppi'))} | {f(net.get('froc_auc_large'))} | "
                     f"{f(net.get('sensitivity_all_at_1fppi'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "study-cpu.yaml"))
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=COHORT",
                        help="a cohort variant to measure (repeatable)")
    parser.add_argument("--work", required=True, help="folder for the run folders (one per variant)")
    parser.add_argument("--fold", type=int, default=1, help="test fold whose training folds train the model")
    parser.add_argument("--reference-only", action="store_true", help="skip the model from scratch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="difficulty.json")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.variant:
        name, _, cohort = spec.partition("=")
        rows.append(measure_variant(name, Path(cohort), args.config, args.set, Path(args.work), args.fold,
                                    train=not args.reference_only))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
