"""``sap infer``: geometry, lesion table, regions, DICOM SEG, bundles, bad input (SPEC §8, §13).

Geometry and I/O run a one-layer stand-in network (a 1×1×1 convolution whose foreground
probability is a known voxelwise function of the input) through the real sliding-window engine,
so every expected value is computed independently from the input files (nibabel / SimpleITK /
pydicom), never from sap's own reader. One test runs a tiny Swin UNETR end to end through the
``sap`` command.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from sap.cli import main
from sap.config import DataConfig, load_config
from sap.data.io import make_geometry, write_image
from sap.errors import SapError
from sap.infer import InferenceModel, InferOptions, load_model, predict, run_inference
from sap.infer.inputs import discover_inputs
from sap.infer.lesions import REGIONS, lesion_instances
from sap.models.bundle import read_bundle, write_bundle
from sap.models.swin import build_swin_unetr
from sap.models.weights import make_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------------- helpers
# LPS world direction columns of each source index axis for nibabel orientation codes.
DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def standin(weights: list[float], bias: float) -> nn.Module:
    """1×1×1 convolution: logit_0 = 0, logit_1 = Σ w_c x_c + bias, so the engine's foreground
    probability is sigmoid(Σ w_c x_c + bias) voxel by voxel."""
    conv = nn.Conv3d(len(weights), 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, :, 0, 0, 0] = torch.tensor(weights)
        conv.bias[1] = bias
    return conv


def expected_prob(channels: list[np.ndarray], weights: list[float], bias: float) -> np.ndarray:
    logit = sum(w * c.astype(np.float64) for w, c in zip(weights, channels, strict=True)) + bias
    return 1.0 / (1.0 + np.exp(-logit))


def raw_model(channels: list[str], weights: list[float], bias: float, roi=(32, 32, 32), **kw) -> InferenceModel:
    data = DataConfig(channels=list(channels), modality="ct", normalization="none")
    return InferenceModel.from_module(standin(weights, bias), channels, data, roi_size=roi, **kw)


def write_sitk(array_xyz: np.ndarray, path: Path, spacing, origin, axcodes: str) -> sitk.Image:
    """Write a source-order (x, y, z) array with SimpleITK directly (not through sap)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(DIRECTIONS[axcodes].flatten().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def sitk_xyz(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def opts(**kw) -> InferOptions:
    return InferOptions(progress=False, **kw)


# ----------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LAS", "PIR"])
def test_outputs_overlay_input_and_lesion_lands_at_its_lps_coordinate(tmp_path, axcodes):
    """Two channels in any orientation: the probability map read back equals the stand-in's
    function of the input voxel by voxel, on the input's grid; a lesion block placed at known
    source indices appears in the CSV at its LPS centroid with its exact volume."""
    rng = np.random.default_rng(1)
    size, spacing, origin = (23, 17, 29), (1.5, 2.0, 2.5), (-30.0, 12.5, 80.0)
    t1 = rng.uniform(-1, 1, size).astype(np.float32)
    b1000 = rng.uniform(-1, 1, size).astype(np.float32)
    block = (slice(5, 9), slice(3, 6), slice(10, 17))  # source (x, y, z) indices
    t1[block] = 8.0
    case = tmp_path / "in" / "case1"
    image = write_sitk(t1, case / "T1.nii.gz", spacing, origin, axcodes)
    write_sitk(b1000, case / "b1000.nii.gz", spacing, origin, axcodes)
    weights, bias = [1.0, 0.5], -4.0
    model = raw_model(["T1", "b1000"], weights, bias, roi=(32, 32, 32))

    report = run_inference(case, tmp_path / "out", model, opts())
    assert not report.failed, report.summary()

    out = tmp_path / "out"
    prob_img = sitk.ReadImage(str(out / "case1_prob.nii.gz"))
    assert_same_geometry(prob_img, image)
    np.testing.assert_allclose(nib.load(out / "case1_prob.nii.gz").affine, nib.load(case / "T1.nii.gz").affine, atol=1e-4)
    np.testing.assert_allclose(sitk_xyz(out / "case1_prob.nii.gz"), expected_prob([t1, b1000], weights, bias), atol=1e-5)

    instances = sitk_xyz(out / "case1_lesions.nii.gz")
    expected_mask = expected_prob([t1, b1000], weights, bias) >= 0.5
    assert expected_mask[block].all() and expected_mask.sum() == 4 * 3 * 7  # only the block passes
    np.testing.assert_array_equal(instances > 0, expected_mask)
    rows = read_rows(out / "case1_lesions.csv")
    assert len(rows) == 1
    centre = [(s.start + s.stop - 1) / 2 for s in block]
    lps = image.TransformContinuousIndexToPhysicalPoint(centre)
    got = [float(rows[0][f"centroid_lps_{a}_mm"]) for a in "xyz"]
    np.testing.assert_allclose(got, lps, atol=2e-3)
    assert float(rows[0]["volume_ml"]) == pytest.approx(4 * 3 * 7 * np.prod(spacing) / 1000, rel=1e-5)
    assert "region" not in rows[0]


REAL_INPUTS = {
    "RAS": "ct_small/ct.nii.gz",
    "LPS": "mr_abdomen/mr.nii.gz",
    "PIR": "verse004/vertebrae_mask.nii.gz",
    "LAS": "ct_upper_abdomen_dicom/labels_totalseg.nii.gz",
}


@pytest.mark.parametrize("axcodes", sorted(REAL_INPUTS))
def test_real_files_every_orientation_keep_their_geometry(shared_data, tmp_path, axcodes):
    source = shared_data / REAL_INPUTS[axcodes]
    image = sitk.ReadImage(str(source))
    assert "".join(nib.aff2axcodes(nib.load(source).affine)) == axcodes
    weights, bias = [0.01], -1.0
    model = raw_model(["CT"], weights, bias, roi=(128, 128, 64))
    report = run_inference(source, tmp_path / "out", model, opts())
    assert not report.failed, report.summary()
    case_id = source.name.removesuffix(".nii.gz")
    prob_path = tmp_path / "out" / f"{case_id}_prob.nii.gz"
    assert_same_geometry(sitk.ReadImage(str(prob_path)), image)
    np.testing.assert_allclose(nib.load(prob_path).affine, nib.load(source).affine, atol=1e-4)
    source_xyz = np.asanyarray(nib.load(source).dataobj)
    np.testing.assert_allclose(sitk_xyz(prob_path), expected_prob([source_xyz], weights, bias), atol=1e-5)
    lesions = sitk_xyz(tmp_path / "out" / f"{case_id}_lesions.nii.gz")
    np.testing.assert_array_equal(lesions > 0, expected_prob([source_xyz], weights, bias) >= 0.5)


def test_dicom_series_with_dicom_seg(shared_data, tmp_path):
    """A DICOM series folder in: outputs on the series grid, and a DICOM SEG that references the
    source images and reads back with highdicom with the lesion voxels of each source slice."""
    import highdicom as hd
    import pydicom

    series = shared_data / "ct_upper_abdomen_dicom" / "dicom"
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series))
    reader.SetFileNames(files)
    image = reader.Execute()
    weights, bias = [0.05], -0.05 * 300.5  # bone (HU > 300.5) is "lesion"
    model = raw_model(["CT"], weights, bias, roi=(256, 256, 32))
    report = run_inference(series, tmp_path / "out", model, opts(dicom_seg=True))
    assert not report.failed, report.summary()
    out = tmp_path / "out"
    prob_img = sitk.ReadImage(str(out / "dicom_prob.nii.gz"))
    assert_same_geometry(prob_img, image)
    hu_xyz = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    np.testing.assert_allclose(sitk_xyz(out / "dicom_prob.nii.gz"), expected_prob([hu_xyz], weights, bias), atol=1e-5)

    seg = hd.seg.segread(out / "dicom_seg.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert seg.Modality == "SEG"
    assert "research use only" in seg.SeriesDescription.lower()
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    uids = [ds.file_meta.MediaStorageSOPInstanceUID for ds in sources]
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    # each SEG frame (rows = y, columns = x) = the bone voxels of its source slice, in file order
    np.testing.assert_array_equal(pixels[..., 0] > 0, hu_xyz.transpose(2, 1, 0) > 300.5)


# ----------------------------------------------------------------------------------- lesions
def test_threshold_min_volume_and_ordering(tmp_path):
    """Stored threshold/min volume apply unless overridden; ids run from the largest lesion."""
    size = (30, 30, 30)
    x = np.zeros(size, np.float32)
    x[2:4, 2:4, 2:4] = 0.6  # 8 voxels, prob sigmoid(0.6*10-5)=0.73
    x[10:15, 10:15, 10:15] = 0.9  # 125 voxels, prob 0.98
    x[20:23, 20:23, 20:23] = 0.45  # 27 voxels, prob 0.38
    write_sitk(x, tmp_path / "c.nii.gz", (2.0, 2.0, 2.0), (0, 0, 0), "LPS")  # voxel = 0.008 mL
    model = raw_model(["CT"], [10.0], -5.0, threshold=0.3, min_volume_ml=0.1)
    run_inference(tmp_path / "c.nii.gz", tmp_path / "a", model, opts())
    rows = read_rows(tmp_path / "a" / "c_lesions.csv")
    # stored 0.3 keeps the 0.38 lesion; 0.1 mL (12.5 voxels) drops the 8-voxel one
    assert [round(float(r["volume_ml"]) / 0.008) for r in rows] == [125, 27]
    assert [r["lesion_id"] for r in rows] == ["1", "2"]
    instances = sitk_xyz(tmp_path / "a" / "c_lesions.nii.gz")
    assert (instances[10:15, 10:15, 10:15] == 1).all() and (instances[20:23, 20:23, 20:23] == 2).all()
    assert instances[2:4, 2:4, 2:4].max() == 0
    summary = json.loads((tmp_path / "a" / "c_summary.json").read_text())
    assert summary["threshold"] == 0.3 and summary["min_volume_ml"] == 0.1 and summary["research_use_only"]

    run_inference(tmp_path / "c.nii.gz", tmp_path / "b", model, opts(threshold=0.5, min_volume_ml=0.0))
    rows = read_rows(tmp_path / "b" / "c_lesions.csv")
    assert [round(float(r["volume_ml"]) / 0.008) for r in rows] == [125, 8]
    assert float(rows[0]["max_prob"]) == pytest.approx(1 / (1 + np.exp(-4.0)), abs=1e-5)
    assert float(rows[1]["mean_prob"]) == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-5)
    # diameters by boundary-face centres (sap.metrics.diameters): a 10 mm cube spans 10 mm between
    # opposite faces and 8 mm between the outermost face centres beside them
    assert float(rows[0]["axial_diameter_mm"]) == pytest.approx(np.hypot(10.0, 8.0), abs=0.01)
    assert float(rows[0]["feret_diameter_mm"]) == pytest.approx(np.sqrt(100.0 + 64.0 + 64.0), abs=0.01)
    assert float(rows[1]["axial_diameter_mm"]) == pytest.approx(np.hypot(4.0, 2.0), abs=0.01)
    assert [r["axial_diameter_ge_10mm"] for r in rows] == ["True", "False"]


