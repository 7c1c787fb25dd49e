"""Image appearance: tissue classes → MR (T1, b1000) or CT (HU) intensities.

MR follows whole-body MRI of adult bone marrow: on T1 fatty marrow and fat are bright, muscle
intermediate, metastases dark; on the b1000 diffusion image the background (fat, air) is suppressed,
normal marrow is dark and metastases are bright, as are spleen, kidneys, bowel and lymph nodes (the
false-positive mimics of the study). CT is in Hounsfield units with lytic (hypodense) or blastic
(hyperdense) lesions. Each exam gets its own gain, bias field (MR) and noise; images are stored as
int16, as scanners do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sap.data.synth.lesions import MIMIC_KINDS
from sap.data.synth.phantom import TISSUES
from sap.data.synth.shapes import smooth_noise

#: tissue → (T1, b1000) mean signal, arbitrary scanner units
MR_SIGNAL: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (900.0, 14.0),
    "muscle": (330.0, 40.0),
    "lung": (35.0, 6.0),
    "liver": (420.0, 60.0),
    "spleen": (370.0, 190.0),
    "kidney": (360.0, 170.0),
    "bladder": (120.0, 25.0),
    "bowel": (300.0, 140.0),
    "blood": (150.0, 15.0),
    "marrow": (650.0, 30.0),
    "cortex": (60.0, 5.0),
    "csf": (140.0, 45.0),
    "disc": (220.0, 35.0),
    "visceral_fat": (760.0, 12.0),
}
#: tissue → mean CT value (HU)
CT_HU: dict[str, float] = {
    "air": -1000.0, "fat": -95.0, "muscle": 50.0, "lung": -850.0, "liver": 60.0, "spleen": 50.0,
    "kidney": 35.0, "bladder": 8.0, "bowel": 20.0, "blood": 42.0, "marrow": 260.0, "cortex": 1300.0,
    "csf": 10.0, "disc": 80.0, "visceral_fat": -90.0,
}
#: marrow by bone value: red (haematopoietic) marrow of the axial skeleton is darker on T1 and less
#: fatty on CT than the yellow marrow of the long bones. Keys are bone values (phantom.bone).
MARROW_T1 = {1: 560.0, 2: 560.0, 3: 560.0, 4: 600.0, 5: 780.0, 6: 780.0, 7: 620.0, 8: 640.0, 9: 600.0, 10: 620.0, 11: 760.0}
MARROW_HU = {1: 320.0, 2: 300.0, 3: 290.0, 4: 260.0, 5: 200.0, 6: 210.0, 7: 280.0, 8: 320.0, 9: 300.0, 10: 340.0, 11: 220.0}

#: mimic kind → (T1, b1000) and HU
#: (difficulty feature ``bone_mimics``, ours) a healing fracture is marrow oedema: dark on T1,
#: moderately bright on b1000, like a low-contrast lesion; a treated sclerotic focus is very dark
#: on T1 and faintly bright on b1000 (T2 shine-through), dense on CT
MIMIC_MR = {"lymph_node": (330.0, 300.0), "haemangioma": (980.0, 70.0), "bone_island": (60.0, 8.0), "implant": (0.0, 0.0),
            "fracture": (280.0, 150.0), "sclerosis": (110.0, 95.0)}
MIMIC_HU = {"lymph_node": 40.0, "haemangioma": 90.0, "bone_island": 1000.0, "implant": 3500.0,
            "fracture": 620.0, "sclerosis": 780.0}
#: (difficulty feature ``marrow``, ours) fully cellular red marrow: T1 x (1 - 0.4), b1000 + 110
#: (restricted diffusion, up to low-contrast-lesion levels), CT + 90 HU
CELLULAR_T1_DROP = 0.4
CELLULAR_B1000_RISE = 110.0
CELLULAR_HU_RISE = 90.0


def marrow_cellularity(bone: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Regional marrow variation in [0, ``amplitude``] (0 outside bone): a level per bone (some
    bones hypercellular, some fatty) plus smooth patches a few centimetres across."""
    levels = np.zeros(int(bone.max()) + 1, dtype=np.float32)
    levels[1:] = rng.uniform(0.0, 0.6, size=levels.size - 1)
    patches = np.clip(smooth_noise(rng, bone.shape, coarse=5), 0.0, 1.0).astype(np.float32)
    cellularity = np.clip(levels[bone] + 0.8 * patches, 0.0, 1.0) * np.float32(amplitude)
    cellularity[bone == 0] = 0.0
    return cellularity


