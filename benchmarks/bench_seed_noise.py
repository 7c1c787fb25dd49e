"""How much of a difference between methods is training-seed noise? (issue 15)

Given a finished study run folder RUN, one test fold per method is fine-tuned again with other
training seeds (``finetune.seed``: the network's random initialisation of every part not loaded
from pretraining, the patch sampler's order and placement, and the per-step torch seed of the
augmentations; the folds (``cv.seed``) and the pretrained weights stay). Every seed gets its own
run folder ``OUT/seed_<s>`` holding RUN's splits and hard links (copies across file systems) to
RUN's pretraining, so nothing is pretrained again; a seed equal to RUN's own ``finetune.seed``
reuses RUN's fold model and predictions the same way. RUN is only read: sap replaces files by
atomic rename, so a hard link never lets a write reach RUN's copy.

Each (method, seed) goes through the study's own steps (:class:`sap.cv.study.Study`): fine-tune →
predict the tuning fold and the test fold → tune the threshold on the tuning fold for this fold
model alone (``Study.tune_fold``; the study's shared threshold pools every fold model and cannot
be formed from one fold) → evaluate the fold's test exams (``sap.cv.stages.evaluate_pairs``). The
steps are resumable: a killed run continues where it stopped when started again.

Usage::

    python benchmarks/bench_seed_noise.py RUN --out SEEDS [--fold 1] [--seeds 42,43,44] \\
        [--methods baseline,ssl,sap]

Writes ``SEEDS/seed_noise.json`` and ``SEEDS/seed_noise.md`` (also printed): per method and seed the
test fold's pooled sensitivity for lesions ≥ V at the tuned threshold, false positives per exam,
mean F2 over exams with lesions, FROC-AUC (≥ V mL, 4 FPPI; all lesions, 15 FPPI), Dice, and per
method the spread (min–max) over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: (key, column header, digits) of the per-seed table; ``{v}`` is the large-lesion cut-off in mL
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("threshold", "threshold", 2),
    ("sensitivity_large", "sens. ≥ {v} mL", 3),
    ("fp_per_exam", "FP/exam", 2),
    ("fp_large_per_exam", "FP ≥ {v} mL/exam", 2),
    ("f2_mean", "mean F2", 3),
    ("froc_auc_large", "FROC-AUC ≥ {v} mL (4)", 3),
    ("froc_auc", "FROC-AUC (15)", 3),
    ("dice_patient_mean", "Dice (per-patient)", 3),
    ("dice_global", "global Dice", 3),
)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard link (copy across file systems); an existing ``dst`` is kept (a resumed run)."""
    if os.path.lexists(dst):
        return dst
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _mirror(src: Path, dst: Path) -> None:
    """``dst`` gets every file of ``src`` (recursively) as a hard link or copy; lock files are left."""
    from sap.files import LOCK_NAME

    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(LOCK_NAME, "*.tmp*"))


def seed_config(cfg: Any, seed: int, out: Path) -> Any:
    """RUN's config with another fine-tuning seed and run folder (nothing else changes)."""
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, seed=int(seed)), out=str(out))


