"""``sap slice2d predict``: slice-wise prediction restacked into volumes, and the detector → SAM hybrid.

For every input case the CT volume is cut into display-oriented axial slices, each slice is run
through the 2D model (or refined by SAM from detector boxes), and the slice probabilities are
restacked into a volume on the source grid. Outputs per case, like ``sap infer`` (SPEC §8), so
``sap evaluate --pred OUT`` scores 2D and 3D models in one table:

* ``CASE_prob.nii.gz``: foreground probability (float32 in [0, 1]); with SAM refinement the
  refined binary mask (0/1);
* ``CASE_lesions.nii.gz``: connected components (26-connectivity) of the mask at the threshold.

Inputs: a CT file (NIfTI/NRRD/MHA) or DICOM series folder, a case folder holding ``CT.*``, or a
folder of such case folders (``patients/`` and ``healthy/`` of a cohort included).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from tqdm import tqdm

from sap.data.io import IMAGE_SUFFIXES, read_image, strip_image_suffix, write_image
from sap.errors import SapError
from sap.files import atomic_write_text, check_writable
from sap.models.weights import load_checkpoint
from sap.slice2d.data import bone_window, slices_to_volume, volume_to_slices
from sap.slice2d.metrics import score_volume_slices
from sap.slice2d.models import ModelSpec, build_model, load_state_checked
from sap.slice2d.train import CHECKPOINT_KIND, predict_slices

CT_NAMES = ("CT", "ct")


@dataclass
class SliceModel:
    """A trained 2D model with what it needs at prediction time."""

    model: torch.nn.Module
    spec: ModelSpec
    target: str
    window: tuple[float, float]
    threshold: float
    source: str


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> SliceModel:
    """Rebuild the network of a ``sap slice2d train`` folder (its ``best.pt``) or of one of its
    checkpoints and load its weights. Folders and ``model.pt`` files of sap before the stage
    runner (slice2d checkpoint version 1) still load."""
    path = Path(path)
    if path.is_dir():
        file = next((path / name for name in ("best.pt", "model.pt") if (path / name).is_file()), None)
        if file is None:
            raise SapError(f"{path}: no best.pt (expected a folder written by `sap slice2d train`)")
    else:
        file = path
    if not file.is_file():
        raise SapError(f"{file}: no such checkpoint")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SapError(f"{file}: cannot read the checkpoint ({str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(payload, dict):
        raise SapError(f"{file}: not a sap slice2d checkpoint")
    if "format" in payload:  # the stage runner's checkpoints: what slice2d needs is under "run"
        payload = load_checkpoint(file)
        run = payload.get("run") or {}
        if payload.get("kind") != CHECKPOINT_KIND or "spec" not in run:
            raise SapError(f"{file}: a {payload.get('kind')} checkpoint, not a sap slice2d model")
        meta = {"spec": run["spec"], "target": run.get("target"), "window": run.get("window"), "threshold": run.get("slice2d_threshold")}
    elif "spec" in payload and "state_dict" in payload:  # version 1: model.pt
        meta = payload
    else:
        raise SapError(f"{file}: not a sap slice2d checkpoint (no spec/state_dict)")
    spec = ModelSpec(**meta["spec"])
    model = build_model(spec)
    load_state_checked(model, payload["state_dict"], str(file))
    model.to(device).eval()
    level, width = meta.get("window") or (400.0, 1800.0)
    threshold = meta.get("threshold")
    return SliceModel(
        model, spec, meta.get("target") or "lesions", (float(level), float(width)),
        0.5 if threshold is None else float(threshold), str(file),
    )  # fmt: skip


def find_inputs(path: str | Path) -> list[tuple[str, Path]]:
    """(case id, CT path) pairs of an input file, case folder or folder of case folders."""
    path = Path(path)
    if not path.exists():
        raise SapError(f"{path}: input not found")
    if path.is_file():
        return [(strip_image_suffix(path.name), path)]

    def ct_of(folder: Path) -> Path | None:
        for name in CT_NAMES:
            for suffix in IMAGE_SUFFIXES:
                if (folder / f"{name}{suffix}").is_file():
                    return folder / f"{name}{suffix}"
            if (folder / name).is_dir():
                return folder / name
        return None

    own = ct_of(path)
    if own is not None:
        return [(path.name, own)]
    if _is_dicom_series(path):
        return [(path.name, path)]
    groups = [path / g for g in ("patients", "healthy") if (path / g).is_dir()] or [path]
    found = []
    for group in groups:
        for case_dir in sorted(p for p in group.iterdir() if p.is_dir() and not p.name.startswith(".")):
            ct = ct_of(case_dir)
            if ct is not None:
                found.append((case_dir.name, ct))
        found += [(strip_image_suffix(p.name), p) for p in sorted(group.iterdir()) if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    if not found:
        raise SapError(f"{path}: no CT image found (expected a file, CASE/CT.nii.gz or folders of those)")
    ids = [case for case, _ in found]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise SapError(f"{path}: case id collision: {', '.join(duplicates)}")
    return found


def _is_dicom_series(folder: Path) -> bool:
    """A folder of files that GDCM reads as a DICOM series (file names need no .dcm suffix)."""
    entries = list(folder.iterdir())
    if any(p.is_dir() for p in entries) or not any(p.is_file() and not p.name.endswith(IMAGE_SUFFIXES) for p in entries):
        return False
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is an answer here, not a warning
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def predict_volume(model: SliceModel, hu: np.ndarray, batch_size: int = 8, device: torch.device | str = "cpu") -> np.ndarray:
    """Canonical (X, Y, Z) HU volume → restacked foreground probability volume (float32)."""
    slices = volume_to_slices(bone_window(hu, *model.window))
    probs = predict_slices(model.model, model.spec.kind, list(slices), model.spec.image_size, batch_size, device)
    return slices_to_volume(np.stack(probs)).astype(np.float32)


def refine_volume(
    prompter: Any,
    hu: np.ndarray,
    window: tuple[float, float],
    detector_mask: np.ndarray | None = None,
    instances: np.ndarray | None = None,
    expansion: float = 1.1,
    crop_factor: float | None = 2.0,
    progress: bool = False,
) -> np.ndarray:
    """Detector → SAM hybrid on a volume: boxes per axial slice, SAM masks pasted back (bool volume).

    Boxes come from the 4-connected components of ``detector_mask`` in each slice (a 2D detector),
    or from each 3D component of ``instances`` cut by the slice (the 3D lesion model).
    """
    from sap.slice2d.sam import boxes_from_instances, boxes_from_mask, refine_with_sam

    images = volume_to_slices(bone_window(hu, *window))
    source = volume_to_slices(instances if instances is not None else detector_mask)
    out = np.zeros(images.shape, dtype=bool)
    for k in tqdm(range(len(images)), desc="slice2d: SAM refinement", unit="slice", disable=not progress):
        if not source[k].any():
            continue
        boxes = boxes_from_instances(source[k]) if instances is not None else boxes_from_mask(source[k] > 0)
        out[k] = refine_with_sam(prompter, images[k], boxes, expansion, crop_factor)
    return slices_to_volume(out)


def _write_outputs(prob: np.ndarray, geometry, out: Path, case_id: str, threshold: float, overwrite: bool) -> None:
    write_image(prob.astype(np.float32), geometry, out / f"{case_id}_prob.nii.gz", overwrite=overwrite)
    labels = cc3d.connected_components(prob >= threshold, connectivity=26).astype(np.uint16)
    write_image(labels, geometry, out / f"{case_id}_lesions.nii.gz", overwrite=overwrite)


def predict_cases(
    input_path: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    sam_dir: str | Path | None = None,
    sam_family: str = "sam",
    boxes_from: str | Path | None = None,
    threshold: float | None = None,
    expansion: float = 1.1,
    crop_factor: float | None = 2.0,
    overwrite: bool = False,
    progress: bool = True,
    gt: str | Path | None = None,
    target: str | None = None,
) -> list[Path]:
    """Predict every input case; returns the written probability files.

    ``model_dir`` alone: the 2D model's restacked probabilities. With ``sam_dir`` too: the model is
    the detector and SAM refines its boxes. ``boxes_from`` (a folder of a 3D model's
    ``CASE_lesions.nii.gz`` or ``CASE_prob.nii.gz``) replaces the 2D detector.
    ``gt`` (a folder of ``CASE.nii.gz`` or case folders) adds ``metrics2d.csv``: the 2D metrics of
    SPEC §11 per case against the lesion mask or, for ``target="bone"``, skeleton > 0.
    A case that fails is reported and the others still finish; the error then names the failures.
    """
    if model_dir is None and boxes_from is None:
        raise SapError("give --model-dir (a 2D model) or --boxes-from (a 3D model's predictions) with --sam-refine")
    if boxes_from is not None and sam_dir is None:
        raise SapError("--boxes-from needs --sam-refine SAM_DIR (the boxes are refined by SAM)")
    cases = find_inputs(input_path)
    out = Path(out_dir)
    for case_id, _ in cases:  # refuse before any work (SPEC §13)
        check_writable(out / f"{case_id}_prob.nii.gz", overwrite)
        check_writable(out / f"{case_id}_lesions.nii.gz", overwrite)
    if gt is not None:
        check_writable(out / "metrics2d.csv", overwrite)
    from sap.files import check_not_input

    boxes = [Path(boxes_from) / f"{c}_{kind}.nii.gz" for c, _ in cases for kind in ("lesions", "prob")] if boxes_from else []
    check_not_input([out / f"{c}_{kind}.nii.gz" for c, _ in cases for kind in ("prob", "lesions")],
                    [*(path for _, path in cases), *boxes])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model_dir(model_dir, device) if model_dir is not None else None
    prompter = None
    if sam_dir is not None:
        from sap.slice2d.models import load_hf_model
        from sap.slice2d.sam import SamPrompter

        prompter = SamPrompter(load_hf_model(sam_dir, "sam"), sam_family, device)
    window = model.window if model is not None else (400.0, 1800.0)
    cut = threshold if threshold is not None else (model.threshold if model is not None else 0.5)
    target = target or (model.target if model is not None else "lesions")
    written: list[Path] = []
    scores: list[dict[str, Any]] = []
    failures: list[str] = []
    for case_id, ct_path in tqdm(cases, desc="slice2d: predicting", unit="case", disable=not progress or len(cases) < 2):
        try:
            prob, image = _predict_case(
                ct_path, case_id, model, prompter, window, cut, boxes_from, expansion, crop_factor, device, progress
            )
            out.mkdir(parents=True, exist_ok=True)
            _write_outputs(prob, image.geometry, out, case_id, cut, overwrite)
            written.append(out / f"{case_id}_prob.nii.gz")
            if gt is not None:
                reference = _read_reference(Path(gt), case_id, target, image)
                scores.append({"case": case_id, **score_volume_slices(prob >= cut, reference, image.spacing)})
        except SapError as exc:
            failures.append(f"{case_id}: {exc}")
            print(f"sap slice2d predict: case {case_id} failed: {exc}", file=sys.stderr)
    if gt is not None and scores:
        _write_metrics(out / "metrics2d.csv", scores, overwrite)
    if failures:
        raise SapError(f"{len(failures)} of {len(cases)} case(s) failed ({'; '.join(failures)[:400]})")
    return written


def _predict_case(
    ct_path: Path,
    case_id: str,
    model: SliceModel | None,
    prompter: Any,
    window: tuple[float, float],
    cut: float,
    boxes_from: str | Path | None,
    expansion: float,
    crop_factor: float | None,
    device: str,
    progress: bool,
) -> tuple[np.ndarray, Any]:
    """Restacked probability (or refined mask) of one case and its image."""
    image = read_image(ct_path, dtype=np.float32)
    if prompter is None:
        return predict_volume(model, image.array, device=device), image
    instances = detector = None
    if boxes_from is not None:
        instances = _read_instances(Path(boxes_from), case_id, image, cut)
    else:
        detector = predict_volume(model, image.array, device=device) >= cut
    refined = refine_volume(prompter, image.array, window, detector, instances, expansion, crop_factor, progress)
    prob = refined.astype(np.float32)
    return prob, image


METRIC_FIELDS = ("case", "dice", "iou", "hd95_mm", "nhd", "volume_dice", "n_slices", "n_both_empty", "n_distance_undefined")


def _write_metrics(path: Path, rows: list[dict[str, Any]], overwrite: bool) -> None:
    import csv
    import io
    import math

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(METRIC_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, text.getvalue(), overwrite=overwrite)


def _read_reference(folder: Path, case_id: str, target: str, image: Any) -> np.ndarray:
    """The case's reference mask on the CT grid: lesions (``GT``) or bone (``skeleton`` > 0)."""
    from sap.data.cases import find_image

    stem = "GT" if target == "lesions" else "skeleton"
    candidates = [folder / f"{case_id}.nii.gz"] if target == "lesions" else []
    for base in (folder, folder / "patients", folder / "healthy"):
        found = find_image(base / case_id, stem) if (base / case_id).is_dir() else None
        if found is not None:
            candidates.append(found)
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise SapError(f"{folder}: no {stem} reference for case {case_id} (expected {case_id}/{stem}.nii.gz)")
    reference = read_image(path)
    problem = reference.geometry.same_grid(image.geometry)
    if problem is not None:
        raise SapError(f"{path} and {image.path} are on different grids ({problem})")
    return reference.array > 0