def test_lesion_instances_rule_matches_scipy_labelling():
    rng = np.random.default_rng(3)
    prob = rng.uniform(size=(20, 18, 16)).astype(np.float32)
    instances, n = lesion_instances(prob, 0.8, 0.0, 1.0)
    from scipy import ndimage

    labels, n_ref = ndimage.label(prob >= 0.8, structure=np.ones((3, 3, 3)))
    assert n == n_ref
    sizes = np.bincount(instances.ravel())[1:]
    assert np.all(np.diff(sizes) <= 0)  # 1 = largest
    assert sorted(sizes) == sorted(np.bincount(labels.ravel())[1:])
    # same partition: every reference component maps to exactly one instance id
    pairs = np.unique(np.stack([labels.ravel(), instances.ravel()]), axis=1)
    assert pairs.shape[1] == n + 1


# ----------------------------------------------------------------------------------- regions
def _region_case(tmp_path: Path) -> tuple[Path, np.ndarray]:
    size = (24, 24, 40)
    x = np.zeros(size, np.float32)
    skeleton = np.zeros(size, np.uint8)
    skeleton[:, :, 0:10] = 4  # pelvis
    skeleton[:, :, 10:25] = 3  # lumbar spine
    skeleton[:, :, 25:40] = 2  # thoracic spine
    skeleton[18:, :, :] = 0  # a "rib" strip: background
    x[4:8, 4:8, 27:31] = 1.0  # 64 voxels in thoracic spine
    x[4:8, 4:8, 7:12] = 1.0  # 80 voxels: 48 pelvis, 32 lumbar → pelvis
    x[19:22, 10:13, 15:18] = 1.0  # 27 voxels in the background strip → rib/other
    x[10:12, 10:12, 14:16] = 1.0  # 8 voxels in lumbar spine
    case = tmp_path / "in" / "p1"
    write_sitk(x, case / "CT.nii.gz", (2.0, 2.0, 2.0), (0, 0, 0), "RAS")
    write_sitk(skeleton, case / "skeleton.nii.gz", (2.0, 2.0, 2.0), (0, 0, 0), "RAS")
    return case, skeleton


