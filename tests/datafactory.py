"""Small on-disk cases for data-layer tests (written through sap's own writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sap.data.io import make_geometry, write_image


def write_case(
    folder: Path,
    shape=(16, 16, 20),
    spacing=(2.0, 2.0, 3.0),
    channels=("T1", "b1000"),
    lesions: np.ndarray | None | bool = True,
    skeleton: np.ndarray | None | bool = True,
    seed: int = 0,
    axcodes: str = "LPS",
) -> Path:
    """A case folder with random channels, a two-lesion mask and a skeleton with labels 0–3."""
    rng = np.random.default_rng(seed)
    geometry = make_geometry(shape, spacing, axcodes=axcodes)
    folder.mkdir(parents=True, exist_ok=True)
    for name in channels:
        image = rng.normal(100, 10, size=shape).astype(np.float32)
        image[:2] = 0  # some background so a body mask exists
        write_image(image, geometry, folder / f"{name}.nii.gz")
    if lesions is True:
        lesions = np.zeros(shape, np.uint8)
        lesions[3:5, 3:5, 3:5] = 1
        lesions[10:13, 10:12, 12:15] = 1
    if isinstance(lesions, np.ndarray):
        write_image(lesions, geometry, folder / "GT.nii.gz")
    if skeleton is True:
        skeleton = np.zeros(shape, np.uint8)
        skeleton[4:12, 4:12, :6] = 3
        skeleton[4:12, 4:12, 6:14] = 2
        skeleton[4:12, 4:12, 14:] = 1
    if isinstance(skeleton, np.ndarray):
        write_image(skeleton, geometry, folder / "skeleton.nii.gz")
    return folder


def write_cohort(root: Path, n_healthy: int = 3, n_patients: int = 6, shape=(16, 16, 20)) -> Path:
    """healthy/ (skeletons) and patients/ (lesion masks, one lesion-free) with subjects.csv."""
    for i in range(n_healthy):
        write_case(root / "healthy" / f"h{i}", shape=shape, lesions=None, seed=i)
    (root / "healthy").mkdir(parents=True, exist_ok=True)
    (root / "healthy" / "subjects.csv").write_text(
        "case_id,subject_id\n" + "".join(f"h{i},hs{i // 2}\n" for i in range(n_healthy))
    )
    for i in range(n_patients):
        lesions = np.zeros(shape, np.uint8)
        for j in range(i % 4):  # 0…3 lesions: heterogeneous burden, one lesion-free exam
            lesions[2 + 4 * j : 4 + 4 * j, 3:5, 3:5] = 1
        write_case(root / "patients" / f"p{i}", shape=shape, lesions=lesions, seed=100 + i)
    return root
