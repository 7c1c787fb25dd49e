"""Files in, tables out: the importable function behind ``sap evaluate`` (SPEC §9).

Each volume is read once, thresholded once and labelled once per threshold; the per-case work is
:func:`sap.metrics.evaluate_case`. Cases run in worker processes; only small per-case results
travel back.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sap.data.geometry import Geometry, from_canonical, to_canonical
from sap.data.io import IMAGE_SUFFIXES, read_geometry, read_source_array, strip_image_suffix
from sap.errors import SapError
from sap.files import atomic_write_text, check_not_input, check_writable, folder_lock, publish_together
from sap.metrics import (
    LESION_COLUMNS,
    PATIENT_COLUMNS,
    CaseResult,
    DetectionCounts,
    EvaluationSettings,
    detection_counts_grid,
    evaluate_case,
    is_binary_prediction,
    label_ground_truth,
    nan_to_none,
    summarize,
    tune_threshold,
)

OUTPUT_FILES = ("patients.csv", "lesions.csv", "summary.json")
GT_NAMES = ("GT",)


@dataclass(frozen=True)
class CasePair:
    """One case: its ground-truth file and its prediction file (None = missing, read as empty)."""

    case_id: str
    gt: Path
    pred: Path | None


def _image_in(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def find_ground_truth(gt_dir: Path) -> dict[str, Path]:
    """Ground-truth masks: ``CASE.nii.gz`` files, case folders with ``GT.nii.gz``, a cohort's
    ``patients/`` folder, or nnU-Net ``labelsTr/``."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise SapError(f"{gt_dir}: ground-truth folder not found")
    for sub in ("patients", "labelsTr"):
        if (gt_dir / sub).is_dir():
            gt_dir = gt_dir / sub
            break
    found: dict[str, Path] = {}
    for entry in sorted(gt_dir.iterdir()):
        if entry.is_file() and entry.name.endswith(IMAGE_SUFFIXES) and not entry.name.startswith("."):
            found[strip_image_suffix(entry.name)] = entry
        elif entry.is_dir():
            path = next((p for p in (_image_in(entry, n) for n in GT_NAMES) if p is not None), None)
            if path is not None:
                found[entry.name] = path
    if not found:
        raise SapError(f"{gt_dir}: no ground-truth masks found (CASE.nii.gz or CASE/GT.nii.gz)")
    return found


