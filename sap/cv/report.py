"""The study report (SPEC §10), rebuilt from the files of a run folder (``sap report --run RUN``).

Reads ``RUN/{method}/evaluation`` (patients.csv, lesions.csv, summary.json, regions.csv),
``RUN/{method}/threshold.json``, the pretraining logs, ``RUN/features/*.npz`` and, for the
overlays, the cohort images and stored probability maps. Writes ``RUN/report/report.md``,
``report.html`` (self-contained: figures embedded), ``figures/*.png`` and ``tables/*.csv``.

The report is a list of blocks (headings, paragraphs, tables, figures) rendered twice, as
Markdown and as HTML, so both say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sap import RESEARCH_USE_ONLY, __version__
from sap.cv.rundir import METHOD_LABELS, METHODS, RunDir, load_run_config
from sap.data.io import atomic_write_text
from sap.errors import SapError

SCALE_NOTES = {
    "demo": "Demo scale: shows the pipeline, not evidence.",
    "tiny": "Test scale (tiny preset): shows the pipeline, not evidence.",
    "paper": "Paper scale: the configuration of the study (SPEC §10).",
}

#: Table 1 rows: (section, label, summary metric name)
TABLE1_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Detection (all lesions)", "Sensitivity", "sensitivity"),
    ("Detection (all lesions)", "Precision", "precision"),
    ("Detection (all lesions)", "FP per exam", "fp"),
    ("Detection (all lesions)", "F2 score", "f2"),
    ("Detection (lesions ≥ 1 mL)", "Sensitivity ≥ 1 mL", "sensitivity_1ml"),
    ("Detection (lesions ≥ 1 mL)", "FP ≥ 1 mL per exam", "fp_1ml"),
    ("Segmentation (detected lesions)", "Dice", "dice_detected"),
    ("Segmentation (detected lesions)", "NSD", "nsd_detected"),
    ("End-to-end", "Dice (per-patient mean)", "dice_patient_mean"),
    ("End-to-end", "Global Dice", "dice_global"),
)
#: pooled values shown beside Table 1: (label, summary key)
POOLED_ROWS: tuple[tuple[str, str], ...] = (
    ("Pooled sensitivity, all lesions", "pooled_sensitivity"),
    ("Mean FP per exam, all lesions", "mean_fp"),
    ("Pooled sensitivity ≥ 1 mL", "pooled_sensitivity_1ml"),
    ("Mean FP ≥ 1 mL per exam", "mean_fp_1ml"),
)


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


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    # **bold** → <b>
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


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
def table1(results: dict[str, MethodResults]) -> Any:
    """Table 1 (long form): section, metric, key, method, median, ci95_lo, ci95_hi, q25, q75, n."""
    import pandas as pd

    rows = []
    for section, label, key in TABLE1_ROWS:
        for method, r in results.items():
            m = r.summary.get("metrics", {}).get(key) or {}
            ci = m.get("ci95") or [None, None]
            rows.append({"section": section, "metric": label, "key": key, "method": method,
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


def pooled_table(results: dict[str, MethodResults]) -> Any:
    """Pooled ≥ 1 mL values (the paper's headline), FROC-AUCs and the operating point per method."""
    import pandas as pd

    rows = []
    for method, r in results.items():
        s = r.summary
        row = {"method": METHOD_LABELS[method],
               "threshold": _operating_text(r.threshold, s)}
        for label, key in POOLED_ROWS:
            row[label] = _num(s.get(key))
        for key, label in (("froc", "FROC-AUC (15 FPPI)"), ("froc_1ml", "FROC-AUC ≥ 1 mL (4 FPPI)")):
            curve = s.get(key) or {}
            ci = curve.get("auc_ci95") or [None, None]
            row[label] = f"{_fmt(curve.get('auc'), 2)} [{_fmt(ci[0], 2)}–{_fmt(ci[1], 2)}]"
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


def table1_display(t1: Any) -> Any:
    import pandas as pd

    rows = []
    for _, r in t1.iterrows():
        med = _fmt(r["median"])
        ci = f"[{_fmt(r['ci95_lo'])}–{_fmt(r['ci95_hi'])}]"
        quart = f"{_fmt(r['q25'])}–{_fmt(r['q75'])}" if math.isfinite(r["q25"]) else "–"
        rows.append({"Section": r["section"], "Metric": r["metric"], "Method": METHOD_LABELS[r["method"]],
                     "Median [95% CI]": f"{med} {ci}", "25%–75% quartiles": quart,
                     "n": "–" if r["n"] is None or (isinstance(r["n"], float) and math.isnan(r["n"])) else int(r["n"])})
    return pd.DataFrame(rows)


def significance_table(run: RunDir, methods: list[str]) -> Any | None:
    """Pairwise tests between methods (``sap evaluate --compare``): Wilcoxon paired by case for
    case-level metrics, Mann–Whitney for lesion-level ones, Bonferroni over method pairs."""
    if len(methods) < 2:
        return None
    from sap.evaluate.compare import compare_runs

    return compare_runs([run.evaluation(m) for m in methods], names=methods)


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
def build_report(run_root: str | Path, progress: bool = True) -> Path:
    """(Re)build ``RUN/report`` from the stored results; returns the path of report.md."""
    import pandas as pd

    from sap.cv import figures

    t0 = time.perf_counter()
    run = RunDir(Path(run_root))
    if not run.root.is_dir():
        raise SapError(f"{run.root}: run folder not found")
    cfg = load_run_config(run.config) if run.config.is_file() else None
    scale = cfg.scale if cfg is not None else "paper"
    results = {m: r for m in METHODS if (r := load_method(run, m)) is not None}
    if not results:
        raise SapError(f"{run.root}: no evaluated method yet (RUN/<method>/evaluation/summary.json); "
                       "finish the folds with sap cv first")
    methods = list(results)
    out = run.report
    fig_dir, tab_dir = out / "figures", out / "tables"
    tab_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(run.manifest.read_text()) if run.manifest.is_file() else {}
    scale_note = SCALE_NOTES.get(scale, scale)

    b = Blocks()
    b.heading("sap cross-validated study report", 1)
    b.para(f"**{scale_note}** {RESEARCH_USE_ONLY}")
    n_cases = {m: r.summary.get("n_cases") for m, r in results.items()}
    b.para(f"Methods: {', '.join(METHOD_LABELS[m] for m in methods)}. k = {cfg.cv.k if cfg else '?'} folds over "
           f"subjects (fold 0 tunes the threshold; {', '.join(f'{METHOD_LABELS[m]}: {n} test exams' for m, n in n_cases.items())}). "
           f"Threshold: {cfg.cv.threshold if cfg else '?'} (E9 objective {cfg.tuning.objective if cfg else '?'}). "
           f"sap {__version__}; config hash {manifest.get('config_hash', '?')}; git {manifest.get('git_commit') or 'n/a'}.")

    # Table 1 and pooled values
    t1 = table1(results)
    t1.to_csv(tab_dir / "table1.csv", index=False)
    b.heading("Table 1: detection and segmentation metrics")
    n_boot = cfg.evaluate.n_bootstrap if cfg else 1000
    b.para(f"Median with 95 % percentile-bootstrap CI ({n_boot} resamples: exams for case-level metrics, lesions "
           "for Dice/NSD of detected lesions) and 25–75 % quartiles; all test exams pooled over the test folds, "
           "each scored by its own fold model at the tuned threshold.")
    b.table(table1_display(t1))
    pooled = pooled_table(results)
    pooled.to_csv(tab_dir / "pooled.csv", index=False)
    b.heading("Pooled values and FROC-AUC", 3)
    b.table(pooled)

    sig = significance_table(run, methods)
    if sig is not None:
        sig.to_csv(tab_dir / "significance.csv", index=False)
        b.heading("Significance between methods")
        b.para("Wilcoxon signed-rank paired by exam (case-level metrics; pairwise deletion) or Mann–Whitney U "
               "(lesion-level metrics), two-sided, Bonferroni over method pairs; * < 0.05, ** < 0.01, *** < 0.001.")
        shown = sig.copy()
        shown["method_a"] = shown["method_a"].map(METHOD_LABELS)
        shown["method_b"] = shown["method_b"].map(METHOD_LABELS)
        shown["stars"] = shown["stars"].fillna("").replace("", "n.s.")
        b.table(shown[["metric", "level", "method_a", "method_b", "median_a", "median_b", "test", "n_a", "n_b",
                       "p", "p_adj", "stars"]])

    # Figures
    b.heading("Figures")
    fr = figures.froc_figure({m: r.summary for m, r in results.items()}, fig_dir / "froc.png", scale_note)
    b.figure(fr, "FROC curves (sweep mode over the tuning grid): all lesions to 15 FPPI (solid), ≥ 1 mL to 4 FPPI "
                 "(dashed); AUC with bootstrap 95 % CI in the legend; circles/squares mark the operating point.")
    box_values: dict[str, dict[str, np.ndarray]] = {}
    for _, metric, level in figures.BOX_PANELS:
        box_values[metric] = {}
        for m, r in results.items():
            if level == "lesion":
                col = "dice" if metric == "dice_detected" else "nsd"
                gt = r.lesions[(r.lesions["kind"] == "gt") & (r.lesions["matched"].astype(str).str.lower() == "true")]
                box_values[metric][m] = gt[col].to_numpy(dtype=float)
            else:
                box_values[metric][m] = r.patients[metric].to_numpy(dtype=float)
    bx = figures.box_figure(box_values, sig, fig_dir / "boxplots.png")
    b.figure(bx, "Per-exam and per-lesion metrics (Fig. 4 style); n under each box; brackets give the "
                 "Bonferroni-adjusted significance.")
    any_r = next(iter(results.values()))
    gt_vol = any_r.lesions.loc[any_r.lesions["kind"] == "gt", "volume_ml"].to_numpy(dtype=float)
    vf = figures.volume_figure({m: r.summary["cumulative"] for m, r in results.items() if r.summary.get("cumulative")},
                               gt_vol, fig_dir / "volume.png", cfg.evaluate.volume_threshold_ml if cfg else 1.0)
    b.figure(vf, "Sensitivity (solid) and false positives per exam (dotted) for lesions ≥ V mL against V, over the "
                 "histogram of ground-truth lesion volumes (Fig. 6 style); dashed line at 1 mL.")

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

    if cfg is not None:
        try:
            panels = overlay_panels(run, results, cfg)
        except SapError as exc:  # cohort moved: the rest of the report still builds
            print(f"sap report: warning: overlays skipped ({exc})", file=sys.stderr)
            panels = []
        if panels:
            of = figures.overlay_figure(panels, methods, fig_dir / "overlays.png")
            rank = "SAP" if "sap" in results else METHOD_LABELS[methods[-1]]
            b.figure(of, f"Coronal slices through lesions at the 25th/50th/75th percentile of per-lesion Dice "
                         f"(ranked by {rank}); yellow: ground truth; coloured: each method at its threshold.")

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
        total = sum(v for v in durations.values() if isinstance(v, int | float) and math.isfinite(v))
        b.para(f"Recorded step time {total / 60:.1f} min over {len(durations)} steps; packages: "
               + ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items() if v) + ".")
    b.para(f"{RESEARCH_USE_ONLY} Report built in {time.perf_counter() - t0:.0f} s by sap {__version__}.")

    md = atomic_write_text(out / "report.md", b.markdown(out))
    atomic_write_text(out / "report.html", b.html("sap study report"))
    if progress:
        print(f"sap report: wrote {md} and report.html ({len(list(fig_dir.glob('*.png')))} figures)",
              file=sys.stderr)
    return md
