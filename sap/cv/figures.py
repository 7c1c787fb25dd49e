"""Figures of the study report (matplotlib, Agg backend; PNG files).

Each function takes plain data (dicts, arrays, DataFrames already read from the run folder) and
writes one PNG; the report module reads the files and calls these. Colours are fixed per method
so every figure reads the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sap.files import atomic_write  # noqa: E402
from sap.metrics import FrocCurve, sensitivity_at  # noqa: E402

COLORS = {"baseline": "#7f7f7f", "ssl": "#1f77b4", "sap": "#d62728", "reference": "#8c564b"}
LABELS = {"baseline": "Baseline", "ssl": "SSL", "sap": "SAP", "reference": "Reference"}
DPI = 100


def _save(fig: Any, path: Path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"), suffix=".tmp.png")
    finally:
        plt.close(fig)


def _fmt_ci(ci: Sequence[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"{ci[0]:.2f}–{ci[1]:.2f}"


def froc_plot_points(curve: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The points drawn for a stored FROC curve (``summary.json``'s ``froc``/``froc_1ml``): the
    curve's points up to its AUC limit, closed at the limit with the SPEC E8 interpolation (flat
    beyond the last point). A candidate-mode curve is non-decreasing in both coordinates, and so
    are these points."""
    x = np.asarray(curve["fppi"], dtype=float)
    y = np.asarray(curve["sensitivity"], dtype=float)
    limit = float(curve.get("limit", 15.0))
    keep = x <= limit
    return np.append(x[keep], limit), np.append(y[keep], sensitivity_at(FrocCurve(x, y), limit))