def test_region_attribution_from_skeleton_labels(tmp_path):
    case, _ = _region_case(tmp_path)
    model = raw_model(["CT"], [10.0], -5.0)
    report = run_inference(tmp_path / "in", tmp_path / "out", model, opts(), skeleton=tmp_path / "in")
    assert not report.failed, report.summary()
    rows = read_rows(tmp_path / "out" / "p1_lesions.csv")
    by_volume = {round(float(r["volume_ml"]) / 0.008): r["region"] for r in rows}
    assert by_volume == {80: "pelvis", 64: "thoracic_spine", 27: "rib/other", 8: "lumbar_spine"}
    regions = {r["region"]: r for r in read_rows(tmp_path / "out" / "p1_regions.csv")}
    assert list(regions) == list(REGIONS)
    assert int(regions["pelvis"]["n_lesions"]) == 1 and int(regions["femurs"]["n_lesions"]) == 0
    assert float(regions["thoracic_spine"]["total_volume_ml"]) == pytest.approx(64 * 0.008)
    assert float(regions["rib/other"]["largest_lesion_ml"]) == pytest.approx(27 * 0.008)
    assert sum(int(r["n_lesions"]) for r in regions.values()) == 4


class SkeletonStandIn(nn.Module):
    """10-class stand-in: class k's logit peaks where the second channel equals k."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(10, dtype=x.dtype, device=x.device).view(1, 10, 1, 1, 1)
        return -10.0 * (x[:, 1:2] - k).abs()


def test_region_attribution_from_a_skeletal_model(tmp_path):
    _, skeleton = _region_case(tmp_path)
    case = tmp_path / "in" / "p1"
    two = tmp_path / "two" / "p1"  # channel 2 carries the skeleton for the stand-in skeletal model
    two.mkdir(parents=True)
    (two / "CT.nii.gz").write_bytes((case / "CT.nii.gz").read_bytes())
    write_sitk(nib.load(case / "skeleton.nii.gz").get_fdata().astype(np.float32), two / "S.nii.gz",
               (2.0, 2.0, 2.0), (0, 0, 0), "RAS")
    data = DataConfig(channels=["CT", "S"], modality="ct", normalization="none")
    lesion = InferenceModel.from_module(standin([10.0, 0.0], -5.0), ["CT", "S"], data, roi_size=(32, 32, 32))
    skeletal = InferenceModel.from_module(SkeletonStandIn(), ["CT", "S"], data, roi_size=(32, 32, 32),
                                          out_channels=10, kind="skeletal")
    report = run_inference(two, tmp_path / "out", lesion, opts(), skeletal_model=skeletal)
    assert not report.failed, report.summary()
    rows = read_rows(tmp_path / "out" / "p1_lesions.csv")
    by_volume = {round(float(r["volume_ml"]) / 0.008): r["region"] for r in rows}
    assert by_volume == {80: "pelvis", 64: "thoracic_spine", 27: "rib/other", 8: "lumbar_spine"}


# ----------------------------------------------------------------------------------- API, bundle
def test_predict_api_arrays_and_files(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(2, 20, 21, 22)).astype(np.float32)
    prob = predict(arr, standin([1.0, -1.0], 0.2), roi_size=(32, 32, 32))
    np.testing.assert_allclose(prob, expected_prob([arr[0], arr[1]], [1.0, -1.0], 0.2), atol=1e-5)
    geometry = make_geometry((20, 21, 22), (1.0, 2.0, 3.0), axcodes="PIR")
    write_image(arr[0], geometry, tmp_path / "a.nii.gz")
    write_image(arr[1], geometry, tmp_path / "b.nii.gz")
    model = raw_model(["A", "B"], [1.0, -1.0], 0.2)
    from_files = predict([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], model)
    np.testing.assert_allclose(from_files, prob, atol=1e-5)  # canonical array, like read_image
    with pytest.raises(SapError, match="3 files"):
        predict([tmp_path / "a.nii.gz"] * 3, model)


def test_ensemble_averages_probabilities(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(1, 16, 16, 16)).astype(np.float32)
    ensemble = InferenceModel.from_module([standin([2.0], 0.0), standin([-1.0], 1.0)], ["CT"], roi_size=(32, 32, 32))
    expected = (expected_prob([arr[0]], [2.0], 0.0) + expected_prob([arr[0]], [-1.0], 1.0)) / 2
    np.testing.assert_allclose(predict(arr, ensemble), expected, atol=1e-5)


def test_target_spacing_predicts_on_resampled_grid_and_writes_source_grid(tmp_path):
    x = np.zeros((30, 24, 20), np.float32)
    x[10:20, 8:16, 5:15] = 1.0
    write_sitk(x, tmp_path / "c.nii.gz", (1.0, 1.0, 2.0), (5, 5, 5), "LPS")
    data = DataConfig(channels=["CT"], modality="ct", normalization="none", target_spacing=[2.0, 2.0, 2.0])
    model = InferenceModel.from_module(standin([10.0], -5.0), ["CT"], data, roi_size=(32, 32, 32))
    run_inference(tmp_path / "c.nii.gz", tmp_path / "out", model, opts())
    prob = sitk.ReadImage(str(tmp_path / "out" / "c_prob.nii.gz"))
    assert_same_geometry(prob, sitk.ReadImage(str(tmp_path / "c.nii.gz")))
    values = sitk_xyz(tmp_path / "out" / "c_prob.nii.gz")
    assert values[14, 12, 10] > 0.99 and values[2, 2, 2] < 0.01  # centre in, far corner out


def _tiny_checkpoint(channels=("T1", "b1000"), seed=0, threshold=0.5, out_channels=2, feature_size=12):
    torch.manual_seed(seed)
    cfg = load_config("tiny")
    cfg.data.channels = list(channels)
    cfg.model.feature_size = feature_size
    network = build_swin_unetr(cfg.model, len(channels), out_channels)
    return make_checkpoint(network, config=cfg.to_dict(), channels=list(channels), kind="lesion",
                           out_channels=out_channels, threshold=threshold, min_volume_ml=0.0)


def test_bundle_roundtrip_loads_every_fold_with_the_bundle_threshold(tmp_path):
    ckpts = [_tiny_checkpoint(seed=0, threshold=0.5), _tiny_checkpoint(seed=1, threshold=0.6)]
    bundle_dir = write_bundle(tmp_path / "bundle", ckpts, threshold=0.35, min_volume_ml=0.25, method="sap")
    raw = json.loads((bundle_dir / "bundle.json").read_text())
    assert raw["format"] == "sap-bundle" and raw["version"] == 1 and raw["research_use_only"] is True
    assert raw["models"] == ["fold_1.pt", "fold_2.pt"] and raw["channels"] == ["T1", "b1000"]
    bundle = read_bundle(bundle_dir)
    assert bundle.method == "sap" and len(bundle.model_paths) == 2
    model = load_model(bundle_dir)
    assert len(model.networks) == 2 and model.threshold == 0.35 and model.min_volume_ml == 0.25
    for network, ckpt in zip(model.networks, ckpts, strict=True):
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    with pytest.raises(SapError, match="bundle exists"):
        write_bundle(bundle_dir, ckpts, threshold=0.35, min_volume_ml=0.0, method="sap")
    (bundle_dir / "fold_2.pt").unlink()
    with pytest.raises(SapError, match="fold_2.pt"):
        read_bundle(bundle_dir)
    with pytest.raises(SapError, match="channels"):
        write_bundle(tmp_path / "b2", [ckpts[0], _tiny_checkpoint(channels=("CT",))], 0.5, 0.0, "sap")


# ----------------------------------------------------------------------------------- inputs
def test_discovery_layouts(tmp_path):
    geometry = make_geometry((8, 8, 8), (1.0, 1.0, 1.0))
    zeros = np.zeros((8, 8, 8), np.float32)
    write_image(zeros, geometry, tmp_path / "dir" / "a" / "t1.nii.gz")  # case-insensitive name
    write_image(zeros, geometry, tmp_path / "dir" / "a" / "B1000.nii.gz")
    write_image(zeros, geometry, tmp_path / "dir" / "b_0000.nii.gz")  # nnU-Net style
    write_image(zeros, geometry, tmp_path / "dir" / "b_0001.nii.gz")
    write_image(zeros, geometry, tmp_path / "dir" / "c" / "T1.nii.gz")  # missing b1000
    cases = {c.case_id: c for c in discover_inputs(tmp_path / "dir", ["T1", "b1000"])}
    assert sorted(cases) == ["a", "b", "c"]
    assert cases["a"].case.channels["T1"].name == "t1.nii.gz"
    assert cases["b"].case.channels["b1000"].name == "b_0001.nii.gz"
    assert cases["c"].case is None and "missing channel b1000" in cases["c"].error
    with pytest.raises(SapError, match="2 channels"):
        discover_inputs(tmp_path / "dir" / "b_0000.nii.gz", ["T1", "b1000"])
    with pytest.raises(SapError, match="not found"):
        discover_inputs(tmp_path / "nothing", ["T1"])


# ----------------------------------------------------------------------------------- command, §13
@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "lesion.pt"
    save_checkpoint(_tiny_checkpoint(threshold=0.37), path)
    return path


def _mr_case(folder: Path, shape=(48, 40, 56), seed=0, axcodes="LAS") -> Path:
    rng = np.random.default_rng(seed)
    geometry = make_geometry(shape, (3.0, 3.0, 4.0), origin=(10.0, -5.0, 3.0), axcodes=axcodes)
    for name in ("T1", "b1000"):
        image = rng.normal(100, 20, size=shape).astype(np.float32)
        image[:4] = 0
        write_image(image, geometry, folder / f"{name}.nii.gz")
    return folder


def test_command_end_to_end_tiny_swin_with_one_failing_case(tmp_path, tiny_model_file, capsys):
    """The real command on a folder with a good case and a broken one: the good case is
    written (geometry of its input, lesions = prob ≥ the stored threshold 0.37), the broken one
    is reported by file name, nothing of it is written, and the exit code says a case failed."""
    good = _mr_case(tmp_path / "in" / "good")
    bad = _mr_case(tmp_path / "in" / "bad", seed=1)
    (bad / "b1000.nii.gz").write_bytes((bad / "b1000.nii.gz").read_bytes()[:300])  # truncated
    out = tmp_path / "out"
    rc = main(["infer", "-i", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model_file), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "b1000.nii.gz" in captured.err and "1 of 2 cases done, 1 failed: bad" in captured.err
    assert not list(out.glob("bad_*")) and not list(out.glob(".*"))
    assert "Research use only" in (out / "README.txt").read_text()
    prob_img = sitk.ReadImage(str(out / "good_prob.nii.gz"))
    assert_same_geometry(prob_img, sitk.ReadImage(str(good / "T1.nii.gz")))
    prob = sitk.GetArrayFromImage(prob_img)
    assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "good_lesions.nii.gz")))
    np.testing.assert_array_equal(lesions > 0, prob >= 0.37)
    rows = read_rows(out / "good_lesions.csv")
    assert len(rows) == int(lesions.max())
    assert json.loads((out / "good_summary.json").read_text())["threshold"] == pytest.approx(0.37)

    # outputs exist: refused without --overwrite, files untouched
    before = (out / "good_prob.nii.gz").read_bytes()
    rc = main(["infer", "-i", str(good), "-o", str(out), "--model", str(tiny_model_file), "--quiet"])
    assert rc == 1 and "--overwrite" in capsys.readouterr().err
    assert (out / "good_prob.nii.gz").read_bytes() == before


def test_overwrite_replaces_all_outputs(tmp_path):
    x = np.zeros((12, 12, 12), np.float32)
    x[2:5, 2:5, 2:5] = 1
    write_sitk(x, tmp_path / "c.nii.gz", (1, 1, 1), (0, 0, 0), "LPS")
    run_inference(tmp_path / "c.nii.gz", tmp_path / "out", raw_model(["CT"], [10.0], -5.0), opts())
    report = run_inference(tmp_path / "c.nii.gz", tmp_path / "out", raw_model(["CT"], [10.0], -20.0), opts())
    assert report.failed and "--overwrite" in report.failed[0].error
    assert len(read_rows(tmp_path / "out" / "c_lesions.csv")) == 1
    report = run_inference(tmp_path / "c.nii.gz", tmp_path / "out", raw_model(["CT"], [10.0], -20.0),
                           opts(overwrite=True))
    assert not report.failed
    assert read_rows(tmp_path / "out" / "c_lesions.csv") == []  # no voxel reaches 0.5 any more


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("nan", "NaN/Inf"),
        ("grid", "different grids"),
        ("missing", "missing channel b1000"),
    ],
)
def test_command_bad_case_inputs(tmp_path, tiny_model_file, capsys, problem, expected):
    case = _mr_case(tmp_path / "in" / "c1", shape=(16, 16, 16))
    if problem == "nan":
        arr = np.ones((16, 16, 16), np.float32)
        arr[3, 3, 3] = np.nan
        write_image(arr, make_geometry((16, 16, 16), (3.0, 3.0, 4.0), (10.0, -5.0, 3.0), "LAS"), case / "T1.nii.gz")
    elif problem == "grid":
        write_image(np.ones((16, 16, 16), np.float32), make_geometry((16, 16, 16), (2.0, 3.0, 4.0)), case / "b1000.nii.gz")
    else:
        (case / "b1000.nii.gz").unlink()
    rc = main(["infer", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and expected in err and "c1" in err
    assert not list((tmp_path / "out").glob("c1*"))


def test_command_bad_model_and_options(tmp_path, tiny_model_file, capsys):
    case = _mr_case(tmp_path / "c1", shape=(16, 16, 16))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    ckpt = _tiny_checkpoint()
    ckpt["config"]["model"]["feature_size"] = 24  # weights are feature_size 12
    save_checkpoint(ckpt, wrong)
    cases = [
        (["--model", str(junk)], "junk.pt"),
        (["--model", str(wrong)], "shape-mismatched"),
        (["--model", str(tmp_path)], "not a sap bundle"),
        (["--model", str(tiny_model_file), "--threshold", "1.5"], "outside [0, 1]"),
        (["--model", str(tiny_model_file), "-i", str(tmp_path / "absent")], "input not found"),
    ]
    for extra, message in cases:
        argv = ["infer", "-i", str(case), "-o", str(tmp_path / "out"), "--quiet", *extra]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("c1*"))


def test_skeleton_on_another_grid_fails_that_case_only(tmp_path):
    case, skeleton = _region_case(tmp_path)
    other = tmp_path / "in" / "p2"
    other.mkdir()
    (other / "CT.nii.gz").write_bytes((case / "CT.nii.gz").read_bytes())
    write_sitk(skeleton, other / "skeleton.nii.gz", (3.0, 2.0, 2.0), (0, 0, 0), "RAS")  # other spacing
    report = run_inference(tmp_path / "in", tmp_path / "out", raw_model(["CT"], [10.0], -5.0), opts(),
                           skeleton=tmp_path / "in")
    assert [r.case_id for r in report.failed] == ["p2"]
    assert "different grids" in report.failed[0].error and "spacing" in report.failed[0].error
    assert (tmp_path / "out" / "p1_regions.csv").is_file() and not list((tmp_path / "out").glob("p2*"))
    with pytest.raises(SapError, match="one skeleton file for 2 cases"):
        run_inference(tmp_path / "in", tmp_path / "o2", raw_model(["CT"], [10.0], -5.0), opts(),
                      skeleton=case / "skeleton.nii.gz")


def test_module_help_is_light_and_lists_every_option():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import sys, sap.infer.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, encoding="utf-8", check=True,
    )
    assert result.stdout.strip() == "False"  # the CLI module does not import torch
    result = subprocess.run([sys.executable, "-m", "sap.infer", "--help"], capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0
    for option in ("--model", "--threshold", "--min-volume-ml", "--skeletal-model", "--skeleton", "--tta",
                   "--overlap", "--sw-batch-size", "--amp", "--device", "--dicom-seg", "--overwrite"):
        assert option in result.stdout
    assert "(default: None)" not in result.stdout


def test_tta_option_averages_mirrored_predictions():
    """An asymmetric 3×3×3 stand-in: --tta must give the mean over the 8 mirror flips, each
    computed here by flipping the input and flipping the prediction back."""
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 2, kernel_size=3, padding=1)
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(1, 14, 12, 10)).astype(np.float32)
    plain = predict(arr, conv, roi_size=(32, 32, 32), tta=False)
    with_tta = predict(arr, conv, roi_size=(32, 32, 32), tta=True)
    manual = np.zeros_like(plain)
    for flips in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]:
        flipped = np.ascontiguousarray(np.flip(arr, flips)) if flips else arr
        out = predict(flipped, conv, roi_size=(32, 32, 32), tta=False)
        manual += np.flip(out, tuple(f - 1 for f in flips)) if flips else out
    manual /= 8
    np.testing.assert_allclose(with_tta, manual, atol=1e-5)
    assert np.abs(with_tta - plain).max() > 1e-3  # the option reached the engine
