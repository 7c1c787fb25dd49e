"""Issue 14, validation items on data, configs and evaluation (4, 6, 7, 8, 10, 11, 12, 14, 15, 17c/f/h).

Each test runs the real command in-process (``sap.cli.main``) and asserts the exit code, the one
error line naming the file, and (md5 before/after) that nothing changed. Model and inference
items (5, 17a/b/d/e/g) are in ``test_hostile_models.py``.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sap.config import load_config
from sap.data.cache import load_cached
from sap.data.cases import Case, discover_cohort
from sap.data.io import ReadOptions, make_geometry, read_geometry, write_image
from sap.data.splits import make_splits
from sap.errors import SapError
from sap.evaluate.api import evaluate_folders
from sap.metrics import EvaluationSettings
from tests.datafactory import write_case, write_cohort
from tests.hostile_helpers import (
    md5_tree,
    nifti_header_only,
    patch_nifti,
    refuse,
    run,
    write_dicom_series,
)

SHAPE = (10, 12, 14)


def _cohort(root, n=1, shape=SHAPE, suffix=".nii.gz"):
    for i in range(n):
        write_case(root / "patients" / f"p{i}", shape=shape, skeleton=None, seed=i)
    if suffix != ".nii.gz":  # rewrite the first channel uncompressed
        t1 = root / "patients" / "p0" / "T1.nii.gz"
        image = nib.load(str(t1))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), str(t1.with_name("T1.nii")))
        t1.unlink()
    return root


def _check_data(root, *extra):
    return ["check-data", "--config", "tiny", "--data", root, "--quiet", *extra]


# ------------------------------------------------------------------------------------ item 4
def _all_axcodes() -> list[str]:
    """The 48 orientations: every permutation of the three axes, each axis either way."""
    pairs = [("L", "R"), ("P", "A"), ("I", "S")]
    codes = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            codes.append("".join(pairs[axis][sign] for axis, sign in zip(order, signs, strict=True)))
    return codes


def _write_reoriented(canonical: np.ndarray, affine_ras: np.ndarray, axcodes: str, path) -> None:
    """The canonical array stored in orientation ``axcodes`` with the affine adjusted (nibabel
    does the reorientation; NRRD is written by SimpleITK from that affine)."""
    image = nib.Nifti1Image(canonical, affine_ras).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axcodes))
    )
    assert "".join(nib.aff2axcodes(image.affine)) == axcodes
    if path.name.endswith(".nii.gz"):
        nib.save(image, str(path))
        return
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :4]
    spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(image.dataobj).transpose(2, 1, 0)))
    out.SetSpacing(spacing.tolist())
    out.SetDirection((lps[:, :3] / spacing).ravel().tolist())
    out.SetOrigin(lps[:, 3].tolist())
    sitk.WriteImage(out, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_item4_prediction_in_any_orientation_scores_as_its_ground_truth(tmp_path, capsys, suffix):
    """A prediction equal to the ground truth stored in each of the 48 axis orders and flips
    (affine adjusted) is a perfect score: every lesion detected, no false positive, Dice 1."""
    geometry = make_geometry(SHAPE, (1.5, 2.0, 2.5), origin=(4.0, -7.0, 11.0))
    gt = np.zeros(SHAPE, np.uint8)
    gt[1:3, 1:4, 2:4] = 1  # three lesions of different shapes, away from every symmetry
    gt[6:9, 2:3, 9:13] = 1
    gt[2:4, 8:11, 10:12] = 1
    prob = np.where(gt > 0, 0.9, 0.05).astype(np.float32)
    prob[0, 0, 0] = 0.3  # background below threshold, but not symmetric
    codes = _all_axcodes()
    (tmp_path / "pred").mkdir()
    for code in codes:
        write_image(gt, geometry, tmp_path / "gt" / f"c_{code}.nii.gz")
        _write_reoriented(prob, geometry.affine, code, tmp_path / "pred" / f"c_{code}{suffix}")
    watched = [tmp_path / "gt", tmp_path / "pred"]
    before = md5_tree(*watched)
    rc, _, err = run(["evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--out", tmp_path / "ev",
                      "--no-progress", "--set", "evaluate.n_bootstrap=10"], capsys)
    assert rc == 0, err
    assert md5_tree(*watched) == before
    rows = list(csv.DictReader((tmp_path / "ev" / "patients.csv").open()))
    assert len(rows) == len(codes) == 48
    wrong = [r["case"] for r in rows if (r["n_gt"], r["detected"], r["fp"]) != ("3", "3", "0")]
    assert not wrong, wrong
    assert all(float(r["dice_global"]) == pytest.approx(1.0) for r in rows)


# ------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("case_id", ["../../../escaped", "sub/dir", ".."])
def test_item6_datalist_case_id_that_is_not_one_path_component(tmp_path, capsys, case_id):
    """A MONAI datalist ``case_id`` with separators or ``..`` is refused by check-data, naming the
    datalist; nothing is written (no cache entry outside its folder); the cache refuses it too."""
    root = tmp_path / "cohort"
    write_case(root / "patients" / "files", shape=SHAPE, skeleton=None)
    entry = {"image": ["files/T1.nii.gz", "files/b1000.nii.gz"], "label": "files/GT.nii.gz", "case_id": case_id}
    (root / "patients" / "datalist.json").write_text(json.dumps({"training": [entry]}))
    refuse(_check_data(root), capsys, [tmp_path], "check-data", "datalist.json", repr(case_id), "one path component")
    case = Case(case_id=case_id, subject_id="s", group="patients", channels={"T1": root / "patients/files/T1.nii.gz"})
    cfg = load_config("tiny").data
    cfg.cache_dir = str(tmp_path / "cache" / "a" / "b")
    with pytest.raises(SapError, match="one path component"):
        load_cached(case, cfg)
    # sap infer's outputs are named by the case id too: refused before anything is read or written
    from sap.infer import InferenceModel, InferOptions
    from sap.infer.inputs import InputCase
    from sap.infer.pipeline import infer_case

    model = InferenceModel.from_module(torch.nn.Conv3d(1, 2, 1), ["T1"], roi_size=(16, 16, 16))
    with pytest.raises(SapError, match="one path component"):
        infer_case(InputCase(case_id, case), tmp_path / "out" / "a", model, InferOptions(progress=False))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ item 7
def _dicom_case(root, **series):
    volume = (np.arange(6 * 8 * 10).reshape(10, 8, 6) % 50).astype(np.int16)  # (z, y, x)
    folder = root / "patients" / "p0" / "CT"
    write_dicom_series(folder, volume, **series)
    return folder, volume


def test_item7_dicom_missing_slice_and_two_series(tmp_path, capsys):
    """A series with a missing slice is refused naming the gap; two series in one folder are an
    error listing both UIDs; ``--series UID`` reads the one asked for."""
    root = tmp_path / "cohort"
    folder, volume = _dicom_case(root, skip=(4,))
    argv = ["check-data", "--config", "tiny", "--data", root, "--quiet", "--set", "data.channels=[CT]",
            "--set", "data.modality=ct"]
    refuse(argv, capsys, [tmp_path], "check-data", str(folder), "not uniform", "4 mm", "2 mm elsewhere")

    # a tolerance that accepts the gap is configurable
    rc, _, err = run([*argv, "--set", "data.dicom_slice_tolerance=1.5"], capsys)
    assert "not uniform" not in err

    # a truncated slice file (GDCM drops it from the series) is the same gap
    for path in folder.iterdir():
        path.unlink()
    write_dicom_series(folder, volume)
    sixth = sorted(folder.iterdir())[5]
    sixth.write_bytes(sixth.read_bytes()[:300])
    refuse(argv, capsys, [tmp_path], "check-data", str(folder), "not uniform", "4 mm")

    # two complete series in one folder
    for path in folder.iterdir():
        path.unlink()
    write_dicom_series(folder, volume, series_uid="1.2.3.100")
    write_dicom_series(folder, volume[::-1], series_uid="1.2.3.200", origin=(0.0, 0.0, 50.0))
    geometry = read_geometry(folder, ReadOptions(dicom_series="1.2.3.100"))
    gt = np.zeros(geometry.canonical_shape, np.uint8)
    gt[1:3, 1:3, 1:3] = 1
    write_image(gt, geometry, root / "patients" / "p0" / "GT.nii.gz")
    refuse(argv, capsys, [tmp_path], "check-data", str(folder), "2 DICOM series", "1.2.3.100", "1.2.3.200", "--series")
    rc, out, err = run([*argv, "--series", "1.2.3.100"], capsys)
    assert rc == 0, err
    assert "1 cases passed every check" in out


# ------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize(
    "pixdim, sform, needle",
    [
        ([1, 0, 2, 2], None, "spacing (pixdim)"),
        ([1, 2, float("nan"), 2], None, "spacing (pixdim)"),
        ([1, 2, 2, float("inf")], None, "spacing (pixdim)"),
        (None, [[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], "spacing (sform)"),
        (None, [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], "not orthonormal"),
    ],
    ids=["zero", "nan", "inf", "zero-sform", "sheared"],
)
def test_item8_impossible_spacing_or_direction(tmp_path, capsys, pixdim, sform, needle):
    """Zero and non-finite spacing are refused (ITK would read them as 1 mm); a sheared direction
    says so instead of "cannot read image header"."""
    root = _cohort(tmp_path / "cohort", suffix=".nii")
    t1 = root / "patients" / "p0" / "T1.nii"
    patch_nifti(t1, pixdim=pixdim, sform=sform)
    line = refuse(_check_data(root), capsys, [tmp_path], "check-data", str(t1), needle)
    assert "cannot read image header" not in line


def test_item8_negative_pixdim_is_read_as_nibabel_does(tmp_path):
    """nibabel takes a negative pixdim as its absolute value; so does sap (ITK keeps the sign)."""
    root = _cohort(tmp_path / "cohort", suffix=".nii")
    t1 = root / "patients" / "p0" / "T1.nii"
    patch_nifti(t1, pixdim=[1, -2, 2, 2])
    geometry = read_geometry(t1)
    assert geometry.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(geometry.affine, nib.as_closest_canonical(nib.load(str(t1))).affine, atol=1e-6)


# ------------------------------------------------------------------------------------ item 10
def test_item10_duplicate_channels_and_subject_in_both_pretraining_sets(tmp_path, capsys):
    """``channels: [T1, T1]`` is a config error (file or --set, each blamed); a splits file with a
    subject in both the pretraining training and validation sets is refused by check-data."""
    root = write_cohort(tmp_path / "cohort", n_healthy=3, n_patients=3, shape=(8, 8, 8))
    refuse([*_check_data(root), "--set", "data.channels=[T1,T1]"], capsys, [tmp_path], "check-data",
           "--set data.channels=[T1,T1]", "T1 listed twice")
    config = tmp_path / "dup.yaml"
    config.write_text("data:\n  channels: [T1, T1]\n")
    refuse(["check-data", "--config", config, "--data", root, "--quiet"], capsys, [tmp_path], "check-data",
           str(config), "T1 listed twice")

    cfg = load_config("tiny")
    cfg.data.root = str(root)
    splits = make_splits(discover_cohort(cfg.data), cfg).to_json()
    # h0 and h1 are one subject (hs0): one in training, the other in validation
    splits["pretrain"] = {"train": ["h0", "h2"], "val": ["h1"]}
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    rc, _, err = run([*_check_data(root), "--splits", path], capsys)
    assert rc == 2 and "Traceback" not in err
    problems = [line for line in err.splitlines() if "pretraining" in line]
    assert len(problems) == 1 and str(path) in problems[0] and "hs0" in problems[0], err


def _eval_folder(tmp_path, name, case_ids):
    geometry = make_geometry((8, 8, 8), (2.0, 2.0, 2.0))
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    for case_id in case_ids:
        write_image(gt, geometry, tmp_path / f"{name}_gt" / f"{case_id}.nii.gz")
        write_image(gt.astype(np.float32) * 0.8, geometry, tmp_path / f"{name}_pred" / f"{case_id}.nii.gz")
    evaluate_folders(tmp_path / f"{name}_pred", tmp_path / f"{name}_gt", tmp_path / name,
                     EvaluationSettings(n_bootstrap=10), progress=False)
    return tmp_path / name


def test_item10_compare_on_disjoint_case_sets(tmp_path, capsys):
    a = _eval_folder(tmp_path, "a", ["c1", "c2"])
    b = _eval_folder(tmp_path, "b", ["c3", "c4"])
    refuse(["evaluate", "--compare", a, b], capsys, [tmp_path], "evaluate", str(a / "patients.csv"),
           str(b / "patients.csv"), "share no case")


# ------------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_item11_header_declaring_more_voxels_than_the_file_holds(tmp_path, capsys, suffix):
    """A small file whose header declares 1200³ voxels is refused from its size, before any
    allocation, in one line naming the file."""
    root = _cohort(tmp_path / "cohort")
    t1 = root / "patients" / "p0" / f"T1{suffix}"
    (root / "patients" / "p0" / "T1.nii.gz").unlink()
    raw = nifti_header_only((1200, 1200, 1200))
    t1.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    refuse(_check_data(root), capsys, [tmp_path], "check-data", str(t1), "1200×1200×1200")


def test_item11_configurable_voxel_limit(tmp_path, capsys):
    root = _cohort(tmp_path / "cohort")
    refuse([*_check_data(root), "--set", "data.max_voxels=1000"], capsys, [tmp_path], "check-data",
           "T1.nii.gz", "data.max_voxels", str(np.prod(SHAPE)))


# ------------------------------------------------------------------------------------ item 12
def test_item12_yaml_alias_bomb_and_unbounded_values(tmp_path, capsys):
    """A YAML alias bomb is refused at the first alias (no expansion); a huge value in a wrong
    type is shown shortened, never repr'd in full."""
    levels = ["a: &a [" + ", ".join(["x"] * 9) + "]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    refuse(["check-data", "--config", bomb, "--data", tmp_path], capsys, [tmp_path], "check-data", str(bomb), "alias")

    huge = tmp_path / "huge.yaml"
    huge.write_text("finetune:\n  max_steps: [" + ", ".join(["1"] * 3000) + "]\n")
    line = refuse(["check-data", "--config", huge, "--data", tmp_path], capsys, [tmp_path], "check-data",
                  str(huge), "finetune.max_steps: expected int")
    assert len(line) < 400
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"key_{i}_{'x' * 200}: 1\n" for i in range(3000)))
    line = refuse(["check-data", "--config", many, "--data", tmp_path], capsys, [tmp_path], "check-data",
                  str(many), "unknown key", "and 2990 more")
    assert len(line) < 3000


