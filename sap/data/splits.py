"""Subject-grouped, burden-stratified k-fold splits, written once to ``RUN/splits.json`` (SPEC §4).

* Lesion study: k folds over **subjects** (every exam of a subject in one fold), stratified by
  lesion burden (number of lesion components). Fold 0 is the fixed threshold-tuning fold; folds
  1…k−1 are test folds. For test fold f the model trains on every other fold, tuning fold included
  (as the paper does) unless ``cv.tuning_in_training`` is false.
* Validation cases (checkpoint selection) come from the training folds, grouped by subject:
  n_val = max(1, round(val_fraction × training subjects)).
* Pretraining: a fixed train/validation split of the healthy exams by subject.

The file is written once and reused; an edited file is validated (every case in exactly one fold,
no subject in two folds, every case known to the cohort).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import numpy as np

from sap.config import Config
from sap.data.cases import Case, Cohort
from sap.data.io import read_image
from sap.errors import SapError
from sap.files import atomic_write_text
from sap.run_layout import RunDir

SPLITS_VERSION = 1


def _subjects(cases: list[Case]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(case.subject_id, []).append(case.case_id)
    return groups


def pretrain_split(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Train/validation split of healthy exams by subject (at least one validation subject).

    With a single subject the validation set is empty and the caller validates on training scans.
    """
    groups = _subjects(cases)
    subjects = sorted(groups)
    rng = np.random.default_rng(seed)
    order = [subjects[i] for i in rng.permutation(len(subjects))]
    n_val = 0 if len(subjects) < 2 else min(len(subjects) - 1, max(1, round(val_fraction * len(subjects))))
    val_subjects = set(order[:n_val])
    train = [c for c in cases if c.subject_id not in val_subjects]
    val = [c for c in cases if c.subject_id in val_subjects]
    return train, val


def count_lesions(case: Case) -> int:
    """Number of lesion components (26-connectivity) of a case's mask; 0 without a mask."""
    if case.lesions is None:
        return 0
    mask = read_image(case.lesions).array != 0
    return int(cc3d.connected_components(mask, connectivity=26, return_N=True)[1])


def stratified_subject_folds(burden: dict[str, int], k: int, seed: int) -> list[list[str]]:
    """Assign subjects to k folds so each fold gets a similar spread of lesion burden.

    Subjects are ranked by burden (random tie-break from ``seed``) and dealt out in blocks of k,
    each block in a fresh random fold order: fold sizes differ by at most one subject and every
    fold receives subjects from every burden level.
    """
    subjects = sorted(burden)
    if len(subjects) < k:
        raise SapError(f"{len(subjects)} subjects cannot fill {k} folds; lower cv.k")
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(len(subjects))
    ranked = [s for _, _, s in sorted(zip((burden[s] for s in subjects), tie_break, subjects, strict=True))]
    folds: list[list[str]] = [[] for _ in range(k)]
    for start in range(0, len(ranked), k):
        block = ranked[start : start + k]
        # Smallest folds first so sizes stay balanced, random among equals.
        order = sorted(range(k), key=lambda f: (len(folds[f]), rng.random()))
        for subject, fold in zip(block, order, strict=False):
            folds[fold].append(subject)
    return folds


@dataclass
class Splits:
    """Lesion folds (fold 0 tunes the threshold), validation picks and the pretraining split."""

    k: int
    seed: int
    folds: list[list[str]]
    subjects: dict[str, str]
    validation: dict[int, list[str]] = field(default_factory=dict)
    pretrain_train: list[str] = field(default_factory=list)
    pretrain_val: list[str] = field(default_factory=list)
    tuning_in_training: bool = True
    val_fraction: float = 0.1

    tuning_fold: int = 0

    @property
    def test_folds(self) -> list[int]:
        return list(range(1, self.k))

    def fold_of(self, case_id: str) -> int:
        for index, fold in enumerate(self.folds):
            if case_id in fold:
                return index
        raise SapError(f"case {case_id} is in no fold of splits.json")

    def test_cases(self, fold: int) -> list[str]:
        self._check_fold(fold)
        return list(self.folds[fold])

    def tuning_cases(self) -> list[str]:
        return list(self.folds[self.tuning_fold])

    def validation_cases(self, fold: int) -> list[str]:
        self._check_fold(fold)
        return list(self.validation.get(fold, []))

    def training_cases(self, fold: int) -> list[str]:
        """Cases of every other fold (tuning fold included unless configured otherwise), minus validation."""
        self._check_fold(fold)
        excluded = {fold} | (set() if self.tuning_in_training else {self.tuning_fold})
        val = set(self.validation_cases(fold))
        return [c for f, ids in enumerate(self.folds) if f not in excluded for c in ids if c not in val]

    def _check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.k:
            raise SapError(f"fold {fold} does not exist: splits have folds 0…{self.k - 1} (0 = tuning)")

    def to_json(self) -> dict:
        return {
            "version": SPLITS_VERSION,
            "k": self.k,
            "seed": self.seed,
            "tuning_fold": self.tuning_fold,
            "tuning_in_training": self.tuning_in_training,
            "val_fraction": self.val_fraction,
            "folds": {str(i): ids for i, ids in enumerate(self.folds)},
            "validation": {str(f): ids for f, ids in sorted(self.validation.items())},
            "subjects": dict(sorted(self.subjects.items())),
            "pretrain": {"train": self.pretrain_train, "val": self.pretrain_val},
        }


