"""Real anatomy (``sap synth --anatomy DIR``): lesions simulated on real CT/MR with TotalSegmentator labels.

A source is a folder holding one image (``ct.*``, ``mr.*``, ``image.*`` or a ``dicom/`` series
folder, taken as CT; ``image.*`` is CT when it holds values below -500) and a TotalSegmentator label map named ``labels_totalseg*.nii[.gz]`` (``*_mr*`` → the
``total_mr`` table, otherwise ``total``). ``DIR`` may be such a folder or hold several of them. The
labels become SAP skeleton labels through :func:`sap.data.labels.convert_totalseg` (the ``total_mr``
table's single "vertebrae" class is read as lumbar spine, the usual coverage of abdominal MR); ribs
are lesion sites with region "rib/other".

Appearance: in CT mode the real HU are kept and lesions painted (lytic or blastic); in MR mode a
T1-like image is derived from the real CT (a piecewise-linear HU → T1 map keeps the real texture)
or taken from the real MR, and a b1000-like image from the labels (background suppressed, marrow
dark, spleen, kidneys and bowel bright). The source files are read, never copied.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from sap.data.io import Geometry, read_geometry, read_image
from sap.data.labels import convert_totalseg, default_class_map
from sap.data.synth.exam import AnatomySource, Exam, ExamJob, exam_generators, lesion_kinds
from sap.data.synth.lesions import Placer, place_lesions, place_mimics
from sap.data.synth.phantom import RIB
from sap.data.synth.shapes import smooth_noise
from sap.errors import SapError

IMAGE_STEMS = ("ct", "mr", "image")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
MR_VERTEBRAE_RULE = "lumbar"

#: TotalSegmentator class-name patterns → b1000 signal (bright organs are the DWI mimics)
B1000_ORGANS: tuple[tuple[str, float], ...] = (
    (r"spleen", 190.0),
    (r"kidney_(left|right)", 170.0),
    (r"(small_bowel|duodenum|colon|stomach)", 140.0),
    (r"liver", 60.0),
    (r"urinary_bladder", 25.0),
    (r"prostate", 120.0),
    (r"spinal_cord", 60.0),
    (r"lung.*", 5.0),
)


def _source_in(folder: Path) -> AnatomySource | None:
    labels = sorted(p for p in folder.glob("labels_totalseg*") if p.name.endswith((".nii.gz", ".nii")))
    if not labels:
        return None
    images = [p for stem in IMAGE_STEMS for suffix in IMAGE_SUFFIXES for p in [folder / f"{stem}{suffix}"] if p.is_file()]
    if not images and (folder / "dicom").is_dir():
        images = [folder / "dicom"]
    if not images:
        return None
    image = images[0]
    table = "total_mr" if "_mr" in labels[0].name else "total"
    if image.name.startswith("mr"):
        modality = "mr"
    elif image.name.startswith("ct") or image.is_dir():
        modality = "ct"
    else:  # image.*: CT holds air at about -1000 HU, MR has no negative values
        modality = "ct" if float(read_image(image).array.min()) < -500 else "mr"
    return AnatomySource(name=folder.name, image=str(image.resolve()), labels=str(labels[0].resolve()), table=table, modality=modality)


def discover_sources(folder: Path, modality: str) -> list[AnatomySource]:
    """Sources in ``folder`` (itself, or its immediate sub-folders), checked for matching grids.

    CT mode accepts only CT sources; MR mode uses every source. Raises :class:`SapError` when none
    is usable or an image and its labels lie on different grids.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SapError(f"{folder}: --anatomy folder not found")
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    sources = [s for s in (_source_in(c) for c in candidates) if s is not None]
    if modality == "ct":
        sources = [s for s in sources if s.modality == "ct"]
    if not sources:
        raise SapError(
            f"{folder}: no {'CT ' if modality == 'ct' else ''}scan with TotalSegmentator labels found "
            "(expected e.g. ct.nii.gz + labels_totalseg.nii.gz, itself or in sub-folders)"
        )
    for source in sources:
        difference = read_geometry(source.image).same_grid(read_geometry(source.labels))
        if difference is not None:
            raise SapError(f"{source.labels}: not on the grid of {source.image} ({difference})")
    return sources


