"""The study report (SPEC §10), rebuilt from the files of a run folder (``sap report --run RUN``).

Reads ``RUN/{method}/evaluation`` (patients.csv, lesions.csv, summary.json, regions.csv,
candidates.csv),
``RUN/{method}/threshold.json``, the fine-tuning and pretraining logs, ``RUN/features/*.npz``,
the cohort's ``cohort.json`` and, for the overlays, the cohort images and stored probability
maps. Writes ``RUN/report/report.md``, ``report.html`` (self-contained: figures embedded),
``figures/*.png`` and ``tables/*.csv``. Methods are the networks (baseline, ssl, sap) and the
non-learning reference detector (:mod:`sap.cv.reference`); significance tests, box plots and
overlays compare the networks only (Bonferroni over the paper's method pairs).

The report is a list of blocks (headings, paragraphs, tables, figures) rendered twice, as
Markdown and as HTML, so both say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sap import RESEARCH_USE_ONLY, __version__
from sap.cv.rundir import METHOD_LABELS, load_run_config, manifest_commits
from sap.errors import SapError
from sap.files import atomic_write_text, check_not_input, staged_folder
from sap.run_layout import ALL_METHODS, METHODS, REFERENCE, RunDir

SCALE_NOTES = {
    "demo": "Demo scale: shows the pipeline, not evidence.",
    "tiny": "Test scale (tiny preset): shows the pipeline, not evidence.",
    "study-cpu": "CPU study scale (study-cpu preset): a benchmark whose truth is known, on synthetic data.",
    "paper": "Paper scale: the configuration of the study (SPEC §10).",
}

#: Table 1 rows: (section, label, summary metric name); ``{v}`` is the large-lesion cut-off in mL
TABLE1_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Detection (all lesions)", "Sensitivity", "sensitivity"),
    ("Detection (all lesions)", "Precision", "precision"),
    ("Detection (all lesions)", "FP per exam", "fp"),
    ("Detection (all lesions)", "F2 score", "f2"),
    ("Detection (lesions ≥ {v} mL)", "Sensitivity ≥ {v} mL", "sensitivity_1ml"),
    ("Detection (lesions ≥ {v} mL)", "FP ≥ {v} mL per exam", "fp_1ml"),
    ("Segmentation (detected lesions)", "Dice", "dice_detected"),
    ("Segmentation (detected lesions)", "NSD", "nsd_detected"),
    ("End-to-end", "Dice (per-patient mean)", "dice_patient_mean"),
    ("End-to-end", "Global Dice", "dice_global"),
)
#: pooled values shown in Table 1: (label, summary key); ``{v}`` as above
POOLED_ROWS: tuple[tuple[str, str], ...] = (
    ("Pooled sensitivity, all lesions", "pooled_sensitivity"),
    ("Mean FP per exam, all lesions", "mean_fp"),
    ("Pooled sensitivity ≥ {v} mL", "pooled_sensitivity_1ml"),
    ("Mean FP ≥ {v} mL per exam", "mean_fp_1ml"),
)
#: a network "has not converged" when its pooled sensitivity at this FPPI of the candidate-mode
#: FROC over the test folds stays below this value (issue 12)
CONVERGENCE_FPPI = 1.0
CONVERGENCE_SENSITIVITY = 0.5


# ------------------------------------------------------------------------------------ blocks
@dataclass
class Blocks:
    """Report content, rendered to Markdown and HTML."""

    items: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.items.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.items.append(("p", text))

    def table(self, df: Any) -> None:
        self.items.append(("t", df))

    def figure(self, path: Path, caption: str) -> None:
        self.items.append(("f", (path, caption)))

    def markdown(self, root: Path) -> str:
        out = []
        for kind, value in self.items:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "t":
                cols = [str(c) for c in value.columns]
                lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                for row in value.itertuples(index=False):
                    lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
                out.append("\n".join(lines))
            elif kind == "f":
                path, caption = value
                out.append(f"![{caption}]({path.relative_to(root).as_posix()})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.items:
            if kind == "h":
                body.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(value)}</p>")
            elif kind == "t":
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in value.columns)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                               for row in value.itertuples(index=False))
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "f":
                path, caption = value
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
                 "img{max-width:100%}figcaption{font-style:italic;font-size:90%}"
                 ".warn{background:#fff3cd;padding:8px;border:1px solid #e0c36a}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | np.floating):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.3f}"
    return str(value)


#: Markdown strong emphasis as CommonMark reads it: ``**`` not touching a third ``*``, opening
#: before and closing after a non-space (so "* < 0.05, ** < 0.01, *** < 0.001" is plain text)
_BOLD = re.compile(r"(?<!\*)\*\*(?=[^\s*])(.+?)(?<=[^\s*])\*\*(?!\*)")


def _inline_html(text: str) -> str:
    """A paragraph's Markdown as HTML: escaped, ``**bold**`` → ``<b>``, every other ``*`` kept."""
    return _BOLD.sub(lambda m: f"<b>{m.group(1)}</b>", html.escape(text))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.{digits}f}"


# ------------------------------------------------------------------------------------ loading
@dataclass
class MethodResults:
    method: str
    summary: dict[str, Any]
    patients: Any
    lesions: Any
    regions: Any | None
    threshold: dict[str, Any] | None


