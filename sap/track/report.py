"""``report.html`` of ``sap track``: per tracked lesion, baseline and follow-up crops side by side
(axial and coronal through the lesion's centre, each exam in its own geometry, lesion outlined)
with the track's fields and numbers. One self-contained file (images embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import numpy as np

from sap import RESEARCH_USE_ONLY

if TYPE_CHECKING:
    from sap.track.api import Exam, TrackResult

HALF_WIDTH_MM = 40.0  #: crops span 80 mm
MAX_TRACKS = 300  #: a page stays readable; the CSV has every track


def _centre_voxel(exam: Exam, ids: list[int]) -> np.ndarray:
    mask_idx = np.argwhere(np.isin(exam.instances, ids))
    return np.round(mask_idx.mean(axis=0)).astype(int)


def _panels(exam: Exam, ids: list[int], centre: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(image, mask, aspect) for the axial and the coronal view, radiological display (patient's
    right on the left, anterior / superior up)."""
    image, spacing = exam.image.array, exam.image.spacing
    if centre is None:
        centre = np.array(image.shape) // 2
    half = [max(3, int(round(HALF_WIDTH_MM / s))) for s in spacing]
    lo = [max(0, int(c) - h) for c, h in zip(centre, half, strict=True)]
    hi = [min(n, int(c) + h + 1) for c, n, h in zip(centre, image.shape, half, strict=True)]
    mask = np.isin(exam.instances[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], ids) if ids else None
    crop = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    k, j = int(centre[2]) - lo[2], int(centre[1]) - lo[1]
    views = []
    for img, m, aspect in (
        (crop[:, :, k], None if mask is None else mask[:, :, k], spacing[1] / spacing[0]),
        (crop[:, j, :], None if mask is None else mask[:, j, :], spacing[2] / spacing[0]),
    ):
        shown = img.T[::-1, ::-1]
        views.append((shown, None if m is None else m.T[::-1, ::-1], aspect))
    return views


def _png(panels: list[tuple[str, list]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(8.8, 2.6), dpi=80)
    for ax in axes:
        ax.axis("off")
    for (title, views), start in zip(panels, (0, 2), strict=True):
        for offset, (name, view) in enumerate(zip(("axial", "coronal"), views, strict=True)):
            ax = axes[start + offset]
            if view is None:
                ax.text(0.5, 0.5, f"{title}\nno lesion", ha="center", va="center", fontsize=9, color="#888")
                continue
            img, mask, aspect = view
            lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect, interpolation="nearest")
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=["#ff3b30"], linewidths=1.0)
            ax.set_title(f"{title} {name}", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if not np.isfinite(value) else f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return html.escape(str(value)) if value != "" else "–"


def report_html(result: TrackResult, progress: bool = False) -> str:
    from tqdm.auto import tqdm

    b, f, s = result.baseline, result.followup, result.summary
    reg = s["registration"]
    quality = (f"bone Dice {reg['skeleton_dice_before']:.3f} before, {reg['skeleton_dice_after']:.3f} after registration"
               if reg["skeleton_dice_after"] is not None else f"final metric {reg['final_metric']:.4f} (no skeletons)")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sap track</title><style>"
        "body{font-family:sans-serif;margin:16px;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
        ".track{border-top:2px solid #444;margin-top:14px;padding-top:6px}.warn{color:#a40}"
        ".tag{display:inline-block;padding:1px 6px;border-radius:4px;background:#eee;margin-right:6px;font-weight:bold}"
        "</style></head><body>",
        f"<h1>Lesion tracking: {html.escape(b.case_id)} → {html.escape(f.case_id)}</h1>",
        f"<p class='warn'>{html.escape(RESEARCH_USE_ONLY)}</p>",
        f"<p>Registration ({', '.join(st['stage'] for st in reg['stages'])}; "
        f"{'bone-weighted' if reg['bone_weighted'] else 'intensity only'}): {quality}.</p>",
        f"<p>Burden {s['burden_baseline_ml']:.2f} mL → {s['burden_followup_ml']:.2f} mL "
        f"({_fmt(s['burden_change_pct'])} %). Tracks: "
        + ", ".join(f"{v} {k}" for k, v in s["correspondence_counts"].items())
        + ". Size change: " + ", ".join(f"{v} {k}" for k, v in s["size_change_counts"].items())
        + f" (volume change ≥ +{s['matching']['enlarging_pct']:g} % enlarging, ≤ −{s['matching']['shrinking_pct']:g} % "
        "shrinking; sap's own defaults, not a response category scheme).</p>",
    ]
    for note in s.get("warnings", []):
        parts.append(f"<p class='warn'>warning: {html.escape(note)}</p>")
    parts.append("<h2>Regions</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in result.region_rows[0]) + "</tr>")
    for row in result.region_rows:
        parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>")
    parts.append("</table><h2>Tracked lesions</h2><p>Left: baseline, right: follow-up, each in its own exam "
                 "(crops of 80 mm through the lesion centre; patient's right on the left; lesion outlined).</p>")
    shown = list(zip(result.tracks, result.rows, strict=True))[:MAX_TRACKS]
    for track, row in tqdm(shown, desc="sap track report", unit="lesion", disable=not progress):
        b_centre = _centre_voxel(b, track.baseline) if track.baseline else None
        f_centre = _centre_voxel(f, track.followup) if track.followup else None
        b_views = _panels(b, track.baseline, b_centre) if track.baseline else [None, None]
        f_views = _panels(f, track.followup, f_centre) if track.followup else [None, None]
        image = _png([("baseline", b_views), ("follow-up", f_views)])
        fields = [
            ("baseline ids", row["baseline_ids"]), ("follow-up ids", row["followup_ids"]), ("region", row["region"]),
            ("volume mL", f"{_fmt(row['volume_baseline_ml'])} → {_fmt(row['volume_followup_ml'])}"),
            ("change", f"{_fmt(row['volume_change_ml'])} mL ({_fmt(row['volume_change_pct'])} %)"),
            ("3D Feret mm", f"{_fmt(row['feret_diameter_baseline_mm'])} → {_fmt(row['feret_diameter_followup_mm'])}"),
            ("axial mm", f"{_fmt(row['axial_diameter_baseline_mm'])} → {_fmt(row['axial_diameter_followup_mm'])}"),
            ("axial ≥ 10 mm", f"{_fmt(row['axial_diameter_ge_10mm_baseline'])} → {_fmt(row['axial_diameter_ge_10mm_followup'])}"),
            ("matched by", row["matched_by"] or "–"),
        ]
        parts.append(
            f"<div class='track'><span class='tag'>#{row['track_id']}</span><span class='tag'>{row['correspondence']}</span>"
            f"<span class='tag'>{row['size_change'] or 'size change n/a'}</span>"
            f"<table><tr>{''.join(f'<th>{html.escape(k)}</th>' for k, _ in fields)}</tr>"
            f"<tr>{''.join(f'<td>{html.escape(str(v)) if not isinstance(v, str) else v}</td>' for _, v in fields)}</tr></table>"
            f"<img src='data:image/png;base64,{image}' alt='track {row['track_id']}'></div>"
        )
    if len(result.tracks) > MAX_TRACKS:
        parts.append(f"<p>{len(result.tracks) - MAX_TRACKS} more tracks in lesions.csv.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
