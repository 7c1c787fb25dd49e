"""Test fixtures for the study report: a small cohort plus fabricated fold predictions.

The probability maps are fabricated (clearly test data, not model output): each lesion is
"found" with a method-dependent chance, plus a few false-positive blobs and low noise, so the
threshold tuning, evaluation, statistics and figures run on realistic-looking inputs without
training anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sap.config import load_config
from sap.cv.rundir import mark_done
from sap.data.io import read_image, write_image
from tests.datafactory import write_case

HIT_RATE = {"baseline": 0.4, "ssl": 0.6, "sap": 0.85}


SHAPE = (24, 20, 28)  # not cubic: a mix-up of voxel orders cannot go unnoticed
SPACING = (4.0, 4.0, 4.0)  # 0.064 mL voxels: a 3×3×3 lesion is 1.7 mL, 2×2×2 is 0.5 mL
AXCODES = "SPL"  # files stored in another axis order than the canonical arrays (as many scanners do)


def write_study_cohort(root: Path, n_patients: int = 9, n_healthy: int = 2) -> Path:
    """Patients with 0–4 lesions of 1, 8 or 27 voxels inside a skeleton of five regions."""
    rng = np.random.default_rng(7)
    skeleton = np.zeros(SHAPE, np.uint8)
    for label, z in zip((1, 2, 3, 4, 5), range(0, 24, 5), strict=False):
        skeleton[6:18, 6:18, z : z + 5] = label
    for i in range(n_healthy):
        write_case(root / "healthy" / f"h{i}", shape=SHAPE, spacing=SPACING, lesions=None, skeleton=skeleton, seed=i,
                   axcodes=AXCODES)
    for i in range(n_patients):
        lesions = np.zeros(SHAPE, np.uint8)
        for j in range(i % 5):
            size = (1, 2, 3)[(i + j) % 3]
            x, y = 2 + 5 * j, int(rng.integers(3, 18))
            z = int(rng.integers(1, 20))
            lesions[x : x + size, y : y + size, z : z + size] = 1
        write_case(root / "patients" / f"p{i}", shape=SHAPE, spacing=SPACING, lesions=lesions, skeleton=skeleton,
                   seed=100 + i, axcodes=AXCODES)
    return root


def fabricate_probability(gt: np.ndarray, method: str, seed: int) -> np.ndarray:
    import cc3d

    rng = np.random.default_rng(seed)
    prob = rng.uniform(0.0, 0.04, gt.shape).astype(np.float32)
    labels, n = cc3d.connected_components(gt > 0, return_N=True)
    for k in range(1, n + 1):
        if rng.random() < HIT_RATE[method]:
            prob[labels == k] = rng.uniform(0.45, 0.95)
    for _ in range(rng.integers(0, 3)):
        x, y, z = (rng.integers(0, s - 2) for s in gt.shape)
        prob[x : x + 2, y : y + 2, z : z + 2] = np.maximum(prob[x : x + 2, y : y + 2, z : z + 2], rng.uniform(0.2, 0.8))
    return prob


def make_fake_study(root: Path, methods=("baseline", "sap"), threshold_mode: str = "shared",
                    overrides: list[str] | None = None, cohort_json: dict | None = None):
    """A Study over a 9-patient cohort with fabricated predictions for every fold (no training).

    ``cohort_json``: written as the cohort's ``cohort.json`` (what ``sap synth`` records)."""
    import json

    from sap.cv.study import Study

    cohort = write_study_cohort(root / "cohort")
    if cohort_json is not None:
        (cohort / "cohort.json").write_text(json.dumps(cohort_json))
    # the fixture's lesions (0.06-1.7 mL) are sized around the paper's 1 mL cut-off, whatever the preset's
    cfg = load_config("tiny", [f"cv.methods=[{','.join(methods)}]", f"cv.threshold={threshold_mode}",
                               "evaluate.n_bootstrap=100", "evaluate.volume_threshold_ml=1.0", *(overrides or [])])
    cfg.data.root = str(cohort)
    cfg.out = str(root / "run")
    study = Study(cfg)
    for mi, method in enumerate(methods):
        for fold in study.splits.test_folds:
            jobs = [(c, study.run.tuning_predictions(method, fold)) for c in study.splits.tuning_cases()]
            jobs += [(c, study.run.predictions(method)) for c in study.splits.test_cases(fold)]
            for ci, (case_id, out) in enumerate(jobs):
                gt = read_image(study.cases[case_id].lesions)
                prob = fabricate_probability(gt.array, method, seed=1000 * mi + 100 * fold + ci)
                out.mkdir(parents=True, exist_ok=True)
                write_image(prob, gt.geometry, out / f"{case_id}_prob.nii.gz", overwrite=True)
            mark_done(study.run.fold(method, fold), "predict", study.fold_hashes[method], 0.0)
    from sap.config import save_config

    save_config(cfg, study.run.config)
    return study


def fabricate_features(study, n: int = 8, dim: int = 192) -> None:
    """Stored t-SNE features (lesion points shifted from negatives, more so for SAP)."""
    rng = np.random.default_rng(0)
    study.run.features.mkdir(parents=True, exist_ok=True)
    for method, shift in (("ssl", 0.5), ("sap", 3.0)):
        label = np.array([1] * n + [0] * n, dtype=np.int8)
        feats = rng.normal(0, 1, (2 * n, dim)).astype(np.float32)
        feats[label == 1] += shift
        np.savez(study.run.features / f"{method}.npz", features=feats, label=label,
                 case=np.array(["p0"] * (2 * n)))


def fabricate_skeletal_log(study) -> None:
    from sap.data.labels import SKELETON_CLASSES

    folder = study.run.pretrain("skeletal")
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["step", "loss"] + [f"val_dice_{c}" for c in SKELETON_CLASSES[1:]] + ["val_dice_binary"]
    rows = ["1,1.0" + "," * (len(cols) - 2), "2,0.8," + ",".join(f"{0.5 + 0.04 * i:.2f}" for i in range(len(cols) - 2))]
    (folder / "log.csv").write_text(",".join(cols) + "\n" + "\n".join(rows) + "\n")


def fabricate_finetune_logs(study, methods=("baseline", "ssl", "sap"), steps: int = 40) -> None:
    """Fine-tuning ``log.csv`` per fold as the stage writes it: training rows with empty validation
    columns, a validation row every 10 steps (values rising with the step, per method and fold)."""
    cols = ["step", "lr", "lr_decoder", "loss", "epoch", "val_f2", "val_sensitivity", "val_dice", "val_fp",
            "val_cases"]
    for mi, method in enumerate(methods):
        for fold in study.splits.test_folds:
            lines = [",".join(cols)]
            for step in range(1, steps + 1):
                row = [str(step), "1e-4", "1e-4", f"{1 - step / (2 * steps):.4f}", "0"] + [""] * 5
                if step % 10 == 0:
                    f2 = min(1.0, 0.2 * mi + 0.1 * fold + step / (2 * steps))
                    row[5:] = [f"{f2:.4f}", f"{min(1.0, f2 + 0.05):.4f}", f"{f2 / 2:.4f}", "1", "2"]
                lines.append(",".join(row))
            folder = study.run.fold(method, fold)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "log.csv").write_text("\n".join(lines) + "\n")