def froc_figure(summaries: Mapping[str, dict], path: Path, scale_note: str, volume_threshold_ml: float = 1.0) -> Path:
    """FROC (candidate mode, as stored by the study): all lesions to 15 FPPI (solid), lesions ≥ V
    to 4 FPPI (dashed), FROC-AUC with its bootstrap CI in the legend, and the tuned operating point
    from the evaluation at the tuned threshold (pooled sensitivity, mean FP per exam) marked; an
    operating point beyond the axis is drawn at its edge as a triangle."""
    x_max = 15.0
    fig, ax = plt.subplots(figsize=(7.5, 5))
    modes, drawn = set(), set()
    for method, s in summaries.items():
        color = COLORS[method]
        for key, style, op_x, op_y, label in (
            ("froc", "-", "mean_fp", "pooled_sensitivity", "all lesions"),
            ("froc_1ml", "--", "mean_fp_1ml", "pooled_sensitivity_1ml", f"≥ {volume_threshold_ml:g} mL"),
        ):
            curve = s.get(key)
            if not curve or not curve.get("fppi"):
                continue
            modes.add(curve.get("mode", "candidate"))
            drawn.add(key)
            xs, ys = froc_plot_points(curve)
            auc = curve.get("auc")
            auc_text = f"{auc:.2f}" if auc is not None else "n/a"
            ax.plot(xs, ys, style, color=color, lw=1.8,
                    label=f"{LABELS[method]} {label}: AUC {auc_text} [{_fmt_ci(curve.get('auc_ci95'))}]")
            if s.get(op_x) is not None and s.get(op_y) is not None:
                beyond = float(s[op_x]) > x_max
                ax.plot([min(float(s[op_x]), x_max)], [s[op_y]], ">" if beyond else ("o" if key == "froc" else "s"),
                        color=color, ms=8, mfc="white", mew=2, clip_on=False)
    ax.plot([], [], "ko", mfc="white", label="operating point, all lesions (tuned threshold)")
    if "froc_1ml" in drawn:
        ax.plot([], [], "ks", mfc="white", label=f"operating point, ≥ {volume_threshold_ml:g} mL")
    ax.set_xlim(-0.3, x_max)  # operating points at 0 FPPI stay visible
    ax.set_ylim(0, 1.04)
    ax.set_xlabel("false positives per exam (FPPI)")
    ax.set_ylabel("lesion sensitivity (pooled)")
    mode = "/".join(sorted(modes)) or "candidate"
    ax.set_title(f"FROC ({mode} mode) — {scale_note}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def learning_curves_figure(curves: Mapping[str, Mapping[int, Any]], path: Path, steps: int | None = None) -> Path:
    """Fine-tuning learning curves: one column per method, validation F2 (top) and sensitivity
    (bottom) against the optimiser step, one line per fold. ``curves[method][fold]``: a table with
    ``step`` and ``val_f2`` / ``val_sensitivity`` (validation rows only)."""
    methods = list(curves)
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6), squeeze=False, sharey=True)
    styles = ("-", "--", ":", "-.")
    last = max((float(t["step"].max()) for folds in curves.values() for t in folds.values() if len(t)), default=0.0)
    x_max = max(float(steps or 0), last)
    for c, method in enumerate(methods):
        for r, (column, name) in enumerate((("val_f2", "validation F2"), ("val_sensitivity", "validation sensitivity"))):
            ax = axes[r, c]
            for i, (fold, table) in enumerate(sorted(curves[method].items())):
                if column not in table:
                    continue
                rows = table[["step", column]].dropna()
                ax.plot(rows["step"], rows[column], styles[i % len(styles)], marker="o", ms=3,
                        color=COLORS.get(method, "k"), lw=1.5, label=f"fold {fold}")
            ax.set_ylim(-0.02, 1.02)
            if x_max > 0:
                ax.set_xlim(0, x_max * 1.02)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(LABELS.get(method, method), fontsize=10)
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.set_xlabel("optimiser step")
    fig.suptitle("Fine-tuning learning curves (validation exams, one line per test fold's model)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


#: panels of the box-plot figure: (title, metric name in the significance table, level)
BOX_PANELS = (
    ("Dice (detected lesions)", "dice_detected", "lesion"),
    ("NSD (detected lesions)", "nsd_detected", "lesion"),
    ("FP per exam", "fp", "case"),
    ("F2 score", "f2", "case"),
    ("Sensitivity", "sensitivity", "case"),
    ("Sensitivity ≥ {v} mL", "sensitivity_1ml", "case"),
)


def box_figure(values: Mapping[str, Mapping[str, np.ndarray]], significance: Any, path: Path,
               volume_threshold_ml: float = 1.0) -> Path:
    """Fig. 4: one panel per metric, a box per method with its points, brackets marked with the
    Bonferroni-adjusted significance (``*``, ``**``, ``***``, ``n.s.``) and n per box.

    ``values[metric][method]``: per-case (or per-lesion) values, NaN dropped here.
    ``significance``: DataFrame with metric, method_a, method_b, p_adj, stars (may be None).
    """
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for ax, (title, metric, level) in zip(axes.ravel(), BOX_PANELS, strict=True):
        by_method = values.get(metric, {})
        methods = list(by_method)
        data = [np.asarray(by_method[m], dtype=float) for m in methods]
        data = [d[~np.isnan(d)] for d in data]
        positions = np.arange(1, len(methods) + 1)
        if any(d.size for d in data):
            bp = ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.55,
                            showfliers=False, patch_artist=True)
            for patch, m in zip(bp["boxes"], methods, strict=True):
                patch.set_facecolor(COLORS[m])
                patch.set_alpha(0.35)
            rng = np.random.default_rng(0)
            for pos, d, m in zip(positions, data, methods, strict=True):
                ax.scatter(pos + rng.uniform(-0.12, 0.12, d.size), d, s=9, color=COLORS[m], alpha=0.8, zorder=3)
        top = max((float(d.max()) for d in data if d.size), default=1.0)
        span = top if top > 0 else 1.0  # all-zero panels (e.g. no FP) keep a readable scale
        ax.set_xticks(positions, [f"{LABELS[m]}\nn={d.size}" for m, d in zip(methods, data, strict=True)])
        title = title.format(v=f"{volume_threshold_ml:g}")
        ax.set_title(title + (" (per lesion)" if level == "lesion" else " (per exam)"), fontsize=10)
        if significance is not None and len(methods) > 1:
            rows = significance[significance["metric"] == metric]
            step = 0.09 * span
            for k, (_, row) in enumerate(rows.iterrows()):
                if row["method_a"] not in methods or row["method_b"] not in methods:
                    continue
                a, b = methods.index(row["method_a"]) + 1, methods.index(row["method_b"]) + 1
                y = top + step * (k + 1)
                ax.plot([a, a, b, b], [y - step * 0.3, y, y, y - step * 0.3], color="k", lw=0.8)
                mark = row["stars"] if isinstance(row["stars"], str) and row["stars"] else "n.s."
                ax.text((a + b) / 2, y, mark, ha="center", va="bottom", fontsize=8)
            ax.set_ylim(bottom=min(0.0, -0.05 * span), top=top + step * (len(rows) + 1.5))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Detection and segmentation metrics (Bonferroni-adjusted significance)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def volume_figure(cumulative: Mapping[str, dict], gt_volumes: np.ndarray, path: Path,
                  volume_threshold_ml: float = 1.0) -> Path:
    """Fig. 6: sensitivity and FP per exam over the minimum lesion volume V (lesions ≥ V),
    over the histogram of ground-truth lesion volumes."""
    fig, ax_hist = plt.subplots(figsize=(8, 4.8))
    vols = np.asarray(gt_volumes, dtype=float)
    vols = vols[vols > 0]
    if vols.size:
        bins = np.geomspace(max(vols.min() * 0.8, 1e-3), vols.max() * 1.25, 20)
        ax_hist.hist(vols, bins=bins, color="0.85", edgecolor="0.6")
    ax_hist.set_xscale("log")
    ax_hist.set_xlabel("lesion volume V (mL); curves: lesions ≥ V")
    ax_hist.set_ylabel("ground-truth lesions (histogram)")
    ax_sens = ax_hist.twinx()
    ax_fp = ax_hist.twinx()
    ax_fp.spines["right"].set_position(("axes", 1.12))
    for method, cum in cumulative.items():
        v = np.asarray(cum["volume_ml"], dtype=float)
        keep = v > 0
        sens = np.asarray([np.nan if s is None else s for s in cum["sensitivity"]], dtype=float)
        fp = np.asarray([np.nan if s is None else s for s in cum["fp_per_case"]], dtype=float)
        ax_sens.plot(v[keep], sens[keep], "-", color=COLORS[method], lw=2, label=f"{LABELS[method]} sensitivity")
        ax_fp.plot(v[keep], fp[keep], ":", color=COLORS[method], lw=2, label=f"{LABELS[method]} FP/exam")
    ax_sens.set_ylim(0, 1.05)
    ax_sens.set_ylabel("sensitivity (lesions ≥ V, pooled)")
    ax_fp.set_ylabel("false positives ≥ V per exam")
    ax_fp.set_ylim(bottom=0)  # counts: no negative axis when every curve is 0
    ax_hist.axvline(volume_threshold_ml, color="k", lw=0.8, ls="--")
    lines = ax_sens.get_legend_handles_labels()
    lines2 = ax_fp.get_legend_handles_labels()
    ax_sens.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7.5, loc="center left")
    ax_hist.set_title("Cumulative sensitivity and FP per exam against lesion volume", fontsize=10)
    return _save(fig, path)


