"""Follow-up pairs with known truth (``sap synth --followup``, SPEC §14): for each patient a
baseline and a follow-up exam of the same subject, for scoring ``sap track``.

The baseline is a phantom patient exam (:func:`sap.data.synth.cohort.phantom_exam`) plus, for
some patients, a second lesion placed close to an existing one (a pair that merges later). The
follow-up is built from the baseline's labels:

1. **pose**: a small rigid motion (≤ 3° about each axis, ≤ 8 mm) plus a smooth deformation
   (≤ 4 mm, varying over ~10 cm), and a field of view shifted along the body axis; every label
   map (tissue, bone, cortex, lesions, mimics) is resampled nearest-neighbour onto the follow-up
   grid through that known mapping, so images are rendered afresh and stay crisp;
2. **lesion events**, each on the follow-up grid, sized in voxels exactly: stable (±10 %),
   enlarging (+50…150 %), shrinking (−40…−80 %), near a size-change threshold (volume change
   within ±5 percentage points of +30 % or −30 %, the defaults of ``sap track``), disappeared,
   merged (two nearby baseline lesions joined by a bridge of bone), split (a lesion cut in two by
   a plane across its long axis) and new lesions;
3. rendering as any patient exam (MR or CT).

Each lesion stays one connected component one voxel clear of the others (as in every cohort),
so the written binary masks identify the lesions. The truth in ``cohort.json`` (key
``followup``) lists per pair the correspondence groups (baseline ids → follow-up ids, with the
designed event) and every lesion's measured voxels, volume and a point inside it (LPS mm), so a
scorer can find each lesion in the masks; volumes and sizes are measured on the written grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage

from sap.data.io import Geometry
from sap.data.synth.exam import Exam, ExamJob, exam_generators, lesion_kinds
from sap.data.synth.intensity import render_ct, render_mr
from sap.data.synth.lesions import Finding, Placer, _grow_to_size, place_lesions, sample_lesion_volumes
from sap.data.synth.phantom import Phantom
from sap.data.synth.shapes import Canvas, rotation, smooth_noise

#: size-change thresholds the near-threshold events are designed around (percent volume change);
#: the defaults of ``sap track`` (tests check they agree)
DESIGN_ENLARGING_PCT = 30.0
DESIGN_SHRINKING_PCT = -30.0
#: designed event → (probability, range of the volume ratio follow-up / baseline)
EVENTS: dict[str, tuple[float, tuple[float, float]]] = {
    "stable": (0.28, (0.90, 1.10)),
    "enlarging": (0.18, (1.50, 2.50)),
    "shrinking": (0.18, (0.20, 0.60)),
    "near_enlarging": (0.12, (1.25, 1.35)),
    "near_shrinking": (0.12, (0.65, 0.75)),
    "disappeared": (0.12, (0.0, 0.0)),
}
_NEIGHBOURS = np.ones((3, 3, 3), dtype=bool)


@dataclass
class FollowupPair:
    """A baseline and a follow-up exam in memory, with the truth of their correspondences."""

    baseline: Exam
    followup: Exam
    groups: list[dict]  #: {"baseline": [ids], "followup": [ids], "event": str}
    pose: dict  #: the designed motion (for the record)


def followup_job(job: ExamJob) -> ExamJob:
    """The follow-up exam's job: same subject, exam index 2, case id ``…_t1``."""
    return dataclasses.replace(job, case_id=job.subject_id + "_t1", exam_index=2)