def _read_instances(folder: Path, case_id: str, image, threshold: float) -> np.ndarray:
    """The 3D model's lesion components of a case on the CT grid (instance map or thresholded probability)."""
    for name, is_instances in ((f"{case_id}_lesions.nii.gz", True), (f"{case_id}_prob.nii.gz", False), (f"{case_id}.nii.gz", False)):
        path = folder / name
        if path.is_file():
            pred = read_image(path)
            problem = pred.geometry.same_grid(image.geometry)
            if problem is not None:
                raise SapError(f"{path} and {image.path} are on different grids ({problem})")
            if is_instances:
                return pred.array.astype(np.int64)
            return cc3d.connected_components(pred.array >= threshold, connectivity=26).astype(np.int64)
    raise SapError(f"{folder}: no {case_id}_lesions.nii.gz or {case_id}_prob.nii.gz for case {case_id}")


def score_restacked_volumes(
    cases: list[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]], threshold: float = 0.5
) -> tuple[list[Any], dict[str, Any]]:
    """Score restacked 2D predictions with the 3D lesion rules of SPEC §9, so 2D and 3D models share a table.

    ``cases``: (case id, restacked probability (X, Y, Z), ground-truth mask (X, Y, Z), spacing mm).
    Calls :func:`sap.metrics.evaluate_case` per case and :func:`sap.metrics.summarize` (no second
    copy of the rules); returns (per-case results, summary). ``sap evaluate --pred OUT`` does the
    same from the files ``predict`` writes.
    """
    from sap.metrics import EvaluationSettings, evaluate_case, summarize

    settings = EvaluationSettings(threshold=threshold)
    results = [evaluate_case(prob, gt, spacing, settings, case_id) for case_id, prob, gt, spacing in cases]
    return results, summarize(results, settings)
