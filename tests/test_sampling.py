"""Patch samplers (SPEC §7): instance balance, negatives, determinism, sharding, padding, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sap.errors import SapError
from sap.sampling import (
    CaseIndex,
    ClassBalancedSampler,
    EpochCursor,
    InstanceBalancedSampler,
    PosNegSampler,
    SamplingCase,
    build_case_index,
    build_sampler,
    read_patch,
)

PATCH = (16, 16, 16)


def _ellipsoid_body(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, float) - 1) / 2
    radii = np.array(shape, float) / 2 * 0.9
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1


def _make_cases() -> list[SamplingCase]:
    """Four cases: lesions of 1 voxel to wider-than-patch, touching lesions, one lesion-free exam."""
    rng = np.random.default_rng(0)
    cases = []
    shape = (40, 36, 48)
    body = _ellipsoid_body(shape).astype(np.uint8)
    specs = [
        # (x0, y0, z0, x1, y1, z1) boxes of lesions
        [(10, 10, 10, 11, 11, 11), (20, 15, 20, 24, 19, 26), (12, 20, 30, 15, 23, 33)],
        [(8, 8, 12, 30, 20, 18), (25, 25, 35, 27, 27, 37)],  # first is 22 voxels wide (> patch 16)
        [(18, 16, 22, 20, 18, 24), (20, 18, 24, 22, 20, 26)],  # diagonal neighbours: one 26-component
        [],
    ]
    for number, boxes in enumerate(specs):
        lesions = np.zeros(shape, np.uint8)
        for box in boxes:
            lesions[box[0] : box[3], box[1] : box[4], box[2] : box[5]] = 1
        image = rng.random((2, *shape), dtype=np.float32)
        cases.append(SamplingCase(f"case{number}", image, lesions if boxes else None, body.copy()))
    return cases


@pytest.fixture(scope="module")
def cases() -> list[SamplingCase]:
    return _make_cases()


def _lesion_labels(case: SamplingCase) -> tuple[np.ndarray, int]:
    """Independent peer: scipy's 26-connected labelling."""
    if case.lesions is None:
        return np.zeros(case.shape, np.int32), 0
    return ndimage.label(case.lesions, structure=np.ones((3, 3, 3)))


def test_index_matches_scipy_components(cases, tmp_path):
    for case in cases:
        index = case.get_index()
        labels, n = _lesion_labels(case)
        assert index.n_lesions == n
        assert sorted(index.lesion_voxel_counts.tolist()) == sorted(np.bincount(labels.ravel())[1:].tolist())
        for lesion in range(index.n_lesions):
            voxels = index.lesion_voxels(lesion)
            ids = set(labels[tuple(voxels.T)].tolist())
            assert len(ids) == 1 and 0 not in ids  # one component, all lesion voxels
            box = index.lesion_bboxes[lesion]
            assert np.all(voxels.min(0) == box[:3]) and np.all(voxels.max(0) + 1 == box[3:])
        saved = CaseIndex.load(index.save(tmp_path / f"{case.case_id}.npz"))
        assert saved.shape == index.shape and saved.n_lesions == index.n_lesions
        np.testing.assert_array_equal(saved.lesion_coords, index.lesion_coords)
        np.testing.assert_array_equal(saved.body_bbox, index.body_bbox)


def test_one_epoch_holds_every_lesion_once_and_the_configured_negatives(cases):
    sampler = InstanceBalancedSampler(cases, PATCH, neg_ratio=1.5, seed=3)
    plan = sampler.plan(epoch=0)
    n_lesions = sum(_lesion_labels(c)[1] for c in cases)
    assert n_lesions == 6
    positives = [(r.case, r.target) for r in plan if r.kind == "pos"]
    assert Counter(positives) == Counter(
        (c, k) for c, case in enumerate(cases) for k in range(_lesion_labels(case)[1])
    )
    negatives = [r for r in plan if r.kind == "neg"]
    assert len(negatives) == round(1.5 * n_lesions)
    # Spread evenly over the cases, the lesion-free exam included.
    per_case = Counter(r.case for r in negatives)
    assert set(per_case) == set(range(len(cases)))
    assert max(per_case.values()) - min(per_case.values()) <= 1


def test_positive_patches_hold_their_lesion(cases):
    sampler = InstanceBalancedSampler(cases, PATCH, seed=1)
    size = np.array(PATCH)
    for epoch in range(3):
        for request in sampler.plan(epoch):
            if request.kind != "pos":
                continue
            patch = sampler.resolve(request, epoch)
            index = sampler.indices[request.case]
            voxels = index.lesion_voxels(request.target)
            inside = np.all((voxels >= patch.start) & (voxels < patch.start + size), axis=1)
            box = index.lesion_bboxes[request.target]
            if np.all(box[3:] - box[:3] <= size):
                assert inside.all()  # the whole lesion fits: it is entirely inside
            else:
                assert inside.any()  # wider than the patch: centred on one of its voxels
            assert np.all(patch.start >= 0) and np.all(patch.start + size <= index.shape)
            _, label = sampler.read(patch)
            assert label.sum() >= inside.sum()