def prepare_seed_run(run_root: Path, cfg: Any, seed_out: Path, methods: list[str], fold: int) -> list[str]:
    """Fill ``seed_out`` from RUN: splits, the pretraining the methods need, and (for RUN's own seed)
    the fold's models and predictions. Returns what was reused. Refuses when RUN's pretraining was
    made with other settings than ``cfg`` would ask (it would be pretrained again)."""
    from sap.cv.rundir import fold_hash, pretrain_hash, read_marker
    from sap.errors import SapError
    from sap.run_layout import PRETRAIN_OF, RunDir

    run, out = RunDir(run_root), RunDir(seed_out)
    out.root.mkdir(parents=True, exist_ok=True)
    if not out.splits.is_file():
        _link_or_copy(str(run.splits), str(out.splits))
    reused = []
    for stage in sorted({PRETRAIN_OF[m] for m in methods} - {None}):
        marker = read_marker(run.pretrain(stage), "pretrain")
        if marker is None or marker.get("config_hash") != pretrain_hash(cfg, stage):
            raise SapError(f"{run.pretrain(stage)}: no finished pretraining with this run's settings; "
                           "bench_seed_noise never pretrains")
        _mirror(run.pretrain(stage), out.pretrain(stage))
        reused.append(f"pretrain/{stage}")
    from sap.data.splits import splits_from_json

    splits = splits_from_json(json.loads(run.splits.read_text()), str(run.splits), None)
    for method in methods:
        marker = read_marker(run.fold(method, fold), "predict")
        if marker is None or marker.get("config_hash") != fold_hash(cfg, method):
            continue  # another seed than RUN's: trained here
        _mirror(run.fold(method, fold), out.fold(method, fold))
        out.predictions(method).mkdir(parents=True, exist_ok=True)
        for case_id in splits.test_cases(fold):
            src = run.predictions(method) / f"{case_id}_prob.nii.gz"
            if src.is_file() and not (out.predictions(method) / src.name).exists():
                _link_or_copy(str(src), str(out.predictions(method) / src.name))
        reused.append(f"{method}/fold_{fold}")
    return reused


def fold_metrics(summary: dict, patients: Any) -> dict[str, float]:
    """The table's numbers from a fold evaluation's summary.json and patients.csv."""
    def mean(column: str) -> float:
        values = patients[column].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else float("nan")

    def auc(key: str) -> float:
        curve = summary.get(key) or {}
        return float("nan") if curve.get("auc") is None else float(curve["auc"])

    def num(key: str) -> float:
        value = summary.get(key)
        return float("nan") if value is None else float(value)

    return {"sensitivity_large": num("pooled_sensitivity_1ml"), "fp_per_exam": num("mean_fp"),
            "fp_large_per_exam": num("mean_fp_1ml"), "f2_mean": mean("f2"), "froc_auc_large": auc("froc_1ml"),
            "froc_auc": auc("froc"), "dice_patient_mean": mean("dice_patient_mean"), "dice_global": mean("dice_global"),
            "n_exams": int(summary.get("n_cases") or 0), "n_lesions_large": int(patients["n_gt_1ml"].sum())}


