"""``sap evaluate --compare RUN_A RUN_B …``: the per-metric significance table between methods.

Reads each run's ``patients.csv`` (case-level metrics, paired by case: Wilcoxon) and
``lesions.csv`` (Dice and NSD of detected lesions: Mann–Whitney), Bonferroni over method pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sap.errors import SapError
from sap.metrics import CASE_METRICS, LESION_METRICS, compare_methods


def _read_csv(path: Path):
    import pandas as pd

    if not path.is_file():
        raise SapError(f"{path}: not found (is this an evaluate output folder?)")
    try:
        return pd.read_csv(path, dtype={"case": str})
    except Exception as exc:
        raise SapError(f"{path}: cannot read CSV ({exc})") from exc


def compare_runs(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None):
    """Significance table (a pandas DataFrame) between the evaluate outputs in ``run_dirs``.

    Columns: metric, level, method_a, method_b, median_a, median_b, test, n_a, n_b, p, p_adj,
    stars. Case-level metrics are paired over the union of case ids (pairwise deletion).
    """
    import pandas as pd

    if len(run_dirs) < 2:
        raise SapError("--compare needs at least two evaluate output folders")
    dirs = [Path(d) for d in run_dirs]
    seen: dict[Path, Path] = {}
    for d in dirs:
        key = d.resolve()
        if key in seen:
            raise SapError(f"{d}: given twice to --compare (also as {seen[key]}); compare different evaluate outputs")
        seen[key] = d
    names = list(names) if names else [d.name or str(d) for d in dirs]
    if len(set(names)) != len(names):
        names = [str(d) for d in dirs]
    patients = {n: _read_csv(d / "patients.csv") for n, d in zip(names, dirs, strict=True)}
    lesions = {n: _read_csv(d / "lesions.csv") for n, d in zip(names, dirs, strict=True)}
    for n, d in zip(names, dirs, strict=True):
        missing = [c for c in CASE_METRICS if c not in patients[n].columns]
        if missing:
            raise SapError(f"{d / 'patients.csv'}: missing columns {', '.join(missing)}")
    case_sets = {n: set(p["case"]) for n, p in patients.items()}
    by_name = dict(zip(names, dirs, strict=True))
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if not case_sets[a] & case_sets[b]:
                raise SapError(
                    f"{by_name[a] / 'patients.csv'} and {by_name[b] / 'patients.csv'} share no case: a paired "
                    "comparison needs evaluations of the same cases"
                )
    cases = sorted(set().union(*case_sets.values()))
    rows = []
    for metric in CASE_METRICS:
        values = {n: p.set_index("case")[metric].reindex(cases).to_numpy(dtype=np.float64) for n, p in patients.items()}
        rows += _with_medians(metric, "case", values, compare_methods(values, paired=True))
    for metric, column in LESION_METRICS.items():
        values = {}
        for n, table in lesions.items():
            gt = table[(table["kind"] == "gt") & (table["matched"].astype(str).str.lower() == "true")]
            values[n] = gt[column].to_numpy(dtype=np.float64)
        rows += _with_medians(metric, "lesion", values, compare_methods(values, paired=False))
    return pd.DataFrame(rows)


def _with_medians(metric: str, level: str, values: dict, rows: list[dict]) -> list[dict]:
    def median(a: np.ndarray) -> float:
        a = a[~np.isnan(a)]
        return float(np.median(a)) if a.size else float("nan")

    return [
        {"metric": metric, "level": level, "method_a": r["method_a"], "method_b": r["method_b"],
         "median_a": median(values[r["method_a"]]), "median_b": median(values[r["method_b"]]),
         **{k: r[k] for k in ("test", "n_a", "n_b", "p", "p_adj", "stars")}}
        for r in rows
    ]