def load_method(run: RunDir, method: str) -> MethodResults | None:
    """A method's stored evaluation, or None when it has not been evaluated yet."""
    import pandas as pd

    folder = run.evaluation(method)
    if not (folder / "summary.json").is_file():
        return None
    try:
        summary = json.loads((folder / "summary.json").read_text())
        patients = pd.read_csv(folder / "patients.csv", dtype={"case": str})
        lesions = pd.read_csv(folder / "lesions.csv", dtype={"case": str})
    except (OSError, ValueError) as exc:
        raise SapError(f"{folder}: cannot read the stored evaluation ({exc})") from exc
    regions = pd.read_csv(folder / "regions.csv", dtype={"case": str}) if (folder / "regions.csv").is_file() else None
    threshold = json.loads(run.threshold(method).read_text()) if run.threshold(method).is_file() else None
    return MethodResults(method, summary, patients, lesions, regions, threshold)


# ------------------------------------------------------------------------------------ tables
def _v(volume_threshold_ml: float) -> str:
    return f"{float(volume_threshold_ml):g}"


def table1(results: dict[str, MethodResults], volume_threshold_ml: float = 1.0) -> Any:
    """Table 1 (long form): section, metric, key, method, median, ci95_lo, ci95_hi, q25, q75, n.

    ``volume_threshold_ml``: the large-lesion cut-off V of the evaluation (in the labels only).
    """
    import pandas as pd

    v = _v(volume_threshold_ml)
    rows = []
    for section, label, key in TABLE1_ROWS:
        for method, r in results.items():
            m = r.summary.get("metrics", {}).get(key) or {}
            ci = m.get("ci95") or [None, None]
            rows.append({"section": section.format(v=v), "metric": label.format(v=v), "key": key, "method": method,
                         "median": _num(m.get("median")), "ci95_lo": _num(ci[0]), "ci95_hi": _num(ci[1]),
                         "q25": _num(m.get("q25")), "q75": _num(m.get("q75")), "n": m.get("n")})
    for method, r in results.items():
        icc = r.summary.get("icc_burden") or {}
        ci = icc.get("ci95") or [None, None]
        rows.append({"section": "End-to-end", "metric": "ICC(2,1) tumour burden", "key": "icc_burden",
                     "method": method, "median": _num(icc.get("value")), "ci95_lo": _num(ci[0]),
                     "ci95_hi": _num(ci[1]), "q25": float("nan"), "q75": float("nan"),
                     "n": r.summary.get("n_cases")})
    return pd.DataFrame(rows)


def froc_auc_label(key: str, volume_threshold_ml: float = 1.0) -> str:
    """Column/row label of a FROC-AUC (``froc`` or ``froc_1ml``)."""
    return "FROC-AUC (15 FPPI)" if key == "froc" else f"FROC-AUC ≥ {_v(volume_threshold_ml)} mL (4 FPPI)"


def pooled_table(results: dict[str, MethodResults], volume_threshold_ml: float = 1.0) -> Any:
    """Pooled values (the paper's headline), FROC-AUCs and the operating point per method."""
    import pandas as pd

    v = _v(volume_threshold_ml)
    rows = []
    for method, r in results.items():
        s = r.summary
        row = {"method": METHOD_LABELS[method],
               "threshold": _operating_text(r.threshold, s)}
        for label, key in POOLED_ROWS:
            row[label.format(v=v)] = _num(s.get(key))
        for key in ("froc", "froc_1ml"):
            curve = s.get(key) or {}
            ci = curve.get("auc_ci95") or [None, None]
            row[froc_auc_label(key, volume_threshold_ml)] = (
                f"{_fmt(curve.get('auc'), 2)} [{_fmt(ci[0], 2)}–{_fmt(ci[1], 2)}]")
        row["exams"] = s.get("n_cases")
        rows.append(row)
    return pd.DataFrame(rows)


def _operating_text(threshold: dict | None, summary: dict) -> str:
    if threshold is None:
        return _fmt(summary.get("settings", {}).get("threshold"), 2)
    if threshold.get("mode") == "per_fold":
        return ", ".join(f"fold {f}: {v['threshold']:.2f}" for f, v in sorted(threshold["folds"].items()))
    mv = threshold.get("min_volume_ml") or 0.0
    return f"{threshold['threshold']:.2f}" + (f" (min {mv:g} mL)" if mv else "")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _f2(v: Any) -> str:
    """Two decimals as in the paper's tables; "–" for a missing value, never "-0.00"."""
    if v is None or (isinstance(v, float | np.floating) and not math.isfinite(float(v))):
        return "–"
    text = f"{float(v):.2f}"
    return "0.00" if text == "-0.00" else text


def ci_text(median: Any, lo: Any, hi: Any) -> str:
    """A Table 1 cell: ``median [lo–hi]`` (95 % CI), two decimals; "–" without a median."""
    if _f2(median) == "–":
        return "–"
    if _f2(lo) == "–" or _f2(hi) == "–":
        return f"{_f2(median)} [CI n/a]"
    return f"{_f2(median)} [{_f2(lo)}–{_f2(hi)}]"