# ------------------------------------------------------------------------------------ item 14
def test_item14_patch_size_and_learning_rates(tmp_path, capsys):
    """A 32³ patch (1×1×1 Swin UNETR bottleneck) and NaN / zero learning rates are config errors
    before anything runs; 64×64×32 is the smallest patch that trains (checked with a step)."""
    out = tmp_path / "run"
    base = ["finetune", "--config", "tiny", "--data", tmp_path / "absent", "--out", out, "--init", "scratch",
            "--fold", "1", "--no-progress"]
    refuse([*base, "--set", "model.patch_size=[32,32,32]"], capsys, [tmp_path], "finetune",
           "--set model.patch_size", "1×1×1 bottleneck")
    refuse([*base, "--set", "finetune.lr_scratch=.nan"], capsys, [tmp_path], "finetune",
           "finetune.lr_scratch: nan must be a finite positive learning rate")
    refuse([*base, "--set", "pretrain.lr=0"], capsys, [tmp_path], "finetune", "pretrain.lr: 0.0 must be")
    assert not out.exists()

    from sap.models.swin import build_swin_unetr

    # the rule the config states is the network's own: in training mode (instance norm over the
    # bottleneck) 32³ fails and 64×64×32, which the config accepts, runs
    cfg = load_config("tiny", ["model.patch_size=[64,64,32]"])
    with torch.no_grad():
        build_swin_unetr(cfg.model, 1, 2).train()(torch.zeros(1, 1, 64, 64, 32))
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            build_swin_unetr(cfg.model, 1, 2).train()(torch.zeros(1, 1, 32, 32, 32))


