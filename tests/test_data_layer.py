"""Case discovery (three layouts), reading rules, cache and splits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sap.config import load_config
from sap.data.cache import cache_key, load_cached
from sap.data.cases import discover_cohort
from sap.data.io import make_geometry, read_image, write_image
from sap.data.preprocess import load_case, normalise
from sap.data.splits import (
    load_or_create_splits,
    make_splits,
    pretrain_split,
    splits_from_json,
    stratified_subject_folds,
)
from sap.errors import SapError
from tests.datafactory import write_case, write_cohort


def _cfg(root, **data):
    cfg = load_config("tiny")
    cfg.data.root = str(root)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_case_folders_with_subjects(tmp_path):
    write_cohort(tmp_path, n_healthy=4, n_patients=3)
    cohort = discover_cohort(_cfg(tmp_path).data)
    assert [c.case_id for c in cohort.healthy] == ["h0", "h1", "h2", "h3"]
    assert [c.subject_id for c in cohort.healthy] == ["hs0", "hs0", "hs1", "hs1"]
    assert all(c.skeleton is not None and c.lesions is None for c in cohort.healthy)
    assert all(c.lesions is not None for c in cohort.patients)
    assert list(cohort.patients[0].channels) == ["T1", "b1000"]


def test_nnunet_layout(tmp_path):
    source = write_case(tmp_path / "src")
    dataset = tmp_path / "Dataset001" / "patients"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for i, name in enumerate(["T1", "b1000"]):
        shutil.copy(source / f"{name}.nii.gz", dataset / "imagesTr" / f"case01_{i:04d}.nii.gz")
    shutil.copy(source / "GT.nii.gz", dataset / "labelsTr" / "case01.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "b1000"}}))
    cfg = _cfg(tmp_path / "Dataset001")
    cohort = discover_cohort(cfg.data)
    (case,) = cohort.patients
    assert case.case_id == "case01" and case.lesions.name == "case01.nii.gz"
    assert case.channels["b1000"].name == "case01_0001.nii.gz"
    loaded = load_case(case, cfg.data)
    assert loaded.image.shape == (2, 16, 16, 20) and loaded.lesions.sum() == 8 + 18


def test_datalist_layout(tmp_path):
    source = write_case(tmp_path / "patients" / "files")
    datalist = {"training": [{"image": ["files/T1.nii.gz", "files/b1000.nii.gz"], "label": "files/GT.nii.gz",
                              "case_id": "dl1", "subject_id": "s1"}]}
    (tmp_path / "patients" / "datalist.json").write_text(json.dumps(datalist))
    cohort = discover_cohort(_cfg(tmp_path).data)
    (case,) = cohort.patients
    assert (case.case_id, case.subject_id) == ("dl1", "s1")
    assert case.lesions == (source / "GT.nii.gz").resolve()


def test_case_id_collision_is_an_error(tmp_path):
    write_case(tmp_path / "healthy" / "same", lesions=None)
    write_case(tmp_path / "patients" / "same")
    with pytest.raises(SapError, match="case id collision: 'same'"):
        discover_cohort(_cfg(tmp_path).data)


def test_missing_channel_names_the_case(tmp_path):
    write_case(tmp_path / "patients" / "p0", channels=("T1",))
    with pytest.raises(SapError, match=r"p0: missing channel b1000"):
        discover_cohort(_cfg(tmp_path).data)


def test_grid_mismatch_names_both_files_and_field(tmp_path):
    case_dir = write_case(tmp_path / "patients" / "p0")
    other = make_geometry((16, 16, 20), (2.0, 2.0, 3.5))
    write_image(np.zeros((16, 16, 20), np.uint8), other, case_dir / "GT.nii.gz")
    cfg = _cfg(tmp_path)
    (case,) = discover_cohort(cfg.data).patients
    with pytest.raises(SapError, match=r"GT.nii.gz and .*T1.nii.gz are on different grids \(spacing"):
        load_case(case, cfg.data)
    cfg.data.resample_channels = True
    assert load_case(case, cfg.data).lesions.shape == (16, 16, 20)


def test_label_in_flipped_storage_is_the_same_grid(tmp_path):
    """A mask stored RAS beside LPS channels covers the same voxels: read it, aligned."""
    case_dir = write_case(tmp_path / "patients" / "p0")
    lps = read_image(case_dir / "GT.nii.gz")
    ras = make_geometry((16, 16, 20), (2.0, 2.0, 3.0), axcodes="RAS",
                        origin=tuple(lps.geometry.affine[:3, 3] * np.array([-1, -1, 1])))
    assert ras.same_grid(lps.geometry) is None
    write_image(lps.array, ras, case_dir / "GT.nii.gz")
    cfg = _cfg(tmp_path)
    (case,) = discover_cohort(cfg.data).patients
    np.testing.assert_array_equal(load_case(case, cfg.data).lesions, lps.array)


def test_percentile_normalisation_inside_body():
    image = np.zeros((1, 10, 10, 10), np.float32)
    image[0, 2:8, 2:8, 2:8] = np.linspace(0, 100, 216).reshape(6, 6, 6)
    body = (image[0] > 0).astype(np.uint8)
    cfg = load_config("tiny").data
    out = normalise(image, body, cfg)
    assert out.min() == 0.0 and out.max() == 1.0
    inside = image[0][body > 0]
    lo, hi = np.percentile(inside, [1, 99])
    np.testing.assert_allclose(out[0][body > 0], np.clip((inside - lo) / (hi - lo), 0, 1), rtol=1e-5)
    cfg.modality, cfg.ct_window = "ct", [-100.0, 100.0]
    ct = normalise(image - 50, body, cfg)
    np.testing.assert_allclose(ct[0, 0, 0, 0], 0.25)  # -50 HU in [-100, 100]


def test_cache_is_memory_mapped_and_keyed_by_content_and_settings(tmp_path):
    write_cohort(tmp_path, n_healthy=1, n_patients=1)
    cfg = _cfg(tmp_path)
    case = discover_cohort(cfg.data).patients[0]
    first = load_cached(case, cfg.data)
    assert isinstance(first.image, np.memmap) and first.image.dtype == np.float32
    assert first.image.shape == (2, 16, 16, 20) and first.lesions.dtype == np.uint8
    assert 0.0 <= float(first.image.min()) and float(first.image.max()) <= 1.0
    again = load_cached(case, cfg.data)
    assert again.path == first.path  # reused, not rebuilt
    key = cache_key(case, cfg.data)
    cfg.data.normalization = "zscore"
    assert cache_key(case, cfg.data) != key
    cfg.data.normalization = "percentile"
    lesions = read_image(case.lesions).array
    lesions[0, 0, 0] = 1
    write_image(lesions, read_image(case.lesions).geometry, case.lesions)
    assert cache_key(case, cfg.data) != key
    assert not list((tmp_path / ".sap_cache").glob(".*"))  # no temporary leftovers


def test_stratified_folds_group_subjects_and_balance_burden():
    burden = {f"s{i}": b for i, b in enumerate([0, 0, 1, 1, 2, 2, 5, 8, 20, 30, 3, 4, 6, 0])}
    folds = stratified_subject_folds(burden, k=3, seed=1)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == sorted(burden) and len(flat) == len(set(flat))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    totals = [sum(burden[s] for s in f) for f in folds]
    # each fold got one of the three heaviest subjects
    heaviest = sorted(burden, key=burden.get)[-3:]
    assert all(sum(s in f for s in heaviest) == 1 for f in folds), totals
    assert folds == stratified_subject_folds(burden, k=3, seed=1)


def test_splits_written_once_and_validated(tmp_path):
    root = write_cohort(tmp_path / "cohort", n_healthy=4, n_patients=9)
    cfg = _cfg(root)
    cfg.cv.k = 3
    cohort = discover_cohort(cfg.data)
    run = tmp_path / "run"
    splits = load_or_create_splits(run, cohort, cfg)
    assert sorted(c for f in splits.folds for c in f) == sorted(c.case_id for c in cohort.patients)
    for fold in splits.test_folds:
        train, val, test = splits.training_cases(fold), splits.validation_cases(fold), splits.test_cases(fold)
        assert val and not set(val) & set(test) and not set(train) & set(val) and not set(train) & set(test)
        assert set(splits.tuning_cases()) <= set(train) | set(val)  # tuning fold trains (as the paper)
    text = (run / "splits.json").read_text()
    assert load_or_create_splits(run, cohort, cfg).folds == splits.folds
    assert (run / "splits.json").read_text() == text
    raw = json.loads(text)
    raw["folds"]["1"].append(raw["folds"]["2"][0])  # edited: one case in two folds
    with pytest.raises(SapError, match="is in folds"):
        splits_from_json(raw, "splits.json", cohort)


def test_subject_in_two_folds_is_refused(tmp_path):
    root = write_cohort(tmp_path / "cohort", n_healthy=0, n_patients=6)
    (root / "patients" / "subjects.csv").write_text("case_id,subject_id\np0,A\np1,A\n")
    cfg = _cfg(root)
    cfg.cv.k = 3
    cohort = discover_cohort(cfg.data)
    splits = make_splits(cohort, cfg)
    assert splits.fold_of("p0") == splits.fold_of("p1")
    raw = splits.to_json()
    fold_a = splits.fold_of("p0")
    other = next(f for f in range(3) if f != fold_a)
    raw["folds"][str(fold_a)].remove("p1")
    raw["folds"][str(other)].append("p1")
    raw["validation"] = {}
    with pytest.raises(SapError, match="subject A is in folds"):
        splits_from_json(raw, "splits.json", cohort)


def test_pretrain_split_by_subject(tmp_path):
    root = write_cohort(tmp_path, n_healthy=6, n_patients=0)
    cases = discover_cohort(_cfg(root).data).healthy
    train, val = pretrain_split(cases, 0.34, seed=0)
    assert val and train
    assert not {c.subject_id for c in train} & {c.subject_id for c in val}


def test_n4_reduces_a_smooth_bias_field(tmp_path):
    shape = (32, 32, 32)
    z = np.linspace(0, 1, shape[2])
    body = np.zeros(shape, bool)
    body[4:28, 4:28, 4:28] = True
    bias = np.broadcast_to(1.0 + 0.8 * z, shape)
    rng = np.random.default_rng(0)
    image = np.where(body, 100.0 * bias + rng.normal(0, 1, shape), 0).astype(np.float32)
    from sap.data.io import from_sitk, make_geometry, to_sitk
    from sap.data.preprocess import n4_correct

    geometry = make_geometry(shape, (2.0, 2.0, 2.0))
    corrected = from_sitk(n4_correct(to_sitk(image, geometry), shrink=2), geometry)
    cv = lambda a: a[body].std() / a[body].mean()  # noqa: E731
    assert cv(corrected) < 0.5 * cv(image)


def test_outputs_have_ordinary_permissions(tmp_path):
    import os
    import stat

    write_cohort(tmp_path, n_healthy=1, n_patients=1)
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "patients/p0/GT.nii.gz").stat().st_mode)
    assert mode == 0o666 & ~umask
    cfg = _cfg(tmp_path)
    cached = load_cached(discover_cohort(cfg.data).patients[0], cfg.data)
    assert stat.S_IMODE(cached.path.stat().st_mode) == 0o777 & ~umask


def test_cohort_json_states_channels_unless_overridden(tmp_path):
    import argparse

    from sap.cli import config_from_args

    write_case(tmp_path / "patients" / "p0", channels=("CT",))
    (tmp_path / "cohort.json").write_text(json.dumps({"channels": ["CT"], "modality": "ct"}))
    args = argparse.Namespace(config="demo", overrides=[], data=str(tmp_path), out=None)
    cfg = config_from_args(args)
    assert cfg.data.channels == ["CT"] and cfg.data.modality == "ct"
    assert list(discover_cohort(cfg.data).patients[0].channels) == ["CT"]
    args.overrides = ["data.channels=[T1]"]
    assert config_from_args(args).data.channels == ["T1"]


@pytest.mark.parametrize("method", ["percentile", "zscore", "ct_window", "none"])
def test_normalise_in_place_equals_copy(method):
    rng = np.random.default_rng(3)
    image = rng.normal(50, 20, size=(2, 12, 12, 12)).astype(np.float32)
    body = np.zeros((12, 12, 12), np.uint8)
    body[2:10, 2:10, 2:10] = 1
    cfg = load_config("tiny").data
    cfg.normalization = method
    expected = normalise(image, body, cfg)
    assert expected.dtype == np.float32 and not np.shares_memory(expected, image)
    in_place = image.copy()
    result = normalise(in_place, body, cfg, out=in_place)
    assert result is in_place
    np.testing.assert_allclose(in_place, expected, rtol=1e-6, atol=1e-6)
    if method == "zscore":
        inside = expected[:, body > 0]
        np.testing.assert_allclose(inside.mean(axis=1), 0, atol=1e-4)
        np.testing.assert_allclose(inside.std(axis=1), 1, atol=1e-4)
