"""The cross-validated study behind ``sap cv`` (SPEC §10).

For each method (baseline, ssl, sap): pretraining if missing, one fine-tuned model per test fold,
prediction of the tuning fold and the test fold, the threshold tuned on the tuning fold (shared
by default: one threshold per method, the E9 objective averaged over every (fold model, tuning
case) pair with lesions; or per fold), the threshold written into the fold checkpoints,
evaluation of every test case at its threshold, pooled over all test folds (each case scored by
its own fold model). The non-learning reference detector (:mod:`sap.cv.reference`) goes through
the same predict → tune → evaluate steps with its intensity map in place of a fold model. Every
step is resumable (see :mod:`sap.cv.rundir`); ``folds`` restricts the run to some test folds so a
study can be split across machines, and :func:`finalize_method` (also called by ``sap report``)
completes a method once all its folds are on disk.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sap.config import Config, save_config
from sap.cv import stages
from sap.cv.progress import Progress, Task
from sap.cv.rundir import (
    clear_folder,
    fold_hash,
    mark_done,
    parse_folds,
    parse_methods,
    pretrain_hash,
    read_marker,
    settings_hash,
    step_done,
    write_manifest,
)
from sap.data.cases import Case, Cohort, discover_cohort
from sap.data.io import write_image
from sap.data.splits import Splits, load_or_create_splits
from sap.errors import SapError
from sap.files import atomic_write_text, folder_lock, make_folder
from sap.run_layout import INIT_OF, PRETRAIN_OF, REFERENCE, STUDY_SECTIONS, RunDir

#: rough budgets per step at demo scale (SPEC §10), seconds; only for the "remaining" display
DEMO_ESTIMATES = {"pretrain": 90.0, "finetune": 30.0, "predict": 20.0, "finalize": 15.0, "features": 20.0,
                  "report": 60.0, "export": 10.0, "reference": 5.0}
#: FROC mode of the study's evaluation: candidate mode (SPEC E8), monotone by construction; the
#: report marks the operating point from the evaluation at the tuned threshold
FROC_MODE = "candidate"


def _log(message: str) -> None:
    print(f"sap cv: {message}", file=sys.stderr, flush=True)


def evaluation_settings(cfg: Config, threshold: float | None = None, min_volume_ml: float | None = None) -> Any:
    """The §9 settings of a study: candidate-mode FROC (monotone; the operating point comes from the
    evaluation at the tuned threshold, not from the curve), everything else from the ``evaluate``
    section."""
    from sap.metrics import EvaluationSettings

    e = cfg.evaluate
    return EvaluationSettings(
        threshold=e.threshold if threshold is None else float(threshold),
        t_min=e.t_min, tolerance_mm=e.tolerance_mm, connectivity=e.connectivity,
        min_volume_ml=e.min_volume_ml if min_volume_ml is None else float(min_volume_ml),
        volume_threshold_ml=e.volume_threshold_ml, froc=FROC_MODE, grid=tuple(cfg.tuning.grid),
        n_bootstrap=e.n_bootstrap, seed=e.seed,
    )


def validate_cases(cases: list[Case], cfg: Config, progress: bool = True) -> None:
    """Read every case not yet in the preprocessing cache with every data rule (grids, NaN/Inf
    voxels, binary masks, skeleton labels; :func:`sap.data.check.check_case`), so a bad exam is
    refused before pretraining starts, not after. Cached cases were checked when cached."""
    from tqdm.auto import tqdm

    from sap.data.cache import is_cached
    from sap.data.check import check_case

    todo = [c for c in cases if not is_cached(c, cfg.data)]
    for case in tqdm(todo, desc="checking cases", unit="case", file=sys.stderr, disable=not progress or len(todo) < 2):
        check_case(case, cfg)


# ------------------------------------------------------------------------------------ context
class Study:
    """A study run: config, run folder, cohort and splits, and its steps."""

    def __init__(self, cfg: Config, overwrite: bool = False, validate: tuple[str, ...] = (), progress: bool = True) -> None:
        """``validate``: groups (``patients``, ``healthy``) whose every case is read and checked
        (:func:`validate_cases`) before anything is written. ``progress``: the stages' progress bars."""
        if not cfg.out:
            raise SapError("no run folder: pass --out RUN (or set out in the config)")
        self.cfg = cfg
        self.run = RunDir(Path(cfg.out))
        self.overwrite = overwrite
        self.progress = progress
        self.fold_hashes = {m: fold_hash(cfg, m) for m in ("baseline", "ssl", "sap", REFERENCE)}
        self.pretrain_hashes = {s: pretrain_hash(cfg, s) for s in ("skeletal", "ssl")}
        self.study_hash = settings_hash(cfg, STUDY_SECTIONS)
        self.cohort: Cohort = discover_cohort(cfg.data, require=("patients", *validate))
        self.cases: dict[str, Case] = {c.case_id: c for c in self.cohort.patients}
        missing_gt = [c.case_id for c in self.cohort.patients if c.lesions is None]
        if missing_gt:
            raise SapError(f"{cfg.data.root}: patient cases without a lesion mask (GT): {', '.join(missing_gt[:5])}")
        validate_cases([c for c in self.cohort.cases if c.group in validate], cfg, progress)
        make_folder(self.run.root)
        self.splits: Splits = load_or_create_splits(self.run.root, self.cohort, cfg)

    # -------------------------------------------------------------- pretraining
    def pretrained_checkpoint(self, stage: str) -> Path:
        best = self.run.pretrained(stage)
        return best if best.is_file() else self.run.pretrain(stage) / "last.pt"

    def pretrain(self, stage: str) -> Path:
        folder = self.run.pretrain(stage)
        if self._done(folder, "pretrain", config_hash=self.pretrain_hashes[stage]):
            return self.pretrained_checkpoint(stage)
        # runs split over machines (--folds) may share the stage: the first pretrains, the others wait
        with folder_lock(folder, wait=True, on_wait=_log):
            if self._done(folder, "pretrain", config_hash=self.pretrain_hashes[stage]):
                return self.pretrained_checkpoint(stage)
            return self._pretrain(stage, folder)

    def _pretrain(self, stage: str, folder: Path) -> Path:
        t0 = time.perf_counter()
        resume = (folder / "last.pt").is_file()
        checkpoint = stages.pretrain(self.cfg, stage, self.run.root, resume=resume, progress=self.progress)
        if not Path(checkpoint).is_file():
            checkpoint = self.pretrained_checkpoint(stage)
        mark_done(folder, "pretrain", self.pretrain_hashes[stage], time.perf_counter() - t0,
                  checkpoint=str(checkpoint))
        return Path(checkpoint)

    # -------------------------------------------------------------- one fold
    def fold_checkpoint(self, method: str, fold: int) -> Path:
        return self.run.fold(method, fold) / f"{self.cfg.cv.checkpoint}.pt"

    def finetune(self, method: str, fold: int) -> Path:
        with folder_lock(self.run.fold(method, fold)):
            return self._finetune(method, fold)

    def _finetune(self, method: str, fold: int) -> Path:
        folder = self.run.fold(method, fold)
        if self._done(folder, "finetune", self.fold_hashes[method], clear=True, method=method, fold=fold):
            return self.fold_checkpoint(method, fold)
        stage = PRETRAIN_OF[method]
        pretrained = self.pretrained_checkpoint(stage) if stage else None
        if pretrained is not None and not pretrained.is_file():
            raise SapError(f"{pretrained}: pretraining of {method} missing; run sap cv without --folds restrictions "
                           f"on pretraining or copy RUN/pretrain from the machine that ran it")
        t0 = time.perf_counter()
        stages.finetune(self.cfg, INIT_OF[method], fold, self.run.root, pretrained,
                        resume=(folder / "last.pt").is_file(), progress=self.progress)
        checkpoint = self.fold_checkpoint(method, fold)
        if not checkpoint.is_file():
            raise SapError(f"{checkpoint}: fine-tuning of {method} fold {fold} finished without this checkpoint")
        mark_done(folder, "finetune", self.fold_hashes[method], time.perf_counter() - t0,
                  checkpoint=str(checkpoint))
        return checkpoint

    def predict(self, method: str, fold: int) -> None:
        """:meth:`_predict` while holding the fold folder's lock."""
        with folder_lock(self.run.fold(method, fold)):
            self._predict(method, fold)

    def _predict(self, method: str, fold: int) -> None:
        """Probability maps of the tuning fold (into the fold folder) and of the test fold (into
        ``RUN/{method}/predictions``). Files already written are kept (writes are atomic).

        ``method`` ``reference``: the reference detector's maps (:mod:`sap.cv.reference`; the same
        for every fold, written per fold so tuning and evaluation read them like a network's)."""
        folder = self.run.fold(method, fold)
        # the reference has no fine-tuning step to clear stale maps: its predict step does (--overwrite)
        if self._done(folder, "predict", self.fold_hashes[method], clear=method == REFERENCE, method=method,
                      fold=fold):
            return
        t0 = time.perf_counter()
        jobs = [(c, self.run.tuning_predictions(method, fold)) for c in self.splits.tuning_cases()]
        jobs += [(c, self.run.predictions(method)) for c in self.splits.test_cases(fold)]
        todo = [(c, out) for c, out in jobs if not (out / f"{c}_prob.nii.gz").is_file()]
        if todo:
            if method == REFERENCE:
                from sap.cv.reference import reference_probability

                def probability(case: Case) -> tuple[np.ndarray, Any]:
                    return reference_probability(case, self.cfg)
            else:
                predictor = stages.load_predictor(self.fold_checkpoint(method, fold), self.cfg)

                def probability(case: Case) -> tuple[np.ndarray, Any]:
                    return stages.predict_probability(predictor, case, self.cfg)
            from tqdm.auto import tqdm

            for case_id, out in tqdm(todo, desc=f"predict {method} fold {fold}", unit="case", file=sys.stderr,
                                     disable=not self.progress):
                prob, geometry = probability(self.cases[case_id])
                out.mkdir(parents=True, exist_ok=True)
                write_image(np.asarray(prob, dtype=np.float32), geometry, out / f"{case_id}_prob.nii.gz",
                            overwrite=True)
        mark_done(folder, "predict", self.fold_hashes[method], time.perf_counter() - t0,
                  tuning_cases=self.splits.tuning_cases(), test_cases=self.splits.test_cases(fold))

    def _done(self, folder: Path, step: str, config_hash: str, clear: bool = False, method: str | None = None,
              fold: int | None = None) -> bool:
        marker = read_marker(folder, step)
        if marker is not None and marker.get("config_hash") != config_hash and self.overwrite and clear:
            # Results of another config: the whole fold is redone, test predictions included.
            clear_folder(folder)
            if method is not None and fold is not None:
                for case_id in self.splits.test_cases(fold):
                    (self.run.predictions(method) / f"{case_id}_prob.nii.gz").unlink(missing_ok=True)
            return False
        return step_done(folder, step, config_hash, self.overwrite)

    # -------------------------------------------------------------- whole method
    def folds_complete(self, method: str) -> list[int]:
        """Test folds whose predictions are on disk with this config (from any machine)."""
        done = []
        for fold in self.splits.test_folds:
            marker = read_marker(self.run.fold(method, fold), "predict")
            if marker is not None and marker.get("config_hash") == self.fold_hashes[method]:
                done.append(fold)
        return done

    def finalize(self, method: str) -> bool:
        """Tune the threshold, write it into the checkpoints, evaluate all test cases pooled.

        Returns False (and does nothing) while some test fold is missing.
        """
        missing = sorted(set(self.splits.test_folds) - set(self.folds_complete(method)))
        if missing:
            _log(f"{method}: test folds {missing} not finished yet; run them (sap cv --folds "
                 f"{','.join(map(str, missing))}), then sap report --run {self.run.root}")
            return False
        # sap report and the last of several split runs may finalize at once: one does, the other waits
        with folder_lock(self.run.evaluation(method), wait=True, on_wait=_log):
            return self._finalize(method)

    def _finalize(self, method: str) -> bool:
        folder = self.run.method(method)
        marker = read_marker(folder, "finalize")
        # an evaluation stored by an older sap with another FROC mode is redone (it is cheap)
        if marker is not None and marker.get("config_hash") == self.study_hash and marker.get("froc") == FROC_MODE:
            return True
        t0 = time.perf_counter()
        operating = self.tune(method)
        for fold in self.splits.test_folds:
            point = operating["folds"][str(fold)]
            for name in ("last.pt", "best.pt"):
                path = self.run.fold(method, fold) / name
                if path.is_file():
                    stages.set_checkpoint_threshold(path, point["threshold"], point["min_volume_ml"])
        self.evaluate(method, operating)
        mark_done(folder, "finalize", self.study_hash, time.perf_counter() - t0,
                  threshold=operating["threshold"], min_volume_ml=operating["min_volume_ml"], froc=FROC_MODE)
        return True

    def _tuning_counts(self, prob_dir: Path) -> list[dict]:
        """E9 grid counts of every tuning case predicted in ``prob_dir``."""
        from sap.evaluate.api import CasePair, load_pair
        from sap.metrics import detection_counts_grid, label_ground_truth

        cfg = self.cfg
        volumes = cfg.tuning.min_volume_ml_grid if cfg.tuning.tune_min_volume else [cfg.evaluate.min_volume_ml]
        out = []
        for case_id in self.splits.tuning_cases():
            prob, gt, spacing = load_pair(CasePair(case_id, self.cases[case_id].lesions,
                                                   prob_dir / f"{case_id}_prob.nii.gz"))
            gt_c = label_ground_truth(gt, spacing, cfg.evaluate.connectivity)
            out.append(detection_counts_grid(prob, gt_c, spacing, cfg.tuning.grid, volumes,
                                             cfg.evaluate.connectivity, cfg.evaluate.volume_threshold_ml))
        return out

    def _pick(self, counts: list[dict]) -> dict[str, Any]:
        """The E9 operating point of tuning-case counts (of one or several fold models)."""
        from sap.metrics import tune_threshold

        try:
            t, mv, best, table = tune_threshold(counts, self.cfg.tuning.objective)
        except ValueError as exc:
            raise SapError(f"{self.run.splits}: cannot tune the threshold on the tuning fold: {exc}") from exc
        return {"threshold": t, "min_volume_ml": mv, "objective_value": best,
                "objective_by_threshold": {f"{k[0]:g}@{k[1]:g}": v for k, v in sorted(table.items())}}

    def tune_fold(self, method: str, fold: int) -> dict[str, Any]:
        """E9 on the tuning fold for one fold model alone (``cv.threshold: per_fold``'s point of
        that fold; a partial run with ``--folds`` can be scored with it). Writes nothing."""
        return self._pick(self._tuning_counts(self.run.tuning_predictions(method, fold)))

    def tune(self, method: str) -> dict[str, Any]:
        """E9 on the tuning fold: shared over all fold models or per fold; writes threshold.json."""
        objective = self.cfg.tuning.objective
        per_fold_counts = {f: self._tuning_counts(self.run.tuning_predictions(method, f))
                           for f in self.splits.test_folds}
        shared = self._pick([c for f in self.splits.test_folds for c in per_fold_counts[f]])
        folds = {str(f): self._pick(per_fold_counts[f]) for f in self.splits.test_folds}
        if self.cfg.cv.threshold == "shared":
            folds = {f: {**shared, "objective_by_threshold": v["objective_by_threshold"]} for f, v in folds.items()}
        record = {
            "mode": self.cfg.cv.threshold, "objective": objective,
            "threshold": shared["threshold"] if self.cfg.cv.threshold == "shared" else None,
            "min_volume_ml": shared["min_volume_ml"] if self.cfg.cv.threshold == "shared" else None,
            "shared": shared, "folds": folds, "tuning_cases": self.splits.tuning_cases(),
        }
        from sap.metrics import nan_to_none

        atomic_write_text(self.run.threshold(method), json.dumps(nan_to_none(record), indent=1) + "\n")
        return record

    def evaluate(self, method: str, operating: dict[str, Any]) -> dict[str, Any]:
        """Pooled evaluation of every test case at its fold's operating point, plus regions.csv."""
        from sap.cv.regions import region_rows, write_regions

        settings_by_case, pairs, fold_of = {}, [], {}
        for fold in self.splits.test_folds:
            point = operating["folds"][str(fold)]
            settings = evaluation_settings(self.cfg, point["threshold"], point["min_volume_ml"])
            for case_id in self.splits.test_cases(fold):
                settings_by_case[case_id] = settings
                fold_of[case_id] = fold
                pairs.append((case_id, self.cases[case_id].lesions,
                              self.run.predictions(method) / f"{case_id}_prob.nii.gz"))
        shared = operating["shared"]
        summary_settings = evaluation_settings(self.cfg, shared["threshold"], shared["min_volume_ml"])
        rows: list[dict] = []

        def on_case(case_id: str, prob: np.ndarray, gt: np.ndarray, spacing: tuple) -> None:
            s = settings_by_case[case_id]
            rows.extend(region_rows(case_id, fold_of[case_id], prob, gt, spacing, self.cases[case_id].skeleton,
                                    s.threshold, s.min_volume_ml, s.connectivity))

        out = self.run.evaluation(method)
        # patients.csv, lesions.csv, summary.json and regions.csv are published together
        _, summary = stages.evaluate_pairs(pairs, settings_by_case, summary_settings, out, on_case=on_case,
                                           extra=lambda: {"regions.csv": lambda p: write_regions(p, rows)})
        return summary

    # -------------------------------------------------------------- export
    def export(self, method: str, out: Path) -> Path:
        """Ensemble bundle of the fold models with a threshold tuned for the ensemble on the
        tuning fold (mean of the fold models' stored tuning probabilities = the ensemble's)."""
        from sap.data.io import read_image
        from sap.metrics import nan_to_none

        folds = self.splits.test_folds
        ens_dir = self.run.ensemble_tuning(method)
        for case_id in self.splits.tuning_cases():
            target = ens_dir / f"{case_id}_prob.nii.gz"
            if target.is_file():
                continue
            images = [read_image(self.run.tuning_predictions(method, f) / f"{case_id}_prob.nii.gz") for f in folds]
            mean = np.mean([im.array for im in images], axis=0).astype(np.float32)
            write_image(mean, images[0].geometry, target, overwrite=True)
        from sap.metrics import tune_threshold

        t, mv, best, _ = tune_threshold(self._tuning_counts(ens_dir), self.cfg.tuning.objective)
        members = [self.fold_checkpoint(method, f) for f in folds]
        from sap.cv.provenance import synthetic_training_data

        bundle = stages.write_bundle(members, t, mv, out / method, method, tuning_objective_value=best,
                                     **synthetic_training_data(self.cfg.data.root))
        atomic_write_text(self.run.ensemble_threshold(method),
                          json.dumps(nan_to_none({"threshold": t, "min_volume_ml": mv, "objective_value": best,
                                                  "bundle": str(bundle)}), indent=1) + "\n")
        return Path(bundle)


