"""Matching lesion instances of two exams, and the two per-lesion fields (numpy/scipy only).

:func:`match_lesions` works on the baseline instance map and the follow-up instance map warped
into the baseline grid:

1. **overlap**: a baseline lesion and a follow-up lesion are linked when their overlap is at least
   ``min_overlap`` of the smaller of the two (in warped voxels). The connected groups of links are
   the tracks: one baseline and one follow-up lesion **matched**; several baseline lesions into
   one or more follow-up lesions **merged**; one baseline lesion into several follow-up lesions
   **split**;
2. **distance**: the lesions left over are paired one to one by centroid distance (baseline
   centroid against the warped follow-up centroid, mm) with
   :func:`scipy.optimize.linear_sum_assignment`, pairs further apart than ``max_distance_mm``
   refused; such a pair is **matched**;
3. the rest: baseline lesions **disappeared**, follow-up lesions **new**.

:func:`size_change` is the second field: from the total volume of a track's lesions at each time
(measured in each exam's own geometry), **enlarging** when the change is at least
``enlarging_pct`` percent, **shrinking** when at most ``-shrinking_pct`` percent, **stable**
otherwise; empty for new and disappeared lesions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

CORRESPONDENCES = ("matched", "merged", "split", "new", "disappeared")
SIZE_CHANGES = ("enlarging", "shrinking", "stable")


@dataclass(frozen=True)
class MatchOptions:
    min_overlap: float = 0.1  #: overlap fraction of the smaller lesion that links two lesions *(ours)*
    max_distance_mm: float = 20.0  #: cap of the centroid-distance pairing *(ours)*
    enlarging_pct: float = 30.0  #: volume change (%) from which a track is "enlarging" *(ours)*
    shrinking_pct: float = 30.0  #: volume decrease (%) from which a track is "shrinking" *(ours)*


@dataclass
class Track:
    baseline: list[int]  #: baseline lesion ids
    followup: list[int]  #: follow-up lesion ids
    correspondence: str
    matched_by: str = ""  #: "overlap" | "distance" | ""
    distance_mm: float = float("nan")
    overlap: list[tuple[int, int, int]] = field(default_factory=list)  #: (baseline, follow-up, voxels)


def correspondence_of(n_baseline: int, n_followup: int) -> str:
    """The correspondence of a group with that many lesions on each side (several on both
    sides counts as merged)."""
    if n_baseline == 0:
        return "new"
    if n_followup == 0:
        return "disappeared"
    if n_baseline >= 2:
        return "merged"
    return "split" if n_followup >= 2 else "matched"


def size_change(volume_baseline_ml: float, volume_followup_ml: float, enlarging_pct: float, shrinking_pct: float) -> str:
    """``enlarging`` / ``shrinking`` / ``stable`` from the percent volume change (see module)."""
    if volume_baseline_ml <= 0:
        return ""
    pct = 100.0 * (volume_followup_ml - volume_baseline_ml) / volume_baseline_ml
    if pct >= enlarging_pct:
        return "enlarging"
    if pct <= -shrinking_pct:
        return "shrinking"
    return "stable"


def _components(n_b: int, edges: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    """Connected groups of a bipartite graph; nodes 1…n_b baseline, follow-up shifted by n_b."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for b, f in edges:
        parent[find(b)] = find(n_b + f)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for b, f in edges:
        root = find(b)
        group = groups.setdefault(root, ([], []))
        if b not in group[0]:
            group[0].append(b)
        if f not in group[1]:
            group[1].append(f)
    return [(sorted(b), sorted(f)) for b, f in groups.values()]


def match_lesions(
    baseline: np.ndarray,
    n_baseline: int,
    warped_followup: np.ndarray,
    n_followup: int,
    baseline_centroids_mm: np.ndarray,
    followup_centroids_mm: np.ndarray,
    options: MatchOptions,
) -> list[Track]:
    """Tracks of two instance maps on one grid (see module).

    ``baseline``/``warped_followup``: instance ids 1…n (0 = background) on the baseline grid.
    ``*_centroids_mm``: (n, 3) world positions in one frame (the baseline's); a NaN row (a
    follow-up lesion that left the baseline's field of view when warped) never pairs by distance.
    """
    both = (baseline > 0) & (warped_followup > 0)
    pairs = baseline[both].astype(np.int64) * (n_followup + 1) + warped_followup[both].astype(np.int64)
    counts = np.bincount(pairs, minlength=(n_baseline + 1) * (n_followup + 1)).reshape(n_baseline + 1, n_followup + 1)
    size_b = np.bincount(baseline.reshape(-1).astype(np.int64), minlength=n_baseline + 1)
    size_f = np.bincount(warped_followup.reshape(-1).astype(np.int64), minlength=n_followup + 1)
    edges = []
    overlaps = {}
    for b, f in zip(*np.nonzero(counts[1:, 1:]), strict=True):
        b, f = int(b) + 1, int(f) + 1
        smaller = min(size_b[b], size_f[f])
        if smaller > 0 and counts[b, f] >= options.min_overlap * smaller:
            edges.append((b, f))
            overlaps[(b, f)] = int(counts[b, f])
    tracks = []
    for bs, fs in _components(n_baseline, edges):
        links = [(b, f, overlaps[(b, f)]) for b in bs for f in fs if (b, f) in overlaps]
        tracks.append(Track(bs, fs, correspondence_of(len(bs), len(fs)), "overlap", overlap=links))
    used_b = {b for t in tracks for b in t.baseline}
    used_f = {f for t in tracks for f in t.followup}
    rest_b = [b for b in range(1, n_baseline + 1) if b not in used_b]
    rest_f = [f for f in range(1, n_followup + 1) if f not in used_f]
    paired_b, paired_f = set(), set()
    if rest_b and rest_f:
        a = np.asarray(baseline_centroids_mm, dtype=np.float64)[[b - 1 for b in rest_b]]
        c = np.asarray(followup_centroids_mm, dtype=np.float64)[[f - 1 for f in rest_f]]
        distance = np.sqrt(((a[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1))
        allowed = np.isfinite(distance) & (distance <= options.max_distance_mm)
        cost = np.where(allowed, distance, 1e9)
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            if allowed[i, j]:
                paired_b.add(rest_b[i])
                paired_f.add(rest_f[j])
                tracks.append(Track([rest_b[i]], [rest_f[j]], "matched", "distance", float(distance[i, j])))
    tracks += [Track([b], [], "disappeared") for b in rest_b if b not in paired_b]
    tracks += [Track([], [f], "new") for f in rest_f if f not in paired_f]
    # reading order: baseline lesions by id, then new lesions by id
    tracks.sort(key=lambda t: (0, min(t.baseline)) if t.baseline else (1, min(t.followup)))
    return tracks
