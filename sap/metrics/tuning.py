"""E9 threshold tuning (SPEC §9) on per-case detection counts over a grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sap.metrics.case import DetectionCounts, f2_score

#: objectives within this distance of the best tie (then the lowest threshold, lowest volume win)
TIE_TOLERANCE = 1e-12


def tuning_objective(counts: Sequence[DetectionCounts], objective: str = "mean_f2") -> float:
    """E9 objective over tuning cases at one (threshold, min volume).

    ``mean_f2``: mean per-case F2 over cases with n_gt > 0 (the paper); ``pooled_f2``: F2 of the
    pooled counts of all cases, so false positives on lesion-free exams count. NaN when no case
    has a lesion.
    """
    if objective == "mean_f2":
        values = [c.f2 for c in counts if c.n_gt > 0]
        return float(np.mean(values)) if values else float("nan")
    if objective == "pooled_f2":
        return f2_score(
            sum(c.detected for c in counts), sum(c.n_gt for c in counts),
            sum(c.true_candidates for c in counts), sum(c.n_pred for c in counts),
        )
    raise ValueError(f"unknown tuning objective {objective!r} (mean_f2 or pooled_f2)")


def tune_threshold(
    grid_counts: Sequence[Mapping[tuple[float, float], DetectionCounts]],
    objective: str = "mean_f2",
) -> tuple[float, float, float, dict[tuple[float, float], float]]:
    """Pick (threshold, min volume) maximising the objective over tuning cases.

    ``grid_counts``: one mapping per tuning case (or per (fold model, case) pair) from
    (threshold, min_volume_ml) to its counts, all with the same keys. Objectives within 1e-12 of
    the best tie; the lowest threshold wins, then the lowest minimum volume. Returns
    (threshold, min_volume_ml, best objective, objective per grid point). Raises ValueError when
    no case has a lesion (nothing to tune on).
    """
    if not grid_counts:
        raise ValueError("no tuning cases")
    keys = sorted(grid_counts[0].keys())
    table = {key: tuning_objective([c[key] for c in grid_counts], objective) for key in keys}
    finite = [v for v in table.values() if np.isfinite(v)]
    if not finite:
        raise ValueError("no tuning case has a lesion: the objective is undefined")
    best = max(finite)
    threshold, min_volume = min(k for k, v in table.items() if np.isfinite(v) and v >= best - TIE_TOLERANCE)
    return threshold, min_volume, best, table
