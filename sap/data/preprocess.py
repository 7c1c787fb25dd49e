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
from sap.data.io import Geometry, Image, ReadOptions, from_sitk, read_source_array, to_canonical, to_sitk
from sap.data.labels import check_lesion_mask, check_skeleton
from sap.errors import SapError
from sap.memory import release_freed_memory


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


def _resample_onto(image: Image, reference: Geometry, is_label: bool) -> np.ndarray:
    """``image`` resampled onto the ``reference`` grid (labels nearest, channels linear)."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    moving = to_sitk(image.array, image.geometry)
    fixed = to_sitk(np.zeros(reference.canonical_shape, np.uint8), reference)
    resampled = sitk.Resample(moving, fixed, sitk.Transform(), interpolator, 0.0, moving.GetPixelID())
    return from_sitk(resampled, reference)


def load_case(case: Case, cfg: DataConfig, n4: bool | None = None) -> LoadedCase:
    """Read every file of ``case`` onto one canonical grid, enforcing the reading rules.

    Raises :class:`SapError` naming the file(s) for unreadable files, grid mismatches (naming both
    files and the differing field), NaN/Inf voxels and invalid label values.

    Memory: each channel is copied from the file's array straight into its slot of the
    ``(C, X, Y, Z)`` float32 result (casting and reorienting on the way), so reading holds the
    result plus one channel as decoded from its file; no stacked or contiguous copies.
    """
    channel_paths = list(case.channels.values())
    reference_path = channel_paths[0]
    options = ReadOptions.of(cfg)
    reference_source, reference_geometry = read_source_array(reference_path, options)

    def on_grid(path: Path, is_label: bool) -> np.ndarray:
        """The file's canonical array on the reference grid (a view where possible)."""
        nonlocal reference_source
        if path == reference_path and reference_source is not None:
            source, geometry = reference_source, reference_geometry
            reference_source = None  # the slot copy is kept; the file's array can go
        else:
            source, geometry = read_source_array(path, options)
        problem = geometry.same_grid(reference_geometry)
        if problem is None:
            return to_canonical(source, geometry)
        if not cfg.resample_channels:
            raise SapError(
                f"{path} and {reference_path} are on different grids ({problem}); "
                "set data.resample_channels: true to resample onto the first channel"
            )
        image = Image(np.ascontiguousarray(to_canonical(source, geometry)), geometry, str(path))
        return _resample_onto(image, reference_geometry, is_label)

    shape = reference_geometry.canonical_shape
    image = np.empty((len(channel_paths), *shape), dtype=np.float32)
    for c, path in enumerate(channel_paths):
        image[c] = on_grid(path, is_label=False)  # casts like astype(float32): too large → inf
        count = _non_finite(image[c])
        if count:
            raise SapError(f"{path}: {count} NaN/Inf voxels")
        if n4 if n4 is not None else cfg.n4:
            image[c] = from_sitk(n4_correct(to_sitk(image[c], reference_geometry)), reference_geometry)
    lesions = skeleton = None
    if case.lesions is not None:
        mask = np.ascontiguousarray(on_grid(case.lesions, is_label=True))
        lesions = check_lesion_mask(mask, str(case.lesions), binarize=cfg.binarize)
    if case.skeleton is not None:
        skeleton = check_skeleton(np.ascontiguousarray(on_grid(case.skeleton, is_label=True)), str(case.skeleton))
    return LoadedCase(case=case, image=image, geometry=reference_geometry, lesions=lesions, skeleton=skeleton)


def _non_finite(array: np.ndarray) -> int:
    """Number of NaN/Inf voxels, checked slab by slab (no full-size boolean mask)."""
    count = 0
    step = max(1, (1 << 22) // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        slab = array[start : start + step]
        count += int(slab.size - np.count_nonzero(np.isfinite(slab)))
    return count


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
    # = binary_closing(mask, iterations=2): single iterations take a few boolean volumes, where
    # scipy's iterated path keeps coordinate lists of ~10 (whole-body inference, SPEC §12)
    for _ in range(2):
        mask = ndimage.binary_dilation(mask)
    for _ in range(2):
        mask = ndimage.binary_erosion(mask)
    mask = ndimage.binary_fill_holes(mask)
    release_freed_memory()  # the fill's buffers, before the component labels are allocated
    largest = cc3d.largest_k(mask, k=1, connectivity=6, binary_image=True)
    del mask
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
        elif method == "percentile":
            # the masked copy is ours: let percentile partition it in place instead of copying again
            lo, hi = np.percentile(channel[inside], cfg.percentiles, overwrite_input=True)
        elif method == "zscore":
            values = channel[inside]
            lo, std = float(values.mean()), float(values.std())
            hi, scale = None, (std if std > 0 else 1.0)  # window bounds get their scale below
        else:
            if target is not channel:
                target[...] = channel
            continue
        # float32 bounds: the clipped minimum then maps to exactly 0 and the maximum to exactly 1
        lo = np.float32(lo)
        if hi is None:
            scale = np.float32(scale)
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