def find_predictions(pred_dir: Path) -> dict[str, Path]:
    """Predictions: ``CASE.nii.gz`` or ``CASE_prob.nii.gz`` (``*_lesions.*`` files are ignored)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise SapError(f"{pred_dir}: prediction folder not found")
    found: dict[str, Path] = {}
    for entry in sorted(pred_dir.iterdir()):
        if not entry.is_file() or not entry.name.endswith(IMAGE_SUFFIXES) or entry.name.startswith("."):
            continue
        stem = strip_image_suffix(entry.name)
        if stem.endswith("_lesions"):
            continue
        case_id = stem[: -len("_prob")] if stem.endswith("_prob") else stem
        if case_id in found:
            raise SapError(f"{pred_dir}: two predictions for case {case_id} ({found[case_id].name}, {entry.name})")
        found[case_id] = entry
    return found


def _listing(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" … ({len(ids)} in all)" if len(ids) > limit else "")


def find_case_pairs(pred_dir: Path, gt_dir: Path, allow_missing: bool = False) -> list[CasePair]:
    """Pair predictions with ground truth by case id; check grids from the headers only.

    Errors: a prediction without ground truth (lists the cases); a missing prediction (lists the
    cases; ``allow_missing`` treats it as empty); a prediction on another grid (names both files).
    """
    gts = find_ground_truth(Path(gt_dir))
    preds = find_predictions(Path(pred_dir))
    orphans = sorted(set(preds) - set(gts))
    if orphans:
        raise SapError(f"{pred_dir}: predictions without ground truth in {gt_dir}: {_listing(orphans)}")
    missing = sorted(set(gts) - set(preds))
    if missing and not allow_missing:
        raise SapError(f"{pred_dir}: missing predictions for cases {_listing(missing)} (--allow-missing treats them as empty)")
    pairs = [CasePair(c, gts[c], preds.get(c)) for c in sorted(gts)]
    for pair in pairs:
        if pair.pred is None:
            continue
        differs = read_geometry(pair.pred).same_grid(read_geometry(pair.gt))
        if differs:
            raise SapError(f"{pair.pred}: prediction is on another grid than {pair.gt} ({differs})")
    return pairs


def _check_gt(array: np.ndarray, path: Path) -> np.ndarray:
    """Binary lesion mask check without ``np.unique`` (which sorts the whole volume)."""
    if array.dtype.kind in "bu" and array.max(initial=0) <= 1:
        return array  # one pass for the usual uint8 {0, 1} mask
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SapError(f"{path}: lesion mask holds NaN/Inf voxels")
    bad = (array != 0) & (array != 1)
    if bad.any():
        shown = ", ".join(f"{v:g}" for v in np.unique(array[bad])[:8])
        raise SapError(f"{path}: lesion mask is not binary: values {shown}")
    return array


def _check_pred(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "b":
        return array
    lo, hi = array.min(initial=0), array.max(initial=0)
    if array.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise SapError(f"{path}: prediction holds NaN/Inf voxels")
    if lo < 0 or hi > 1:
        raise SapError(f"{path}: prediction values must lie in [0, 1] (found {lo:g} to {hi:g})")
    return array


def _read(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A volume as a C-contiguous (z, y, x) view of the file's voxels, and its spacing (mm).

    The metrics do not depend on orientation (only on the grid and its spacing), so evaluation
    skips the canonical reorientation copy, which costs more than labelling on whole-body volumes.
    """
    source_xyz, geometry = read_source_array(path)
    return np.ascontiguousarray(source_xyz.T), tuple(float(s) for s in reversed(geometry.spacing))  # type: ignore


