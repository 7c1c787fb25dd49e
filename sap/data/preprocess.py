"""Reading a whole case with every rule of SPEC §2, and intensity preprocessing.

:func:`load_case` reads channels and labels, checks that they share one grid (or resamples onto
the first channel when ``data.resample_channels`` is set), rejects NaN/Inf voxels, non-binary lesion
masks and skeleton values outside 0–9, and returns canonical arrays. :func:`preprocess_case` adds
optional N4 bias-field correction, optional resampling to ``data.target_spacing``, a body mask and
per-channel intensity normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sap.config import DataConfig
from sap.data.cases import Case
from sap.data.io import Geometry, Image, from_sitk, read_image, to_sitk
from sap.data.labels import check_lesion_mask, check_skeleton
from sap.errors import SapError


@dataclass
class LoadedCase:
    """Canonical arrays of one case: ``image`` (C, X, Y, Z) float32, labels (X, Y, Z) uint8."""

    case: Case
    image: np.ndarray
    geometry: Geometry
    lesions: np.ndarray | None = None
    skeleton: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.canonical_spacing


def _resample_onto(image: Image, reference: Image, is_label: bool) -> np.ndarray:
    """``image`` resampled onto ``reference``'s grid (labels nearest, channels linear)."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    moving = to_sitk(image.array, image.geometry)
    fixed = to_sitk(np.zeros(reference.array.shape, np.uint8), reference.geometry)
    resampled = sitk.Resample(moving, fixed, sitk.Transform(), interpolator, 0.0, moving.GetPixelID())
    return from_sitk(resampled, reference.geometry)


def load_case(case: Case, cfg: DataConfig, n4: bool | None = None) -> LoadedCase:
    """Read every file of ``case`` onto one canonical grid, enforcing the reading rules.

    Raises :class:`SapError` naming the file(s) for unreadable files, grid mismatches (naming both
    files and the differing field), NaN/Inf voxels and invalid label values.
    """
    channel_paths = list(case.channels.values())
    reference_path = channel_paths[0]
    reference = read_image(reference_path)

    def on_grid(path: Path, is_label: bool) -> np.ndarray:
        """The file's canonical array on the reference grid."""
        image = reference if path == reference_path else read_image(path)
        problem = image.geometry.same_grid(reference.geometry)
        if problem is None:
            return image.array
        if not cfg.resample_channels:
            raise SapError(
                f"{path} and {reference_path} are on different grids ({problem}); "
                "set data.resample_channels: true to resample onto the first channel"
            )
        return _resample_onto(image, reference, is_label)

    channels = []
    for path in channel_paths:
        array = on_grid(path, is_label=False).astype(np.float32, copy=False)
        if not np.all(np.isfinite(array)):
            count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise SapError(f"{path}: {count} NaN/Inf voxels")
        if n4 if n4 is not None else cfg.n4:
            array = from_sitk(n4_correct(to_sitk(array, reference.geometry)), reference.geometry)
        channels.append(array)
    lesions = skeleton = None
    if case.lesions is not None:
        lesions = check_lesion_mask(on_grid(case.lesions, is_label=True), str(case.lesions), binarize=cfg.binarize)
    if case.skeleton is not None:
        skeleton = check_skeleton(on_grid(case.skeleton, is_label=True), str(case.skeleton))
    return LoadedCase(
        case=case,
        image=np.stack(channels).astype(np.float32, copy=False),
        geometry=reference.geometry,
        lesions=lesions,
        skeleton=skeleton,
    )


