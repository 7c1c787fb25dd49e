"""``sap track``: two exams of one subject → registration, lesion tracks, size change (SPEC §14).

:func:`track` is the Python function behind the command. An exam is a case folder (channel
images such as ``T1.nii.gz`` + ``b1000.nii.gz`` or ``CT.nii.gz``, a lesion mask ``GT.nii.gz``,
optionally ``skeleton.nii.gz``); the lesion mask may come from elsewhere (a file, or a
``sap infer`` output folder holding ``CASE_lesions.nii.gz``). Lesions are the 26-connected
components of the mask (any non-zero value), numbered 1…n from the largest.

Volumes and diameters are measured on each exam's own grid (:mod:`sap.metrics.diameters`), never
on the warped mask; the warped follow-up map only decides which lesions correspond
(:mod:`sap.track.match`). Research use only.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import cc3d
import numpy as np
import SimpleITK as sitk

from sap import RESEARCH_USE_ONLY, __version__
from sap.data.cases import find_image, read_subjects
from sap.data.io import IMAGE_SUFFIXES, Image, read_image, strip_image_suffix, write_image
from sap.data.labels import N_SKELETON_CLASSES, OUTSIDE_REGION, SKELETON_CLASSES, region_name
from sap.errors import SapError
from sap.files import atomic_write, atomic_write_text, json_text, staged_folder
from sap.metrics.diameters import LesionSize, instance_sizes
from sap.track.match import MatchOptions, Track, match_lesions, size_change
from sap.track.register import Registration, RegistrationOptions, register, warp_labels

REGIONS: tuple[str, ...] = (*SKELETON_CLASSES[1:], OUTSIDE_REGION)
LESION_FILE, REGION_FILE, SUMMARY_FILE = "lesions.csv", "regions.csv", "summary.json"
WARPED_FILE, TRANSFORM_FILE, REPORT_FILE = "followup_lesions_in_baseline.nii.gz", "transform.h5", "report.html"
#: channel tried first for registration when --channel is not given
PREFERRED_CHANNELS = ("T1", "CT")
_LABEL_STEMS = ("GT", "skeleton", "lesions")

LESION_COLUMNS = (
    "track_id", "correspondence", "size_change", "region", "baseline_ids", "followup_ids",
    "volume_baseline_ml", "volume_followup_ml", "volume_change_ml", "volume_change_pct",
    "feret_diameter_baseline_mm", "feret_diameter_followup_mm",
    "axial_diameter_baseline_mm", "axial_diameter_followup_mm",
    "axial_diameter_ge_10mm_baseline", "axial_diameter_ge_10mm_followup",
    "centroid_baseline_lps_x_mm", "centroid_baseline_lps_y_mm", "centroid_baseline_lps_z_mm",
    "centroid_followup_lps_x_mm", "centroid_followup_lps_y_mm", "centroid_followup_lps_z_mm",
    "matched_by", "distance_mm",
)
REGION_COLUMNS = (
    "region", "n_baseline", "n_followup", "burden_baseline_ml", "burden_followup_ml",
    "burden_change_ml", "burden_change_pct", "n_new", "n_disappeared",
)


@dataclass(frozen=True)
class TrackOptions:
    """Everything ``sap track`` can be told besides its inputs; defaults marked *(ours)* in docs."""

    match: MatchOptions = field(default_factory=MatchOptions)
    registration: RegistrationOptions = field(default_factory=RegistrationOptions)
    channel: str | None = None  #: channel registered (default: T1, else CT, else the first)
    force: bool = False  #: track exams whose subject ids differ
    overwrite: bool = False
    report: bool = True  #: write report.html
    progress: bool = True


@dataclass
class Exam:
    """One exam as tracking sees it: the registered channel, lesion instances, skeleton."""

    case_id: str
    subject_id: str | None
    image: Image
    channel: str
    instances: np.ndarray
    n: int
    skeleton: np.ndarray | None
    sources: dict[str, str]
    sizes: list[LesionSize] = field(default_factory=list)
    centroids_lps: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    regions: list[str] = field(default_factory=list)


@dataclass
class TrackResult:
    out: Path | None
    baseline: Exam
    followup: Exam
    registration: Registration
    tracks: list[Track]
    rows: list[dict]
    region_rows: list[dict]
    summary: dict
    warped_followup: np.ndarray


# ------------------------------------------------------------------------------------ inputs
def _channels(folder: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(IMAGE_SUFFIXES):
            stem = strip_image_suffix(path.name)
            if stem not in _LABEL_STEMS and not stem.endswith(("_lesions", "_prob", "_skeleton")):
                found[stem] = path
    return found


def _lesion_file(path: Path, case_id: str) -> Path:
    """A lesion mask file, or the ``CASE_lesions.nii.gz`` inside a ``sap infer`` output folder."""
    if path.is_file():
        return path
    if path.is_dir():
        named = path / f"{case_id}_lesions.nii.gz"
        if named.is_file():
            return named
        candidates = sorted(path.glob("*_lesions.nii.gz"))
        if len(candidates) == 1:
            return candidates[0]
        raise SapError(f"{path}: no {case_id}_lesions.nii.gz (a sap infer output folder holds CASE_lesions.nii.gz)")
    raise SapError(f"{path}: lesion mask not found")


def _check_labels(array: np.ndarray, path: Path, what: str, maximum: int | None = None) -> None:
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise SapError(f"{path}: {what} holds NaN or Inf voxels")
        if not np.array_equal(array, np.round(array)):
            raise SapError(f"{path}: {what} holds non-integer values")
    if array.size and array.min() < 0:
        raise SapError(f"{path}: {what} holds negative values")
    if maximum is not None and array.size and array.max() > maximum:
        raise SapError(f"{path}: {what} holds values above {maximum} (skeleton labels are 0-9)")


def _on_grid(label: Image, image: Image) -> None:
    difference = label.geometry.same_grid(image.geometry)
    if difference:
        raise SapError(f"{label.path}: not on the grid of {image.path} ({difference})")


def load_exam(path: str | Path, lesions: str | Path | None = None, skeleton: str | Path | None = None,
              channel: str | None = None) -> Exam:
    """Read one exam (see module) into canonical arrays, lesion instances numbered by size."""
    folder = Path(path)
    if not folder.is_dir():
        raise SapError(f"{folder}: not a case folder (expected a folder of channel images and a lesion mask)")
    case_id = folder.name
    channels = _channels(folder)
    if not channels:
        raise SapError(f"{folder}: no channel image found")
    if channel is None:
        channel = next((c for c in PREFERRED_CHANNELS if c in channels), next(iter(channels)))
    if channel not in channels:
        raise SapError(f"{folder}: no channel {channel!r} (found: {', '.join(channels)})")
    image = read_image(channels[channel], np.float32)
    if not np.isfinite(image.array).all():
        raise SapError(f"{channels[channel]}: holds NaN or Inf voxels")
    lesion_path = _lesion_file(Path(lesions), case_id) if lesions is not None else find_image(folder, "GT")
    if lesion_path is None:
        raise SapError(f"{folder}: no lesion mask (GT.nii.gz); give one with --baseline-lesions/--followup-lesions")
    mask = read_image(lesion_path)
    _on_grid(mask, image)
    _check_labels(mask.array, lesion_path, "lesion mask")
    labels, n = cc3d.connected_components(mask.array > 0, connectivity=26, return_N=True, binary_image=True)
    counts = np.bincount(labels.reshape(-1), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")
    lut = np.zeros(n + 1, dtype=np.uint16 if n < 65535 else np.uint32)
    lut[order + 1] = np.arange(1, n + 1)
    instances = lut[labels]
    skeleton_path = Path(skeleton) if skeleton is not None else find_image(folder, "skeleton")
    skeleton_array = None
    if skeleton_path is not None:
        skel = read_image(skeleton_path)
        _on_grid(skel, image)
        _check_labels(skel.array, skeleton_path, "skeleton", maximum=N_SKELETON_CLASSES - 1)
        skeleton_array = skel.array.astype(np.uint8)
    subject = read_subjects(folder.parent).get(case_id)
    sources = {"channel": str(channels[channel]), "lesions": str(lesion_path),
               "skeleton": str(skeleton_path) if skeleton_path else ""}
    exam = Exam(case_id, subject, image, channel, instances, int(n), skeleton_array, sources)
    _measure(exam)
    return exam


def _measure(exam: Exam) -> None:
    exam.sizes = instance_sizes(exam.instances, exam.image.spacing, exam.n)
    if exam.n == 0:
        return
    stats = cc3d.statistics(exam.instances, no_slice_conversion=True)
    exam.centroids_lps = exam.image.geometry.voxel_to_lps(np.asarray(stats["centroids"][1 : exam.n + 1], dtype=np.float64))
    if exam.skeleton is not None:
        flat = exam.instances.reshape(-1)
        where = np.flatnonzero(flat)
        votes = np.bincount(flat[where].astype(np.int64) * N_SKELETON_CLASSES + exam.skeleton.reshape(-1)[where],
                            minlength=(exam.n + 1) * N_SKELETON_CLASSES).reshape(exam.n + 1, N_SKELETON_CLASSES)
        exam.regions = [region_name(int(k)) for k in votes[1:].argmax(axis=1)]


# ------------------------------------------------------------------------------------ tracking
def _subject_check(baseline: Exam, followup: Exam, force: bool) -> list[str]:
    notes = []
    if baseline.subject_id and followup.subject_id:
        if baseline.subject_id != followup.subject_id:
            if not force:
                raise SapError(
                    f"{baseline.case_id} (subject {baseline.subject_id}) and {followup.case_id} (subject "
                    f"{followup.subject_id}) belong to different subjects; pass --force to track them anyway"
                )
            notes.append(f"subject ids differ ({baseline.subject_id} vs {followup.subject_id}); tracked because of --force")
    else:
        notes.append("no subject id on one or both exams (no subjects.csv beside the case folders): "
                     "cannot check that they belong to one subject")
    return notes


def _warped_centroids(warped: np.ndarray, n: int, baseline: Exam) -> np.ndarray:
    out = np.full((n, 3), np.nan)
    if n == 0:
        return out
    stats = cc3d.statistics(np.ascontiguousarray(warped), no_slice_conversion=True)
    counts = np.asarray(stats["voxel_counts"])
    for label in range(1, min(n, len(counts) - 1) + 1):
        if counts[label] > 0:
            out[label - 1] = baseline.image.geometry.voxel_to_lps(np.asarray(stats["centroids"][label]))[0]
    return out


def _side(exam: Exam, ids: list[int]) -> dict:
    if not ids:
        return {"volume": float("nan"), "feret": float("nan"), "axial": float("nan"), "flag": "", "centroid": [float("nan")] * 3}
    sizes = [exam.sizes[i - 1] for i in ids]
    volume = float(sum(s.volume_ml for s in sizes))
    weights = np.array([s.voxels for s in sizes], dtype=np.float64)
    centroid = (exam.centroids_lps[[i - 1 for i in ids]] * weights[:, None]).sum(axis=0) / max(weights.sum(), 1.0)
    axial = max(s.axial_diameter_mm for s in sizes)
    return {"volume": volume, "feret": max(s.feret_diameter_mm for s in sizes), "axial": axial,
            "flag": bool(axial >= 10.0), "centroid": [float(v) for v in centroid]}


def lesion_rows(baseline: Exam, followup: Exam, tracks: list[Track], options: MatchOptions) -> list[dict]:
    """One row per track (columns :data:`LESION_COLUMNS`)."""
    rows = []
    for number, t in enumerate(tracks, start=1):
        b, f = _side(baseline, t.baseline), _side(followup, t.followup)
        both = bool(t.baseline and t.followup)
        change = f["volume"] - b["volume"] if both else float("nan")
        if t.baseline:  # the region of the track: its largest baseline lesion's, else the follow-up's
            region = baseline.regions[min(t.baseline) - 1] if baseline.regions else ""
        else:
            region = followup.regions[min(t.followup) - 1] if followup.regions else ""
        rows.append({
            "track_id": number,
            "correspondence": t.correspondence,
            "size_change": size_change(b["volume"], f["volume"], options.enlarging_pct, options.shrinking_pct) if both else "",
            "region": region,
            "baseline_ids": ";".join(map(str, t.baseline)),
            "followup_ids": ";".join(map(str, t.followup)),
            "volume_baseline_ml": b["volume"],
            "volume_followup_ml": f["volume"],
            "volume_change_ml": change,
            "volume_change_pct": 100.0 * change / b["volume"] if both and b["volume"] > 0 else float("nan"),
            "feret_diameter_baseline_mm": b["feret"],
            "feret_diameter_followup_mm": f["feret"],
            "axial_diameter_baseline_mm": b["axial"],
            "axial_diameter_followup_mm": f["axial"],
            "axial_diameter_ge_10mm_baseline": b["flag"],
            "axial_diameter_ge_10mm_followup": f["flag"],
            **{f"centroid_baseline_lps_{a}_mm": v for a, v in zip("xyz", b["centroid"], strict=True)},
            **{f"centroid_followup_lps_{a}_mm": v for a, v in zip("xyz", f["centroid"], strict=True)},
            "matched_by": t.matched_by,
            "distance_mm": t.distance_mm,
        })
    return rows


def region_rows(baseline: Exam, followup: Exam, tracks: list[Track]) -> list[dict]:
    """Per reading region (and ``all``): burden at both times, its change, new and disappeared.

    A lesion counts in the region of its own exam's skeleton; without skeletons everything is
    in ``all`` only. New and disappeared lesions count where they are.
    """
    new = {f for t in tracks if t.correspondence == "new" for f in t.followup}
    gone = {b for t in tracks if t.correspondence == "disappeared" for b in t.baseline}
    regions = list(REGIONS) if (baseline.regions or followup.regions or baseline.skeleton is not None) else []
    out = []
    for region in [*regions, "all"]:
        def pick(exam: Exam, r: str = region) -> list[int]:
            if r == "all":
                return list(range(1, exam.n + 1))
            return [i for i in range(1, exam.n + 1) if exam.regions and exam.regions[i - 1] == r]

        b_ids, f_ids = pick(baseline), pick(followup)
        v0 = float(sum(baseline.sizes[i - 1].volume_ml for i in b_ids))
        v1 = float(sum(followup.sizes[i - 1].volume_ml for i in f_ids))
        out.append({
            "region": region, "n_baseline": len(b_ids), "n_followup": len(f_ids),
            "burden_baseline_ml": v0, "burden_followup_ml": v1, "burden_change_ml": v1 - v0,
            "burden_change_pct": 100.0 * (v1 - v0) / v0 if v0 > 0 else float("nan"),
            "n_new": sum(i in new for i in f_ids), "n_disappeared": sum(i in gone for i in b_ids),
        })
    return out


_FORMATS = {"volume": "{:.4f}", "burden": "{:.4f}", "diameter": "{:.2f}", "centroid": "{:.2f}", "distance": "{:.2f}"}


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text with fixed number formats; NaN as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, float):
                fmt = next((f for k, f in _FORMATS.items() if k in c), "{:.3f}")
                cells.append("" if not np.isfinite(value) else fmt.format(value))
            else:
                cells.append(value)
        writer.writerow(cells)
    return buffer.getvalue()


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SapError(f"{out}: output exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise SapError(f"{out}: exists and is not a folder")


def track(
    baseline: str | Path,
    followup: str | Path,
    out: str | Path | None,
    options: TrackOptions | None = None,
    baseline_lesions: str | Path | None = None,
    followup_lesions: str | Path | None = None,
    baseline_skeleton: str | Path | None = None,
    followup_skeleton: str | Path | None = None,
    truth: str | Path | None = None,
    extra_folders: dict[str, Path] | None = None,
) -> TrackResult:
    """Track the lesions of ``followup`` against ``baseline`` and publish the outputs in ``out``
    (one folder, published whole; ``None``: compute only). ``truth``: a ``sap synth --followup``
    cohort (folder or cohort.json) to score against (:mod:`sap.track.truth`). ``extra_folders``:
    name → folder moved into the output before it is published (``sap track-infer``'s ``infer/``).
    """
    options = options or TrackOptions()
    start = time.perf_counter()
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _refuse_existing(out_path, options.overwrite)
    b = load_exam(baseline, baseline_lesions, baseline_skeleton, options.channel)
    f = load_exam(followup, followup_lesions, followup_skeleton, options.channel or b.channel)
    notes = _subject_check(b, f, options.force)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    reg_start = time.perf_counter()
    reg = register(b.image, f.image, b.skeleton, f.skeleton, options.registration)
    reg_seconds = time.perf_counter() - reg_start
    warped = warp_labels(f.instances, f.image, b.image, reg.transform)
    tracks = match_lesions(b.instances, b.n, warped, f.n, b.centroids_lps, _warped_centroids(warped, f.n, b), options.match)
    rows = lesion_rows(b, f, tracks, options.match)
    regions = region_rows(b, f, tracks)
    counts = {c: sum(r["correspondence"] == c for r in rows) for c in ("matched", "merged", "split", "new", "disappeared")}
    changes = {c: sum(r["size_change"] == c for r in rows) for c in ("enlarging", "shrinking", "stable")}
    total = regions[-1]
    summary = {
        "research_use_only": True,
        "note": RESEARCH_USE_ONLY,
        "baseline": {"case_id": b.case_id, "subject_id": b.subject_id, "n_lesions": b.n, **b.sources,
                     "channel_name": b.channel, "grid": list(b.image.array.shape),
                     "voxel_size_mm": [round(s, 4) for s in b.image.spacing]},
        "followup": {"case_id": f.case_id, "subject_id": f.subject_id, "n_lesions": f.n, **f.sources,
                     "channel_name": f.channel, "grid": list(f.image.array.shape),
                     "voxel_size_mm": [round(s, 4) for s in f.image.spacing]},
        "warnings": notes,
        "registration": {**reg.record(), "options": asdict(options.registration), "seconds": round(reg_seconds, 3)},
        "matching": asdict(options.match),
        "thresholds_note": "min_overlap, max_distance_mm, enlarging_pct and shrinking_pct are sap's own defaults (ours), not a published response scheme",
        "correspondence_counts": counts,
        "size_change_counts": changes,
        "burden_baseline_ml": total["burden_baseline_ml"],
        "burden_followup_ml": total["burden_followup_ml"],
        "burden_change_ml": total["burden_change_ml"],
        "burden_change_pct": total["burden_change_pct"],
        "sap_version": __version__,
    }
    result = TrackResult(out_path, b, f, reg, tracks, rows, regions, summary, warped)
    if truth is not None:
        from sap.track.truth import score_against_truth

        summary["truth"] = score_against_truth(result, truth)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if out_path is not None:
        _publish(result, options, extra_folders or {})
        summary["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _publish(result: TrackResult, options: TrackOptions, extra_folders: dict[str, Path]) -> None:
    out = result.out
    assert out is not None
    _refuse_existing(out, options.overwrite)
    with staged_folder(out, replace=True) as tmp:
        atomic_write_text(tmp / LESION_FILE, to_csv(result.rows, LESION_COLUMNS))
        atomic_write_text(tmp / REGION_FILE, to_csv(result.region_rows, REGION_COLUMNS))
        write_image(result.warped_followup, result.baseline.image.geometry, tmp / WARPED_FILE)
        atomic_write(tmp / TRANSFORM_FILE, lambda p: sitk.WriteTransform(result.registration.transform, p), ".tmp.h5")
        if options.report:
            from sap.track.report import report_html

            atomic_write_text(tmp / REPORT_FILE, report_html(result, options.progress))
        for name, folder in extra_folders.items():
            shutil.move(str(folder), str(tmp / name))
            for side in ("baseline", "followup"):  # inputs that live in a moved folder: name their final place
                record = result.summary[side]
                if record["lesions"].startswith(str(folder)):
                    record["lesions"] = str(out / name) + record["lesions"][len(str(folder)):]
        atomic_write_text(tmp / SUMMARY_FILE, json_text(result.summary))
        _refuse_existing(out, options.overwrite)  # someone may have written there meanwhile


def print_summary(result: TrackResult, stream: TextIO = sys.stdout) -> None:
    s = result.summary
    reg = s["registration"]
    quality = (f"bone Dice {reg['skeleton_dice_before']:.3f} → {reg['skeleton_dice_after']:.3f}"
               if reg["skeleton_dice_after"] is not None else f"final metric {reg['final_metric']:.4f}")
    counts = ", ".join(f"{v} {k}" for k, v in s["correspondence_counts"].items())
    print(f"registration: {quality}; tracks: {counts}; burden {s['burden_baseline_ml']:.2f} → "
          f"{s['burden_followup_ml']:.2f} mL", file=stream)
