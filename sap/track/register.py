"""Registration of the follow-up exam onto the baseline (SimpleITK): rigid → affine → optional
B-spline, restricted to the body, bone-weighted when both exams have skeleton labels.

The registered images are one channel of each exam, scaled to [0, 1] by their 1st–99th
percentiles inside the body. With skeleton labels on both sides, the bone (labels 1–9, smoothed
by one voxel) is added to that image with weight ``bone_weight``, so bone edges dominate the
metric (the lesions sit in bone, soft tissue moves with breathing). The metric (Mattes mutual
information, 32 bins, a fixed random sample of the baseline's body voxels, seeded) is evaluated
only inside the baseline's body mask. Each stage runs at shrink factors 4, 2, 1.

The result maps baseline points to follow-up points (ITK's convention for resampling the
follow-up into the baseline grid). Quality: the Dice of the bone (skeleton > 0) and the mean
per-region Dice after warping the follow-up skeleton, before (the scanner's own world
coordinates) and after; without skeletons, the final metric value. A registration that raises,
ends with a non-finite metric, or leaves the bone Dice below ``min_skeleton_dice`` is a
:class:`SapError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sap.data.io import Image, from_sitk, to_sitk
from sap.errors import SapError


@dataclass(frozen=True)
class RegistrationOptions:
    bspline: bool = False  #: add a B-spline stage after the affine one (slower)
    bspline_grid_mm: float = 100.0  #: B-spline control-point spacing (mm) *(ours)*
    bone_weight: float = 1.0  #: weight of the smoothed bone mask added to the image *(ours)*
    sampling: float = 0.15  #: fraction of body voxels sampled by the metric
    iterations: int = 100  #: per resolution level (rigid, affine)
    bspline_iterations: int = 25  #: per resolution level (B-spline)
    min_skeleton_dice: float = 0.5  #: below this bone Dice after registration: failure *(ours)*
    seed: int = 0


@dataclass
class Registration:
    transform: sitk.Transform
    stages: list[dict] = field(default_factory=list)  #: per stage: name, final metric, iterations
    bone_weighted: bool = False
    skeleton_dice_before: float | None = None
    skeleton_dice_after: float | None = None
    region_dice_after: float | None = None
    final_metric: float = float("nan")

    def record(self) -> dict:
        return {
            "stages": self.stages,
            "bone_weighted": self.bone_weighted,
            "final_metric": self.final_metric,
            "skeleton_dice_before": self.skeleton_dice_before,
            "skeleton_dice_after": self.skeleton_dice_after,
            "skeleton_region_dice_after": self.region_dice_after,
        }


def body_mask(array: np.ndarray) -> np.ndarray:
    """The body: voxels above a tenth of the 99th percentile, largest component, holes filled,
    closed by one voxel."""
    level = 0.1 * float(np.percentile(array, 99))
    mask = array > level
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    mask = labels == (1 + int(np.argmax(np.bincount(labels.reshape(-1))[1:])))
    mask = ndimage.binary_closing(mask, iterations=1)
    for k in range(mask.shape[2]):  # fill per axial slice: the body is closed in-plane
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def _feature(array: np.ndarray, body: np.ndarray, skeleton: np.ndarray | None, weight: float) -> np.ndarray:
    values = array[body] if body.any() else array.reshape(-1)
    lo, hi = np.percentile(values, [1, 99])
    out = np.clip((array.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    if skeleton is not None and weight > 0:
        out += weight * ndimage.gaussian_filter((skeleton > 0).astype(np.float32), 1.0)
    return out.astype(np.float32)


def _method(fixed_mask: sitk.Image, options: RegistrationOptions, iterations: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(options.sampling, options.seed)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _linear_stage(
    transform: sitk.Transform, name: str, learning_rate: float, min_step: float,
    fixed_mask: sitk.Image, fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions,
) -> dict:
    """Optimise ``transform`` in place by regular-step gradient descent (the rigid and affine
    stages differ only in their step sizes)."""
    method = _method(fixed_mask, options, options.iterations)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step,
                                                    numberOfIterations=options.iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    return _run(method, fixed, moving, name)


def _run(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, name: str) -> dict:
    try:
        method.Execute(fixed, moving)
    except RuntimeError as exc:
        reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown")
        raise SapError(f"registration failed at the {name} stage ({reason[:160]})") from exc
    value = float(method.GetMetricValue())
    if not np.isfinite(value):
        raise SapError(f"registration failed at the {name} stage (metric is {value})")
    return {"stage": name, "metric": value, "iterations": int(method.GetOptimizerIteration()),
            "stop": method.GetOptimizerStopConditionDescription()[:200]}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def warp_labels(moving: np.ndarray, moving_image: Image, fixed_image: Image, transform: sitk.Transform) -> np.ndarray:
    """A label array on the moving exam's grid resampled (nearest neighbour) onto the fixed grid."""
    source = to_sitk(moving, moving_image.geometry)
    reference = to_sitk(np.zeros(fixed_image.array.shape, dtype=np.uint8), fixed_image.geometry)
    warped = sitk.Resample(source, reference, transform, sitk.sitkNearestNeighbor, 0, source.GetPixelID())
    return from_sitk(warped, fixed_image.geometry)