def n4_correct(image: sitk.Image, shrink: int = 4, iterations: int = 50) -> sitk.Image:
    """N4 bias-field correction (SimpleITK), fitted on a shrunken copy for speed."""
    shrunk = sitk.Shrink(image, [shrink] * 3)
    mask = sitk.OtsuThreshold(shrunk, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([iterations] * 3)
    corrector.Execute(shrunk, mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)


def body_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Body mask from the first channel: threshold, close, fill holes, keep the largest component.

    MR: above 5 % of the channel's 99th percentile; CT: above −500 HU.
    """
    first = image[0]
    if modality == "ct":
        mask = first > -500
    else:
        high = np.percentile(first, 99)
        mask = first > 0.05 * high if high > 0 else first > first.min()
    if not mask.any():
        return np.ones(first.shape, dtype=np.uint8)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    largest = cc3d.largest_k(mask.astype(np.uint8), k=1, connectivity=6)
    return (largest > 0).astype(np.uint8)


def normalise(
    image: np.ndarray, body: np.ndarray, cfg: DataConfig, out: np.ndarray | None = None
) -> np.ndarray:
    """Per-channel intensity normalisation (SPEC §2), float32 (C, X, Y, Z).

    ``percentile``: clip to the configured percentiles inside the body, scale to [0, 1];
    ``ct_window``: clip to the HU window, scale to [0, 1]; ``zscore``: zero mean, unit variance
    inside the body; ``none``: unchanged. ``out`` (float32, may be ``image`` itself) receives the
    result without a second full-size copy: whole-body inference keeps memory within SPEC §12.
    """
    if out is None:
        out = np.empty(image.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != image.shape:
        raise ValueError("out must be float32 with the image's shape")
    inside = body.astype(bool)
    if not inside.any():
        inside = np.ones(body.shape, dtype=bool)
    for c in range(image.shape[0]):
        channel, target = image[c], out[c]
        method = cfg.normalization
        if method == "ct_window" or (method == "percentile" and cfg.modality == "ct"):
            lo, hi = cfg.ct_window
            scale = hi - lo if hi > lo else 1.0
        elif method == "percentile":
            lo, hi = np.percentile(channel[inside], cfg.percentiles)
            scale = hi - lo if hi > lo else 1.0
        elif method == "zscore":
            values = channel[inside]
            lo, std = float(values.mean()), float(values.std())
            hi, scale = None, (std if std > 0 else 1.0)
        else:
            if target is not channel:
                target[...] = channel
            continue
        # float32 bounds: the clipped minimum then maps to exactly 0 and the maximum to exactly 1
        lo, scale = np.float32(lo), np.float32(scale)
        if hi is None:
            np.subtract(channel, lo, out=target, casting="unsafe")
        else:
            hi = np.float32(hi)
            scale = hi - lo if hi > lo else np.float32(1.0)
            np.clip(channel, lo, hi, out=target, casting="unsafe")
            target -= lo
        target /= scale
    return out


def resample_to_spacing(
    loaded: LoadedCase, target: list[float]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, tuple[float, float, float]]:
    """Resample canonical arrays to ``target`` spacing (mm, array axis order)."""
    zoom = np.asarray(loaded.spacing) / np.asarray(target, dtype=np.float64)
    image = np.stack([ndimage.zoom(c, zoom, order=1) for c in loaded.image]).astype(np.float32)
    lesions = None if loaded.lesions is None else ndimage.zoom(loaded.lesions, zoom, order=0)
    skeleton = None if loaded.skeleton is None else ndimage.zoom(loaded.skeleton, zoom, order=0)
    return image, lesions, skeleton, tuple(float(t) for t in target)  # type: ignore[return-value]


@dataclass
class PreprocessedCase:
    """What the cache stores: normalised image, labels, body mask, spacing, source geometry."""

    case: Case
    image: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    lesions: np.ndarray | None = None
    skeleton: np.ndarray | None = None


def preprocess_case(case: Case, cfg: DataConfig) -> PreprocessedCase:
    """Read, check, (N4,) (resample,) mask and normalise one case."""
    loaded = load_case(case, cfg)
    image, lesions, skeleton, spacing = loaded.image, loaded.lesions, loaded.skeleton, loaded.spacing
    if cfg.target_spacing is not None:
        image, lesions, skeleton, spacing = resample_to_spacing(loaded, cfg.target_spacing)
    body = body_mask(image, cfg.modality)
    return PreprocessedCase(
        case=case,
        image=normalise(image, body, cfg),
        body=body,
        spacing=spacing,
        geometry=loaded.geometry,
        lesions=lesions,
        skeleton=skeleton,
    )
