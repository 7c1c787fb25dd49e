"""Whole-body inference (SPEC §8): preprocessing as in training, the shared sliding-window engine,
lesion instances and tables, written in the source geometry.

* :func:`predict` is the notebook API: images (array, case or files) + model → probability map.
* :func:`infer_case` does one exam end to end; :func:`run_inference` a folder of exams, where a
  failing exam is reported and the others still finish.

Memory (SPEC §12): the input is read channel by channel by :func:`sap.data.preprocess.load_case`,
normalised one channel at a time in place, predicted by the engine (which stitches a single
float32 channel on the CPU) and released before the outputs are written, so the peak stays
within 3 × channels × voxels × 4 bytes for 2-channel inputs. A skeletal model (10 classes) adds
10 float32 volumes while it runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from sap import RESEARCH_USE_ONLY, __version__
from sap.config import DataConfig
from sap.data.cases import Case, check_case_id
from sap.data.io import Geometry, read_image, write_image
from sap.data.labels import check_skeleton
from sap.data.preprocess import body_mask, load_case, normalise, resample_to_spacing
from sap.errors import SapError, WriteError
from sap.files import atomic_write_text, check_not_input, folder_lock, publish_together
from sap.infer.inputs import InputCase, attach_skeletons, discover_inputs
from sap.infer.lesions import (
    LESION_COLUMNS,
    REGION_COLUMNS,
    lesion_instances,
    lesion_table,
    region_summary,
    to_csv,
)
from sap.infer.model import InferenceModel, load_model, same_preprocessing
from sap.memory import release_freed_memory
from sap.models.engine import sliding_window_predict

README_NAME = "README.txt"


@dataclass
class InferOptions:
    """Run settings; ``None`` takes the value stored with the model (its config's ``infer``
    section, its threshold and minimum volume)."""

    threshold: float | None = None
    min_volume_ml: float | None = None
    tta: bool | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    amp: bool | None = None
    device: str | None = None  #: where the network runs (default: CUDA when present, else CPU)
    series: str | None = None  #: DICOM SeriesInstanceUID to read where a folder holds several
    overwrite: bool = False
    dicom_seg: bool = False
    progress: bool = True


@dataclass
class CaseResult:
    case_id: str
    ok: bool
    outputs: list[Path] = field(default_factory=list)
    n_lesions: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class InferenceReport:
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        done = len(self.results) - len(self.failed)
        text = f"{done} of {len(self.results)} cases done"
        if self.failed:
            text += f", {len(self.failed)} failed: " + ", ".join(r.case_id for r in self.failed)
        return text


# ------------------------------------------------------------------------------------ settings
@dataclass
class _Settings:
    threshold: float
    min_volume_ml: float
    tta: bool
    overlap: float
    sw_batch_size: int
    amp: bool
    device: str | None


def _settings(model: InferenceModel, options: InferOptions) -> _Settings:
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = _Settings(
        threshold=float(pick(options.threshold, model.threshold)),
        min_volume_ml=float(pick(options.min_volume_ml, model.min_volume_ml)),
        tta=bool(pick(options.tta, model.infer.tta)),
        overlap=float(pick(options.overlap, model.infer.overlap)),
        sw_batch_size=int(pick(options.sw_batch_size, model.infer.sw_batch_size)),
        amp=bool(pick(options.amp, model.infer.amp)),
        device=options.device,
    )
    if not 0.0 <= settings.threshold <= 1.0:
        raise SapError(f"threshold {settings.threshold} is outside [0, 1]")
    if settings.min_volume_ml < 0:
        raise SapError(f"minimum lesion volume {settings.min_volume_ml} mL is negative")
    if not 0.0 <= settings.overlap < 1.0:
        raise SapError(f"window overlap {settings.overlap} is outside [0, 1)")
    if settings.sw_batch_size < 1:
        raise SapError(f"windows per batch {settings.sw_batch_size} must be at least 1")
    if settings.device is not None:
        check_device(settings.device)
    return settings


def check_device(text: str) -> torch.device:
    """``--device``: a torch device that exists on this machine (checked before any case is read)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SapError(f"--device {text[:40]!r}: not a device name; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SapError(f"--device {text}: no CUDA device on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise SapError(f"--device {text}: this machine has CUDA devices 0…{count - 1}")
    elif device.type not in ("cpu", "mps"):
        raise SapError(f"--device {text}: unsupported device type {device.type!r}; use cpu, cuda or cuda:N")
    return device


# ------------------------------------------------------------------------------------ preprocessing
@dataclass
class PreparedImage:
    """Network input ``image`` (C, X, Y, Z) float32 on the (possibly resampled) prediction grid,
    and how to map predictions back to the source grid ``geometry`` (canonical shape)."""

    image: np.ndarray
    geometry: Geometry
    resampled: bool


def prepare_image(case: Case, data: DataConfig) -> PreparedImage:
    """Read and normalise a case's channels exactly as training did (SPEC §2).

    Same reading rules (grid checks, NaN/Inf refusal, optional N4 and resampling onto the first
    channel) through :func:`sap.data.preprocess.load_case`; optional resampling to
    ``data.target_spacing``; body mask from the first channel; per-channel normalisation. Labels
    are not read.
    """
    unlabelled = dataclasses.replace(case, lesions=None, skeleton=None)
    loaded = load_case(unlabelled, data)
    geometry = loaded.geometry
    resampled = data.target_spacing is not None
    if resampled:
        image = resample_to_spacing(loaded, data.target_spacing)[0]  # type: ignore[arg-type]
    else:
        image = loaded.image
    del loaded
    body = body_mask(image, data.modality)
    for c in range(image.shape[0]):  # one channel at a time: no second full-size copy
        normalise(image[c : c + 1], body, data, out=image[c : c + 1])
    return PreparedImage(image=image, geometry=geometry, resampled=resampled)


def _back_to_source(array: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    """Resample a prediction from the target-spacing grid back to the source grid (corner-aligned
    like :func:`sap.data.preprocess.resample_to_spacing`)."""
    if array.shape == tuple(shape):
        return array
    zoom = np.asarray(shape, dtype=np.float64) / np.asarray(array.shape, dtype=np.float64)
    out = ndimage.zoom(array, zoom, order=order)
    if out.shape != tuple(shape):  # guard against rounding in zoom's output shape
        raise SapError(f"internal: resampled prediction has shape {out.shape}, expected {shape}")
    return out


# ------------------------------------------------------------------------------------ prediction
def _engine(
    model: InferenceModel, image: np.ndarray, settings: _Settings, output: str, progress: bool
) -> np.ndarray:
    """Mean over the model's networks of the engine's output (in place: one extra volume at most)."""
    total: np.ndarray | None = None
    for network in model.networks:
        result = sliding_window_predict(
            network,
            image,
            model.roi_size,
            overlap=settings.overlap,
            sw_batch_size=settings.sw_batch_size,
            output=output,
            tta=settings.tta,
            amp=settings.amp,
            sw_device=settings.device,
            progress=progress,
        )
        if total is None:
            total = result
        else:
            total += result
            del result
    assert total is not None
    if len(model.networks) > 1:
        total /= len(model.networks)
    if total.size and not (np.isfinite(total.min()) and np.isfinite(total.max())):  # NaN/Inf propagate
        raise SapError(
            f"{model.source}: the network's output holds NaN/Inf values; the model (or its input) is broken, "
            "no outputs written"
        )
    return total


def _as_model(model: InferenceModel | nn.Module | str | Path, roi_size: Sequence[int] | None) -> InferenceModel:
    if isinstance(model, InferenceModel):
        return model
    if isinstance(model, nn.Module):
        channels = ["image"]  # arrays carry no names; only used for arrays
        return InferenceModel.from_module(model, channels, roi_size=tuple(roi_size or (96, 96, 96)))
    return load_model(model)


def predict(
    images: np.ndarray | Case | str | Path | Sequence[str | Path] | Mapping[str, str | Path],
    model: InferenceModel | nn.Module | str | Path,
    *,
    tta: bool | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    amp: bool | None = None,
    device: str | None = None,
    roi_size: Sequence[int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Foreground probability of a lesion model on one exam, for notebooks.

    Args:
        images: either an array ``(C, X, Y, Z)`` already normalised (returned as-is to the
            network), or the exam's files: a :class:`Case`, one path (single-channel models), a
            list of paths in the model's channel order, or a ``{channel name: path}`` mapping.
            Files are read and normalised with the settings stored with the model.
        model: an :class:`InferenceModel`, a checkpoint or bundle path, or a torch module
            (``roi_size`` gives its window; default 96³; arrays only).
        tta, overlap, sw_batch_size, amp, device: override the model's stored inference settings.

    Returns float32 ``(X, Y, Z)``: for arrays, on the array's grid; for files, the canonical
    (RAS+) array of the first channel's grid, the orientation :func:`sap.data.io.read_image`
    gives (write it back with ``write_image(prob, read_image(path).geometry, …)``).
    """
    loaded = _as_model(model, roi_size)
    settings = _settings(
        loaded, InferOptions(tta=tta, overlap=overlap, sw_batch_size=sw_batch_size, amp=amp, device=device)
    )
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise SapError(f"predict: images must be (C, X, Y, Z), got shape {images.shape}")
        return _engine(loaded, images, settings, "foreground", progress)
    if isinstance(model, nn.Module):
        raise SapError("predict: a bare torch module takes normalised arrays; load a checkpoint to read files")
    case = _as_case(images, loaded.channels)
    prepared = prepare_image(case, loaded.data)
    prob = _engine(loaded, prepared.image, settings, "foreground", progress)
    return _back_to_source(prob, prepared.geometry.canonical_shape, order=1)


def _as_case(images: Any, channels: list[str]) -> Case:
    if isinstance(images, Case):
        return images
    if isinstance(images, Mapping):
        missing = [c for c in channels if c not in images]
        if missing:
            raise SapError(f"predict: no file for channel {', '.join(missing)} (model channels: {', '.join(channels)})")
        paths = {c: Path(images[c]) for c in channels}
    else:
        listed = [images] if isinstance(images, (str, Path)) else list(images)
        if len(listed) != len(channels):
            raise SapError(f"predict: {len(listed)} files for a model with channels {', '.join(channels)}")
        paths = {c: Path(p) for c, p in zip(channels, listed, strict=True)}
    first = next(iter(paths.values()))
    return Case(case_id=first.name, subject_id=first.name, group="patients", channels=paths)


def _skeleton_labels(
    item: InputCase,
    prepared: PreparedImage,
    skeletal: InferenceModel | None,
    lesion_model: InferenceModel,
    settings: _Settings,
    progress: bool,
) -> np.ndarray | None:
    """Skeleton labels (canonical, source grid) from the given file or the skeletal model."""
    geometry = prepared.geometry
    if item.skeleton is not None:
        image = read_image(item.skeleton)
        problem = image.geometry.same_grid(geometry)
        if problem is not None:
            first = next(iter(item.case.channels.values())) if item.case else "the image"
            raise SapError(f"{item.skeleton} and {first} are on different grids ({problem})")
        return check_skeleton(image.array, str(item.skeleton))
    if skeletal is None:
        return None
    if same_preprocessing(skeletal.data, lesion_model.data):
        image = prepared.image
    else:
        assert item.case is not None
        image = prepare_image(item.case, skeletal.data).image
    probs = _engine(skeletal, image, settings, "probabilities", progress)  # 10 × float32 per voxel
    labels = probs.argmax(axis=0).astype(np.uint8)
    del probs
    return _back_to_source(labels, geometry.canonical_shape, order=0)


# ------------------------------------------------------------------------------------ outputs
def output_names(case_id: str, regions: bool, dicom_seg: bool) -> list[str]:
    """Every file a case writes, so all can be checked before any is written."""
    names = [f"{case_id}_prob.nii.gz", f"{case_id}_lesions.nii.gz", f"{case_id}_lesions.csv"]
    if regions:
        names.append(f"{case_id}_regions.csv")
    if dicom_seg:
        names.append(f"{case_id}_seg.dcm")
    names.append(f"{case_id}_summary.json")
    return names


def _refuse_existing(out: Path, names: list[str], overwrite: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise SapError(f"{out / existing[0]}: output exists ({len(existing)} of this case's files); pass --overwrite to replace")


def write_readme(out: Path) -> None:
    """``OUT/README.txt``: what the files are, and "research use only" (written once)."""
    path = out / README_NAME
    if path.exists():
        return
    text = f"""sap infer outputs (sap {__version__})

{RESEARCH_USE_ONLY}
These maps and tables come from a research model. They are not a diagnosis and must be read
by a qualified radiologist together with the images.

Per case (CASE = the input's case id), all in the geometry of the input image:
  CASE_prob.nii.gz      lesion probability per voxel (float32, 0-1)
  CASE_lesions.nii.gz   lesion instances: 0 = background, 1..n = lesions, 1 = largest
  CASE_lesions.csv      one row per lesion: {", ".join(LESION_COLUMNS)}[, region]
                        volume in mL; centroid in LPS millimetres (DICOM/ITK patient coordinates:
                        x towards the patient's left, y posterior, z superior)
  CASE_regions.csv      with skeleton labels: {", ".join(REGION_COLUMNS)}
                        per reading region (nine skeletal regions + rib/other)
  CASE_seg.dcm          with --dicom-seg: DICOM SEG of the lesions on the source series
  CASE_summary.json     threshold, minimum volume, model, settings, lesion count
"""
    try:
        atomic_write_text(path, text, overwrite=False)
    except SapError:  # written meanwhile by a parallel run: same content
        pass


def _case_outputs(item: InputCase, options: InferOptions, skeletal: InferenceModel | None) -> list[str]:
    regions = item.skeleton is not None or skeletal is not None
    return output_names(item.case_id, regions, options.dicom_seg and item.dicom_series is not None)


def check_inputs_are_not_outputs(
    item: InputCase, out: Path, model: InferenceModel, options: InferOptions, skeletal: InferenceModel | None
) -> None:
    """Refuse a case whose outputs would replace one of its inputs (image, skeleton, model)."""
    if item.case is None:
        return
    models = [Path(m.source) for m in (model, skeletal) if m is not None]
    check_not_input([out / name for name in _case_outputs(item, options, skeletal)],
                    [*item.case.channels.values(), item.skeleton, *(m for m in models if m.exists())])


def infer_case(
    item: InputCase,
    out: Path,
    model: InferenceModel,
    options: InferOptions,
    skeletal: InferenceModel | None = None,
) -> CaseResult:
    """Predict one exam and write its outputs (see :func:`output_names`) into ``out``.

    Raises :class:`SapError` for anything wrong with this exam; nothing is written then.
    """
    start = time.perf_counter()
    if item.case is None:
        raise SapError(item.error or f"{item.case_id}: not a usable case")
    case_id = check_case_id(item.case_id, next(iter(item.case.channels.values())))
    regions = item.skeleton is not None or skeletal is not None
    dicom_seg = options.dicom_seg and item.dicom_series is not None
    if options.dicom_seg and not dicom_seg:
        print(f"sap infer: note: {case_id} is not a DICOM series input; no DICOM SEG written", file=sys.stderr)
    names = _case_outputs(item, options, skeletal)
    _refuse_existing(out, names, options.overwrite)
    check_inputs_are_not_outputs(item, out, model, options, skeletal)
    settings = _settings(model, options)

    data = model.data if options.series is None else dataclasses.replace(model.data, dicom_series=options.series)
    prepared = prepare_image(item.case, data)
    release_freed_memory()
    prob = _engine(model, prepared.image, settings, "foreground", options.progress)
    skeleton = _skeleton_labels(item, prepared, skeletal, model, settings, options.progress) if regions else None
    geometry = prepared.geometry
    del prepared  # the input is no longer needed: free it before post-processing and writing
    release_freed_memory()
    prob = _back_to_source(prob, geometry.canonical_shape, order=1)

    voxel_ml = float(np.prod(geometry.canonical_spacing)) / 1000.0
    instances, n = lesion_instances(prob, settings.threshold, settings.min_volume_ml, voxel_ml)
    rows = lesion_table(instances, n, prob, geometry, skeleton)
    columns = [*LESION_COLUMNS, *(["region"] if regions else [])]
    summary = {
        "case_id": case_id,
        "research_use_only": True,
        "note": RESEARCH_USE_ONLY,
        "inputs": {name: str(path) for name, path in item.case.channels.items()},
        "skeleton": str(item.skeleton) if item.skeleton else (skeletal.source if skeletal else None),
        "model": model.source,
        "n_models": len(model.networks),
        "threshold": settings.threshold,
        "min_volume_ml": settings.min_volume_ml,
        "tta": settings.tta,
        "overlap": settings.overlap,
        "n_lesions": n,
        "total_volume_ml": float(sum(float(r["volume_ml"]) for r in rows)),
        "sap_version": __version__,
    }
    writers: dict[str, Any] = {
        f"{case_id}_prob.nii.gz": lambda p: write_image(prob.astype(np.float32, copy=False), geometry, p),
        f"{case_id}_lesions.nii.gz": lambda p: write_image(instances, geometry, p),
        f"{case_id}_lesions.csv": lambda p: atomic_write_text(p, to_csv(rows, columns)),
    }
    if regions:
        writers[f"{case_id}_regions.csv"] = lambda p: atomic_write_text(p, to_csv(region_summary(rows), REGION_COLUMNS))
    if dicom_seg:
        from sap.infer.dicom_seg import write_dicom_seg

        assert item.dicom_series is not None
        writers[f"{case_id}_seg.dcm"] = lambda p: write_dicom_seg(instances, geometry, item.dicom_series, p, options.series)
    writers[f"{case_id}_summary.json"] = lambda p: atomic_write_text(
        p, json.dumps({**summary, "seconds": round(time.perf_counter() - start, 3)}, indent=2) + "\n"
    )
    # every file of the case is written into a staging folder, then all are renamed into place
    published = publish_together(out, writers, options.overwrite)
    return CaseResult(case_id, True, published, n, time.perf_counter() - start)


def run_inference(
    inputs: str | Path,
    out: str | Path,
    model: InferenceModel | str | Path,
    options: InferOptions | None = None,
    skeletal_model: InferenceModel | str | Path | None = None,
    skeleton: str | Path | None = None,
) -> InferenceReport:
    """Predict every exam under ``inputs`` into ``out`` (see :func:`sap.infer.inputs.discover_inputs`).

    ``skeletal_model`` (a 10-class checkpoint or bundle) or ``skeleton`` (a label file, or a folder
    with one per case) adds each lesion's skeletal region and the per-region summary. A failing
    exam is reported on stderr and in the returned report; the others still finish.
    """
    options = options or InferOptions()
    out = Path(out)
    lesion_model = model if isinstance(model, InferenceModel) else load_model(model, expect_kind="lesion")
    _settings(lesion_model, options)  # bad settings fail before any work
    if lesion_model.info.get("synthetic"):
        print(f"sap infer: warning: {lesion_model.source} was trained on synthetic data "
              f"({lesion_model.info['synthetic']}), not on patients: its outputs show the pipeline, not findings",
              file=sys.stderr)
    skeletal = None
    if skeleton is not None and skeletal_model is not None:
        raise SapError("pass either a skeletal model or skeleton labels, not both")
    if skeletal_model is not None:
        skeletal = (
            skeletal_model
            if isinstance(skeletal_model, InferenceModel)
            else load_model(skeletal_model, expect_kind="skeletal")
        )
        if skeletal.channels != lesion_model.channels:
            raise SapError(
                f"{skeletal.source}: skeletal model channels {skeletal.channels} differ from the lesion "
                f"model's {lesion_model.channels}"
            )
    cases = discover_inputs(inputs, lesion_model.channels)
    if skeleton is not None:
        attach_skeletons(cases, skeleton)
    if out.exists() and not out.is_dir():
        raise SapError(f"{out}: output exists and is not a folder")
    for item in cases:  # before any work: no output may replace an input
        check_inputs_are_not_outputs(item, out, lesion_model, options, skeletal)
    # the folder is created (and locked) when work starts, and holds README.txt once a case is done:
    # a run that finishes no case leaves no folder behind (the lock removes the one it created)
    with folder_lock(out):
        return _infer_all(cases, out, lesion_model, options, skeletal)


def _infer_all(
    cases: list[InputCase], out: Path, lesion_model: InferenceModel, options: InferOptions,
    skeletal: InferenceModel | None,
) -> InferenceReport:
    """Every case in turn; each is published whole (a killed run keeps the finished ones)."""
    from tqdm.auto import tqdm

    results: list[CaseResult] = []
    bar = tqdm(cases, desc="sap infer", unit="case", disable=not options.progress or len(cases) < 2, file=sys.stderr)
    for item in bar:
        bar.set_postfix_str(item.case_id)
        try:
            results.append(infer_case(item, out, lesion_model, options, skeletal))
        except (KeyboardInterrupt, SystemExit, WriteError):
            raise  # a full disk or an unwritable folder fails every later case too: stop here
        except Exception as exc:  # one bad exam must not stop the others
            message = str(exc) if isinstance(exc, SapError) else f"{type(exc).__name__}: {exc}"
            message = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
            if not message.startswith(str(item.case_id)) and item.case_id not in message:
                message = f"{item.case_id}: {message}"
            results.append(CaseResult(item.case_id, False, error=message))
            print(f"sap infer: case {item.case_id} failed: {message}", file=sys.stderr)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if results[-1].ok:
            write_readme(out)
    return InferenceReport(results)