def _with_contrast(background: np.ndarray, target: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """Lesion signal at reduced contrast: the local marrow plus ``contrast`` of the full difference."""
    return background + contrast * (target - background)


def _lookup(table: dict[str, float]) -> np.ndarray:
    return np.array([table[name] for name in TISSUES], dtype=np.float32)


def _bone_values(bone: np.ndarray, table: dict[int, float], base: np.ndarray) -> np.ndarray:
    lookup = np.zeros(max(table) + 1, dtype=np.float32)
    for value, level in table.items():
        lookup[value] = level
    return np.where(bone > 0, lookup[bone], base).astype(np.float32)


def render_mr(
    tissue: np.ndarray,
    bone: np.ndarray,
    cortex: np.ndarray,
    lesions: np.ndarray,
    mimics: np.ndarray,
    rng: np.random.Generator,
    lesion_contrast: np.ndarray | None = None,
    cellularity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and b1000 images (int16, same shape as ``tissue``).

    ``bone``: bone value per voxel (0 none); ``cortex``: bool rim of the bones; ``lesions``: lesion
    instance ids (0 none); ``mimics``: 1 + index in :data:`MIMIC_KINDS` (0 none). Difficulty
    features (None: off, and the image is exactly as without them): ``lesion_contrast[i]`` is lesion
    i's contrast factor (index 0 unused); ``cellularity`` the marrow map of :func:`marrow_cellularity`.
    """
    shape = tissue.shape
    t1_table = np.array([MR_SIGNAL[n][0] for n in TISSUES], dtype=np.float32)
    dwi_table = np.array([MR_SIGNAL[n][1] for n in TISSUES], dtype=np.float32)
    t1 = _bone_values(bone, MARROW_T1, t1_table[tissue])
    dwi = dwi_table[tissue]
    # tissue texture and patchy marrow
    texture = smooth_noise(rng, shape, coarse=4)
    marrow_patches = smooth_noise(rng, shape, coarse=3)
    inside_bone = bone > 0
    t1 *= 1.0 + 0.05 * texture + np.where(inside_bone, 0.10 * marrow_patches, 0.0).astype(np.float32)
    dwi *= 1.0 + 0.15 * texture
    if cellularity is not None:
        t1 *= 1.0 - CELLULAR_T1_DROP * cellularity
        dwi += CELLULAR_B1000_RISE * cellularity
    # sub-voxel cortex: the rim is part marrow, part cortex
    t1[cortex] = 0.55 * t1[cortex] + 0.45 * MR_SIGNAL["cortex"][0]
    dwi[cortex] = 0.55 * dwi[cortex] + 0.45 * MR_SIGNAL["cortex"][1]
    if lesions.any():
        lesion = lesions > 0
        n = int(lesions.max())
        t1_levels = rng.uniform(140.0, 260.0, size=n + 1).astype(np.float32)
        dwi_levels = rng.uniform(230.0, 460.0, size=n + 1).astype(np.float32)
        heterogeneity = 1.0 + 0.15 * smooth_noise(rng, shape, coarse=2)
        t1_lesion = (t1_levels[lesions] * heterogeneity)[lesion]
        dwi_lesion = (dwi_levels[lesions] * heterogeneity)[lesion]
        if lesion_contrast is not None:
            contrast = lesion_contrast.astype(np.float32)[lesions[lesion]]
            t1_lesion = _with_contrast(t1[lesion], t1_lesion, contrast)
            dwi_lesion = _with_contrast(dwi[lesion], dwi_lesion, contrast)
        t1[lesion] = t1_lesion
        dwi[lesion] = dwi_lesion
    for index, kind in enumerate(MIMIC_KINDS):
        where = mimics == index + 1
        if where.any():
            t1[where], dwi[where] = MIMIC_MR[kind]
    t1 = ndimage.gaussian_filter(t1, 0.45)  # partial volume at the voxel scale
    dwi = ndimage.gaussian_filter(dwi, 0.7)
    bias = np.exp(0.18 * smooth_noise(rng, shape, coarse=24)).astype(np.float32)
    gains = rng.uniform(0.85, 1.15, size=2)
    t1 = rician(t1 * bias * gains[0], rng.uniform(10.0, 18.0), rng)
    dwi = rician(dwi * bias * gains[1], rng.uniform(4.0, 7.0), rng)
    return to_int16(t1), to_int16(dwi)


def render_ct(
    tissue: np.ndarray,
    bone: np.ndarray,
    cortex: np.ndarray,
    lesions: np.ndarray,
    lesion_kinds: list[str],
    mimics: np.ndarray,
    rng: np.random.Generator,
    lesion_contrast: np.ndarray | None = None,
    cellularity: np.ndarray | None = None,
) -> np.ndarray:
    """CT image in HU (int16). ``lesion_kinds[i - 1]`` is "lytic" or "blastic" for lesion id i;
    ``lesion_contrast`` and ``cellularity``: the difficulty features, as in :func:`render_mr`."""
    shape = tissue.shape
    hu = _bone_values(bone, MARROW_HU, _lookup(CT_HU)[tissue])
    texture = smooth_noise(rng, shape, coarse=3)
    hu += np.where(bone > 0, 40.0 * texture, 6.0 * texture).astype(np.float32)
    if cellularity is not None:
        hu += CELLULAR_HU_RISE * cellularity
    hu[cortex] = 0.5 * hu[cortex] + 0.5 * CT_HU["cortex"]  # the rim: cortex partial-volumed with marrow
    if lesions.any():
        n = int(lesions.max())
        levels = np.zeros(n + 1, dtype=np.float32)
        for i, kind in enumerate(lesion_kinds, start=1):
            levels[i] = rng.uniform(10.0, 70.0) if kind == "lytic" else rng.uniform(900.0, 1400.0)
        lesion = lesions > 0
        hu_lesion = levels[lesions][lesion] + 40.0 * smooth_noise(rng, shape, coarse=2)[lesion]
        if lesion_contrast is not None:
            hu_lesion = _with_contrast(hu[lesion], hu_lesion, lesion_contrast.astype(np.float32)[lesions[lesion]])
        hu[lesion] = hu_lesion
    hu = ndimage.gaussian_filter(hu, 0.4)
    # metal and bone islands are painted after the blur: their edges stay sharp and their HU intact
    for index, kind in enumerate(MIMIC_KINDS):
        where = mimics == index + 1
        if where.any():
            hu[where] = MIMIC_HU[kind]
    hu += rng.normal(0.0, rng.uniform(10.0, 22.0), size=shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071 + 1000).astype(np.int16)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise: the MR background is a noise floor, not zero."""
    real = signal + rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 32767).astype(np.int16)