def test_negative_patches_touch_no_lesion_and_lie_in_the_body(cases):
    sampler = InstanceBalancedSampler(cases, PATCH, neg_ratio=3.0, seed=7)
    seen = 0
    for epoch in range(2):
        for request in sampler.plan(epoch):
            if request.kind != "neg":
                continue
            patch = sampler.resolve(request, epoch)
            case = cases[patch.request.case]
            box = tuple(slice(int(s), int(s) + p) for s, p in zip(patch.start, PATCH, strict=True))
            if case.lesions is not None:
                assert not case.lesions[box].any()
            assert case.body[box].any()
            image, label = sampler.read(patch)
            assert image.shape == (2, *PATCH) and image.dtype == np.float32
            np.testing.assert_array_equal(image, case.image[(slice(None), *box)])
            assert not label.any()
            seen += 1
    assert seen == 2 * 18


def test_epochs_are_deterministic_and_fresh(cases):
    def starts(sampler, epoch):
        return [(r.case, r.kind, tuple(sampler.resolve(r, epoch).start)) for r in sampler.plan(epoch)]

    a = InstanceBalancedSampler(cases, PATCH, seed=11)
    b = InstanceBalancedSampler(_make_cases(), PATCH, seed=11)
    assert starts(a, 4) == starts(b, 4)
    assert starts(a, 4) != starts(a, 5)
    assert starts(a, 4) != starts(InstanceBalancedSampler(cases, PATCH, seed=12), 4)


@pytest.mark.parametrize(("world", "batch"), [(2, 1), (3, 2), (4, 4)])
def test_shards_are_disjoint_equal_and_padded_with_negatives(cases, world, batch):
    sampler = InstanceBalancedSampler(cases, PATCH, seed=5, batch_size=batch, world_size=world)
    plan = sampler.plan(2)
    shards = [sampler.shard(2, rank) for rank in range(world)]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1 and lengths.pop() % batch == 0
    indices = [r.index for s in shards for r in s]
    assert len(indices) == len(set(indices)) == len(plan)
    assert len(plan) % (world * batch) == 0
    n_pos = sum(r.kind == "pos" for s in shards for r in s)
    assert n_pos == 6  # padding adds negatives only: each lesion once over all ranks
    assert len(plan) - 6 >= round(1.0 * 6)
    with pytest.raises(SapError):
        sampler.shard(2, world)


@settings(deadline=None, max_examples=40)
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    start=st.tuples(*[st.integers(-12, 12)] * 3),
    size=st.tuples(*[st.integers(1, 10)] * 3),
)
def test_read_patch_equals_slicing_a_padded_volume(shape, start, size):
    array = np.arange(2 * int(np.prod(shape)), dtype=np.float32).reshape(2, *shape) + 1
    pad = 25
    padded = np.pad(array, [(0, 0)] + [(pad, pad)] * 3, constant_values=0)
    expected = padded[(slice(None), *(slice(s + pad, s + pad + n) for s, n in zip(start, size, strict=True)))]
    np.testing.assert_array_equal(read_patch(array, np.array(start), size), expected)


def test_volume_smaller_than_the_patch_is_padded():
    shape = (10, 12, 40)
    lesions = np.zeros(shape, np.uint8)
    lesions[4:6, 5:7, 20:23] = 1
    image = np.ones((2, *shape), np.float32)
    sampler = InstanceBalancedSampler([SamplingCase("small", image, lesions, None)], PATCH, seed=0)
    for request in sampler.plan(0):
        patch = sampler.resolve(request, 0)
        img, label = sampler.read(patch)
        assert img.shape == (2, *PATCH) and label.shape == PATCH
        # the in-volume part keeps its values, the rest is padding
        assert img.sum() == 2 * np.prod([min(s, p) for s, p in zip(shape, PATCH, strict=True)])
        assert label.sum() == (6 * 2 if request.kind == "pos" else 0) * 1


def test_negatives_fall_back_to_other_cases_when_a_case_has_no_room():
    shape = (16, 16, 16)
    full = np.ones(shape, np.uint8)  # a lesion everywhere: no lesion-free patch in this case
    rng = np.random.default_rng(0)
    crowded = SamplingCase("crowded", rng.random((1, *shape), dtype=np.float32), full, None)
    clean = SamplingCase("clean", rng.random((1, 30, 30, 30), dtype=np.float32), None, None)
    sampler = InstanceBalancedSampler([crowded, clean], (8, 8, 8), neg_ratio=4, seed=0, max_tries=4)
    assert sampler.roomy_cases == [1]  # no negatives are assigned to the crowded case
    for request in sampler.plan(0):
        patch = sampler.resolve(request, 0)
        if request.kind == "neg":
            assert patch.request.case == 1
    # Nowhere lesion-free: the least-lesion patch is used, with a warning, and labelled correctly.
    partial = full.copy()
    partial[:, :, :3] = 0
    half = SamplingCase("half", rng.random((1, *shape), dtype=np.float32), partial, None)
    only_crowded = InstanceBalancedSampler([half], (8, 8, 8), seed=0, max_tries=64)
    negative = next(r for r in only_crowded.plan(0) if r.kind == "neg")
    with pytest.warns(RuntimeWarning, match="no lesion-free patch"):
        patch = only_crowded.resolve(negative, 0)
    _, label = only_crowded.read(patch)
    assert label.sum() == only_crowded.indices[0].lesion_voxels_in_box(patch.start, np.array([8, 8, 8]))
    assert label.sum() < label.size