def _pick_validation(
    folds: list[list[str]], subjects: dict[str, str], fold: int, val_fraction: float, seed: int,
    tuning_in_training: bool,
) -> list[str]:
    excluded = {fold} | (set() if tuning_in_training else {0})
    candidates = [c for f, ids in enumerate(folds) if f not in excluded for c in ids]
    by_subject: dict[str, list[str]] = {}
    for case_id in candidates:
        by_subject.setdefault(subjects[case_id], []).append(case_id)
    names = sorted(by_subject)
    if len(names) < 2:
        return []
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    rng = np.random.default_rng([seed, fold])
    chosen = {names[i] for i in rng.permutation(len(names))[:n_val]}
    return sorted(c for c in candidates if subjects[c] in chosen)


def make_splits(cohort: Cohort, cfg: Config, burden: dict[str, int] | None = None) -> Splits:
    """Create splits for a cohort. ``burden`` (case → lesion count) is measured when not given."""
    patients = cohort.patients
    if not patients:
        raise SapError("splits need patient cases with lesion masks (COHORT/patients)")
    if burden is None:
        burden = {case.case_id: count_lesions(case) for case in patients}
    subjects = {case.case_id: case.subject_id for case in patients}
    subject_burden: dict[str, int] = {}
    for case_id, subject in subjects.items():
        subject_burden[subject] = subject_burden.get(subject, 0) + burden.get(case_id, 0)
    subject_folds = stratified_subject_folds(subject_burden, cfg.cv.k, cfg.cv.seed)
    fold_of_subject = {s: f for f, group in enumerate(subject_folds) for s in group}
    folds: list[list[str]] = [[] for _ in range(cfg.cv.k)]
    for case in sorted(patients, key=lambda c: c.case_id):
        folds[fold_of_subject[case.subject_id]].append(case.case_id)
    validation = {
        f: _pick_validation(folds, subjects, f, cfg.finetune.val_fraction, cfg.cv.seed, cfg.cv.tuning_in_training)
        for f in range(1, cfg.cv.k)
    }
    train, val = pretrain_split(cohort.healthy, cfg.pretrain.val_fraction, cfg.pretrain.seed) if cohort.healthy else ([], [])
    return Splits(
        k=cfg.cv.k,
        seed=cfg.cv.seed,
        folds=folds,
        subjects=subjects,
        validation=validation,
        pretrain_train=[c.case_id for c in train],
        pretrain_val=[c.case_id for c in val],
        tuning_in_training=cfg.cv.tuning_in_training,
        val_fraction=cfg.finetune.val_fraction,
    )


