"""Synthetic whole-body cases for the patch-sampling benchmark (``bench_sampling.py``).

Each case: a body ellipsoid (2 channels, float32, values in [0, 1] inside the body, 0 outside), a
binary lesion mask with a given number of blobs of log-normal volume (median 0.5 mL, about a quarter
≥ 1 mL at the given spacing, as in SPEC §3), the body mask, and the 26-connected instance map used
to attribute patches to lesions. Written as ``.npy`` (the sap cache format, memory-mapped) and as
one 4-D ``.nii.gz`` image plus a ``.nii.gz`` label (what a MONAI ``LoadImaged`` pipeline reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np


def _blob(rng: np.random.Generator, n_voxels: int) -> np.ndarray:
    """A roughly ellipsoidal boolean blob holding about ``n_voxels`` voxels."""
    radius = max(0.6, (3 * n_voxels / (4 * np.pi)) ** (1 / 3))
    axes = radius * rng.uniform(0.75, 1.3, size=3)
    half = np.ceil(axes).astype(int) + 1
    grid = np.indices(2 * half + 1).astype(float) - half[:, None, None, None]
    return ((grid / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def make_case(
    shape: tuple[int, int, int], spacing_mm: float, n_lesions: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y, z = (np.arange(s, dtype=np.float32) for s in shape)
    centre = (np.array(shape, np.float32) - 1) / 2
    radii = np.array(shape, np.float32) * np.array([0.42, 0.40, 0.48], np.float32)
    body = (
        ((x[:, None, None] - centre[0]) / radii[0]) ** 2
        + ((y[None, :, None] - centre[1]) / radii[1]) ** 2
        + ((z[None, None, :] - centre[2]) / radii[2]) ** 2
    ) <= 1.0
    image = np.zeros((2, *shape), np.float32)
    noise = rng.random(shape, dtype=np.float32)
    image[0][body] = 0.4 + 0.2 * noise[body]
    image[1][body] = 0.2 + 0.1 * noise[body]
    lesions = np.zeros(shape, np.uint8)
    voxel_ml = spacing_mm**3 / 1000.0
    volumes_ml = rng.lognormal(mean=np.log(0.5), sigma=1.2, size=n_lesions)
    inside = np.argwhere(body[::4, ::4, ::4]) * 4
    placed = 0
    while placed < n_lesions:
        blob = _blob(rng, max(1, int(round(volumes_ml[placed] / voxel_ml))))
        corner = inside[rng.integers(len(inside))] - np.array(blob.shape) // 2
        if np.any(corner < 0) or np.any(corner + blob.shape > np.array(shape)):
            continue
        box = tuple(slice(c, c + s) for c, s in zip(corner, blob.shape, strict=True))
        if lesions[tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)].any():
            continue  # keep lesions apart so each blob is one instance
        lesions[box] |= blob.astype(np.uint8)
        placed += 1
    lesions &= body.astype(np.uint8)
    image[0][lesions > 0] = 0.1
    image[1][lesions > 0] = 0.9
    instances = cc3d.connected_components(lesions, connectivity=26).astype(np.int32)
    return {"image": image, "lesions": lesions, "body": body.astype(np.uint8), "instances": instances}


def write_cases(
    folder: Path,
    n_cases: int,
    shape: tuple[int, int, int],
    spacing_mm: float,
    n_lesions: list[int],
    seed: int,
) -> list[dict[str, str]]:
    """Write (or reuse) the benchmark cases; returns one dict of file paths per case.

    ``n_lesions`` gives the lesion count of each case in turn (repeated as needed), so a cohort mixes
    heavy-burden, light-burden and lesion-free exams as the study's patients do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "cases.json"
    settings = {
        "n_cases": n_cases,
        "shape": list(shape),
        "spacing": spacing_mm,
        "lesions": n_lesions,
        "seed": seed,
    }
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["settings"] == settings:
            return meta["cases"]
    affine = np.diag([spacing_mm] * 3 + [1.0])
    cases = []
    for number in range(n_cases):
        arrays = make_case(shape, spacing_mm, n_lesions[number % len(n_lesions)], seed + number)
        stem = folder / f"case{number}"
        entry = {}
        for name, array in arrays.items():
            np.save(f"{stem}_{name}.npy", array)
            entry[name] = f"{stem}_{name}.npy"
        nib.save(nib.Nifti1Image(np.moveaxis(arrays["image"], 0, -1), affine), f"{stem}_image.nii.gz")
        nib.save(nib.Nifti1Image(arrays["lesions"], affine), f"{stem}_label.nii.gz")
        entry["image_nii"] = f"{stem}_image.nii.gz"
        entry["label_nii"] = f"{stem}_label.nii.gz"
        entry["voxel_ml"] = spacing_mm**3 / 1000.0
        cases.append(entry)
    meta_path.write_text(json.dumps({"settings": settings, "cases": cases}, indent=1))
    return cases
