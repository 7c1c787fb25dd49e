"""sap.slice2d without networks: prompt primitives, the 32 strategies, 2D metrics, window, orientation, splits."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sap.slice2d import data as d
from sap.slice2d import metrics as m
from sap.slice2d import prompts as p


# ----------------------------------------------------------------------------------- helpers
def c_shape(size: int = 40) -> np.ndarray:
    """A thick C opening to the right: its centre of mass lies in the gap."""
    mask = np.zeros((size, size), bool)
    mask[5:35, 5:13] = True  # spine of the C
    mask[5:13, 5:35] = True  # top arm
    mask[27:35, 5:35] = True  # bottom arm
    return mask


def brute_force_border_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest non-mask pixel, the outside of the image included."""
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded)
    inside = np.argwhere(padded)
    dist = np.zeros(padded.shape)
    for r, c in inside:
        dist[r, c] = np.sqrt(((outside - (r, c)) ** 2).sum(axis=1)).min()
    return dist[1:-1, 1:-1]


def chebyshev_distance_to(mask: np.ndarray) -> np.ndarray:
    """Chessboard distance of every pixel to the nearest mask pixel (brute force)."""
    pts = np.argwhere(mask)
    rr, cc = np.indices(mask.shape)
    grid = np.stack([rr.ravel(), cc.ravel()], axis=1)
    dist = np.abs(grid[:, None, :] - pts[None, :, :]).max(axis=2).min(axis=1)
    return dist.reshape(mask.shape)


# ----------------------------------------------------------------------------------- primitives
def test_tight_box_is_the_inclusive_extent():
    mask = np.zeros((20, 30), bool)
    mask[3:9, 7:12] = True
    mask[10, 20] = True  # a second piece widens the box when both are passed
    assert p.tight_box(mask) == (3, 7, 10, 20)
    assert p.tight_box(mask[:, :15]) == (3, 7, 8, 11)


def test_edt_center_is_inside_and_farthest_from_the_border():
    mask = c_shape()
    r, c = p.edt_center(mask, np.random.default_rng(0))
    assert mask[r, c]
    reference = brute_force_border_distance(mask)
    assert reference[r, c] == pytest.approx(reference.max())


def test_edt_center_counts_the_image_edge_as_border():
    mask = np.zeros((10, 30), bool)
    mask[:, :20] = True  # touches the top, bottom and left edges
    r, c = p.edt_center(mask)
    assert r in (4, 5)  # half-way between the top and bottom edges, not at row 0
    assert brute_force_border_distance(mask)[r, c] == pytest.approx(5.0)


def test_edt_center_ties_are_seeded_random_choices():
    mask = np.zeros((9, 30), bool)
    mask[2:7, 2:28] = True  # a long bar: many pixels share the maximum distance
    picks = {p.edt_center(mask, np.random.default_rng(s)) for s in range(20)}
    assert len(picks) > 1
    assert all(mask[r, c] and r == 4 for r, c in picks)
    assert p.edt_center(mask, np.random.default_rng(3)) == p.edt_center(mask, np.random.default_rng(3))


def test_centroid_of_a_c_shape_lies_outside_it():
    mask = c_shape()
    cy, cx = p.centroid(mask)
    coords = np.argwhere(mask)
    assert (cy, cx) == pytest.approx(tuple(coords.mean(axis=0)))
    assert not mask[int(round(cy)), int(round(cx))]


def test_positive_points_lie_inside_the_eroded_mask():
    mask = c_shape()
    # independent 3x3 erosion: a pixel survives when its whole 3x3 neighbourhood is in the mask
    padded = np.pad(mask, 1)
    eroded = np.ones_like(mask)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            eroded &= padded[1 + dr : 1 + dr + mask.shape[0], 1 + dc : 1 + dc + mask.shape[1]]
    prims = p.class_primitives(mask, np.random.default_rng(1))
    pos = prims[0].positives
    assert len(pos) == p.MAX_POSITIVES
    assert len({tuple(x) for x in pos}) == len(pos)  # distinct
    assert eroded[pos[:, 0], pos[:, 1]].all()
    # the border ring of the mask (in mask, not in the erosion) is never sampled
    assert not (mask & ~eroded)[pos[:, 0], pos[:, 1]].any()


def test_thin_component_samples_positives_from_itself():
    mask = np.zeros((10, 40), bool)
    mask[5, 5:35] = True  # one pixel thick: the 3x3 erosion is empty
    pos = p.class_primitives(mask, np.random.default_rng(0))[0].positives
    assert len(pos) == p.MAX_POSITIVES and mask[pos[:, 0], pos[:, 1]].all()