def test_no_lesions_is_an_error():
    case = SamplingCase("empty", np.zeros((1, 8, 8, 8), np.float32), None, None)
    with pytest.raises(SapError, match="no lesion"):
        InstanceBalancedSampler([case], (8, 8, 8))


def test_posneg_centres_on_lesion_voxels_and_favours_large_lesions(cases):
    sampler = PosNegSampler(cases[:1], PATCH, neg_ratio=1.0, seed=0, patches_per_epoch=200)
    index = sampler.indices[0]
    labels, _ = _lesion_labels(cases[0])
    hits = Counter()
    kinds = Counter()
    for request in sampler.plan(0):
        patch = sampler.resolve(request, 0)
        kinds[request.kind] += 1
        _, label = sampler.read(patch)
        if request.kind == "pos":
            assert label.any()
            # the centre (shifted only at the volume border, not here) is a lesion voxel
            centre = tuple(patch.start + np.array(PATCH) // 2)
            hits[int(labels[centre])] += 1
    assert kinds["pos"] > 60 and kinds["neg"] > 60
    # voxel-uniform: the 96-voxel lesion is drawn far more often than the 1-voxel lesion
    counts = np.bincount(labels.ravel())
    big, small = int(np.argmax(counts[1:])) + 1, int(np.argmin(counts[1:])) + 1
    assert hits[big] > 5 * max(hits[small], 1)
    assert index.n_lesions == 3


def test_class_balanced_draws_each_present_class(cases):
    label_maps = []
    for case in cases[:2]:
        labels = np.zeros(case.shape, np.uint8)
        labels[5:9, 5:9, 5:9] = 3
        labels[20:30, 10:20, 10:40] = 7
        label_maps.append(SamplingCase(case.case_id, case.image, None, case.body, labels))
    sampler = ClassBalancedSampler(label_maps, PATCH, seed=0, patches_per_epoch=60)
    drawn = Counter()
    for request in sampler.plan(0):
        patch = sampler.resolve(request, 0)
        _, label = sampler.read(patch)
        assert label.dtype == np.uint8 and (label == request.target).any()
        drawn[request.target] += 1
    assert set(drawn) == {0, 3, 7}
    assert min(drawn.values()) >= 10  # uniform over classes, not over voxels
    no_background = ClassBalancedSampler(label_maps, PATCH, seed=0, include_background=False)
    assert {r.target for e in range(5) for r in no_background.plan(e)} <= {3, 7}
    with pytest.raises(SapError, match="label map"):
        ClassBalancedSampler(cases[:1], PATCH)


def test_cursor_resumes_mid_epoch_to_the_same_stream(cases):
    torch = pytest.importorskip("torch")
    from sap.sampling.torch_data import batch_stream

    def take(cursor: EpochCursor, n: int) -> list[torch.Tensor]:
        stream = batch_stream(sampler, cursor)
        return [next(stream)["image"] for _ in range(n)]

    sampler = InstanceBalancedSampler(cases, PATCH, seed=2, batch_size=2)
    per_epoch = sampler.epoch_length() // 2
    full = take(EpochCursor(), per_epoch + 3)
    cursor = EpochCursor()
    first = take(cursor, 4)
    state = cursor.state_dict()
    assert state == {"epoch": 0, "position": 8}
    resumed = EpochCursor()
    resumed.load_state_dict(state)
    rest = take(resumed, per_epoch - 1)
    assert resumed.epoch == 1
    for a, b in zip(full, first + rest, strict=True):
        assert torch.equal(a, b)


def test_index_errors_name_the_case(tmp_path):
    with pytest.raises(SapError, match="case7"):
        build_case_index("case7", (4, 4, 4), lesions=np.zeros((4, 4, 5), np.uint8))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(SapError, match="bad.npz"):
        CaseIndex.load(bad)


def test_build_sampler_names_the_config_choices(cases):
    assert isinstance(build_sampler("instance", cases, PATCH), InstanceBalancedSampler)
    posneg = build_sampler("posneg", cases, PATCH, neg_ratio=2.0, batch_size=2, world_size=2)
    assert isinstance(posneg, PosNegSampler) and posneg.neg_ratio == 2.0
    assert len(posneg.plan(0)) % 4 == 0
    with pytest.raises(SapError, match="instance or posneg"):
        build_sampler("uniform", cases, PATCH)
