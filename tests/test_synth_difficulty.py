"""The study cohort's difficulty features (issue 15): each is present in a tiny cohort, does what
docs/cohort.md says, and switching one off changes nothing else."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from sap.data.synth.cohort import make_cohort, phantom_exam, plan_cohort, synthesize_exam
from sap.data.synth.lesions import BONE_MIMIC_KINDS, MIMIC_KINDS
from sap.data.synth.presets import DIFFICULTY_FEATURES, STUDY_DIFFICULTY, Difficulty, get_preset
from sap.errors import SapError

TINY_STUDY = dataclasses.replace(get_preset("tiny"), difficulty=STUDY_DIFFICULTY)


def _patient_jobs(preset, seed: int = 0):
    return [j for j in plan_cohort(preset, "mr", seed) if j.group == "patients" and j.lesion_volumes_ml]


def _with(job, difficulty: Difficulty):
    return dataclasses.replace(job, preset=dataclasses.replace(job.preset, difficulty=difficulty))


def test_in_bone_mimics_sit_in_bone_and_carry_no_lesion_label() -> None:
    jobs = _patient_jobs(TINY_STUDY)
    found = 0
    for job in jobs:
        labelled = phantom_exam(job)
        for kind in BONE_MIMIC_KINDS:
            where = labelled.mimics == 1 + MIMIC_KINDS.index(kind)
            if where.any():
                found += 1
                assert (labelled.phantom.bone[where] > 0).all(), f"{job.case_id}: {kind} voxels outside bone"
                assert not (labelled.lesions[where] > 0).any(), f"{job.case_id}: {kind} voxels carry a lesion label"
    assert found >= 2, "the tiny study cohort should hold in-bone mimics"


def test_low_contrast_lesions_are_closer_to_marrow_on_b1000() -> None:
    low, full = [], []
    for job in _patient_jobs(TINY_STUDY)[:3]:
        exam = synthesize_exam(job)
        labelled = phantom_exam(job)
        dwi = exam.images["b1000"].astype(float)
        marrow = np.median(dwi[(labelled.phantom.bone > 0) & (labelled.lesions == 0) & (labelled.mimics == 0)])
        for finding in exam.lesion_findings:
            inside = labelled.lesions == finding.label
            excess = float(np.median(dwi[inside]) - marrow)
            (low if finding.contrast < 1 else full).append(excess)
    assert low and full, "the tiny study cohort should hold lesions of both contrasts"
    assert max(low) < np.median(full), (low, full)
    # a low-contrast lesion is still brighter than its marrow: hard, not invisible
    assert np.median(low) > 0


def test_marrow_variation_raises_b1000_and_lowers_t1_in_bone_only() -> None:
    job = _patient_jobs(TINY_STUDY)[0]
    plain = synthesize_exam(_with(job, STUDY_DIFFICULTY.only(["low_contrast", "bone_mimics"])))
    varied = synthesize_exam(job)
    labelled = phantom_exam(job)
    bone = (labelled.phantom.bone > 0) & (labelled.lesions == 0) & (labelled.mimics == 0)
    # beyond the partial-volume blur of the marrow (sigma 0.7 voxel), nothing changes
    far_from_bone = ~ndimage.binary_dilation(labelled.phantom.bone > 0, np.ones((3, 3, 3), bool), iterations=4)
    d_dwi = varied.images["b1000"].astype(float) - plain.images["b1000"].astype(float)
    d_t1 = varied.images["T1"].astype(float) - plain.images["T1"].astype(float)
    assert d_dwi[bone].mean() > 10 and d_t1[bone].mean() < -20
    assert np.abs(d_dwi[far_from_bone]).max() == 0 and np.abs(d_t1[far_from_bone]).max() == 0


@pytest.mark.parametrize("feature", DIFFICULTY_FEATURES)
def test_switching_one_feature_off_keeps_lesions_and_the_other_features(feature: str) -> None:
    job = max(_patient_jobs(TINY_STUDY), key=lambda j: len(j.lesion_volumes_ml))
    kept = [f for f in DIFFICULTY_FEATURES if f != feature]
    full, without = phantom_exam(job), phantom_exam(_with(job, STUDY_DIFFICULTY.only(kept)))
    np.testing.assert_array_equal(full.lesions, without.lesions)
    if feature == "bone_mimics":
        # plan_cohort draws the in-bone mimics per cohort; a job without them in its plan places none
        plain_job = [j for j in plan_cohort(dataclasses.replace(TINY_STUDY, difficulty=STUDY_DIFFICULTY.only(kept)), "mr", 0)
                     if j.case_id == job.case_id][0]
        assert not any(k in BONE_MIMIC_KINDS and n for k, n in plain_job.mimics)
        old_kinds = [1 + MIMIC_KINDS.index(k) for k in MIMIC_KINDS if k not in BONE_MIMIC_KINDS]
        np.testing.assert_array_equal(np.isin(full.mimics, old_kinds), np.isin(phantom_exam(plain_job).mimics, old_kinds))
    else:
        np.testing.assert_array_equal(full.mimics, without.mimics)
    contrasts = [f.contrast for f in without.lesion_findings]
    assert min(f.contrast for f in full.lesion_findings) < 1
    if "low_contrast" in kept:
        assert contrasts == [f.contrast for f in full.lesion_findings]
    else:
        assert set(contrasts) == {1.0}


def test_study_preset_cohort_records_its_difficulty_and_tiny_is_unchanged(tmp_path) -> None:
    out = make_cohort(tmp_path / "tiny", preset="tiny", seed=0, progress=False, workers=1)
    meta = json.loads((out / "cohort.json").read_text())
    assert "difficulty" not in meta
    assert all("contrast" not in lesion for case in meta["cases"] for lesion in case["lesions"])


def test_difficulty_bad_requests_are_refused(tmp_path) -> None:
    with pytest.raises(SapError, match="unknown feature"):
        make_cohort(tmp_path / "a", preset="study-cpu", difficulty=["glare"], progress=False)
    with pytest.raises(SapError, match="has no such feature"):
        make_cohort(tmp_path / "b", preset="demo", difficulty=["marrow"], progress=False)
    with pytest.raises(SapError, match="phantom cohort only"):
        make_cohort(tmp_path / "c", preset="study-cpu", followup=True, progress=False)
    assert not any(tmp_path.iterdir())