# ------------------------------------------------------------------------------------ entry
def plan_tasks(study: Study, methods: list[str], folds: list[int], export: Path | None,
               report: bool) -> list[Task]:
    """The ordered steps of a (partial) study; finished steps cost nothing when run again."""
    est = DEMO_ESTIMATES if study.cfg.scale != "paper" else {k: 0.0 for k in DEMO_ESTIMATES}
    tasks: list[Task] = []
    for stage in ("skeletal", "ssl"):
        if any(PRETRAIN_OF[m] == stage for m in methods):
            tasks.append(Task(f"pretrain {stage}", lambda s=stage: study.pretrain(s), est["pretrain"]))
    for method in methods:
        for fold in folds:
            tasks.append(Task(f"finetune {method} fold {fold}",
                              lambda m=method, f=fold: study.finetune(m, f), est["finetune"]))
            tasks.append(Task(f"predict {method} fold {fold}",
                              lambda m=method, f=fold: study.predict(m, f), est["predict"]))
    # the reference detector: no training; predicted per fold like a network, then tuned and evaluated
    for fold in folds:
        tasks.append(Task(f"predict {REFERENCE} fold {fold}",
                          lambda f=fold: study.predict(REFERENCE, f), est["reference"]))
    for method in (*methods, REFERENCE):
        tasks.append(Task(f"threshold + evaluation {method}", lambda m=method: study.finalize(m), est["finalize"]))
    if "ssl" in methods and "sap" in methods:
        from sap.cv.features import compute_features

        tasks.append(Task("t-SNE features", lambda: compute_features(study), est["features"]))
    if report:
        from sap.cv.report import build_report

        tasks.append(Task("report", lambda: build_report(study.run.root), est["report"]))
    if export is not None:
        for method in methods:
            tasks.append(Task(f"export {method}", lambda m=method: study.export(m, export), est["export"]))
    return tasks


