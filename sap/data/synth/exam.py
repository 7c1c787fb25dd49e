"""One synthetic exam: what a worker needs to build it, and what it builds (shared by the phantom
cohort and the real-anatomy mode, so :mod:`sap.data.synth.cohort` and
:mod:`sap.data.synth.anatomy` both import it and not each other)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sap.data.io import Geometry
from sap.data.synth.lesions import Finding
from sap.data.synth.presets import Preset


@dataclass(frozen=True)
class AnatomySource:
    """One real scan with TotalSegmentator labels (``sap synth --anatomy``)."""

    name: str
    image: str
    labels: str
    table: str  #: "total" or "total_mr"
    modality: str  #: "ct" or "mr"


GROUP_CODES = {"healthy": 1, "patients": 2}
CHANNELS = {"mr": ("T1", "b1000"), "ct": ("CT",)}
#: CT lesion phenotype per patient (prostate cancer metastases are often blastic)
CT_PHENOTYPES = (("lytic", 0.45), ("blastic", 0.35), ("mixed", 0.20))
#: share of a CT patient's lesions that are blastic, by phenotype: each lesion's kind is drawn on its
#: own, so a predominantly lytic patient also has the odd blastic lesion and the reverse, as patients
#: with mixed lytic/blastic metastases do (one kind per patient made the 2D training patients of the
#: demo cohort cover one kind and its validation patients the other; docs/cohort.md)
CT_BLASTIC_SHARE = {"lytic": 0.2, "blastic": 0.8, "mixed": 0.5}


@dataclass(frozen=True)
class ExamJob:
    """Everything one worker needs to build and write one exam (picklable)."""

    group: str  #: "healthy" | "patients"
    case_id: str
    subject_id: str
    subject_index: int
    exam_index: int
    preset: Preset
    modality: str
    seed: int
    lesion_volumes_ml: tuple[float, ...] = ()
    phenotype: str = "metastasis"  #: MR: "metastasis"; CT: "lytic" | "blastic" | "mixed"
    mimics: tuple[tuple[str, int], ...] = ()
    source: AnatomySource | None = None  #: the real scan in ``--anatomy`` mode


@dataclass
class Exam:
    """One synthesised exam in memory: canonical arrays, their geometry and what was placed."""

    job: ExamJob
    geometry: Geometry
    images: dict[str, np.ndarray]
    skeleton: np.ndarray
    lesions: np.ndarray | None  #: instance ids (patients), None for healthy exams
    lesion_findings: list[Finding] = field(default_factory=list)
    mimic_findings: list[Finding] = field(default_factory=list)


def exam_generators(job: ExamJob) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator, np.random.Generator]:
    """(subject, pose, placement, rendering) generators of one exam; the subject one is shared by its exams."""
    code = GROUP_CODES[job.group]
    subject = np.random.default_rng([job.seed, code, job.subject_index])
    pose, placement, rendering = (np.random.default_rng(s) for s in np.random.SeedSequence([job.seed, code, job.subject_index, job.exam_index]).spawn(3))
    return subject, pose, placement, rendering


def difficulty_generators(job: ExamJob) -> tuple[np.random.Generator, np.random.Generator]:
    """(lesion contrast, marrow variation) generators of one exam: streams of their own, so switching
    a difficulty feature on or off changes nothing else in the exam."""
    code = GROUP_CODES[job.group]
    contrast, marrow = np.random.SeedSequence([job.seed, code, job.subject_index, job.exam_index, 15]).spawn(2)
    return np.random.default_rng(contrast), np.random.default_rng(marrow)


def lesion_kinds(job: ExamJob, rng: np.random.Generator) -> list[str]:
    """Appearance class of each planned lesion: CT "lytic" or "blastic", each drawn with its
    patient's blastic share (:data:`CT_BLASTIC_SHARE`); MR "metastasis" for every lesion, without
    drawing from ``rng`` (MR cohorts do not depend on the CT mix)."""
    n = len(job.lesion_volumes_ml)
    share = CT_BLASTIC_SHARE.get(job.phenotype)
    if share is None:
        return [job.phenotype] * n
    return ["blastic" if u < share else "lytic" for u in rng.random(n)]