# ------------------------------------------------------------------------------------ item 15
def test_item15_remaining_tracebacks(tmp_path, capsys):
    """labels from-totalseg to a .txt, evaluate --out an existing file, evaluate --compare A A."""
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[2:4, 2:4, 2:4] = 26  # a vertebra in the shipped `total` table
    source = tmp_path / "totalseg.nii.gz"
    write_image(labels, make_geometry((6, 6, 6), (1.0, 1.0, 1.0)), source)
    refuse(["labels", "from-totalseg", source, tmp_path / "out.txt"], capsys, [tmp_path], "labels",
           "out.txt", "not an image file name")

    a = _eval_folder(tmp_path, "a", ["c1", "c2"])
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    refuse(["evaluate", "--pred", tmp_path / "a_pred", "--gt", tmp_path / "a_gt", "--out", existing, "--no-progress"],
           capsys, [tmp_path], "evaluate", str(existing), "not a folder")
    refuse(["evaluate", "--compare", a, tmp_path / "x" / ".." / "a"], capsys, [tmp_path], "evaluate", "given twice")


# ------------------------------------------------------------------------------------ item 17 c, f, h
def test_item17c_dangling_symlink_channel(tmp_path, capsys):
    root = _cohort(tmp_path / "cohort")
    t1 = root / "patients" / "p0" / "T1.nii.gz"
    t1.unlink()
    t1.symlink_to(tmp_path / "moved" / "T1.nii.gz")
    line = refuse(_check_data(root), capsys, [tmp_path], "check-data", str(t1), "broken symbolic link", "moved")
    assert "missing channel" not in line