@dataclass
class RealAnatomy:
    image: np.ndarray  #: float32, canonical
    labels: np.ndarray  #: TotalSegmentator values, canonical
    geometry: Geometry
    skeleton: np.ndarray  #: uint8 0–9
    bone: np.ndarray  #: uint8: skeleton values, RIB for ribs
    names: dict[int, str]


@lru_cache(maxsize=4)
def load_source(source: AnatomySource) -> RealAnatomy:
    """Read and convert one source (cached per process: several exams share it)."""
    image = read_image(source.image, dtype=np.float32)
    labels = read_image(source.labels).array
    table = default_class_map()[source.table]
    rule = MR_VERTEBRAE_RULE if source.table == "total_mr" else None
    skeleton = convert_totalseg(labels, table, vertebrae_rule=rule, source=source.labels)
    int_labels = labels.astype(np.int32)
    rib_values = [v for v, name in table.items() if name.startswith("rib_")]
    bone = skeleton.copy()
    bone[np.isin(int_labels, rib_values) & (skeleton == 0)] = RIB
    return RealAnatomy(image=image.array, labels=int_labels, geometry=image.geometry, skeleton=skeleton, bone=bone, names=table)


def _body_mask(anatomy: RealAnatomy, modality: str) -> np.ndarray:
    if modality == "ct":
        body = anatomy.image > -500
    else:
        body = anatomy.image > 0.1 * np.percentile(anatomy.image, 99)
    return ndimage.binary_opening(body, iterations=1)


def _organ_lookup(names: dict[int, str], table: tuple[tuple[str, float], ...]) -> np.ndarray:
    lookup = np.full(max(names) + 1, np.nan, dtype=np.float32)
    for value, name in names.items():
        for pattern, level in table:
            if re.fullmatch(pattern, name):
                lookup[value] = level
                break
    return lookup


