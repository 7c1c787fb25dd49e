"""Paired differences between the networks of a study (SAP − SSL, SAP − Baseline, SSL − Baseline).

The significance table says whether two methods differ; this says by how much, with a 95 %
percentile-bootstrap CI from resampling test exams, the same exams for both methods:

- case-level metrics (``patients.csv``): mean over exams of the per-exam difference
  (:func:`sap.metrics.paired_bootstrap_difference`; exams where either value is undefined are
  dropped). Dice and NSD of detected lesions enter as each exam's mean over its detected lesions.
- FROC-AUC, all lesions and lesions ≥ V: the difference of the pooled candidate-mode AUCs, each
  resample recomputing both methods' FROC from the drawn exams
  (:func:`sap.metrics.paired_froc_auc_difference`). The candidates come from
  ``RUN/{method}/evaluation/candidates.csv``; a run evaluated before that file existed gets them
  from its stored probability maps and the cohort's lesion masks.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from sap.cv.rundir import METHOD_LABELS
from sap.errors import SapError
from sap.metrics.froc import AUC_LIMIT, AUC_LIMIT_1ML
from sap.run_layout import RunDir

#: method pairs (a, b) reported as a − b, in the paper's order of interest
PAIRS: tuple[tuple[str, str], ...] = (("sap", "ssl"), ("sap", "baseline"), ("ssl", "baseline"))
#: case-level metrics of ``patients.csv`` compared per exam: (column, label); ``{v}`` = cut-off
CASE_ROWS: tuple[tuple[str, str], ...] = (
    ("sensitivity", "Sensitivity"),
    ("precision", "Precision"),
    ("fp", "FP per exam"),
    ("f2", "F2 score"),
    ("sensitivity_1ml", "Sensitivity ≥ {v} mL"),
    ("fp_1ml", "FP ≥ {v} mL per exam"),
    ("dice_detected", "Dice (detected lesions, exam mean)"),
    ("nsd_detected", "NSD (detected lesions, exam mean)"),
    ("dice_patient_mean", "Dice (per-patient mean)"),
    ("dice_global", "Global Dice"),
)
#: FROC rows: (key, whether only lesions >= the volume cut-off count, AUC limit in FPPI: the
#: summary's own limits, so the differences are of the FROC-AUCs Table 1 shows)
FROC_ROWS: tuple[tuple[str, bool, float], ...] = (("froc_auc", False, AUC_LIMIT), ("froc_1ml_auc", True, AUC_LIMIT_1ML))


def pair_label(a: str, b: str) -> str:
    return f"{METHOD_LABELS[a]} − {METHOD_LABELS[b]}"


def load_candidates(run: RunDir, method: str, cfg: Any) -> dict[str, Any] | None:
    """Case id → :class:`sap.metrics.CaseCandidates` of a method's evaluated test exams.

    From ``candidates.csv`` when the evaluation wrote it; otherwise recomputed from the stored
    probability maps (``RUN/{method}/predictions``) and the cohort's lesion masks at the
    evaluation's ``t_min`` and connectivity. None (with a warning) when neither is possible.
    """
    import pandas as pd

    from sap.cv.stages import CANDIDATES_FILE
    from sap.metrics import candidates_from_rows

    path = run.evaluation(method) / CANDIDATES_FILE
    if path.is_file():
        try:
            table = pd.read_csv(path, dtype={"case": str, "kind": str})
            return candidates_from_rows(table["case"], table["kind"], table["score"],
                                        table["hit"].astype(str).str.lower() == "true", table["volume_ml"])
        except (OSError, ValueError, KeyError) as exc:
            raise SapError(f"{path}: cannot read the stored FROC candidates ({exc})") from exc
    try:
        return _candidates_from_maps(run, method, cfg)
    except (SapError, OSError) as exc:
        print(f"sap report: warning: paired FROC-AUC differences of {method} skipped ({exc})", file=sys.stderr)
        return None


def _candidates_from_maps(run: RunDir, method: str, cfg: Any) -> dict[str, Any]:
    import pandas as pd

    from sap.data.cases import discover_cohort
    from sap.evaluate.api import CasePair, load_pair
    from sap.metrics import froc_case_candidates

    if cfg is None:
        raise SapError(f"{run.config}: no stored config to find the cohort")
    patients = pd.read_csv(run.evaluation(method) / "patients.csv", dtype={"case": str})
    cases = {c.case_id: c for c in discover_cohort(cfg.data, require=("patients",)).patients}
    out = {}
    for case_id in patients["case"]:
        prob_path = run.predictions(method) / f"{case_id}_prob.nii.gz"
        if case_id not in cases or cases[case_id].lesions is None or not prob_path.is_file():
            raise SapError(f"{prob_path}: probability map or lesion mask of {case_id} missing")
        prob, gt, spacing = load_pair(CasePair(case_id, cases[case_id].lesions, prob_path))
        out[case_id] = froc_case_candidates(prob, gt, spacing, cfg.evaluate.t_min, cfg.evaluate.connectivity)
    return out


def paired_differences(
    run: RunDir, patients: dict[str, Any], cfg: Any, n_bootstrap: int = 1000, seed: int = 0
) -> Any | None:
    """Long table of paired differences between the networks in ``patients`` (method → its
    ``patients.csv`` DataFrame): one row per (metric, pair) with columns key, metric, method_a,
    method_b, pair, difference, ci95_lo, ci95_hi, n (exams), estimate (what the difference is of).
    None with fewer than two networks."""
    import pandas as pd

    from sap.metrics import paired_bootstrap_difference, paired_froc_auc_difference

    pairs = [(a, b) for a, b in PAIRS if a in patients and b in patients]
    if not pairs:
        return None
    v_ml = float(cfg.evaluate.volume_threshold_ml) if cfg is not None else 1.0
    v = f"{v_ml:g}"
    rows = []
    for key, label in CASE_ROWS:
        for a, b in pairs:
            pa, pb = patients[a].set_index("case"), patients[b].set_index("case")
            if key not in pa.columns or key not in pb.columns:
                continue
            cases = sorted(set(pa.index) & set(pb.index))
            d = paired_bootstrap_difference(pa[key].reindex(cases).to_numpy(dtype=float),
                                            pb[key].reindex(cases).to_numpy(dtype=float), n_bootstrap, seed)
            rows.append({"key": key, "metric": label.format(v=v), "method_a": a, "method_b": b,
                         "pair": pair_label(a, b), "difference": d["difference"], "ci95_lo": d["ci95"][0],
                         "ci95_hi": d["ci95"][1], "n": d["n"], "estimate": "mean of per-exam differences"})
    candidates = {m: load_candidates(run, m, cfg) for m in {m for p in pairs for m in p}}
    for key, large, limit in FROC_ROWS:
        label = f"FROC-AUC ≥ {v} mL ({limit:g} FPPI)" if large else f"FROC-AUC ({limit:g} FPPI)"
        for a, b in pairs:
            ca, cb = candidates[a], candidates[b]
            if ca is None or cb is None:
                continue
            cases = sorted(set(ca) & set(cb))
            d = paired_froc_auc_difference([ca[c] for c in cases], [cb[c] for c in cases],
                                           v_ml if large else None, limit, n_bootstrap, seed)
            rows.append({"key": key, "metric": label, "method_a": a, "method_b": b, "pair": pair_label(a, b),
                         "difference": d["difference"], "ci95_lo": d["ci95"][0], "ci95_hi": d["ci95"][1],
                         "n": d["n"], "estimate": "difference of pooled FROC-AUCs"})
    return pd.DataFrame(rows, columns=["key", "metric", "method_a", "method_b", "pair", "difference", "ci95_lo",
                                       "ci95_hi", "n", "estimate"])


def difference_text(difference: Any, lo: Any, hi: Any) -> str:
    """A cell "d [lo, hi]" with signed two-decimal numbers; "–" without a difference."""
    def fmt(x: Any) -> str | None:
        if x is None or not np.isfinite(float(x)):
            return None
        text = f"{float(x):+.2f}"
        return "0.00" if text in ("+0.00", "-0.00") else text

    d, lo_t, hi_t = fmt(difference), fmt(lo), fmt(hi)
    if d is None:
        return "–"
    return f"{d} [CI n/a]" if lo_t is None or hi_t is None else f"{d} [{lo_t}, {hi_t}]"


def paired_differences_wide(long: Any) -> Any:
    """One row per metric, one column per pair ("SAP − SSL"), cells "difference [lo, hi]"."""
    import pandas as pd

    columns = list(dict.fromkeys(long["pair"]))
    rows = []
    for (key, metric), group in long.groupby(["key", "metric"], sort=False):
        row = {"key": key, "Metric": metric}
        by_pair = {r["pair"]: r for _, r in group.iterrows()}
        for col in columns:
            r = by_pair.get(col)
            row[col] = "–" if r is None else difference_text(r["difference"], r["ci95_lo"], r["ci95_hi"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["key", "Metric", *columns])

