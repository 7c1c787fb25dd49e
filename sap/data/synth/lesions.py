"""Bone lesions and false-positive mimics placed inside a labelled anatomy.

Lesion volumes follow the study's distribution: log-normal with a median of 0.5 mL and about a
quarter of lesions ≥ 1 mL (Wuts et al., §3.6). A lesion is an irregular blob grown from a seed in
one bone (one skeleton region, or the ribs), so its region is unambiguous; every lesion is kept at
least one voxel away from every other (26-connectivity), so each is exactly one connected
component of the written mask and lesion counts match exactly.

Mimics are what provokes false positives in the study: lymph nodes (bright on b1000), vertebral
haemangiomas (bright on T1), sclerotic bone islands (dark on T1, dense on CT) and a metal implant
(> 2500 HU on CT, a signal void on MR). Cohorts with the ``bone_mimics`` difficulty feature add
in-bone mimics that look like a low-contrast lesion: healing fractures (a band of marrow oedema,
dark on T1 and moderately bright on b1000) and treated sclerotic foci (very dark on T1, faintly
bright on b1000, dense on CT).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from sap.data.labels import region_name
from sap.data.synth.phantom import OTHER_BONE, RIB
from sap.data.synth.shapes import rotation, smooth_noise

LESION_MEDIAN_ML = 0.5
#: log-normal shape: P(V ≥ 1 mL) = 1 − Φ(ln 2 / σ) ≈ 0.25 for σ = 1.03
LESION_SIGMA = 1.03
LESION_MIN_ML = 0.03
LESION_MAX_ML = 25.0

#: relative frequency of lesion sites (bone value → weight): spine, pelvis, femurs, ribs, clavicles
#: dominate, as in the study's cohort of advanced prostate cancer.
LESION_SITES: dict[int, float] = {1: 0.05, 2: 0.22, 3: 0.18, 4: 0.26, 5: 0.10, 6: 0.02, 7: 0.02, 8: 0.04, 9: 0.03, RIB: 0.08}

#: new kinds go at the end: the mimic map stores 1 + index, and earlier cohorts must not change
MIMIC_KINDS: tuple[str, ...] = ("lymph_node", "haemangioma", "bone_island", "implant", "fracture", "sclerosis")
#: the in-bone mimics of the ``bone_mimics`` difficulty feature (ours), and where they sit
#: (bone values: spine, pelvis, femurs, ribs)
BONE_MIMIC_KINDS: tuple[str, ...] = ("fracture", "sclerosis")
BONE_MIMIC_SITES: dict[str, tuple[int, ...]] = {"fracture": (2, 3, 4, 5, RIB), "sclerosis": (2, 3, 4, 5)}

_NEIGHBOURS = np.ones((3, 3, 3), dtype=bool)


@dataclass
class Finding:
    """One placed lesion or mimic: its voxels live in a label map under ``label``."""

    label: int  #: value in the instance map (lesions) or mimic map
    kind: str  #: "lytic" | "blastic" | "metastasis" for lesions, a MIMIC_KINDS name for mimics
    bone: int  #: bone value at the site (0 for soft tissue)
    n_voxels: int
    centroid_ijk: tuple[float, float, float]  #: canonical array indices
    #: lesion contrast factor (1 = full contrast; < 1 with the ``low_contrast`` difficulty feature)
    contrast: float = 1.0

    @property
    def region(self) -> str:
        """Skeleton region name; ``"rib/other"`` for ribs, ``"soft_tissue"`` outside bone."""
        if self.bone == 0:
            return "soft_tissue"
        return region_name(self.bone) if self.bone not in (RIB, OTHER_BONE) else region_name(0)


def sample_lesion_volumes(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    """Target volumes (mL) of ``n`` lesions from the study's log-normal, clipped to [0.03, 25],
    times ``scale``.

    Stratified (one draw per quantile bin, shuffled), so even a small cohort's lesions follow
    the distribution closely: median ≈ 0.5 mL, ≈ 25 % ≥ 1 mL (× ``scale``: the same quantiles,
    so ≈ 25 % ≥ ``scale`` mL).
    """
    from scipy.special import ndtri

    if n == 0:
        return np.zeros(0)
    quantiles = (rng.permutation(n) + rng.uniform(0.05, 0.95, size=n)) / n
    volumes = np.exp(np.log(LESION_MEDIAN_ML) + LESION_SIGMA * ndtri(quantiles))
    return scale * np.clip(volumes, LESION_MIN_ML, LESION_MAX_ML)


def split_volumes(volumes: np.ndarray, counts: list[int]) -> list[list[float]]:
    """Cut a cohort's lesion volumes into per-patient lists of the given lengths (in order)."""
    edges = np.cumsum([0, *counts])
    return [[float(v) for v in volumes[a:b]] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def burden_plan(rng: np.random.Generator, n_patients: int, n_lesion_free: int, max_lesions: int) -> list[int]:
    """Lesion count per patient: some lesion-free, most few, a few many (heterogeneous burden).

    When at least four patients carry lesions, one of them is guaranteed a high burden.
    """
    counts = []
    for _ in range(n_patients - n_lesion_free):
        kind = rng.choice(3, p=[0.55, 0.3, 0.15])
        low, high = [(1, 3), (4, 8), (10, max_lesions)][kind]
        counts.append(int(rng.integers(low, max(low, high) + 1)))
    if len(counts) >= 4 and max(counts) < 10:
        counts[int(rng.integers(len(counts)))] = int(rng.integers(10, max(10, max_lesions) + 1))
    counts += [0] * n_lesion_free
    order = rng.permutation(n_patients)
    return [counts[i] for i in order]


def mimic_plan(rng: np.random.Generator, n_patients: int) -> list[dict[str, int]]:
    """Number of each mimic kind per patient; at least one implant in a cohort of three or more."""
    plans = []
    for _ in range(n_patients):
        plans.append({
            "lymph_node": int(rng.integers(0, 3)),
            "haemangioma": int(rng.integers(0, 2)),
            "bone_island": int(rng.integers(0, 3)),
            "implant": int(rng.random() < 0.25),
        })
    if n_patients >= 3 and not any(p["implant"] for p in plans):
        plans[int(rng.integers(n_patients))]["implant"] = 1
    return plans


def bone_mimic_plan(rng: np.random.Generator, n_patients: int, count_range: tuple[int, int]) -> list[dict[str, int]]:
    """In-bone mimics per patient (the ``bone_mimics`` difficulty feature): a total uniform in
    ``count_range``, each a fracture or a sclerotic focus with equal odds."""
    plans = []
    for _ in range(n_patients):
        total = int(rng.integers(count_range[0], count_range[1] + 1))
        n_fractures = int(rng.binomial(total, 0.5))
        plans.append({"fracture": n_fractures, "sclerosis": total - n_fractures})
    return plans


def _crop_around(seed: np.ndarray, radius_vox: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(seed - radius_vox, 0)
    hi = np.minimum(seed + radius_vox + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def grow_blob(
    allowed: np.ndarray,
    seed: tuple[int, int, int],
    n_voxels: int,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    elongation: float = 1.0,
) -> np.ndarray:
    """An irregular connected blob of ``n_voxels`` voxels inside ``allowed``, containing ``seed``.

    The blob is a sublevel set of a randomly oriented, anisotropic distance perturbed by smooth
    noise, restricted to ``allowed`` and to the 26-connected component of the seed; the threshold is
    found by bisection, and where the next threshold overshoots the blob is finished one
    lowest-scoring neighbour at a time. The size is exactly ``n_voxels``, or the whole reachable
    bone when that holds fewer. All arrays are the crop's; returns a boolean mask of the crop.
    """
    radii = rng.uniform(0.65, 1.5, size=3)
    radii[0] *= elongation
    axes = rotation(*rng.uniform(0, np.pi, size=3))
    grids = np.meshgrid(*[(np.arange(n) - c) * d for n, c, d in zip(allowed.shape, seed, spacing, strict=True)], indexing="ij")
    distance = np.zeros(allowed.shape)
    for row, r in zip(axes, radii, strict=True):
        distance += ((row[0] * grids[0] + row[1] * grids[1] + row[2] * grids[2]) / r) ** 2
    score = np.sqrt(distance) * (1.0 + 0.45 * smooth_noise(rng, allowed.shape, coarse=3))
    score[seed] = -1.0
    candidates = np.sort(score[allowed])
    if candidates.size == 0:
        return np.zeros(allowed.shape, dtype=bool)

    def component(k: int) -> np.ndarray:
        selected = allowed & (score <= candidates[k - 1])
        labels = cc3d.connected_components(selected.astype(np.uint8), connectivity=26)
        return labels == labels[seed]

    lo, hi = 1, int(min(candidates.size, max(n_voxels * 8, 64)))
    below, above = component(1), None
    while lo <= hi:
        mid = (lo + hi) // 2
        blob = component(mid)
        size = int(blob.sum())
        if size < n_voxels:
            below, lo = blob, mid + 1
        else:
            above, hi = blob, mid - 1
    if above is not None and int(above.sum()) == n_voxels:
        return above
    # One more candidate can join a cluster of several already-selected voxels, so the threshold
    # sizes jump (2 -> 7 voxels); finish from below by adding the lowest-scoring neighbour one
    # voxel at a time, which reaches the asked size exactly whenever the bone has room.
    return _grow_to_size(below, allowed, score, n_voxels)


def _grow_to_size(blob: np.ndarray, allowed: np.ndarray, score: np.ndarray, n_voxels: int) -> np.ndarray:
    """``blob`` grown inside ``allowed`` to ``n_voxels`` voxels, lowest score first (26-connected)."""
    blob = blob.copy()
    size = int(blob.sum())
    if size >= n_voxels:
        return blob
    offsets = [
        (i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)
    ]
    frontier_mask = ndimage.binary_dilation(blob, structure=np.ones((3, 3, 3), dtype=bool)) & allowed & ~blob
    frontier = [(float(score[v]), v) for v in zip(*np.nonzero(frontier_mask), strict=True)]
    heapq.heapify(frontier)
    queued = frontier_mask | blob
    while size < n_voxels and frontier:
        _, voxel = heapq.heappop(frontier)
        blob[voxel] = True
        size += 1
        for offset in offsets:
            neighbour = tuple(int(a + b) for a, b in zip(voxel, offset, strict=True))
            if (
                all(0 <= n < extent for n, extent in zip(neighbour, blob.shape, strict=True))
                and allowed[neighbour]
                and not queued[neighbour]
            ):
                queued[neighbour] = True
                heapq.heappush(frontier, (float(score[neighbour]), neighbour))
    return blob


class Placer:
    """Places blobs one after another, keeping each one voxel clear of all earlier ones.

    ``bone`` holds the bone value per voxel (0 = soft tissue); ``free`` marks voxels still available.
    """

    def __init__(self, bone: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator):
        self.bone = bone
        self.spacing = spacing
        self.rng = rng
        self.free = np.ones(bone.shape, dtype=bool)
        self._site_voxels: dict[int, np.ndarray] = {}

    def site_voxels(self, value: int) -> np.ndarray:
        """Flat indices of one bone's interior voxels (all its voxels when it has no interior)."""
        if value not in self._site_voxels:
            mask = self.bone == value
            interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
            chosen = interior if interior.sum() >= 8 else mask
            self._site_voxels[value] = np.flatnonzero(chosen)
        return self._site_voxels[value]

    def place(self, allowed_value: int | np.ndarray, n_voxels: int, elongation: float = 1.0, tries: int = 12) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Grow one blob of about ``n_voxels`` in the voxels of ``allowed_value`` (a bone value, or a
        boolean mask of candidate voxels). Returns (crop, mask on the crop) or None if no room."""
        if isinstance(allowed_value, np.ndarray):
            pool = np.flatnonzero(allowed_value)
            allowed_full = allowed_value
        else:
            pool = self.site_voxels(allowed_value)
            allowed_full = None
        if pool.size == 0:
            return None
        spacing = np.asarray(self.spacing)
        radius_mm = (3 * n_voxels * np.prod(spacing) / (4 * np.pi)) ** (1 / 3)
        radius_vox = np.ceil(radius_mm * 2.6 * max(1.0, elongation) / spacing).astype(int) + 2
        for _ in range(tries):
            flat = int(pool[self.rng.integers(pool.size)])
            seed = np.array(np.unravel_index(flat, self.bone.shape))
            if not self.free[tuple(seed)]:
                continue
            crop = _crop_around(seed, radius_vox, self.bone.shape)
            if allowed_full is None:
                allowed = (self.bone[crop] == allowed_value) & self.free[crop]
            else:
                allowed = allowed_full[crop] & self.free[crop]
            local_seed = tuple(int(s - c.start) for s, c in zip(seed, crop, strict=True))
            blob = grow_blob(allowed, local_seed, n_voxels, self.spacing, self.rng, elongation)  # type: ignore[arg-type]
            if blob.any():
                # keep a one-voxel gap around the blob so blobs never touch (26-connectivity)
                self.free[crop] &= ~ndimage.binary_dilation(blob, structure=_NEIGHBOURS)
                return crop, blob
        return None


def _centroid(crop: tuple[slice, ...], blob: np.ndarray) -> tuple[float, float, float]:
    idx = np.argwhere(blob).mean(axis=0) + [c.start for c in crop]
    return tuple(float(v) for v in idx)  # type: ignore[return-value]


def place_lesions(
    placer: Placer,
    instances: np.ndarray,
    volumes_ml: list[float],
    kinds: list[str],
    sites: dict[int, float] | None = None,
    rib_max_ml: float = 1.5,
) -> list[Finding]:
    """Place one lesion per target volume (mL); write ids 1..n into ``instances`` (int array, in place).

    The measured volume is the voxel count at ``placer.spacing`` (target rounded to whole voxels,
    smaller only when the bone cannot hold it). ``kinds`` gives each lesion's appearance class. A lesion's site is drawn among the bones that
    can hold its target volume; when no bone has room the lesion is dropped (rare; the returned
    list is what was placed). Ribs take lesions up to ``rib_max_ml`` only.
    """
    sites = LESION_SITES if sites is None else sites
    voxel_ml = float(np.prod(placer.spacing)) / 1000.0
    volumes = volumes_ml
    present = {value: len(placer.site_voxels(value)) for value in sites}
    found: list[Finding] = []
    for volume, kind in zip(volumes, kinds, strict=True):
        n_voxels = max(1, int(round(volume / voxel_ml)))
        # a bone is a candidate when its interior is several times the lesion (ribs: small lesions only)
        options = [v for v, count in present.items() if count >= 4 * n_voxels and (v != RIB or n_voxels * voxel_ml <= rib_max_ml)]
        if not options:
            options = [v for v, count in present.items() if count > 0]
        if not options:
            break
        weights = np.array([sites[v] for v in options])
        site = int(options[placer.rng.choice(len(options), p=weights / weights.sum())])
        placed = placer.place(site, n_voxels)
        if placed is None:
            continue
        crop, blob = placed
        label = len(found) + 1
        instances[crop][blob] = label
        found.append(Finding(label=label, kind=kind, bone=site, n_voxels=int(blob.sum()), centroid_ijk=_centroid(crop, blob)))
    return found


def place_mimics(
    placer: Placer, mimic_map: np.ndarray, plan: dict[str, int], soft_tissue: np.ndarray, scale: float = 1.0
) -> list[Finding]:
    """Place the mimics of ``plan`` (kind → count); write 1 + kind index into ``mimic_map``.

    ``soft_tissue`` marks where lymph nodes may sit (abdominal and pelvic fat). ``scale``
    multiplies mimic volumes like lesion volumes, so mimics stay lesion-sized in a scaled cohort.
    """
    voxel_ml = float(np.prod(placer.spacing)) / 1000.0
    rng = placer.rng
    found: list[Finding] = []
    for kind in MIMIC_KINDS:
        for _ in range(plan.get(kind, 0)):
            if kind == "lymph_node":
                where: int | np.ndarray = soft_tissue
                volume, elongation = rng.uniform(0.4, 2.0), 1.4
            elif kind == "haemangioma":
                where = int(rng.choice([2, 3]))
                volume, elongation = rng.uniform(0.2, 1.0), 1.0
            elif kind == "bone_island":
                where = int(rng.choice([3, 4, 5]))
                volume, elongation = rng.uniform(0.05, 0.4), 1.0
            elif kind in BONE_MIMIC_KINDS:
                # lesion-sized (0.3-2 mL before scaling); a fracture is a band across the bone
                where = int(rng.choice(BONE_MIMIC_SITES[kind]))
                volume, elongation = rng.uniform(0.3, 2.0), (2.5 if kind == "fracture" else 1.0)
            else:  # implant: a rod in a femur
                where = 5
                volume, elongation = rng.uniform(2.0, 5.0), 3.0
            placed = placer.place(where, max(1, int(round(scale * volume / voxel_ml))), elongation=elongation)
            if placed is None:
                continue
            crop, blob = placed
            value = 1 + MIMIC_KINDS.index(kind)
            mimic_map[crop][blob] = value
            bone = int(where) if not isinstance(where, np.ndarray) else 0
            found.append(Finding(label=len(found) + 1, kind=kind, bone=bone, n_voxels=int(blob.sum()), centroid_ijk=_centroid(crop, blob)))
    return found