def test_negative_points_lie_in_the_ring_and_outside_the_class():
    cls = np.zeros((60, 60), bool)
    cls[20:40, 20:40] = True  # the prompted component
    cls[20:40, 44:50] = True  # another component of the class, inside the ring
    first = cls & (np.arange(60)[None, :] < 42)
    cheb = chebyshev_distance_to(first)
    ring = (cheb > 2) & (cheb <= 9)  # 5x5 dilation = distance <= 2; a further 15x15 adds 7
    expected = ring & ~cls
    assert (ring & cls).any()  # the other component really lies in the ring and must be excluded
    np.testing.assert_array_equal(p.negative_ring(first, cls), expected)
    for seed in range(5):
        prims = p.class_primitives(cls, np.random.default_rng(seed))
        big = next(x for x in prims if x.area == 400)
        neg = big.negatives
        assert len(neg) == p.MAX_NEGATIVES
        assert expected[neg[:, 0], neg[:, 1]].all()
        assert not cls[neg[:, 0], neg[:, 1]].any()


def test_components_use_four_connectivity():
    mask = np.zeros((10, 10), bool)
    mask[2, 2] = mask[3, 3] = True  # diagonal neighbours: two components
    assert p.label_components(mask)[1] == 2
    mask[2, 3] = True  # now edge-connected
    assert p.label_components(mask)[1] == 1


def _blob_slice(sizes: list[int]) -> np.ndarray:
    """Separate square-ish components with the given pixel counts (rows of width <= 10)."""
    mask = np.zeros((200, 200), bool)
    col = 0
    for size in sizes:
        full, rest = divmod(size, 10)
        width = 10 if full else rest
        mask[0:full, col : col + 10] = True
        mask[full, col : col + rest] = True
        col += width + 3
    assert p.label_components(mask)[1] == len(sizes)
    return mask


def test_component_filter_and_rule_versus_or_rule():
    # class area 138: 5 % = 6.9 px
    mask = _blob_slice([100, 20, 14, 4])
    _, kept_and = p.kept_components(mask, rule="and")
    _, kept_or = p.kept_components(mask, rule="or")
    assert [a for _, a in kept_and] == [100, 20]  # 14 < 15 px drops under "and"
    assert [a for _, a in kept_or] == [100, 20, 14]  # 14 >= 5 % keeps it under "or"; 4 px fails both
    # 16 px is >= 15 px but < 5 % of 416 px: the authors' "and" drops it, the paper's "or" keeps it
    mask = _blob_slice([400, 16])
    assert [a for _, a in p.kept_components(mask, rule="and")[1]] == [400]
    assert [a for _, a in p.kept_components(mask, rule="or")[1]] == [400, 16]
    with pytest.raises(ValueError):
        p.keep_component(10, 10, rule="xor")


def test_1c_uses_the_largest_and_5c_up_to_five_components():
    mask = _blob_slice([30, 90, 50, 70, 40, 60, 80])  # seven components, all kept
    prims = p.class_primitives(mask, np.random.default_rng(0))
    assert [x.area for x in prims] == [90, 80, 70, 60, 50]
    one = p.prompts_for_strategy(prims, "box_1C")
    five = p.prompts_for_strategy(prims, "box_5C")
    assert len(one) == 1 and one[0].box == prims[0].box
    assert [q.box for q in five] == [x.box for x in prims]
    assert p.prompts_for_strategy([], "center_5C") == []


def test_strategy_prompts_combine_the_primitives():
    mask = c_shape()
    prims = p.class_primitives(mask, np.random.default_rng(7))
    (q,) = p.prompts_for_strategy(prims, "box+neg5_1C")
    assert q.box == p.tight_box(mask) and q.labels.tolist() == [0] * 5
    (q,) = p.prompts_for_strategy(prims, "pos1+neg1_1C")
    assert q.box is None and q.labels.tolist() == [1, 0]
    (q,) = p.prompts_for_strategy(prims, "box+center_1C")
    assert q.points.tolist() == [list(prims[0].center)] and q.labels.tolist() == [1]
    (q,) = p.prompts_for_strategy(prims, "centroid_1C")
    assert q.points[0].tolist() == pytest.approx(list(p.centroid(mask)))
    # nested random points: pos1 is the first of pos3, which are the first of pos10
    pos1 = p.prompts_for_strategy(prims, "pos1_1C")[0].points
    pos3 = p.prompts_for_strategy(prims, "pos3_1C")[0].points
    pos10 = p.prompts_for_strategy(prims, "pos10_1C")[0].points
    assert pos3[:1].tolist() == pos1.tolist() and pos10[:3].tolist() == pos3.tolist() and len(pos10) == 10