def synthesize_real_exam(job: ExamJob) -> Exam:
    """One exam on real anatomy (see the module docstring); deterministic in ``job``."""
    from sap.data.synth.intensity import MIMIC_HU, MIMIC_MR, rician, to_int16
    from sap.data.synth.lesions import MIMIC_KINDS

    source = job.source
    if source is None:
        raise ValueError("synthesize_real_exam needs a job with an anatomy source")
    anatomy = load_source(source)
    _, pose_rng, placement_rng, render_rng = exam_generators(job)
    spacing = anatomy.geometry.canonical_spacing
    body = _body_mask(anatomy, source.modality)
    lesions = np.zeros(anatomy.image.shape, dtype=np.int32)
    mimics = np.zeros(anatomy.image.shape, dtype=np.uint8)
    lesion_findings, mimic_findings, kinds = [], [], []
    if job.group == "patients":
        placer = Placer(anatomy.bone, spacing, placement_rng)
        kinds = lesion_kinds(job, placement_rng)
        scale = job.preset.lesion_volume_scale
        lesion_findings = place_lesions(placer, lesions, list(job.lesion_volumes_ml), kinds, rib_max_ml=1.5 * scale)
        soft = (anatomy.labels == 0) & ndimage.binary_erosion(body, iterations=3) & (anatomy.bone == 0)
        plan = dict(job.mimics)
        if source.modality == "ct" and plan.get("implant"):
            plan["implant"] = 0  # real CT brings its own dense objects; do not add metal on top
        mimic_findings = place_mimics(placer, mimics, plan, soft, scale=scale)
    lesion = lesions > 0
    shape = anatomy.image.shape
    heterogeneity = smooth_noise(render_rng, shape, coarse=2)
    if job.modality == "ct":
        hu = anatomy.image.copy()
        if lesion.any():
            levels = np.zeros(int(lesions.max()) + 1, dtype=np.float32)
            for i, kind in enumerate([f.kind for f in lesion_findings], start=1):
                levels[i] = render_rng.uniform(10.0, 70.0) if kind == "lytic" else render_rng.uniform(900.0, 1400.0)
            hu[lesion] = levels[lesions][lesion] + 40.0 * heterogeneity[lesion]
        for index, kind in enumerate(MIMIC_KINDS):
            hu[mimics == index + 1] = MIMIC_HU[kind]
        hu = hu + render_rng.normal(0.0, render_rng.uniform(3.0, 8.0), size=shape).astype(np.float32)
        images = {"CT": np.clip(np.round(hu), -1024, 4071).astype(np.int16)}
    else:
        if source.modality == "ct":
            hu = anatomy.image
            t1 = np.interp(hu, [-1000, -200, -100, -30, 0, 60, 200, 400, 1200], [0, 820, 900, 480, 330, 350, 560, 640, 90]).astype(np.float32)
            base_dwi = np.interp(hu, [-1000, -200, -100, -30, 0, 80, 200, 1200], [0, 10, 14, 25, 40, 45, 30, 5]).astype(np.float32)
        else:
            scale = 900.0 / max(float(np.percentile(anatomy.image[body], 99)), 1e-6)
            t1 = anatomy.image * scale
            base_dwi = np.where(body, 40.0, 0.0).astype(np.float32)
        organ_levels = _organ_lookup(anatomy.names, B1000_ORGANS)
        organ = organ_levels[np.clip(anatomy.labels, 0, organ_levels.size - 1)]
        dwi = np.where(np.isnan(organ), base_dwi, organ).astype(np.float32)
        dwi[anatomy.bone > 0] = 30.0
        dwi *= 1.0 + 0.15 * smooth_noise(render_rng, shape, coarse=4)
        if lesion.any():
            n = int(lesions.max())
            # lesions replace marrow signal: a fraction of this scan's own marrow level on T1
            marrow_t1 = float(np.median(t1[anatomy.bone > 0])) if (anatomy.bone > 0).any() else 600.0
            t1_levels = (marrow_t1 * render_rng.uniform(0.25, 0.45, size=n + 1)).astype(np.float32)
            dwi_levels = render_rng.uniform(230.0, 460.0, size=n + 1).astype(np.float32)
            t1[lesion] = (t1_levels[lesions] * (1 + 0.15 * heterogeneity))[lesion]
            dwi[lesion] = (dwi_levels[lesions] * (1 + 0.15 * heterogeneity))[lesion]
        for index, kind in enumerate(MIMIC_KINDS):
            where = mimics == index + 1
            t1[where], dwi[where] = MIMIC_MR[kind]
        dwi = ndimage.gaussian_filter(dwi, 0.7)
        bias = np.exp(0.15 * smooth_noise(render_rng, shape, coarse=24)).astype(np.float32)
        gains = render_rng.uniform(0.85, 1.15, size=2)
        images = {
            "T1": to_int16(rician(t1 * bias * gains[0], render_rng.uniform(6.0, 12.0), render_rng)),
            "b1000": to_int16(rician(dwi * bias * gains[1], render_rng.uniform(4.0, 7.0), render_rng)),
        }
    # a few millimetres of table shift per exam; the voxels stay the source's
    shift = pose_rng.uniform(-3.0, 3.0, size=3)
    geometry = dataclasses.replace(anatomy.geometry, origin=tuple(round(o + d, 4) for o, d in zip(anatomy.geometry.origin, shift, strict=True)))
    return Exam(
        job=job,
        geometry=geometry,
        images=images,
        skeleton=anatomy.skeleton,
        lesions=lesions if job.group == "patients" else None,
        lesion_findings=lesion_findings,
        mimic_findings=mimic_findings,
    )