def icc_text(value: Any, ci: Any, gt_burden: Any, pred_burden: Any) -> str:
    """The ICC(2,1) cell of Table 1 from its value, CI and the per-exam burdens (mL).

    SPEC E7's null cases print "undefined (reason)": fewer than 3 exams, or all 2n burden values
    equal. When every predicted burden is 0 (but the ground truth varies) MSR = MSE and the ICC is
    exactly 0 (the computed value is 0 up to rounding, its CI meaningless): "0.00 (no predicted
    burden)". Otherwise "value [lo–hi]".
    """
    gt = np.asarray(gt_burden, dtype=np.float64)
    pred = np.asarray(pred_burden, dtype=np.float64)
    if gt.size < 3:
        return f"undefined (n = {gt.size} < 3 exams)"
    both = np.concatenate([gt, pred])
    if np.all(both == both[0]):
        return "undefined (all burdens equal)"
    if np.all(pred == 0):
        return "0.00 (no predicted burden)"
    lo, hi = (list(ci) + [None, None])[:2] if ci is not None else (None, None)
    return ci_text(value, lo, hi)


def sensitivity_at_fppi(curve: dict | None, fppi: float = CONVERGENCE_FPPI) -> float:
    """Pooled sensitivity at ``fppi`` on a stored FROC curve (SPEC E8 interpolation); NaN without one."""
    from sap.metrics import FrocCurve, sensitivity_at

    if not curve or not curve.get("fppi"):
        return float("nan")
    return sensitivity_at(FrocCurve(np.asarray(curve["fppi"], dtype=float),
                                    np.asarray(curve["sensitivity"], dtype=float)), fppi)


def not_converged(results: dict[str, MethodResults]) -> dict[str, float]:
    """Networks whose pooled sensitivity at 1 FPPI (candidate-mode FROC over the test folds) is
    below 0.5, with that sensitivity (NaN without a curve). The reference detector does not train
    and is never listed."""
    out = {}
    for method, r in results.items():
        if method == REFERENCE:
            continue
        sens = sensitivity_at_fppi(r.summary.get("froc"))
        if not sens >= CONVERGENCE_SENSITIVITY:  # NaN counts as not converged
            out[method] = sens
    return out


def table1_wide(t1: Any, results: dict[str, MethodResults], volume_threshold_ml: float = 1.0,
                steps: int | None = None) -> Any:
    """Table 1 in the paper's shape: one row per metric, one column per method (its label), cells
    "median [lo–hi]" (95 % CI) from the long form ``t1``; then the pooled values, FROC-AUCs,
    sensitivity at 1 FPPI (marked "not converged at N steps" below 0.5) and the threshold.

    Columns: ``section``, ``metric``, ``key`` (the summary name the row comes from), one per
    method. ``steps``: fine-tuning steps (for the "not converged" mark).
    """
    import pandas as pd

    methods = list(results)
    labels = [METHOD_LABELS[m] for m in methods]
    rows = []
    for (section, metric, key), group in t1.groupby(["section", "metric", "key"], sort=False):
        row = {"section": section, "metric": metric, "key": key}
        by_method = group.set_index("method")
        for method, label in zip(methods, labels, strict=True):
            if method not in by_method.index:
                row[label] = "–"
                continue
            r = by_method.loc[method]
            if key == "icc_burden":
                p = results[method].patients
                row[label] = icc_text(r["median"], [r["ci95_lo"], r["ci95_hi"]], p["volume_gt_ml"], p["volume_pred_ml"])
            else:
                row[label] = ci_text(r["median"], r["ci95_lo"], r["ci95_hi"])
        rows.append(row)
    v = _v(volume_threshold_ml)
    section = "Pooled over all test exams"
    for label_t, key in POOLED_ROWS:
        rows.append({"section": section, "metric": label_t.format(v=v), "key": key,
                     **{lab: _f2(results[m].summary.get(key)) for m, lab in zip(methods, labels, strict=True)}})
    for key in ("froc", "froc_1ml"):
        cells = {}
        for m, lab in zip(methods, labels, strict=True):
            curve = results[m].summary.get(key) or {}
            ci = curve.get("auc_ci95") or [None, None]
            cells[lab] = ci_text(curve.get("auc"), ci[0], ci[1])
        rows.append({"section": section, "metric": froc_auc_label(key, volume_threshold_ml), "key": f"{key}_auc",
                     **cells})
    slow = not_converged(results)
    cells = {}
    for m, lab in zip(methods, labels, strict=True):
        text = _f2(sensitivity_at_fppi(results[m].summary.get("froc")))
        if m in slow:
            text += f" (not converged at {steps} steps)" if steps else " (not converged)"
        cells[lab] = text
    rows.append({"section": section, "metric": f"Sensitivity at {CONVERGENCE_FPPI:g} FPPI (FROC)",
                 "key": "sensitivity_at_1fppi", **cells})
    rows.append({"section": section, "metric": "Threshold (tuned on fold 0)", "key": "threshold",
                 **{lab: _operating_text(results[m].threshold, results[m].summary)
                    for m, lab in zip(methods, labels, strict=True)}})
    rows.append({"section": section, "metric": "Test exams", "key": "n_cases",
                 **{lab: str(results[m].summary.get("n_cases", "–")) for m, lab in zip(methods, labels, strict=True)}})
    return pd.DataFrame(rows, columns=["section", "metric", "key", *labels])


def table1_display(wide: Any) -> Any:
    """The wide Table 1 as shown: section only on its first row, no key column."""
    shown = wide.drop(columns=["key"]).rename(columns={"section": "Section", "metric": "Metric"})
    shown["Section"] = shown["Section"].where(shown["Section"] != shown["Section"].shift(), "")
    return shown