def region_figure(table: Any, path: Path) -> Path:
    """Per-region sensitivity (bars per method, n lesions on top) and false positives per exam."""
    from sap.data.labels import SKELETON_CLASSES, region_name

    order = [region_name(i) for i in range(1, len(SKELETON_CLASSES))] + [region_name(0), "unknown"]
    regions = [r for r in order if r in set(table["region"])]
    methods = [m for m in COLORS if m in set(table["method"])]
    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(regions))
    for i, m in enumerate(methods):
        sub = table[table["method"] == m].set_index("region").reindex(regions)
        ax_s.bar(x + i * width, sub["sensitivity"].to_numpy(dtype=float), width, color=COLORS[m], label=LABELS[m])
        ax_f.bar(x + i * width, sub["fp_per_exam"].to_numpy(dtype=float), width, color=COLORS[m], label=LABELS[m])
    n_lesions = table.groupby("region")["n_lesions"].max().reindex(regions).fillna(0).astype(int)
    for ax in (ax_s, ax_f):
        ax.set_xticks(x + width * (len(methods) - 1) / 2, [r.replace("_", " ") for r in regions], rotation=35,
                      ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for xi, n in zip(x, n_lesions, strict=True):
        ax_s.text(xi + width * (len(methods) - 1) / 2, 1.02, f"n={n}", ha="center", fontsize=7)
    ax_s.set_ylim(0, 1.1)
    ax_s.set_ylabel("sensitivity (pooled)")
    ax_s.set_title("Sensitivity per skeletal region", fontsize=10)
    ax_f.set_ylabel("false positives per exam")
    ax_f.set_ylim(bottom=0)
    ax_f.set_title("False positives per region", fontsize=10)
    ax_f.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def overlay_figure(panels: Sequence[dict], methods: Sequence[str], path: Path) -> Path:
    """Fig. 7: coronal slices through lesions; ground truth (yellow) and each method's prediction
    at its operating threshold (method colour) as contours.

    ``panels``: dicts with ``title``, ``image`` (2D, rows = superior→inferior after the flip
    applied here), ``gt`` (2D bool) and ``pred`` {method: 2D bool}.
    """
    ncols = 1 + len(methods)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(2.6 * ncols, 2.8 * len(panels)), squeeze=False)
    for r, panel in enumerate(panels):
        img = panel["image"]
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        for c in range(ncols):
            ax = axes[r, c]
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
            if c > 0:
                m = methods[c - 1]
                pred = panel["pred"].get(m)
                if pred is not None and pred.any():
                    ax.contour(pred.T.astype(float), levels=[0.5], colors=[COLORS[m]], linewidths=1.8)
            if panel["gt"].any():  # dashed on top, so a perfect prediction still shows both
                ax.contour(panel["gt"].T.astype(float), levels=[0.5], colors=["yellow"], linewidths=1.0,
                           linestyles="dashed")
            if c > 0:
                dice = panel.get("dice", {}).get(methods[c - 1])
                ax.set_title(f"{LABELS[methods[c - 1]]}" + (f" Dice {dice:.2f}" if dice is not None else ""),
                             fontsize=8)
            else:
                ax.set_title(panel["title"], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Coronal slices through lesions at the 25th/50th/75th percentile of lesion Dice "
                 "(yellow dashed: ground truth)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def skeletal_dice_figure(dice: Mapping[str, float], path: Path, binary: float | None = None) -> Path:
    """Per-class Dice of the skeletal pretraining on its validation scans."""
    names = list(dice)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(len(names)), [dice[n] for n in names], color="#2ca02c")
    for i, n in enumerate(names):
        ax.text(i, dice[n] + 0.02, f"{dice[n]:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("Dice (validation)")
    title = "Skeletal pretraining: per-class Dice"
    if binary is not None:
        title += f"; whole-skeleton binary Dice {binary:.2f}"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def tsne_figure(embeddings: Mapping[str, dict], path: Path) -> Path:
    """Fig. 3: t-SNE of encoder features, SSL vs SAP; green = lesion patches, red = negatives."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5.2 * len(embeddings), 4.6), squeeze=False)
    for ax, (method, e) in zip(axes[0], embeddings.items(), strict=True):
        xy, label = e["xy"], e["label"]
        ax.scatter(xy[label == 1, 0], xy[label == 1, 1], c="#2ca02c", s=22, label="lesion patches")
        ax.scatter(xy[label == 0, 0], xy[label == 0, 1], c="#d62728", s=22, label="negative patches")
        ax.set_title(f"{LABELS[method]} encoder (before fine-tuning)\ncentroid distance {e['centroid_distance']:.3g}; "
                     f"mean dist. to centroid {e['spread']:.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7)
    fig.suptitle(f"t-SNE of Swin ViT stage-4 features (perplexity {e['perplexity']:.3g})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