# ------------------------------------------------------------------------------------ geometry
def _resample_labels(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling of a label array at fractional indices ``coords`` (3, X, Y, Z);
    outside the array: 0."""
    return ndimage.map_coordinates(values, coords, order=0, mode="constant", cval=0, prefilter=False).astype(values.dtype)


def pose_mapping(canvas: Canvas, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Fractional baseline indices (3, X, Y, Z) of every follow-up voxel, and the pose record.

    Follow-up voxel centre (body mm on a canvas shifted along z) → rigid motion about the body
    centre → plus a smooth displacement → baseline body mm → baseline index.
    """
    shape = canvas.shape
    spacing = np.asarray(canvas.spacing)
    angles = rng.uniform(-3.0, 3.0, size=3)
    shift = rng.uniform(-8.0, 8.0, size=3)
    fov_shift = float(rng.uniform(-12.0, 12.0))
    amplitude = float(rng.uniform(2.0, 4.0))
    coarse = max(2, int(round(100.0 / float(spacing.mean()))))
    field = np.stack([smooth_noise(rng, shape, coarse=coarse) for _ in range(3)]) * amplitude
    origin_fu = np.asarray(canvas.origin) + np.array([0.0, 0.0, fov_shift])
    grids = np.meshgrid(*[origin_fu[a] + np.arange(shape[a]) * spacing[a] for a in range(3)], indexing="ij")
    points = np.stack(grids)  # body mm of the follow-up voxels
    centre = np.asarray(canvas.origin) + (np.asarray(shape) - 1) * spacing / 2
    rot = rotation(*np.deg2rad(angles))
    moved = np.einsum("ij,jxyz->ixyz", rot, points - centre[:, None, None, None]) + (centre + shift)[:, None, None, None]
    moved += field
    coords = (moved - np.asarray(canvas.origin)[:, None, None, None]) / spacing[:, None, None, None]
    record = {
        "rotation_deg": [round(float(a), 3) for a in angles],
        "translation_mm": [round(float(v), 3) for v in shift],
        "fov_shift_mm": round(fov_shift, 3),
        "deformation_max_mm": round(float(np.abs(field).max()), 3),
    }
    return coords, record


# ------------------------------------------------------------------------------------ lesion edits
def _crop_of(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    if n <= 1:
        return mask.astype(bool)
    counts = np.bincount(labels.reshape(-1))[1:]
    return labels == (1 + int(np.argmax(counts)))


def resize_lesion(mask: np.ndarray, allowed: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """``mask`` (one connected lesion) grown inside ``allowed`` or peeled to ``target`` voxels.

    Growth adds the voxels nearest the lesion first (distance plus a little noise); shrinking
    removes the shallowest voxels first (distance to the outside), keeping the largest piece and
    re-growing it when a peel disconnects it. Returns the new mask (same shape).
    """
    mask = _largest_component(mask)
    target = max(1, int(target))
    size = int(mask.sum())
    jitter = rng.uniform(0.0, 0.3, size=mask.shape)
    if size < target:
        score = ndimage.distance_transform_edt(~mask) + jitter
        return _grow_to_size(mask, allowed | mask, score, target)
    if size > target:
        depth = ndimage.distance_transform_edt(mask) + jitter
        order = np.argsort(-depth[mask], kind="stable")
        flat = np.flatnonzero(mask)
        kept = np.zeros(mask.size, dtype=bool)
        kept[flat[order[:target]]] = True
        kept = _largest_component(kept.reshape(mask.shape))
        if int(kept.sum()) < target:
            score = ndimage.distance_transform_edt(~kept) + jitter
            kept = _grow_to_size(kept, mask, score, target)
        return kept
    return mask


def split_lesion(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut one lesion in two across its long axis, removing a slab wide enough that the halves
    are not 26-connected; None when that does not leave two pieces of ≥ 3 voxels each."""
    idx = np.argwhere(mask).astype(np.float64)
    if len(idx) < 12:
        return None
    points = idx * spacing
    centred = points - points.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    projection = centred @ axis
    half = 0.5 * float(np.abs(axis) @ spacing) + 1e-3
    coords = tuple(idx.astype(int).T)
    a = np.zeros(mask.shape, dtype=bool)
    b = np.zeros(mask.shape, dtype=bool)
    a[tuple(c[projection <= -half] for c in coords)] = True
    b[tuple(c[projection >= half] for c in coords)] = True
    a, b = _largest_component(a), _largest_component(b)
    if a.sum() < 3 or b.sum() < 3:
        return None
    return a, b


def _bridge(a: np.ndarray, b: np.ndarray, allowed: np.ndarray) -> np.ndarray | None:
    """``a ∪ b`` joined into one component through ``allowed`` voxels, fewest voxels between
    them first; None when no path exists."""
    union = a | b
    score = ndimage.distance_transform_edt(~a) + ndimage.distance_transform_edt(~b)
    size = int(union.sum())
    for _ in range(12):
        _, n = cc3d.connected_components(union.astype(np.uint8), connectivity=26, return_N=True)
        if n == 1:
            return union
        grown = _grow_to_size(union, allowed | union, score, size + max(2, size // 10))
        if int(grown.sum()) == int(union.sum()):
            return None
        union, size = grown, int(grown.sum())
    return None


# ------------------------------------------------------------------------------------ the pair
def _merge_partner(placer: Placer, instances: np.ndarray, findings: list[Finding], rng: np.random.Generator) -> tuple[int, Finding] | None:
    """Place a second lesion within two voxels of an existing one in the same bone (it merges
    with it at follow-up). The partner gets the next id."""
    candidates = [f for f in findings if f.bone in (2, 3, 4, 5) and f.n_voxels >= 8]
    if not candidates:
        return None
    host = candidates[int(rng.integers(len(candidates)))]
    crop = _crop_of(instances == host.label, 6)
    host_mask = instances[crop] == host.label
    ring = ndimage.binary_dilation(host_mask, _NEIGHBOURS, iterations=3) & ~ndimage.binary_dilation(host_mask, _NEIGHBOURS)
    # the same piece of bone as the host (not the next vertebra across a disc), so that the two
    # can be joined through bone at follow-up
    pieces = cc3d.connected_components((placer.bone[crop] == host.bone).astype(np.uint8), connectivity=26)
    piece = int(np.bincount(pieces[host_mask]).argmax())
    where = np.zeros(instances.shape, dtype=bool)
    where[crop] = ring & (pieces == piece) & (piece > 0)
    n_voxels = max(6, int(host.n_voxels * rng.uniform(0.4, 0.9)))
    placed = placer.place(where, n_voxels)
    if placed is None:
        return None
    box, blob = placed
    label = int(instances.max()) + 1
    instances[box][blob] = label
    centroid = tuple(float(v) for v in (np.argwhere(blob).mean(axis=0) + [s.start for s in box]))
    return host.label, Finding(label=label, kind=host.kind, bone=host.bone, n_voxels=int(blob.sum()), centroid_ijk=centroid)  # type: ignore[arg-type]


def synthesize_pair(job: ExamJob, geometry_of_canvas: Callable[[Canvas, tuple[float, float, float]], Geometry]) -> FollowupPair:
    """Baseline and follow-up exams of one phantom patient (``job`` is the baseline's job);
    ``geometry_of_canvas`` places a canvas in the world (:func:`sap.data.synth.cohort.phantom_geometry`)."""
    from sap.data.synth.cohort import phantom_exam

    labelled = phantom_exam(job)
    phantom = labelled.phantom
    preset = job.preset
    spacing = np.asarray(preset.spacing)
    fu_job = followup_job(job)
    _, pose_rng, event_rng, render_fu_rng = exam_generators(fu_job)
    render_base_rng = exam_generators(job)[3]

    base_instances = labelled.lesions.copy()
    base_findings = list(labelled.lesion_findings)
    # baseline additions: a merge partner for about half of the patients with lesions
    merge_pair: tuple[int, int] | None = None
    if base_findings and event_rng.random() < 0.6:
        placer = Placer(phantom.bone, preset.spacing, event_rng)
        placer.free &= ~ndimage.binary_dilation(base_instances > 0, _NEIGHBOURS) & ~(labelled.mimics > 0)
        placed = _merge_partner(placer, base_instances, base_findings, event_rng)
        if placed is not None:
            host_label, partner = placed
            base_findings.append(partner)
            merge_pair = (host_label, partner.label)

    # the follow-up grid and its anatomy
    coords, pose = pose_mapping(phantom.canvas, pose_rng)
    tissue = _resample_labels(phantom.tissue, coords)
    bone = _resample_labels(phantom.bone, coords)
    cortex = _resample_labels(phantom.cortex.astype(np.uint8), coords).astype(bool)
    mimics = _resample_labels(labelled.mimics, coords)
    warped = _resample_labels(base_instances.astype(np.int32), coords)
    fu_phantom = Phantom(canvas=phantom.canvas, tissue=tissue, bone=bone, cortex=cortex)

    # events per baseline lesion
    ids = [f.label for f in base_findings]
    events: dict[int, str] = {}
    names = list(EVENTS)
    weights = np.array([EVENTS[n][0] for n in names])
    for label in ids:
        events[label] = str(names[event_rng.choice(len(names), p=weights / weights.sum())])
    split_id = None
    if merge_pair is not None:
        events[merge_pair[0]] = events[merge_pair[1]] = "merged"
    big = [f.label for f in base_findings if f.n_voxels >= 24 and events[f.label] not in ("merged",)]
    if big and event_rng.random() < 0.5:
        split_id = int(big[int(event_rng.integers(len(big)))])
        events[split_id] = "split"

    fu = np.zeros(warped.shape, dtype=np.int32)
    groups: list[dict] = []
    next_id = 1
    allowed_bone = bone > 0

    def blocked() -> np.ndarray:
        return ndimage.binary_dilation(fu > 0, _NEIGHBOURS) if fu.any() else np.zeros(fu.shape, dtype=bool)

    def others_free(crop) -> np.ndarray:
        return allowed_bone[crop] & ~blocked()[crop] & (mimics[crop] == 0)

    base_counts = {f.label: int((base_instances == f.label).sum()) for f in base_findings}
    ordered = sorted(ids, key=lambda i: (events[i] != "merged", i))
    done: set[int] = set()
    for label in ordered:
        if label in done:
            continue
        event = events[label]
        if event == "disappeared":
            groups.append({"baseline": [label], "followup": [], "event": event})
            done.add(label)
            continue
        members = [label] if event != "merged" else list(merge_pair)  # type: ignore[arg-type]
        done.update(members)
        current = np.isin(warped, members)
        if not current.any():  # left the field of view
            groups.append({"baseline": members, "followup": [], "event": "disappeared"})
            continue
        crop = _crop_of(current, 8)
        local = current[crop] & ~blocked()[crop]
        free = others_free(crop)
        if event == "merged":
            a = np.isin(warped[crop], [members[0]]) & local
            b = np.isin(warped[crop], [members[1]]) & local
            joined = _bridge(_largest_component(a), _largest_component(b), free) if a.any() and b.any() else None
            if joined is None:  # no path through bone: the truth says what happened (one kept, one gone)
                events[members[0]] = "stable"
                groups.append({"baseline": [members[1]], "followup": [], "event": "disappeared"})
                shape = resize_lesion(_largest_component(a) if a.any() else local, free, base_counts[members[0]], event_rng)
                fu[crop][shape] = next_id
                groups.append({"baseline": [members[0]], "followup": [next_id], "event": "stable"})
                next_id += 1
                continue
            target = max(int(joined.sum()), int(round(sum(base_counts[m] for m in members) * event_rng.uniform(1.0, 1.3))))
            shape = resize_lesion(joined, free, target, event_rng)
            fu[crop][shape] = next_id
            groups.append({"baseline": members, "followup": [next_id], "event": "merged"})
            next_id += 1
            continue
        low, high = EVENTS.get(event, (0.0, (1.0, 1.0)))[1]
        ratio = float(event_rng.uniform(low, high)) if event != "split" else float(event_rng.uniform(0.9, 1.1))
        if not local.any():
            groups.append({"baseline": members, "followup": [], "event": "disappeared"})
            continue
        shape = resize_lesion(local, free, int(round(base_counts[label] * ratio)), event_rng)
        if event == "split":
            pieces = split_lesion(shape, spacing)
            if pieces is not None:
                fu[crop][pieces[0]] = next_id
                fu[crop][pieces[1]] = next_id + 1
                groups.append({"baseline": [label], "followup": [next_id, next_id + 1], "event": "split"})
                next_id += 2
                continue
            event = "stable"
        fu[crop][shape] = next_id
        groups.append({"baseline": [label], "followup": [next_id], "event": event})
        next_id += 1

    # new lesions
    n_new = int(event_rng.choice([0, 1, 1, 2, 3]))
    if n_new:
        placer = Placer(bone, preset.spacing, event_rng)
        placer.free &= ~blocked() & (mimics == 0)
        scratch = np.zeros(fu.shape, dtype=np.int32)
        volumes = sample_lesion_volumes(event_rng, n_new, preset.lesion_volume_scale)
        kinds = lesion_kinds(dataclasses.replace(fu_job, lesion_volumes_ml=tuple(volumes)), event_rng)
        for finding in place_lesions(placer, scratch, [float(v) for v in volumes], kinds, rib_max_ml=1.5 * preset.lesion_volume_scale):
            fu[scratch == finding.label] = next_id
            groups.append({"baseline": [], "followup": [next_id], "event": "new"})
            next_id += 1

    base_exam = _render(job, phantom, base_instances, labelled.mimics, base_findings, render_base_rng, geometry_of_canvas(phantom.canvas, preset.spacing))
    fu_canvas = dataclasses.replace(phantom.canvas, origin=(phantom.canvas.origin[0], phantom.canvas.origin[1], phantom.canvas.origin[2] + pose["fov_shift_mm"]))
    fu_findings = _findings_of(fu, base_findings, groups, bone)
    fu_exam = _render(fu_job, fu_phantom, fu, mimics, fu_findings, render_fu_rng, geometry_of_canvas(fu_canvas, preset.spacing))
    return FollowupPair(base_exam, fu_exam, groups, pose)


def _findings_of(fu: np.ndarray, base_findings: list[Finding], groups: list[dict], bone: np.ndarray) -> list[Finding]:
    """One Finding per follow-up lesion id (kind inherited from its baseline lesion)."""
    kinds = {f.label: f.kind for f in base_findings}
    stats = cc3d.statistics(np.ascontiguousarray(fu), no_slice_conversion=True)
    out = []
    for group in groups:
        kind = kinds.get(group["baseline"][0], "metastasis") if group["baseline"] else None
        for label in group["followup"]:
            if label >= len(stats["voxel_counts"]) or stats["voxel_counts"][label] == 0:
                continue
            centroid = tuple(float(v) for v in stats["centroids"][label])
            sites = bone[fu == label]
            site = int(np.bincount(sites).argmax()) if sites.size else 0
            out.append(Finding(label=label, kind=kind or "metastasis", bone=site, n_voxels=int(stats["voxel_counts"][label]), centroid_ijk=centroid))  # type: ignore[arg-type]
    return sorted(out, key=lambda f: f.label)


def _render(job: ExamJob, phantom: Phantom, instances: np.ndarray, mimics: np.ndarray, findings: list[Finding], rng: np.random.Generator, geometry: Geometry) -> Exam:
    if job.modality == "ct":
        kinds = {f.label: ("lytic" if f.kind not in ("lytic", "blastic") else f.kind) for f in findings}
        n = int(instances.max())
        images = {"CT": render_ct(phantom.tissue, phantom.bone, phantom.cortex, instances, [kinds.get(i, "lytic") for i in range(1, n + 1)], mimics, rng)}
    else:
        t1, dwi = render_mr(phantom.tissue, phantom.bone, phantom.cortex, instances, mimics, rng)
        images = {"T1": t1, "b1000": dwi}
    return Exam(job=job, geometry=geometry, images=images, skeleton=phantom.skeleton, lesions=instances, lesion_findings=findings)


# ------------------------------------------------------------------------------------ writing
def pair_jobs(jobs: list[ExamJob]) -> list[ExamJob]:
    """The cohort's jobs with each patient's case id renamed to its baseline ``…_t0``."""
    return [dataclasses.replace(j, case_id=j.subject_id + "_t0") if j.group == "patients" else j for j in jobs]


def _lesion_truth(instances: np.ndarray, geometry: Geometry) -> dict[int, dict]:
    """Per lesion id: voxels, volume (mL), centroid and the deepest voxel (a point inside), LPS mm."""
    voxel_ml = float(np.prod(geometry.canonical_spacing)) / 1000.0
    stats = cc3d.statistics(np.ascontiguousarray(instances), no_slice_conversion=True)
    out = {}
    for label in range(1, len(stats["voxel_counts"])):
        count = int(stats["voxel_counts"][label])
        if count == 0:
            continue
        box = stats["bounding_boxes"][label]
        crop = tuple(slice(int(box[2 * a]), int(box[2 * a + 1]) + 1) for a in range(3))
        mask = instances[crop] == label
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=geometry.canonical_spacing)[1:-1, 1:-1, 1:-1]
        deepest = np.array(np.unravel_index(int(np.argmax(np.where(mask, depth, -1))), mask.shape)) + [s.start for s in crop]
        out[label] = {
            "id": label,
            "n_voxels": count,
            "volume_ml": round(count * voxel_ml, 6),
            "centroid_lps_mm": [round(float(v), 3) for v in geometry.voxel_to_lps(np.asarray(stats["centroids"][label]))[0]],
            "inside_lps_mm": [round(float(v), 3) for v in geometry.voxel_to_lps(deepest)[0]],
        }
    return out


def write_any(job: ExamJob, out: Path) -> dict:
    """Worker of a ``--followup`` cohort: healthy exams as usual; a patient becomes a pair,
    written as two case folders, returned as ``{"exams": [two records], "pair": truth}``."""
    from sap.data.synth.cohort import phantom_geometry, write_exam, write_synthesized

    if job.group != "patients":
        return write_exam(job, out)
    pair = synthesize_pair(job, phantom_geometry)
    records = [write_synthesized(pair.baseline, out), write_synthesized(pair.followup, out)]
    assert pair.baseline.lesions is not None and pair.followup.lesions is not None
    base = _lesion_truth(pair.baseline.lesions, pair.baseline.geometry)
    fu = _lesion_truth(pair.followup.lesions, pair.followup.geometry)
    groups = []
    for group in pair.groups:
        b = [i for i in group["baseline"] if i in base]
        f = [i for i in group["followup"] if i in fu]
        if not b and not f:
            continue
        before = sum(base[i]["volume_ml"] for i in b)
        after = sum(fu[i]["volume_ml"] for i in f)
        groups.append({
            "baseline": b,
            "followup": f,
            "event": group["event"],
            "volume_change_pct": round(100.0 * (after - before) / before, 3) if b and f else None,
        })
    truth = {
        "subject_id": job.subject_id,
        "baseline": pair.baseline.job.case_id,
        "followup": pair.followup.job.case_id,
        "pose": pair.pose,
        "baseline_lesions": list(base.values()),
        "followup_lesions": list(fu.values()),
        "groups": groups,
    }
    return {"exams": records, "pair": truth}