def test_points_are_deterministic_per_seed():
    mask = c_shape()
    a = p.class_primitives(mask, p.slice_rng(0, 11, 3))[0]
    b = p.class_primitives(mask, p.slice_rng(0, 11, 3))[0]
    c = p.class_primitives(mask, p.slice_rng(1, 11, 3))[0]
    np.testing.assert_array_equal(a.positives, b.positives)
    np.testing.assert_array_equal(a.negatives, b.negatives)
    assert not np.array_equal(a.positives, c.positives)


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31 - 1))
def test_primitives_hold_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((48, 48)) < 0.55, iterations=1)
    for prim in p.class_primitives(mask, rng, max_components=5):
        comp = p.label_components(mask)[0] == prim.label
        assert comp[prim.center]
        assert prim.area == comp.sum() and prim.box == p.tight_box(comp)
        assert comp[prim.positives[:, 0], prim.positives[:, 1]].all()
        if len(prim.negatives):
            assert not mask[prim.negatives[:, 0], prim.negatives[:, 1]].any()


# ----------------------------------------------------------------------------------- names
def test_the_32_strategy_names_in_documented_order():
    bases = [
        "box", "center", "centroid", "pos1", "pos3", "pos5", "pos10", "box+center", "box+pos1", "box+pos5",
        "box+neg1", "box+neg5", "center+neg1", "center+neg5", "pos1+neg1", "pos5+neg5",
    ]  # fmt: skip
    expected = [f"{b}_{mode}" for b in bases for mode in ("1C", "5C")]
    assert list(p.STRATEGIES) == expected
    assert len(set(p.STRATEGIES)) == 32
    assert p.check_strategy("box+center_5C") == ("box+center", "5C")
    with pytest.raises(ValueError):
        p.check_strategy("box+centroid_1C")
    with pytest.raises(ValueError, match="MedSAM"):
        p.check_strategy("center_1C", family="medsam")
    assert p.check_strategy("box_5C", family="medsam") == ("box", "5C")


def test_cli_lists_the_32_strategies():
    out = subprocess.run(
        [sys.executable, "-m", "sap.slice2d", "prompt-bench", "--list-strategies"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == list(p.STRATEGIES)


# ----------------------------------------------------------------------------------- metrics
def test_dice_iou_match_monai_and_the_empty_slice_rule():
    import torch
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((2, 32, 32)) < 0.3
        dice, iou = m.dice_iou(a, b)
        ta, tb = (torch.as_tensor(x[None, None], dtype=torch.float32) for x in (a, b))
        assert dice == pytest.approx(float(compute_dice(ta, tb, include_background=True)))
        assert iou == pytest.approx(float(compute_iou(ta, tb, include_background=True)))
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[2, 2] = True
    assert all(math.isnan(x) for x in m.dice_iou(empty, empty))
    assert m.dice_iou(some, empty) == (0.0, 0.0)  # ground truth empty, prediction not
    assert m.dice_iou(empty, some) == (0.0, 0.0)


def test_hd95_in_millimetres_and_nan_when_empty():
    gt = np.zeros((40, 40), bool)
    gt[10:20, 10:20] = True
    pred = np.roll(gt, 3, axis=1)  # shifted 3 columns
    assert m.hd95(pred, gt, (1.0, 1.0)) == pytest.approx(3.0)
    assert m.hd95(pred, gt, (1.0, 0.5)) == pytest.approx(1.5)  # columns are 0.5 mm
    assert m.hd95(pred, gt, (2.0, 1.0)) == pytest.approx(3.0)  # rows do not matter for a column shift
    assert math.isnan(m.hd95(pred, np.zeros_like(gt)))
    assert m.hausdorff(pred, gt, (1.0, 1.0)) == pytest.approx(3.0)
    diagonal = math.hypot(40 * 1.0, 40 * 0.5)
    assert m.image_diagonal_mm((40, 40), (1.0, 0.5)) == pytest.approx(diagonal)
    assert m.normalised_hausdorff(pred, gt, (1.0, 0.5)) == pytest.approx(1.5 / diagonal)


def test_summary_excludes_both_empty_slices_and_counts_them():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    empty = np.zeros_like(gt)
    scores = [m.score_slice(gt, gt), m.score_slice(empty, empty), m.score_slice(gt, empty), m.score_slice(empty, gt)]
    s = m.summarise(scores)
    assert s["n_slices"] == 4 and s["n_both_empty"] == 1
    assert s["dice"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert s["n_distance_undefined"] == 3 and s["hd95_mm"] == pytest.approx(0.0)
    assert math.isnan(m.volume_dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))))


