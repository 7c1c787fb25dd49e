"""Scoring ``sap track`` against the truth of a ``sap synth --followup`` cohort.

The truth (``cohort.json`` → ``followup``) names, per pair, the correspondence groups of the
synthetic lesions and a point inside each lesion. Scoring:

1. **identify**: each truth lesion is the component of its exam's ground-truth mask
   (``GT.nii.gz`` in the case folder) that holds its inside point; each tracked lesion is
   assigned to the truth lesion it overlaps most (at least one voxel; one to one, largest
   overlaps first). With ground-truth masks as input every lesion is identified exactly.
2. **correspondences** as statements: a link (baseline lesion, follow-up lesion) for every pair in
   a group with lesions on both sides, "(baseline, none)" for a disappeared lesion and "(none,
   follow-up)" for a new one. Tracked statements are translated through step 1 (a tracked
   lesion without a truth lesion is a false positive in every statement it makes). Precision,
   recall and F1 over these statements, pooled over the pair.
3. **fields**: for every truth lesion found in its exam, whether the track holding it has the
   true ``correspondence`` and, where the truth has both sides, the true ``size_change``
   (the truth volumes with the run's thresholds); accuracy = correct / scored. ``found`` says how
   many truth lesions were identified at all.
4. **diameters**: absolute error (mm) of the 3D Feret and axial diameters of each identified
   lesion against the same measure of its truth component (each exam's own grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import cc3d
import numpy as np

from sap.data.cases import COHORT_FILE, find_image
from sap.data.io import read_image
from sap.errors import SapError
from sap.metrics.diameters import instance_sizes
from sap.track.match import correspondence_of, size_change

if TYPE_CHECKING:
    from sap.track.api import Exam, TrackResult


def load_truth(truth: str | Path, baseline_case: str, followup_case: str) -> tuple[dict, Path]:
    """The pair record of ``baseline_case``/``followup_case`` and the cohort folder."""
    path = Path(truth)
    path = path / COHORT_FILE if path.is_dir() else path
    try:
        cohort = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SapError(f"{path}: cannot read the truth ({exc})") from exc
    pairs = cohort.get("followup") if isinstance(cohort, dict) else None
    if not pairs:
        raise SapError(f"{path}: no follow-up truth (write the cohort with sap synth --followup)")
    for pair in pairs:
        if pair["baseline"] == baseline_case and pair["followup"] == followup_case:
            return pair, path.parent
    raise SapError(f"{path}: no pair {baseline_case} → {followup_case} in the follow-up truth")


def _truth_components(exam: Exam, folder: Path, lesions: list[dict]) -> tuple[np.ndarray, dict[int, int]]:
    """Ground-truth components of an exam and truth id → component id."""
    gt_path = find_image(folder, "GT")
    if gt_path is None:
        raise SapError(f"{folder}: no GT mask for scoring against the truth")
    gt = read_image(gt_path)
    labels = cc3d.connected_components(gt.array > 0, connectivity=26)
    inverse = np.linalg.inv(gt.geometry.affine)
    mapping = {}
    for lesion in lesions:
        lps = np.asarray(lesion["inside_lps_mm"], dtype=np.float64)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.round(inverse[:3, :3] @ ras + inverse[:3, 3]).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < labels.shape) and labels[tuple(ijk)] > 0:
            mapping[int(lesion["id"])] = int(labels[tuple(ijk)])
    return labels, mapping


def _assign(instances: np.ndarray, n: int, components: np.ndarray, truth_of_component: dict[int, int]) -> dict[int, int]:
    """tracked lesion id → truth id, one to one, largest overlaps first."""
    both = (instances > 0) & (components > 0)
    if not both.any():
        return {}
    m = int(components.max())
    pairs = instances[both].astype(np.int64) * (m + 1) + components[both].astype(np.int64)
    values, counts = np.unique(pairs, return_counts=True)
    out: dict[int, int] = {}
    used: set[int] = set()
    for index in np.argsort(-counts, kind="stable"):
        lesion, component = divmod(int(values[index]), m + 1)
        truth_id = truth_of_component.get(component)
        if truth_id is None or lesion in out or truth_id in used:
            continue
        out[lesion] = truth_id
        used.add(truth_id)
    return out


def _f1(precision: float, recall: float) -> float:
    """F1 of precision and recall: NaN when neither side has statements; an undefined precision
    or recall (one side has none) counts as 0."""
    if not (np.isfinite(precision) or np.isfinite(recall)):
        return float("nan")
    p, r = (v if np.isfinite(v) else 0.0 for v in (precision, recall))
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _statements(groups: list[tuple[list, list]]) -> set[tuple]:
    out: set[tuple] = set()
    for b, f in groups:
        if b and f:
            out |= {(x, y) for x in b for y in f}
        elif b:
            out |= {(x, None) for x in b}
        else:
            out |= {(None, y) for y in f}
    return out


def score_against_truth(result: TrackResult, truth: str | Path) -> dict:
    """Scores of one tracked pair against its truth (see module)."""
    b, f = result.baseline, result.followup
    pair, _root = load_truth(truth, b.case_id, f.case_id)
    b_folder = Path(b.sources["channel"]).parent
    f_folder = Path(f.sources["channel"]).parent
    b_comp, b_map = _truth_components(b, b_folder, pair["baseline_lesions"])
    f_comp, f_map = _truth_components(f, f_folder, pair["followup_lesions"])
    b_truth_of = {c: t for t, c in b_map.items()}
    f_truth_of = {c: t for t, c in f_map.items()}
    b_assign = _assign(b.instances, b.n, b_comp, b_truth_of)
    f_assign = _assign(f.instances, f.n, f_comp, f_truth_of)

    truth_groups = [(list(g["baseline"]), list(g["followup"])) for g in pair["groups"]]
    truth_statements = _statements(truth_groups)
    fp = iter(range(10**9, 2 * 10**9))  # unique ids for tracked lesions without a truth lesion
    tracked_groups = [([b_assign.get(i, ("fp_b", next(fp))) for i in t.baseline],
                       [f_assign.get(i, ("fp_f", next(fp))) for i in t.followup]) for t in result.tracks]
    tracked_statements = _statements(tracked_groups)
    hits = len(truth_statements & tracked_statements)
    precision = hits / len(tracked_statements) if tracked_statements else float("nan")
    recall = hits / len(truth_statements) if truth_statements else float("nan")
    f1 = _f1(precision, recall)

    match = result.summary["matching"]
    base_volume = {int(x["id"]): float(x["volume_ml"]) for x in pair["baseline_lesions"]}
    fu_volume = {int(x["id"]): float(x["volume_ml"]) for x in pair["followup_lesions"]}
    truth_fields_b, truth_fields_f = {}, {}
    for bs, fs in truth_groups:
        corr = correspondence_of(len(bs), len(fs))
        change = size_change(sum(base_volume[i] for i in bs), sum(fu_volume[i] for i in fs),
                             match["enlarging_pct"], match["shrinking_pct"]) if bs and fs else ""
        for i in bs:
            truth_fields_b[i] = (corr, change)
        for i in fs:
            truth_fields_f[i] = (corr, change)
    row_of_b = {i: row for t, row in zip(result.tracks, result.rows, strict=True) for i in t.baseline}
    row_of_f = {i: row for t, row in zip(result.tracks, result.rows, strict=True) for i in t.followup}
    corr_ok = corr_n = size_ok = size_n = 0
    for assign, truth_fields, row_of in ((b_assign, truth_fields_b, row_of_b), (f_assign, truth_fields_f, row_of_f)):
        for lesion, truth_id in assign.items():
            corr, change = truth_fields[truth_id]
            row = row_of[lesion]
            corr_n += 1
            corr_ok += row["correspondence"] == corr
            if change:
                size_n += 1
                size_ok += row["size_change"] == change
    errors_feret, errors_axial = [], []
    for exam, comp, truth_of, assign in ((b, b_comp, b_truth_of, b_assign), (f, f_comp, f_truth_of, f_assign)):
        truth_sizes = instance_sizes(comp, exam.image.spacing, int(comp.max(initial=0)))
        component_of = {t: c for c, t in truth_of.items()}
        for lesion, truth_id in assign.items():
            ref = truth_sizes[component_of[truth_id] - 1]
            errors_feret.append(abs(exam.sizes[lesion - 1].feret_diameter_mm - ref.feret_diameter_mm))
            errors_axial.append(abs(exam.sizes[lesion - 1].axial_diameter_mm - ref.axial_diameter_mm))
    n_truth = len(pair["baseline_lesions"]) + len(pair["followup_lesions"])
    return {
        "pair": [b.case_id, f.case_id],
        "n_truth_lesions": n_truth,
        "n_found": len(b_assign) + len(f_assign),
        "n_tracked_lesions": b.n + f.n,
        "correspondence_statements": {"truth": len(truth_statements), "tracked": len(tracked_statements), "hits": hits},
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "correspondence_accuracy": corr_ok / corr_n if corr_n else float("nan"),
        "correspondence_scored": corr_n,
        "correspondence_correct": corr_ok,
        "size_change_accuracy": size_ok / size_n if size_n else float("nan"),
        "size_change_scored": size_n,
        "size_change_correct": size_ok,
        "feret_abs_error_mm_mean": float(np.mean(errors_feret)) if errors_feret else float("nan"),
        "axial_abs_error_mm_mean": float(np.mean(errors_axial)) if errors_axial else float("nan"),
        "feret_abs_errors_mm": [round(float(e), 3) for e in errors_feret],
        "axial_abs_errors_mm": [round(float(e), 3) for e in errors_axial],
    }


def pool_scores(scores: list[dict]) -> dict:
    """Cohort-level scores: statements, fields and diameter errors pooled over pairs."""
    hits = sum(s["correspondence_statements"]["hits"] for s in scores)
    tracked = sum(s["correspondence_statements"]["tracked"] for s in scores)
    true = sum(s["correspondence_statements"]["truth"] for s in scores)
    precision = hits / tracked if tracked else float("nan")
    recall = hits / true if true else float("nan")
    feret = [e for s in scores for e in s["feret_abs_errors_mm"]]
    axial = [e for s in scores for e in s["axial_abs_errors_mm"]]

    def ratio(a: str, b: str) -> float:
        n = sum(s[b] for s in scores)
        return sum(s[a] for s in scores) / n if n else float("nan")

    return {
        "n_pairs": len(scores),
        "n_truth_lesions": sum(s["n_truth_lesions"] for s in scores),
        "n_found": sum(s["n_found"] for s in scores),
        "n_tracked_lesions": sum(s["n_tracked_lesions"] for s in scores),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "correspondence_accuracy": ratio("correspondence_correct", "correspondence_scored"),
        "size_change_accuracy": ratio("size_change_correct", "size_change_scored"),
        "correspondence_scored": sum(s["correspondence_scored"] for s in scores),
        "size_change_scored": sum(s["size_change_scored"] for s in scores),
        "feret_abs_error_mm_mean": float(np.mean(feret)) if feret else float("nan"),
        "feret_abs_error_mm_max": float(np.max(feret)) if feret else float("nan"),
        "axial_abs_error_mm_mean": float(np.mean(axial)) if axial else float("nan"),
        "axial_abs_error_mm_max": float(np.max(axial)) if axial else float("nan"),
    }