def run_study(
    cfg: Config,
    methods: str | list[str] | None = None,
    folds: str | None = None,
    export: str | Path | None = None,
    overwrite: bool = False,
    report: bool = True,
    progress: bool | Progress = True,
) -> Path:
    """Run (or resume) a cross-validated study into ``cfg.out``; returns the run folder.

    ``methods``: subset of baseline, ssl, sap (default ``cv.methods``); ``folds``: "1,2" runs
    only these test folds (the study is then finished by another run or by ``sap report``);
    ``export``: folder for one ensemble bundle per method.
    """
    chosen = parse_methods(methods, cfg.cv.methods)
    fold_list = parse_folds(folds, cfg.cv.k)  # before anything is written
    all_folds = fold_list == list(range(1, cfg.cv.k))
    if export is not None and not all_folds:
        raise SapError("--export needs every test fold: run without --folds (finished folds are reused)")
    if export is not None:  # a bundle folder is replaced whole: it must not hold the fold models or data
        from sap.files import check_not_input

        run = RunDir.of(cfg.out)
        check_not_input([Path(export) / m for m in chosen], [*(run.method(m) for m in chosen), cfg.data.root],
                        replaced_folder=True)
    if report and all_folds:  # the report folder is rebuilt whole: refuse a user's file in it now, not at the end
        from sap.cv.report import check_report_folder

        check_report_folder(RunDir.of(cfg.out))
    # every case the study reads is checked before anything is written or trained
    pretraining = any(PRETRAIN_OF[m] is not None for m in chosen)
    runner = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    study = Study(cfg, overwrite=overwrite, validate=("patients", "healthy") if pretraining else ("patients",),
                  progress=runner.enabled)
    save_config(cfg, study.run.config)
    write_manifest(study.run, cfg, chosen)
    tasks = plan_tasks(study, chosen, fold_list, Path(export) if export else None, report=report and all_folds)
    try:
        runner.run(tasks)
    finally:
        write_manifest(study.run, cfg, chosen, extra={"last_invocation_s": runner.durations})
    return study.run.root


def finalize_run(run_root: Path, overwrite: bool = False) -> Study | None:
    """Complete every method whose folds are all on disk (``sap report`` after split runs).

    Returns the study, or None when the run has no stored config.
    """
    from sap.cv.rundir import load_run_config

    run = RunDir(Path(run_root))
    if not run.config.is_file():
        return None
    cfg = load_run_config(run.config)
    cfg.out = str(run.root)
    study = Study(cfg, overwrite=overwrite)
    # the reference detector needs no training: a run whose reference maps are missing (an older
    # run, or folds that ran elsewhere) gets them here, from sap.data alone (no torch)
    for fold in study.splits.test_folds:
        study.predict(REFERENCE, fold)
    methods = run.methods_present()
    for method in methods:
        study.finalize(method)
    if "ssl" in methods and "sap" in methods and all(
        study.pretrained_checkpoint(s).is_file() for s in ("ssl", "skeletal")
    ):
        from sap.cv.features import compute_features

        compute_features(study)
    write_manifest(run, cfg, methods)
    return study