# ----------------------------------------------------------------------------------- data
def test_bone_window_level_400_width_1800():
    hu = np.array([-1000.0, -500.0, 400.0, 1300.0, 3000.0, -50.0])
    out = d.bone_window(hu)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 450 / 1800], atol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(d.bone_window(np.array([50.0, 100.0]), level=50, width=100), [0.5, 1.0])


def test_display_orientation_and_restacking():
    vol = np.arange(5 * 4 * 3).reshape(5, 4, 3)
    marker = np.zeros((5, 4, 3))
    marker[4, 3, 1] = 1  # most Right (axis 0) and most Anterior (axis 1) voxel
    slices = d.volume_to_slices(marker)
    assert slices.shape == (3, 4, 5)  # (Z, rows = A→P, cols = R→L)
    assert slices[1, 0, 0] == 1  # top-left of the display: anterior and the patient's right
    np.testing.assert_array_equal(d.slices_to_volume(d.volume_to_slices(vol)), vol)
    for k in range(3):
        np.testing.assert_array_equal(d.to_display(vol[:, :, k]), d.volume_to_slices(vol)[k])
        np.testing.assert_array_equal(d.from_display(d.to_display(vol[:, :, k])), vol[:, :, k])


def test_slice_filters_and_slice_set():
    hu = np.zeros((6, 5, 8))
    mask = np.zeros((6, 5, 8), np.uint8)
    mask[2, 2, [1, 4]] = 1
    rng = np.random.default_rng(0)
    for mode, count in (("all", 8), ("foreground", 2), ("balanced", 4)):
        s = d.SliceSet()
        assert s.add_volume("c", hu, mask, (1.0, 2.0, 3.0), mode, rng) == count
        assert s.images[0].shape == (5, 6) and s.spacing[0] == (2.0, 1.0)
        if mode == "foreground":
            assert s.slice_index == [1, 4] and all(x.any() for x in s.masks)
    with pytest.raises(Exception, match="slice filter"):
        d.select_slices(np.ones(3, bool), "some", rng)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=25), st.floats(0.05, 0.6), st.integers(0, 100))
def test_patient_level_split_never_splits_a_subject(subject_of, fraction, seed):
    cases = [f"case{i}" for i in range(len(subject_of))]
    subjects = [f"s{x}" for x in subject_of]
    train, val = d.split_by_patient(cases, subjects, fraction, seed)
    assert sorted(train + val) == sorted(cases)
    by_case = dict(zip(cases, subjects, strict=True))
    assert not {by_case[c] for c in train} & {by_case[c] for c in val}
    n_subjects = len(set(subjects))
    if n_subjects >= 2:
        n_val = len({by_case[c] for c in val})
        assert n_val == min(n_subjects - 1, max(1, round(fraction * n_subjects)))
        assert train
    assert d.split_by_patient(cases, subjects, fraction, seed) == (train, val)


def test_primitives_on_a_real_ct_slice(shared_data):
    """Real bone masks (TotalSegmentator labels → SAP skeleton): prompts stay where they belong."""
    from sap.data.io import read_image
    from sap.data.labels import convert_totalseg, default_class_map

    folder = shared_data / "ct_abdomen_pelvis"
    ct = read_image(folder / "ct.nii.gz")
    labels = read_image(folder / "labels_totalseg.nii.gz")
    skeleton = convert_totalseg(labels.array, default_class_map()["total"], source="labels_totalseg")
    slices = d.volume_to_slices(skeleton)
    k = int(np.argmax([(np.unique(s) > 0).sum() for s in slices]))  # the slice with the most regions
    image = d.volume_to_slices(d.bone_window(ct.array))[k]
    assert 0.0 <= image.min() and image.max() <= 1.0
    classes = [c for c in np.unique(slices[k]) if c]
    assert len(classes) >= 2
    for cls in classes:
        truth = slices[k] == cls
        for prim in p.class_primitives(truth, p.slice_rng(0, k, int(cls))):
            assert truth[prim.center] and truth[prim.positives[:, 0], prim.positives[:, 1]].all()
            assert not (slices[k] == cls)[prim.negatives[:, 0], prim.negatives[:, 1]].any()