def run_seed(run_root: Path, cfg: Any, seed: int, out: Path, methods: list[str], fold: int) -> list[dict]:
    """Fine-tune, predict, tune and evaluate ``fold`` of every method with training seed ``seed``."""
    import pandas as pd

    from sap.cv import stages
    from sap.cv.study import Study, evaluation_settings
    from sap.files import atomic_write_text
    from sap.metrics import nan_to_none

    seed_out = out / f"seed_{seed}"
    cfg_s = seed_config(cfg, seed, seed_out)
    reused = prepare_seed_run(run_root, cfg_s, seed_out, methods, fold)
    study = Study(cfg_s)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        study.finetune(method, fold)
        study.predict(method, fold)
        point = study.tune_fold(method, fold)
        settings = evaluation_settings(cfg_s, point["threshold"], point["min_volume_ml"])
        cases = study.splits.test_cases(fold)
        pairs = [(c, study.cases[c].lesions, study.run.predictions(method) / f"{c}_prob.nii.gz") for c in cases]
        folder = study.run.method(method) / f"evaluation_fold_{fold}"
        _, summary = stages.evaluate_pairs(pairs, dict.fromkeys(cases, settings), settings, folder)
        atomic_write_text(folder / "operating_point.json", json.dumps(nan_to_none(point), indent=1) + "\n")
        patients = pd.read_csv(folder / "patients.csv", dtype={"case": str})
        rows.append({"method": method, "seed": int(seed), "fold": fold, "threshold": point["threshold"],
                     "min_volume_ml": point["min_volume_ml"], **fold_metrics(summary, patients),
                     "reused_from_run": f"{method}/fold_{fold}" in reused,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"bench_seed_noise: {method} seed {seed}: {json.dumps(nan_to_none(rows[-1]))}", file=sys.stderr,
              flush=True)
    return rows


def spread(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric: min, max and max − min over the seeds (NaN values left out)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key, _, _ in COLUMNS:
            values = np.array([r[key] for r in mine], dtype=float)
            values = values[np.isfinite(values)]
            lo, hi = (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)
            out[method][key] = {"min": lo, "max": hi, "range": hi - lo}
    return out


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def markdown(rows: list[dict], spreads: dict, volume_ml: float, fold: int, run_root: Path) -> str:
    v = f"{volume_ml:g}"
    head = ["method", "seed"] + [label.format(v=v) for _, label, _ in COLUMNS] + ["exams"]
    lines = [f"Seed noise on test fold {fold} of {run_root} (threshold tuned on the tuning fold per model; "
             "* = RUN's own fold model, reused).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from sap.cv.rundir import METHOD_LABELS

    for r in rows:
        cells = [METHOD_LABELS.get(r["method"], r["method"]), f"{r['seed']}{'*' if r['reused_from_run'] else ''}"]
        cells += [_fmt(r[key], d) for key, _, d in COLUMNS] + [str(r["n_exams"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Spread over the seeds (min–max):", "", "| " + " | ".join(["method"] + head[2:-1]) + " |",
              "|" + "---|" * (len(head) - 2)]
    for method, per_key in spreads.items():
        cells = [METHOD_LABELS.get(method, method)]
        cells += [f"{_fmt(per_key[k]['min'], d)}–{_fmt(per_key[k]['max'], d)}" for k, _, d in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="finished study run folder (config.yaml, splits.json, pretrain/)")
    p.add_argument("--out", type=Path, required=True, help="output folder (one run folder per seed inside)")
    p.add_argument("--fold", type=int, default=None, help="test fold (default: the first)")
    p.add_argument("--seeds", default=None, help="comma-separated finetune.seed values (default: RUN's and the "
                                                 "next two)")
    p.add_argument("--methods", default=None, help="subset of baseline,ssl,sap (default: RUN's networks)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from sap.cv.rundir import load_run_config, parse_folds, parse_methods
    from sap.errors import SapError
    from sap.files import atomic_write_text
    from sap.metrics import nan_to_none
    from sap.run_layout import METHODS, RunDir

    args = parse_args(argv)
    try:
        run = RunDir(args.run)
        if not run.config.is_file() or not run.splits.is_file():
            raise SapError(f"{run.root}: not a study run folder (config.yaml and splits.json needed)")
        out = args.out.resolve()
        if out == run.root.resolve() or run.root.resolve() in out.parents:
            raise SapError(f"{args.out}: inside the study run folder {run.root}; choose a folder outside it")
        cfg = load_run_config(run.config)
        fold = parse_folds(None if args.fold is None else str(args.fold), cfg.cv.k)[0]
        present = [m for m in METHODS if run.fold(m, fold).is_dir()]
        methods = parse_methods(args.methods, present or cfg.cv.methods)
        seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
                 else [cfg.finetune.seed + i for i in range(3)])
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rows = [row for seed in seeds for row in run_seed(run.root, cfg, seed, out, methods, fold)]
    except SapError as exc:
        print(f"bench_seed_noise: error: {exc}", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    spreads = spread(rows)
    from sap.cv.rundir import git_commit

    record = {"run": str(run.root), "fold": fold, "seeds": seeds, "methods": methods, "rows": rows,
              "spread": spreads, "volume_threshold_ml": cfg.evaluate.volume_threshold_ml,
              "seconds": round(time.perf_counter() - t0, 1), "commit": git_commit()}
    atomic_write_text(out / "seed_noise.json", json.dumps(nan_to_none(record), indent=1) + "\n")
    md = markdown(rows, spreads, cfg.evaluate.volume_threshold_ml, fold, run.root)
    atomic_write_text(out / "seed_noise.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