def significance_table(run: RunDir, methods: list[str]) -> Any | None:
    """Pairwise tests between the networks (``sap evaluate --compare``): Wilcoxon paired by case
    for case-level metrics, Mann–Whitney for lesion-level ones, Bonferroni over method pairs. The
    reference detector is left out, so m is the paper's number of pairs."""
    networks = [m for m in methods if m in METHODS]
    if len(networks) < 2:
        return None
    from sap.evaluate.compare import compare_runs

    return compare_runs([run.evaluation(m) for m in networks], names=networks)


#: significance-table row labels per metric name; ``{v}`` as in Table 1
SIGNIFICANCE_LABELS = {
    "sensitivity": "Sensitivity", "precision": "Precision", "f2": "F2 score", "fp": "FP per exam",
    "sensitivity_1ml": "Sensitivity ≥ {v} mL", "fp_1ml": "FP ≥ {v} mL per exam",
    "dice_patient_mean": "Dice (per-patient mean)", "dice_global": "Global Dice",
    "dice_detected": "Dice (detected lesions)", "nsd_detected": "NSD (detected lesions)",
}


def _p_text(p_adj: Any, stars: Any) -> str:
    if p_adj is None or (isinstance(p_adj, float | np.floating) and not math.isfinite(float(p_adj))):
        return "–"
    mark = stars if isinstance(stars, str) and stars else "n.s."
    value = "< 0.001" if float(p_adj) < 0.001 else f"{float(p_adj):.3f}"
    return f"{value} {mark}"