def register(
    fixed: Image,
    moving: Image,
    fixed_skeleton: np.ndarray | None = None,
    moving_skeleton: np.ndarray | None = None,
    options: RegistrationOptions | None = None,
) -> Registration:
    """Register ``moving`` (follow-up) onto ``fixed`` (baseline); see the module docstring."""
    options = options or RegistrationOptions()
    weighted = fixed_skeleton is not None and moving_skeleton is not None and options.bone_weight > 0
    fixed_body, moving_body = body_mask(fixed.array), body_mask(moving.array)
    if not fixed_body.any() or not moving_body.any():
        raise SapError("registration failed: an exam has no body (blank image)")
    f_img = to_sitk(_feature(fixed.array, fixed_body, fixed_skeleton if weighted else None, options.bone_weight), fixed.geometry)
    m_img = to_sitk(_feature(moving.array, moving_body, moving_skeleton if weighted else None, options.bone_weight), moving.geometry)
    f_mask = to_sitk(ndimage.binary_dilation(fixed_body, iterations=2).astype(np.uint8), fixed.geometry)
    stages = []

    # rigid, started from the centres of mass of the two bodies
    rigid = sitk.CenteredTransformInitializer(
        to_sitk(fixed_body.astype(np.float32), fixed.geometry), to_sitk(moving_body.astype(np.float32), moving.geometry),
        sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    stages.append(_linear_stage(rigid, "rigid", 2.0, 1e-3, f_mask, f_img, m_img, options))

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    stages.append(_linear_stage(affine, "affine", 1.0, 1e-4, f_mask, f_img, m_img, options))
    transform: sitk.Transform = sitk.CompositeTransform([affine])

    if options.bspline:
        extent = np.asarray(f_img.GetSize()) * np.asarray(f_img.GetSpacing())
        mesh = [max(1, int(round(e / options.bspline_grid_mm))) for e in extent]
        bspline = sitk.BSplineTransformInitializer(f_img, mesh, order=3)
        method = _method(f_mask, options, options.iterations)
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([1, 0])
        method.SetMetricSamplingPercentage(min(options.sampling, 0.05), options.seed)
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-4, numberOfIterations=options.bspline_iterations,
                                    maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * options.bspline_iterations)
        method.SetMovingInitialTransform(affine)
        method.SetInitialTransform(bspline, inPlace=True)
        stages.append(_run(method, f_img, m_img, "bspline"))
        transform = sitk.CompositeTransform([affine, bspline])

    result = Registration(transform=transform, stages=stages, bone_weighted=weighted, final_metric=stages[-1]["metric"])
    if fixed_skeleton is not None and moving_skeleton is not None:
        identity = warp_labels(moving_skeleton, moving, fixed, sitk.Transform(3, sitk.sitkIdentity))
        warped = warp_labels(moving_skeleton, moving, fixed, transform)
        result.skeleton_dice_before = dice(fixed_skeleton > 0, identity > 0)
        result.skeleton_dice_after = dice(fixed_skeleton > 0, warped > 0)
        regions = [dice(fixed_skeleton == k, warped == k) for k in range(1, 10) if (fixed_skeleton == k).any()]
        result.region_dice_after = float(np.nanmean(regions)) if regions else None
        if not result.skeleton_dice_after >= options.min_skeleton_dice:
            raise SapError(
                f"registration failed: bone Dice after registration {result.skeleton_dice_after:.3f} is below "
                f"{options.min_skeleton_dice} (before: {result.skeleton_dice_before:.3f}); check that both exams "
                "show the same body part"
            )
    return result