def splits_from_json(raw: dict, source: str, cohort: Cohort | None = None) -> Splits:
    """Parse and validate a splits file (edited files included)."""
    if not isinstance(raw, dict):
        raise SapError(f"{source}: malformed splits file (not a JSON object)")
    try:
        k = int(raw["k"])
        stored = sorted(str(f) for f in raw["folds"])
        if stored != sorted(str(i) for i in range(k)):
            raise SapError(
                f"{source}: says k={k} but holds folds {', '.join(stored[:10])}; a splits file made for another k "
                "(edit it back, or move it away so sap makes a new one)"
            )
        folds = [list(map(str, raw["folds"][str(i)])) for i in range(k)]
        subjects = {str(c): str(s) for c, s in raw["subjects"].items()}
        validation = {int(f): list(map(str, ids)) for f, ids in raw.get("validation", {}).items()}
        pretrain = raw.get("pretrain", {})
        splits = Splits(
            k=k,
            seed=int(raw.get("seed", 0)),
            folds=folds,
            subjects=subjects,
            validation=validation,
            pretrain_train=list(pretrain.get("train", [])),
            pretrain_val=list(pretrain.get("val", [])),
            tuning_in_training=bool(raw.get("tuning_in_training", True)),
            val_fraction=float(raw.get("val_fraction", 0.1)),
        )
    except KeyError as exc:
        raise SapError(f"{source}: malformed splits file (no {str(exc.args[0])[:40]!r} entry)") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise SapError(f"{source}: malformed splits file ({type(exc).__name__}: {str(exc)[:120]})") from exc
    validate_splits(splits, source, cohort)
    return splits


def validate_splits(splits: Splits, source: str, cohort: Cohort | None = None) -> None:
    """Every case in exactly one fold, no subject in two folds, validation inside the training folds."""
    seen: dict[str, int] = {}
    for index, fold in enumerate(splits.folds):
        for case_id in fold:
            if case_id in seen:
                raise SapError(f"{source}: case {case_id} is in folds {seen[case_id]} and {index}")
            seen[case_id] = index
    missing_subject = [c for c in seen if c not in splits.subjects]
    if missing_subject:
        raise SapError(f"{source}: cases without a subject: {', '.join(missing_subject[:5])}")
    subject_fold: dict[str, int] = {}
    for case_id, fold in seen.items():
        subject = splits.subjects[case_id]
        if subject_fold.setdefault(subject, fold) != fold:
            raise SapError(f"{source}: subject {subject} is in folds {subject_fold[subject]} and {fold}")
    for fold, ids in splits.validation.items():
        inside = [c for c in ids if seen.get(c) == fold or c not in seen]
        if inside:
            raise SapError(f"{source}: validation cases of fold {fold} are in the test fold or unknown: {inside[:5]}")
    overlap = sorted(set(splits.pretrain_train) & set(splits.pretrain_val))
    if overlap:
        raise SapError(f"{source}: healthy cases in both the pretraining training and validation sets: {', '.join(overlap[:5])}")
    if cohort is not None:
        healthy = {c.case_id: c.subject_id for c in cohort.healthy}
        listed = [*splits.pretrain_train, *splits.pretrain_val]
        unknown_healthy = sorted({c for c in listed if c not in healthy})
        if unknown_healthy and healthy:
            raise SapError(f"{source}: pretraining cases not among the healthy exams: {', '.join(unknown_healthy[:5])}")
        train_subjects = {healthy[c] for c in splits.pretrain_train if c in healthy}
        shared = sorted(train_subjects & {healthy[c] for c in splits.pretrain_val if c in healthy})
        if shared:
            raise SapError(
                f"{source}: subject(s) {', '.join(shared[:5])} in both the pretraining training and validation "
                "sets; every exam of a subject belongs to one of them"
            )
        known = {c.case_id for c in cohort.patients}
        absent = sorted(known - set(seen))
        unknown = sorted(set(seen) - known)
        if absent:
            raise SapError(f"{source}: cohort cases in no fold: {', '.join(absent[:5])}")
        if unknown:
            raise SapError(f"{source}: cases not in the cohort: {', '.join(unknown[:5])}")
        actual = {c.case_id: c.subject_id for c in cohort.patients}
        moved = [c for c in seen if splits.subjects[c] != actual[c]]
        if moved:
            raise SapError(f"{source}: subject ids differ from the cohort for {', '.join(moved[:5])}")


def load_or_create_splits(run_dir: str | Path, cohort: Cohort, cfg: Config) -> Splits:
    """Read ``RUN/splits.json`` (validated against the cohort), or create and write it once."""
    path = RunDir(Path(run_dir)).splits
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SapError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        splits = splits_from_json(raw, str(path), cohort)
        if splits.k != cfg.cv.k:
            raise SapError(
                f"{path}: made for k={splits.k} but the config asks cv.k={cfg.cv.k}; set --set cv.k={splits.k}, "
                f"or use another --out (the folds in this run were made for k={splits.k})"
            )
        return splits
    splits = make_splits(cohort, cfg)
    atomic_write_text(path, json.dumps(splits.to_json(), indent=1) + "\n")
    return splits