def significance_wide(sig: Any, volume_threshold_ml: float = 1.0) -> Any:
    """The significance table in the paper's shape: one row per metric (with its test), one column
    per method pair ("Baseline vs SAP"), cells "p_adj stars" (Bonferroni-adjusted; n.s. ≥ 0.05)."""
    import pandas as pd

    v = _v(volume_threshold_ml)
    pairs = list(dict.fromkeys(zip(sig["method_a"], sig["method_b"], strict=True)))
    columns = [f"{METHOD_LABELS[a]} vs {METHOD_LABELS[b]}" for a, b in pairs]
    rows = []
    for metric, group in sig.groupby("metric", sort=False):
        tests = {"wilcoxon": "Wilcoxon (paired by exam)", "mannwhitneyu": "Mann–Whitney U (lesions)"}
        row = {"metric": SIGNIFICANCE_LABELS.get(metric, metric).format(v=v), "key": metric,
               "test": tests.get(str(group["test"].iloc[0]), str(group["test"].iloc[0]))}
        by_pair = {(r["method_a"], r["method_b"]): r for _, r in group.iterrows()}
        for (a, b), col in zip(pairs, columns, strict=True):
            r = by_pair.get((a, b))
            row[col] = "–" if r is None else _p_text(r["p_adj"], r["stars"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric", "key", "test", *columns])


# ------------------------------------------------------------------------------------ learning curves
def learning_curves(run: RunDir, methods: list[str]) -> dict[str, dict[int, Any]]:
    """Validation rows of every fold's fine-tuning ``log.csv``: ``{method: {fold: DataFrame(step,
    val_f2, val_sensitivity)}}``. Rows without validation values (training-only steps) are dropped;
    folds without a log (or without such columns) are left out."""
    import pandas as pd

    out: dict[str, dict[int, Any]] = {}
    for method in methods:
        if method not in METHODS:
            continue
        for fold in run.folds_present(method):
            log = run.fold(method, fold) / "log.csv"
            if not log.is_file():
                continue
            try:
                table = pd.read_csv(log)
            except (OSError, ValueError):
                continue
            cols = [c for c in ("val_f2", "val_sensitivity") if c in table.columns]
            if "step" not in table.columns or not cols:
                continue
            rows = table[["step", *cols]].apply(pd.to_numeric, errors="coerce")
            rows = rows.dropna(subset=cols, how="all").sort_values("step")
            if len(rows):
                out.setdefault(method, {})[fold] = rows.reset_index(drop=True)
    return out


def region_table(results: dict[str, MethodResults]) -> Any | None:
    """Per region and method: lesions, detected, pooled sensitivity, false positives per exam."""
    import pandas as pd

    from sap.data.labels import SKELETON_CLASSES, region_name

    order = [region_name(i) for i in range(1, len(SKELETON_CLASSES))] + [region_name(0), "unknown"]
    rows = []
    for method, r in results.items():
        if r.regions is None:
            continue
        reg = r.regions
        n_cases = r.summary.get("n_cases") or max(1, reg["case"].nunique())
        matched = reg["matched"].astype(str).str.lower() == "true"
        for region in order:
            gt = (reg["kind"] == "gt") & (reg["region"] == region)
            fp = (reg["kind"] == "pred") & (reg["region"] == region) & ~matched
            if not gt.any() and not fp.any():
                continue
            n = int(gt.sum())
            det = int((gt & matched).sum())
            rows.append({"method": method, "region": region, "n_lesions": n, "detected": det,
                         "sensitivity": det / n if n else float("nan"), "false_positives": int(fp.sum()),
                         "fp_per_exam": int(fp.sum()) / n_cases})
    return pd.DataFrame(rows) if rows else None


# ------------------------------------------------------------------------------------ pretraining
def skeletal_dice(run: RunDir) -> tuple[dict[str, float], float | None] | None:
    """Per-class validation Dice of the skeletal pretraining (last validated row of its log.csv).

    Columns are matched by class name (``dice_cervical_spine`` …); ``dice_binary`` /
    ``dice_skeleton`` give the whole-skeleton Dice. None when no such log exists.
    """
    import pandas as pd

    from sap.data.labels import SKELETON_CLASSES

    log = run.pretrain("skeletal") / "log.csv"
    if not log.is_file():
        return None
    table = pd.read_csv(log)
    per_class = {}
    for name in SKELETON_CLASSES[1:]:
        cols = [c for c in table.columns if c.lower().endswith(f"dice_{name}")]
        if cols:
            values = table[cols[0]].dropna()
            if len(values):
                per_class[name] = float(values.iloc[-1])
    if not per_class:
        return None
    binary = None
    for col in table.columns:
        if col.lower().endswith(("dice_binary", "dice_skeleton", "skeleton_dice", "binary_dice")):
            values = table[col].dropna()
            if len(values):
                binary = float(values.iloc[-1])
    return per_class, binary


# ------------------------------------------------------------------------------------ t-SNE
def tsne_embeddings(run: RunDir, seed: int = 0) -> dict[str, dict] | None:
    """2D t-SNE (sklearn) of the stored features with perplexity min(15, (n − 1)/3), plus the
    centroid distance (lesion vs negative) and the mean distance of points to their own class
    centroid, both in the full feature space."""
    out = {}
    for method in ("ssl", "sap"):
        path = run.features / f"{method}.npz"
        if not path.is_file():
            return None
        data = np.load(path)
        feats, label = data["features"].astype(np.float64), data["label"].astype(int)
        n = len(label)
        if n < 4 or label.min() == label.max():
            return None
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            print("sap report: warning: scikit-learn is not installed; t-SNE figure skipped", file=sys.stderr)
            return None

        perplexity = min(15.0, (n - 1) / 3)
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
        centroids = {c: feats[label == c].mean(axis=0) for c in (0, 1)}
        spread = float(np.mean([np.linalg.norm(f - centroids[c]) for f, c in zip(feats, label, strict=True)]))
        out[method] = {"xy": xy, "label": label, "perplexity": perplexity, "n": n,
                       "centroid_distance": float(np.linalg.norm(centroids[1] - centroids[0])), "spread": spread}
    return out


# ------------------------------------------------------------------------------------ overlays
def overlay_panels(run: RunDir, results: dict[str, MethodResults], cfg: Any, half_width_mm: float = 48.0) -> list[dict]:
    """Coronal crops through the lesions at the 25th/50th/75th percentile of per-lesion Dice of
    the ranking method (sap when present), with each method's prediction at its threshold."""
    from sap.cv.stages import evaluation_to_canonical, read_evaluation_order
    from sap.data.cases import discover_cohort
    from sap.data.io import read_geometry, read_image
    from sap.metrics import label_ground_truth

    rank = "sap" if "sap" in results else list(results)[-1]
    les = results[rank].lesions
    gt_rows = les[les["kind"] == "gt"].copy()
    gt_rows["dice"] = gt_rows["dice"].fillna(0.0)  # missed lesions count with Dice 0
    if gt_rows.empty:
        return []
    gt_rows = gt_rows.sort_values(["dice", "case", "id"], kind="stable").reset_index(drop=True)
    picks = []
    for q in (25, 50, 75):
        i = int(round(q / 100 * (len(gt_rows) - 1)))
        picks.append((q, gt_rows.iloc[i]))
    cohort = discover_cohort(cfg.data, require=("patients",))
    cases = {c.case_id: c for c in cohort.patients}
    panels = []
    for q, row in picks:
        case = cases.get(str(row["case"]))
        if case is None:
            continue
        # Lesion ids of lesions.csv come from labelling the file in its own voxel order (as
        # sap.evaluate reads it): label the same way, then turn the lesion into canonical order.
        gt_eval, eval_spacing = read_evaluation_order(case.lesions)
        comp = label_ground_truth(gt_eval, eval_spacing, cfg.evaluate.connectivity)
        mask = evaluation_to_canonical(comp.lut[comp.labels] == int(row["id"]), case.lesions)
        spacing = read_geometry(case.lesions).canonical_spacing
        vox = np.argwhere(mask)
        centre = np.round(vox.mean(axis=0)).astype(int)
        channel = read_image(next(iter(case.channels.values()))).array
        half = [int(math.ceil(half_width_mm / s)) for s in spacing]
        xs = slice(max(0, centre[0] - half[0]), centre[0] + half[0] + 1)
        zs = slice(max(0, centre[2] - half[2]), centre[2] + half[2] + 1)
        y = int(centre[1])
        preds, dices = {}, {}
        for method, r in results.items():
            prob_path = run.predictions(method) / f"{case.case_id}_prob.nii.gz"
            if not prob_path.is_file():
                continue
            t = _case_threshold(r, case.case_id)
            preds[method] = read_image(prob_path).array[xs, y, zs] >= t
            match = r.lesions[(r.lesions["kind"] == "gt") & (r.lesions["case"] == case.case_id)
                              & (r.lesions["id"] == row["id"])]
            dices[method] = float(match["dice"].fillna(0.0).iloc[0]) if len(match) else None
        panels.append({"title": f"{case.case_id} lesion {int(row['id'])}\n{q}th pct, "
                                f"{float(row['volume_ml']):.2f} mL",
                       "image": np.asarray(channel[xs, y, zs], dtype=np.float32), "gt": mask[xs, y, zs],
                       "pred": preds, "dice": dices, "case": case.case_id, "id": int(row["id"]),
                       "volume_ml": float(row["volume_ml"]),
                       "measured_volume_ml": float(mask.sum()) * float(np.prod(spacing)) / 1000.0})
    return panels


def _case_threshold(r: MethodResults, case_id: str) -> float:
    th = r.threshold
    if th is None:
        return float(r.summary.get("settings", {}).get("threshold", 0.5))
    if th.get("mode") == "per_fold" and r.regions is not None:
        folds = r.regions.loc[r.regions["case"] == case_id, "fold"]
        if len(folds):
            return float(th["folds"][str(int(folds.iloc[0]))]["threshold"])
    return float(th["shared"]["threshold"])


# ------------------------------------------------------------------------------------ build
def scale_line(scale: str, cfg: Any, cohort: dict[str, Any] | None) -> str:
    """The report's scale line: the scale note, whether the data are synthetic, every deviation
    from the paper's protocol (read from the run's config and ``cohort.json``), the large-lesion
    cut-off against the paper's, and "research use only"."""
    from sap.cv.provenance import is_synthetic, paper_deviations, synthetic_text, volume_cutoff_text

    parts = [f"**{SCALE_NOTES.get(scale, scale)}**"]
    if is_synthetic(cohort):
        parts.append(f"Trained and evaluated on synthetic data ({synthetic_text(cohort)}), not on patients.")
    if cfg is not None:
        deviations = paper_deviations(cfg, cohort)
        parts.append("Deviations from the paper's protocol: " + ("; ".join(deviations) if deviations else "none") + ".")
        parts.append(f"Large lesions: {volume_cutoff_text(cfg, cohort)}.")
    parts.append(RESEARCH_USE_ONLY)
    return " ".join(parts)


#: what ``RUN/report`` holds: the two pages, and figures and tables of these kinds
REPORT_FILES = {"report.md": None, "report.html": None, "figures": ".png", "tables": ".csv"}


def not_report_files(folder: Path) -> list[Path]:
    """Entries of an existing report folder that a report build did not write (a user's notes)."""
    if not folder.is_dir():
        return []
    foreign = []
    for entry in sorted(folder.iterdir()):
        kind = REPORT_FILES.get(entry.name, "missing")
        if kind is None and entry.is_file():
            continue
        if isinstance(kind, str) and kind != "missing" and entry.is_dir():
            foreign += [p for p in sorted(entry.iterdir()) if not (p.is_file() and p.suffix == kind)]
            continue
        foreign.append(entry)
    return foreign


def check_report_folder(run: RunDir) -> None:
    """Refuse a ``RUN/report`` holding anything a build does not write (it is rebuilt whole)."""
    foreign = not_report_files(run.report)
    if foreign:
        raise SapError(f"{foreign[0]}: not written by sap report; {run.report} is rebuilt whole, so move it away first")


def provenance_text(manifest: dict) -> str:
    """Which sap ran the study and which built this report: the run's sap version and git
    commit(s) from ``manifest.json`` (every commit that ran ``sap cv`` or ``sap report`` on the run,
    oldest first), the builder's version only when it differs."""
    ran_version = (manifest.get("packages") or {}).get("sap")
    commits = manifest_commits(manifest)
    ran = f"Run with sap {ran_version or '?'}, config hash {manifest.get('config_hash', '?')}, git "
    ran += ", then ".join(c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in commits) if commits else "n/a"
    built = f"; report built by sap {__version__}" if ran_version != __version__ else ""
    return ran + built + "."


def build_report(run_root: str | Path, progress: bool = True) -> Path:
    """(Re)build ``RUN/report`` from the stored results; returns the path of report.md.

    The folder is built aside and swapped in whole (:func:`sap.files.staged_folder`): a failure
    (a full disk) leaves the earlier report as it was. A report folder holding anything a build does
    not write (:func:`not_report_files`) is refused, naming it, instead of being dropped."""
    t0 = time.perf_counter()
    run = RunDir(Path(run_root))
    if not run.root.is_dir():
        raise SapError(f"{run.root}: run folder not found")
    check_report_folder(run)
    cfg = load_run_config(run.config) if run.config.is_file() else None
    results = {m: r for m in ALL_METHODS if (r := load_method(run, m)) is not None}
    if not results:
        raise SapError(f"{run.root}: no evaluated method yet (RUN/<method>/evaluation/summary.json); "
                       "finish the folds with sap cv first")
    if cfg is not None and cfg.data.root:
        check_not_input([run.report], [cfg.data.root], replaced_folder=True)
    # the report folder is built aside and swapped in whole: never half old, half new
    with staged_folder(run.report) as staging:
        _write_report(run, staging, cfg, results, t0)
    md = run.report / "report.md"
    if progress:
        print(f"sap report: wrote {md} and report.html ({len(list((run.report / 'figures').glob('*.png')))} "
              "figures)", file=sys.stderr)
    return md


def _write_report(run: RunDir, out: Path, cfg: Any, results: dict[str, MethodResults], t0: float) -> None:
    """Every file of the report, written into ``out`` (the staging folder of ``RUN/report``)."""
    import pandas as pd

    from sap.cv import figures
    from sap.cv.provenance import cohort_info

    scale = cfg.scale if cfg is not None else "paper"
    methods = list(results)
    networks = [m for m in methods if m in METHODS]
    fig_dir, tab_dir = out / "figures", out / "tables"
    tab_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(run.manifest.read_text()) if run.manifest.is_file() else {}
    scale_note = SCALE_NOTES.get(scale, scale)
    cohort = cohort_info(cfg.data.root) if cfg is not None else None
    v_ml = cfg.evaluate.volume_threshold_ml if cfg is not None else 1.0
    v = _v(v_ml)  # the cut-off as printed
    steps = cfg.finetune.max_steps if cfg is not None else None

    b = Blocks()
    b.heading("sap cross-validated study report", 1)
    b.para(scale_line(scale, cfg, cohort))
    n_cases = {m: r.summary.get("n_cases") for m, r in results.items()}
    b.para(f"Methods: {', '.join(METHOD_LABELS[m] for m in methods)}"
           + (" (Reference: an intensity threshold inside the body that learns nothing, tuned and evaluated "
              "like the networks)" if REFERENCE in results else "")
           + f". k = {cfg.cv.k if cfg else '?'} folds over "
           f"subjects (fold 0 tunes the threshold; {', '.join(f'{METHOD_LABELS[m]}: {n} test exams' for m, n in n_cases.items())}). "
           f"Threshold: {cfg.cv.threshold if cfg else '?'} (E9 objective {cfg.tuning.objective if cfg else '?'}). "
           f"{provenance_text(manifest)}")

    # Table 1 (wide, as in the paper); the long form and the pooled values stay as CSV files
    t1 = table1(results, v_ml)
    t1.to_csv(tab_dir / "table1.csv", index=False)
    pooled = pooled_table(results, v_ml)
    pooled.to_csv(tab_dir / "pooled.csv", index=False)
    wide = table1_wide(t1, results, v_ml, steps)
    wide.to_csv(tab_dir / "table1_wide.csv", index=False)
    b.heading("Table 1: detection and segmentation metrics")
    n_boot = cfg.evaluate.n_bootstrap if cfg else 1000
    b.para(f"Median [95 % percentile-bootstrap CI] ({n_boot} resamples: exams for case-level metrics, lesions "
           "for Dice/NSD of detected lesions); all test exams pooled over the test folds, each scored by its own "
           "fold model at the tuned threshold. Quartiles and n: tables/table1.csv.")
    b.table(table1_display(wide))
    slow = not_converged(results)
    if slow:
        listed = ", ".join(f"{METHOD_LABELS[m]} (sensitivity {_f2(s)} at {CONVERGENCE_FPPI:g} FPPI)"
                           for m, s in slow.items())
        b.para(f"**Not converged{f' at {steps} steps' if steps else ''}:** {listed}. Pooled sensitivity at "
               f"{CONVERGENCE_FPPI:g} false positive per exam on the FROC over the test folds is below "
               f"{CONVERGENCE_SENSITIVITY:g}: these columns show what training reached in this budget, not what "
               "the method can do.")

    sig = significance_table(run, methods)
    if sig is not None:
        sig.to_csv(tab_dir / "significance.csv", index=False)
        sig_wide = significance_wide(sig, v_ml)
        sig_wide.to_csv(tab_dir / "significance_wide.csv", index=False)
        b.heading("Significance between methods")
        b.para("Bonferroni-adjusted p between the networks (m = number of network pairs; the reference is not "
               "tested): Wilcoxon signed-rank paired by exam (case-level metrics; pairwise deletion) or "
               "Mann–Whitney U (lesion-level metrics), two-sided; * < 0.05, ** < 0.01, *** < 0.001, "
               "n.s. otherwise. Unadjusted p and n: tables/significance.csv.")
        b.table(sig_wide.drop(columns=["key"]).rename(columns={"metric": "Metric", "test": "Test"}))

    if len(networks) >= 2:
        from sap.cv.paired import paired_differences, paired_differences_wide

        seed = cfg.evaluate.seed if cfg else 0
        diffs = paired_differences(run, {m: results[m].patients for m in networks}, cfg, n_boot, seed)
        if diffs is not None and len(diffs):
            diffs.to_csv(tab_dir / "paired_differences.csv", index=False)
            b.heading("Paired differences between methods")
            b.para(f"Difference [95 % percentile-bootstrap CI, {n_boot} resamples of the test exams, the same exams "
                   "for both methods; not adjusted for multiplicity]: mean over exams of the per-exam difference "
                   "(exams where either value is undefined dropped), and for FROC-AUC the difference of the pooled "
                   "AUCs recomputed on each resample. A CI that excludes 0 is evidence of a difference; n and the "
                   "long form: tables/paired_differences.csv.")
            b.table(paired_differences_wide(diffs).drop(columns=["key"]))

    # Figures
    b.heading("Figures")
    fr = figures.froc_figure({m: r.summary for m, r in results.items()}, fig_dir / "froc.png", scale_note, v_ml)
    modes = {(r.summary.get("froc") or {}).get("mode") for r in results.values()} - {None}
    mode = "candidate" if modes <= {"candidate"} else "/".join(sorted(modes))
    b.figure(fr, f"FROC curves ({mode} mode, pooled over the test folds; each exam scored by its own fold model): "
                 f"all lesions to 15 FPPI (solid), lesions ≥ {v} mL to 4 FPPI (dashed); FROC-AUC with bootstrap "
                 "95 % CI in the legend. Circles (all lesions) and squares (≥ "
                 f"{v} mL) mark the tuned operating point from the evaluation at the tuned threshold (its pooled "
                 "sensitivity and mean false positives per exam); it need not lie on the curve, whose candidates "
                 "are components at t_min scored by their maximum probability. Points beyond 15 FPPI are drawn "
                 "at the edge as triangles.")
    curves = learning_curves(run, networks)
    if curves:
        lc = figures.learning_curves_figure(curves, fig_dir / "learning_curves.png", steps)
        b.figure(lc, "Fine-tuning learning curves: validation F2 and sensitivity (means over the validation exams "
                     "with lesions, at the validation threshold of fine-tuning) against the optimiser step, one "
                     "line per test fold's model.")
    box_values: dict[str, dict[str, np.ndarray]] = {}
    for _, metric, level in figures.BOX_PANELS:
        box_values[metric] = {}
        for m in networks:
            r = results[m]
            if level == "lesion":
                col = "dice" if metric == "dice_detected" else "nsd"
                gt = r.lesions[(r.lesions["kind"] == "gt") & (r.lesions["matched"].astype(str).str.lower() == "true")]
                box_values[metric][m] = gt[col].to_numpy(dtype=float)
            else:
                box_values[metric][m] = r.patients[metric].to_numpy(dtype=float)
    if networks:
        bx = figures.box_figure(box_values, sig, fig_dir / "boxplots.png", v_ml)
        b.figure(bx, "Per-exam and per-lesion metrics of the networks (Fig. 4 style); n under each box; brackets "
                     "give the Bonferroni-adjusted significance.")
    any_r = next(iter(results.values()))
    gt_vol = any_r.lesions.loc[any_r.lesions["kind"] == "gt", "volume_ml"].to_numpy(dtype=float)
    vf = figures.volume_figure({m: r.summary["cumulative"] for m, r in results.items() if r.summary.get("cumulative")},
                               gt_vol, fig_dir / "volume.png", v_ml)
    b.figure(vf, "Sensitivity (solid) and false positives per exam (dotted) for lesions ≥ V mL against V, over the "
                 f"histogram of ground-truth lesion volumes (Fig. 6 style); dashed line at the cut-off {v} mL.")

    regions = region_table(results)
    if regions is not None:
        regions.to_csv(tab_dir / "regions.csv", index=False)
        rf = figures.region_figure(regions, fig_dir / "regions.png")
        b.heading("Per-region results", 3)
        b.para("Region = skeleton label covering most of a component's voxels (ribs and skull are 'rib/other').")
        shown = regions.copy()
        shown["method"] = shown["method"].map(METHOD_LABELS)
        b.table(shown)
        b.figure(rf, "Sensitivity and false positives per skeletal region.")

    if cfg is not None and networks:
        try:
            panels = overlay_panels(run, {m: results[m] for m in networks}, cfg)
        except SapError as exc:  # cohort moved: the rest of the report still builds
            print(f"sap report: warning: overlays skipped ({exc})", file=sys.stderr)
            panels = []
        if panels:
            of = figures.overlay_figure(panels, networks, fig_dir / "overlays.png")
            rank = "SAP" if "sap" in results else METHOD_LABELS[networks[-1]]
            b.figure(of, f"Coronal slices through lesions at the 25th/50th/75th percentile of per-lesion Dice "
                         f"(ranked by {rank}); yellow: ground truth; coloured: each network at its threshold.")

    sk = skeletal_dice(run)
    if sk is not None:
        per_class, binary = sk
        sf = figures.skeletal_dice_figure(per_class, fig_dir / "skeletal_dice.png", binary)
        b.heading("Skeletal pretraining", 3)
        b.table(pd.DataFrame({"class": list(per_class), "Dice": list(per_class.values())}))
        b.figure(sf, "Per-class Dice of the skeletal pretraining on its validation scans.")

    emb = tsne_embeddings(run, seed=cfg.cv.seed if cfg else 0)
    if emb is not None:
        tf = figures.tsne_figure(emb, fig_dir / "tsne.png")
        b.heading("Encoder features before fine-tuning (t-SNE)", 3)
        b.table(pd.DataFrame([{"encoder": METHOD_LABELS[m], "patches": e["n"],
                               "lesion patches": int(e["label"].sum()), "centroid distance": e["centroid_distance"],
                               "mean distance to centroid": e["spread"],
                               "ratio": e["centroid_distance"] / e["spread"] if e["spread"] else float("nan")}
                              for m, e in emb.items()]))
        b.figure(tf, "t-SNE of the global mean of the Swin ViT stage-4 output on lesion-centred (green) and random "
                     "negative (red) patches; distances computed in the full feature space.")

    durations = manifest.get("durations_s", {})
    if durations:
        b.heading("Run", 3)
        total = sum(d for d in durations.values() if isinstance(d, int | float) and math.isfinite(d))
        b.para(f"Recorded step time {total / 60:.1f} min over {len(durations)} steps; packages: "
               + ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items() if v) + ".")
    b.para(f"{RESEARCH_USE_ONLY} Report built in {time.perf_counter() - t0:.0f} s by sap {__version__}.")

    atomic_write_text(out / "report.md", b.markdown(out))
    atomic_write_text(out / "report.html", b.html("sap study report"))
