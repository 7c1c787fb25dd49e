"""Lesion evaluation rules E1–E10 of SPEC §9 on in-memory arrays (numpy, scipy, cc3d; no torch).

One function per rule, named after it; :func:`evaluate_case` computes everything for one
(prediction, ground truth, spacing) case and :func:`summarize` pools cases into the summary.
"""

from sap.metrics.case import (
    DEFAULT_GRID,
    LESION_COLUMNS,
    PATIENT_COLUMNS,
    CaseResult,
    DetectionCounts,
    EvaluationSettings,
    detection_counts,
    detection_counts_grid,
    evaluate_case,
    f2_score,
    froc_case_candidates,
    is_binary_prediction,
    label_ground_truth,
    lesion_dice_nsd,
    nan_to_none,
    precision,
    sensitivity,
)
from sap.metrics.components import (
    Components,
    Matching,
    at_least,
    drop_small,
    label_components,
    match_components,
    voxel_volume_ml,
)
from sap.metrics.cumulative import CumulativeMean
from sap.metrics.froc import (
    CANDIDATE_COLUMNS,
    CaseCandidates,
    FrocCurve,
    candidate_rows,
    candidates_from_rows,
    froc_auc,
    froc_auc_bootstrap_ci,
    froc_candidates,
    froc_score,
    froc_sweep,
    paired_froc_auc_difference,
    resampled_froc_aucs,
    sensitivity_at,
)
from sap.metrics.pooled import (
    CASE_METRICS,
    LESION_METRICS,
    cumulative_volume_curves,
    pooled_sensitivity,
    summarize,
)
from sap.metrics.stats import (
    bonferroni,
    bootstrap_median_ci,
    compare_methods,
    describe,
    icc_a1,
    mann_whitney,
    paired_bootstrap_difference,
    shapiro_p,
    stars,
    wilcoxon_paired,
)
from sap.metrics.surface import dice, normalized_surface_dice, surfel_area_table
from sap.metrics.tuning import tune_threshold, tuning_objective

__all__ = [
    "CANDIDATE_COLUMNS", "CASE_METRICS", "DEFAULT_GRID", "LESION_COLUMNS", "LESION_METRICS", "PATIENT_COLUMNS",
    "CaseCandidates", "CaseResult", "Components", "CumulativeMean", "DetectionCounts", "EvaluationSettings", "FrocCurve",
    "Matching", "at_least", "bonferroni", "bootstrap_median_ci", "candidate_rows", "candidates_from_rows", "compare_methods", "cumulative_volume_curves", "describe",
    "detection_counts", "detection_counts_grid", "dice", "drop_small", "evaluate_case", "f2_score",
    "froc_auc", "froc_auc_bootstrap_ci", "froc_candidates", "froc_case_candidates", "froc_score", "froc_sweep", "icc_a1",
    "is_binary_prediction", "label_components", "label_ground_truth", "lesion_dice_nsd", "mann_whitney", "match_components",
    "nan_to_none", "normalized_surface_dice", "paired_bootstrap_difference", "paired_froc_auc_difference", "pooled_sensitivity", "precision", "resampled_froc_aucs", "sensitivity",
    "sensitivity_at", "shapiro_p", "stars", "summarize", "surfel_area_table", "tune_threshold",
    "tuning_objective", "voxel_volume_ml", "wilcoxon_paired",
]