def test_item17f_splits_file_made_for_another_k(tmp_path, capsys):
    root = write_cohort(tmp_path / "cohort", n_healthy=0, n_patients=3, shape=(8, 8, 8))
    cfg = load_config("tiny")
    cfg.data.root = str(root)
    splits = make_splits(discover_cohort(cfg.data), cfg).to_json()
    splits["k"] = 4  # folds 0, 1, 2 only
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    rc, _, err = run([*_check_data(root), "--splits", path], capsys)
    assert rc == 2 and "KeyError" not in err and "Traceback" not in err
    problem = [line for line in err.splitlines() if str(path) in line]
    assert len(problem) == 1 and "k=4" in problem[0] and "another k" in problem[0], err


def test_item17h_set_errors_blame_set_not_the_config_file(tmp_path, capsys):
    root = _cohort(tmp_path / "cohort")
    line = refuse([*_check_data(root), "--set", "finetune.max_steps=abc"], capsys, [tmp_path], "check-data",
                  "--set finetune.max_steps=abc", "expected int")
    assert "tiny.yaml" not in line
    config = tmp_path / "bad.yaml"
    config.write_text("finetune:\n  max_step: 3\n")  # the file's own mistake stays the file's
    line = refuse(["check-data", "--config", config, "--data", root, "--set", "finetune.max_steps=4"], capsys,
                  [tmp_path], "check-data", str(config), "finetune.max_step: unknown key")
    assert "--set" not in line