def _in_orientation_of(source_xyz: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """Voxels of a file in the (x, y, z) index order of another file on the same grid.

    Files of one grid may store it in different orientations (axes flipped or permuted, the
    affine adjusted): the voxels are compared only after both are in one order (the target's).
    """
    if tuple(geometry.ornt) == tuple(target.ornt):
        return source_xyz
    return from_canonical(to_canonical(source_xyz, geometry), target)


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Public name of the evaluation reader: a C-contiguous (z, y, x) view of the file's voxels and
    its spacing in mm along those axes (the voxel order of :func:`load_pair` and ``lesions.csv`` ids)."""
    return _read(Path(path))


def load_pair(pair: CasePair) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(prediction, ground truth, spacing in mm) of one case; spacing from the ground-truth header.

    Arrays are in the files' own voxel order (see :func:`_read`); both files share one grid. The
    two files are decoded concurrently (zlib releases the GIL while inflating).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        gt_future = pool.submit(read_source_array, pair.gt)
        pred_source = read_source_array(pair.pred) if pair.pred is not None else None
        gt_xyz, gt_geometry = gt_future.result()
    gt = np.ascontiguousarray(gt_xyz.T)
    spacing = tuple(float(s) for s in reversed(gt_geometry.spacing))
    pred = None
    if pred_source is not None:  # the prediction in the ground truth's voxel order
        pred = np.ascontiguousarray(_in_orientation_of(*pred_source, gt_geometry).T)
    gt = _check_gt(gt, pair.gt)
    if pred is None:
        return np.zeros(gt.shape, dtype=np.float32), gt, spacing
    if pred.shape != gt.shape:
        raise SapError(f"{pair.pred}: shape {pred.shape} differs from {pair.gt} {gt.shape}")
    return _check_pred(pred, pair.pred), gt, spacing  # type: ignore[return-value]


def check_out_folder(out: str | Path, flag: str = "--out") -> Path:
    """An output folder path that is not an existing file (refused before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SapError(f"{out}: exists and is not a folder; {flag} names the folder the outputs go into")
    return out


Arrays = tuple[np.ndarray, np.ndarray, tuple[float, float, float]]


def _evaluate_one(pair: CasePair, settings: EvaluationSettings, arrays: Arrays | None = None) -> CaseResult:
    pred, gt, spacing = arrays if arrays is not None else load_pair(pair)
    return evaluate_case(pred, gt, spacing, settings, case_id=pair.case_id)


def _tuning_counts(
    pair: CasePair, settings: EvaluationSettings, min_volumes: tuple[float, ...], arrays: Arrays | None = None
) -> dict[tuple[float, float], DetectionCounts] | None:
    pred, gt, spacing = arrays if arrays is not None else load_pair(pair)
    if is_binary_prediction(pred):
        return None
    gt_c = label_ground_truth(gt, spacing, settings.connectivity)
    return detection_counts_grid(
        pred, gt_c, spacing, settings.grid, min_volumes, settings.connectivity, settings.volume_threshold_ml
    )


def _run_parallel(
    func: Callable[..., Any], pairs: Sequence[CasePair], args: tuple, workers: int, desc: str, progress: bool
) -> dict[str, Any]:
    from tqdm import tqdm

    results: dict[str, Any] = {}
    bar = tqdm(total=len(pairs), desc=desc, unit="case", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(pairs) <= 1:
            # One process, one case at a time. No reader thread prefetching the next case: decoding
            # is a small share now, and that thread waited for the GIL through every cc3d call
            # (which holds it), so prefetching made whole runs slower, not faster.
            for pair in pairs:
                results[pair.case_id] = func(pair, *args, arrays=load_pair(pair))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
                futures = {pool.submit(func, pair, *args): pair.case_id for pair in pairs}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        bar.close()
    return results


def parse_case_list(text: str | None) -> list[str]:
    """``--tune-on``: a file with one case id per line (or comma-separated), or a comma list."""
    if not text:
        return []
    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    return [c.strip() for c in raw.replace(",", "\n").splitlines() if c.strip() and not c.startswith("#")]


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path | None,
    settings: EvaluationSettings | None = None,
    tune_on: Sequence[str] = (),
    tuning_objective: str = "mean_f2",
    tune_min_volume: bool = False,
    min_volume_grid: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0),
    allow_missing: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    tune_on_file: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every case of ``pred_dir`` against ``gt_dir`` and write the three outputs to
    ``out_dir`` (None: write nothing). Returns the summary (NaN as float NaN).

    With ``tune_on`` (case ids; read from ``tune_on_file`` when given), E9 picks the threshold
    (and, with ``tune_min_volume``, the minimum volume) on those cases; the other cases are then
    evaluated at it. Everything is checked before ``out_dir`` is created: existing outputs without
    ``overwrite``, an output that is an input, the case pairs and grids. The three files are
    published together (all or nothing, :func:`sap.files.publish_together`) while the main process
    holds the folder's lock (:func:`sap.files.folder_lock`).
    """
    settings = settings or EvaluationSettings()
    # scipy.stats (Shapiro–Wilk in the summary) and pandas (the CSV writer) take seconds to import:
    # import them in the background while the first volumes decode.
    warm = threading.Thread(target=_warm_imports, daemon=True)
    warm.start()
    warn = warn or (lambda msg: print(f"sap evaluate: warning: {msg}", file=sys.stderr))
    out = check_out_folder(out_dir) if out_dir is not None else None
    if out is not None:
        for name in OUTPUT_FILES:
            check_writable(out / name, overwrite)
    pairs = find_case_pairs(Path(pred_dir), Path(gt_dir), allow_missing)
    if out is not None:
        tune_file = Path(tune_on_file) if tune_on_file else None
        inputs = [p for pair in pairs for p in (pair.gt, pair.pred)] + [tune_file]
        check_not_input([out / name for name in OUTPUT_FILES], inputs)
    if workers > 1:
        warm.join()  # never fork worker processes while another thread may hold the import lock
    # everything is checked: the output folder is created (and locked) only now
    with folder_lock(out) if out is not None else contextlib.nullcontext():
        return _evaluate_pairs(pairs, out, settings, tune_on, tuning_objective, tune_min_volume,
                               min_volume_grid, workers, overwrite, progress, warn, pred_dir, gt_dir)


def _evaluate_pairs(pairs: list[CasePair], out: Path | None, settings: EvaluationSettings, tune_on: Sequence[str],
                    tuning_objective: str, tune_min_volume: bool, min_volume_grid: Sequence[float], workers: int,
                    overwrite: bool, progress: bool, warn: Callable[[str], None], pred_dir: str | Path,
                    gt_dir: str | Path) -> dict[str, Any]:

    tuning: dict[str, Any] | None = None
    if tune_on:
        by_id = {p.case_id: p for p in pairs}
        unknown = [c for c in tune_on if c not in by_id]
        if unknown:
            raise SapError(f"{gt_dir}: --tune-on names cases without ground truth: {_listing(unknown)}")
        tune_pairs = [by_id[c] for c in tune_on]
        pairs = [p for p in pairs if p.case_id not in set(tune_on)]
        if not pairs:
            raise SapError(f"{pred_dir}: every case is a tuning case; nothing left to evaluate")
        volumes = tuple(min_volume_grid) if tune_min_volume else (settings.min_volume_ml,)
        counts = _run_parallel(_tuning_counts, tune_pairs, (settings, volumes), workers, "tuning", progress)
        if any(c is None for c in counts.values()):
            warn("binary predictions among the tuning cases: threshold tuning skipped (null)")
            tuning = {"cases": list(tune_on), "threshold": None, "min_volume_ml": None, "objective": tuning_objective}
        else:
            try:
                t, mv, best, _ = tune_threshold([counts[c] for c in tune_on], tuning_objective)
            except ValueError as exc:
                raise SapError(f"{gt_dir}: cannot tune on {_listing(list(tune_on))}: {exc}") from exc
            settings = replace(settings, threshold=t, min_volume_ml=mv)
            tuning = {"cases": list(tune_on), "threshold": t, "min_volume_ml": mv,
                      "objective": tuning_objective, "objective_value": best}

    results = _run_parallel(_evaluate_one, pairs, (settings,), workers, "evaluate", progress)
    ordered = [results[p.case_id] for p in pairs]
    binary = [r.case_id for r in ordered if r.binary]
    if binary:
        warn(f"binary predictions ({_listing(binary)}): FROC, froc_score and tuning are null")
    summary = summarize(ordered, settings)
    summary["settings"]["tune_on"] = list(tune_on)
    if tuning is not None:
        summary["tuning"] = tuning
    if out is not None:
        write_outputs(out, ordered, summary, overwrite)
    return summary


def _warm_imports() -> None:
    for name in ("scipy.stats", "pandas"):
        importlib.import_module(name)


def write_outputs(
    out: Path,
    results: Sequence[CaseResult],
    summary: dict[str, Any],
    overwrite: bool,
    extra: Mapping[str, Callable[[Path], Any]] | None = None,
) -> None:
    """``patients.csv``, ``lesions.csv`` (NaN as empty cells) and ``summary.json`` (NaN as null),
    plus ``extra`` files (name → writer of a path), published together: all or nothing."""
    import pandas as pd

    patients = pd.DataFrame([r.row for r in results], columns=list(PATIENT_COLUMNS))
    lesions = pd.DataFrame([row for r in results for row in r.lesion_rows()], columns=list(LESION_COLUMNS))
    text = json.dumps(nan_to_none(summary), indent=2, allow_nan=False)
    writers: dict[str, Callable[[Path], Any]] = {
        "patients.csv": lambda p: atomic_write_text(p, patients.to_csv(index=False, na_rep="")),
        "lesions.csv": lambda p: atomic_write_text(p, lesions.to_csv(index=False, na_rep="")),
        "summary.json": lambda p: atomic_write_text(p, text + "\n"),
        **(extra or {}),
    }
    publish_together(out, writers, overwrite=overwrite)
