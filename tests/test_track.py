"""sap track: follow-up synth truth, matching rules, the command end to end, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from sap.config import DataConfig
from sap.cv.track import infer_and_track
from sap.data.io import read_image, write_image
from sap.data.synth.cohort import plan_cohort
from sap.data.synth.followup import DESIGN_ENLARGING_PCT, DESIGN_SHRINKING_PCT, pair_jobs, write_any
from sap.data.synth.presets import get_preset
from sap.errors import SapError
from sap.infer import InferenceModel
from sap.track.api import TrackOptions, track
from sap.track.match import MatchOptions, match_lesions, size_change


@pytest.fixture(scope="module")
def pair_cohort(tmp_path_factory):
    """Two follow-up pairs of the tiny preset (patients 1 and 2 of seed 0), with cohort.json truth."""
    root = tmp_path_factory.mktemp("fu")
    jobs = [j for j in pair_jobs(plan_cohort(get_preset("tiny"), "mr", 0)) if j.group == "patients"][:2]
    records, pairs = [], []
    for job in jobs:
        written = write_any(job, root)
        records += written["exams"]
        pairs.append(written["pair"])
    (root / "patients" / "subjects.csv").write_text(
        "case_id,subject_id\n" + "".join(f"{r['case_id']},{r['subject_id']}\n" for r in records)
    )
    (root / "cohort.json").write_text(json.dumps({"cases": records, "followup": pairs}))
    return root, pairs


def test_followup_truth_describes_the_written_masks(pair_cohort):
    import cc3d

    root, pairs = pair_cohort
    kinds = set()
    for pair in pairs:
        for side in ("baseline", "followup"):
            gt = read_image(root / "patients" / pair[side] / "GT.nii.gz")
            labels, n = cc3d.connected_components(gt.array > 0, connectivity=26, return_N=True)
            lesions = pair[f"{side}_lesions"]
            assert n == len(lesions)  # every lesion is exactly one component
            inverse = np.linalg.inv(gt.geometry.affine)
            hit = set()
            for lesion in lesions:
                ras = np.asarray(lesion["inside_lps_mm"]) * [-1, -1, 1]
                ijk = tuple(np.round(inverse[:3, :3] @ ras + inverse[:3, 3]).astype(int))
                component = int(labels[ijk])
                assert component > 0 and int((labels == component).sum()) == lesion["n_voxels"]
                hit.add(component)
            assert len(hit) == n
            ids = sorted(i for g in pair["groups"] for i in g[side])
            assert ids == sorted(x["id"] for x in lesions)  # each lesion in exactly one group
        kinds |= {g["event"] for g in pair["groups"]}
        # a pose change: the follow-up grid lies elsewhere in the world
        assert any(abs(v) > 0.5 for v in pair["pose"]["translation_mm"])
    assert {"merged", "new"} <= kinds
    assert DESIGN_ENLARGING_PCT == MatchOptions().enlarging_pct and -DESIGN_SHRINKING_PCT == MatchOptions().shrinking_pct


def test_size_change_thresholds():
    assert size_change(1.0, 1.30, 30.0, 30.0) == "enlarging"
    assert size_change(1.0, 1.29, 30.0, 30.0) == "stable"
    assert size_change(1.0, 0.70, 30.0, 30.0) == "shrinking"
    assert size_change(1.0, 0.71, 30.0, 30.0) == "stable"
    assert size_change(0.0, 1.0, 30.0, 30.0) == ""


def test_match_overlap_merge_split_distance_and_cap():
    base = np.zeros((40, 40, 40), np.uint8)
    fu = np.zeros_like(base)
    base[2:6, 2:6, 2:6] = 1  # matched by overlap
    fu[3:7, 2:6, 2:6] = 1
    base[10:13, 10:13, 2:5] = 2  # 2 and 3 merge into follow-up 2
    base[14:17, 10:13, 2:5] = 3
    fu[10:17, 10:13, 2:5] = 2
    base[20:30, 20:23, 2:5] = 4  # 4 splits into 3 and 4
    fu[20:24, 20:23, 2:5] = 3
    fu[26:30, 20:23, 2:5] = 4
    base[2:4, 30:32, 30:32] = 5  # no overlap; 5 pairs with 5 by distance (6 mm away)
    fu[8:10, 30:32, 30:32] = 5
    base[30:32, 2:4, 30:32] = 6  # no overlap, too far from anything: disappeared
    fu[35:37, 35:37, 10:12] = 6  # new
    centroids = lambda a, n: np.array([np.argwhere(a == i).mean(axis=0) for i in range(1, n + 1)])  # noqa: E731
    tracks = match_lesions(base, 6, fu, 6, centroids(base, 6), centroids(fu, 6), MatchOptions(max_distance_mm=10.0))
    found = {(tuple(t.baseline), tuple(t.followup)): t.correspondence for t in tracks}
    assert found == {
        ((1,), (1,)): "matched", ((2, 3), (2,)): "merged", ((4,), (3, 4)): "split",
        ((5,), (5,)): "matched", ((6,), ()): "disappeared", ((), (6,)): "new",
    }
    by_distance = next(t for t in tracks if t.baseline == [5])
    assert by_distance.matched_by == "distance" and by_distance.distance_mm == pytest.approx(6.0)
    capped = match_lesions(base, 6, fu, 6, centroids(base, 6), centroids(fu, 6), MatchOptions(max_distance_mm=5.0))
    assert {(tuple(t.baseline), tuple(t.followup)) for t in capped} >= {((5,), ()), ((), (5,))}
    # a tiny overlap below min_overlap does not link
    loose = match_lesions(base, 6, fu, 6, centroids(base, 6), centroids(fu, 6), MatchOptions(min_overlap=0.9, max_distance_mm=0.1))
    assert ((1,), (1,)) not in {(tuple(t.baseline), tuple(t.followup)) for t in loose}


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_track_command_scores_truth_and_writes_outputs(pair_cohort, tmp_path):
    from sap.cli import main

    root, pairs = pair_cohort
    pair = pairs[0]
    out = tmp_path / "out"
    argv = ["track", "--baseline", str(root / "patients" / pair["baseline"]), "--followup",
            str(root / "patients" / pair["followup"]), "-o", str(out), "--truth", str(root), "--quiet"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"lesions.csv", "regions.csv", "summary.json", "report.html",
                                               "followup_lesions_in_baseline.nii.gz", "transform.h5"}
    summary = json.loads((out / "summary.json").read_text())
    reg = summary["registration"]
    assert reg["skeleton_dice_after"] > reg["skeleton_dice_before"] and reg["bone_weighted"]
    truth = summary["truth"]
    assert truth["f1"] >= 0.9 and truth["correspondence_accuracy"] >= 0.9 and truth["size_change_accuracy"] >= 0.9
    assert truth["feret_abs_error_mm_mean"] == pytest.approx(0.0, abs=1e-6)  # same masks, same measure
    rows = _rows(out / "lesions.csv")
    assert len(rows) == len(pair["groups"])
    for row in rows:
        has_both = bool(row["baseline_ids"]) and bool(row["followup_ids"])
        assert (row["size_change"] != "") == has_both
        assert row["correspondence"] in ("matched", "merged", "split", "new", "disappeared")
    regions = _rows(out / "regions.csv")
    total = regions[-1]
    assert total["region"] == "all"
    assert float(total["burden_baseline_ml"]) == pytest.approx(sum(x["volume_ml"] for x in pair["baseline_lesions"]), abs=1e-3)
    warped = read_image(out / "followup_lesions_in_baseline.nii.gz")
    baseline_gt = read_image(root / "patients" / pair["baseline"] / "GT.nii.gz")
    assert warped.geometry.same_grid(baseline_gt.geometry) is None and warped.array.max() >= 1
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("class='track'") == len(rows) and "data:image/png;base64," in page
    # existing output: refused, untouched
    before = (out / "lesions.csv").read_bytes()
    assert main(argv) == 2
    assert (out / "lesions.csv").read_bytes() == before


def test_track_lesion_free_exam_and_subject_check(pair_cohort, tmp_path, recwarn):
    root, pairs = pair_cohort
    pair = pairs[0]
    base_dir, fu_dir = root / "patients" / pair["baseline"], root / "patients" / pair["followup"]
    # different subjects: refused before any work
    other = tmp_path / "cases"
    shutil.copytree(fu_dir, other / pair["followup"])
    (other / "subjects.csv").write_text(f"case_id,subject_id\n{pair['followup']},someone_else\n")
    with pytest.raises(SapError, match="different subjects"):
        track(base_dir, other / pair["followup"], tmp_path / "x", TrackOptions(report=False, progress=False))
    assert not (tmp_path / "x").exists()
    # a lesion-free baseline (no subject ids: a warning) is valid: every follow-up lesion is new
    empty = tmp_path / "empty.nii.gz"
    gt = read_image(base_dir / "GT.nii.gz")
    write_image(np.zeros_like(gt.array), gt.geometry, empty)
    lone = tmp_path / "lone"
    shutil.copytree(fu_dir, lone / pair["followup"])
    result = track(base_dir, lone / pair["followup"], None, TrackOptions(report=False, progress=False, force=True),
                   baseline_lesions=empty)
    assert any("subject id" in str(w.message) for w in recwarn)
    assert result.baseline.n == 0 and {r["correspondence"] for r in result.rows} == {"new"}
    assert len(result.rows) == len(pair["followup_lesions"])
    assert result.region_rows[-1]["n_new"] == len(pair["followup_lesions"])


# ----------------------------------------------------------------------------------- study layer
def _b1000_model() -> InferenceModel:
    """A 1×1×1 convolution: probability = sigmoid(0.05 × (b1000 − 300)); bright-on-DWI voxels are lesion."""
    conv = nn.Conv3d(2, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 1, 0, 0, 0] = 0.05
        conv.bias[1] = -15.0
    data = DataConfig(channels=["T1", "b1000"], modality="mr", normalization="none")
    return InferenceModel.from_module(conv, ["T1", "b1000"], data, roi_size=(32, 32, 32))


def test_infer_then_track_publishes_one_folder(pair_cohort, tmp_path):
    root, pairs = pair_cohort
    pair = pairs[0]
    out = tmp_path / "out"
    result = infer_and_track(root / "patients" / pair["baseline"], root / "patients" / pair["followup"], out,
                             _b1000_model(), TrackOptions(report=False, progress=False), truth=root, device="cpu")
    names = {p.name for p in out.iterdir()}
    assert {"lesions.csv", "regions.csv", "summary.json", "transform.h5", "infer"} <= names
    predicted = read_image(out / "infer" / "baseline" / f"{pair['baseline']}_lesions.nii.gz")
    assert result.baseline.n == len(np.unique(predicted.array)) - 1  # tracked the predicted lesions, not GT
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"]["lesions"].startswith(str(out / "infer"))
    assert 0.0 <= summary["truth"]["recall"] <= 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


@pytest.mark.filterwarnings("ignore:no subject id")
def test_failed_registration_writes_nothing(pair_cohort, tmp_path):
    root, pairs = pair_cohort
    pair = pairs[0]
    blank = tmp_path / pair["followup"]
    shutil.copytree(root / "patients" / pair["followup"], blank)
    t1 = read_image(blank / "T1.nii.gz")
    write_image(np.zeros_like(t1.array), t1.geometry, blank / "T1.nii.gz")
    with pytest.raises(SapError, match="registration failed"):
        track(root / "patients" / pair["baseline"], blank, tmp_path / "out", TrackOptions(progress=False, force=True))
    assert not (tmp_path / "out").exists()
