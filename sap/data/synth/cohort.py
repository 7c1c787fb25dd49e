"""Write a synthetic cohort: case folders, ``subjects.csv`` per group and ``cohort.json`` (SPEC §2, §3).

Layout::

    OUT/healthy/healthy_s01_e1/{T1,b1000}.nii.gz + skeleton.nii.gz     (CT mode: CT.nii.gz)
    OUT/patients/patient_001/{T1,b1000}.nii.gz + GT.nii.gz + skeleton.nii.gz
    OUT/healthy/subjects.csv, OUT/patients/subjects.csv                  (case_id,subject_id)
    OUT/cohort.json

Determinism: every random choice of an exam comes from a generator seeded by (seed, group,
subject, exam), and cohort-level plans (lesion counts and volumes, mimics) are drawn once in the
parent process, so any number of workers writes byte-identical files. The cohort is written into a
temporary sibling folder and renamed into place at the end: an interrupted run leaves no
half-written cohort, and an existing one is replaced only with ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap import __version__
from sap.data.io import Geometry, make_geometry, write_image
from sap.data.synth.exam import (
    CHANNELS,
    CT_PHENOTYPES,
    GROUP_CODES,
    AnatomySource,
    Exam,
    ExamJob,
    difficulty_generators,
    exam_generators,
    lesion_kinds,
)
from sap.data.synth.intensity import marrow_cellularity, render_ct, render_mr
from sap.data.synth.lesions import (
    Finding,
    Placer,
    bone_mimic_plan,
    burden_plan,
    mimic_plan,
    place_lesions,
    place_mimics,
    sample_lesion_volumes,
    split_volumes,
)
from sap.data.synth.phantom import ExamPose, Phantom, SubjectParams, T, build_phantom
from sap.data.synth.presets import Preset, get_preset
from sap.data.synth.shapes import Canvas
from sap.errors import SapError
from sap.files import atomic_write_text, staged_folder


def phantom_geometry(canvas: Canvas, spacing: tuple[float, float, float]) -> Geometry:
    """LPS geometry whose world coordinates are the phantom's body millimetres (LPS signs)."""
    shape = canvas.shape
    # In LPS order the first stored voxel is the canonical corner (x max, y max, z min).
    corner_ras = np.array(canvas.origin) + np.array([shape[0] - 1, shape[1] - 1, 0]) * np.array(spacing)
    origin_lps = (-corner_ras[0], -corner_ras[1], corner_ras[2])
    return make_geometry(shape, spacing, tuple(float(round(v, 4)) for v in origin_lps), "LPS")  # type: ignore[arg-type]


@dataclass
class PhantomExam:
    """The label side of a phantom exam: anatomy, lesion instances, mimics (no images yet)."""

    phantom: Phantom
    lesions: np.ndarray  #: int32 lesion instance ids (all zero for healthy exams)
    mimics: np.ndarray  #: uint8, 1 + index in MIMIC_KINDS
    lesion_findings: list[Finding]
    mimic_findings: list[Finding]


def phantom_exam(job: ExamJob) -> PhantomExam:
    """Anatomy, lesions and mimics of one phantom exam, without rendering or writing (fast).

    Tests use it to check lesion statistics on many patients without writing files.
    """
    subject_rng, pose_rng, placement_rng, _ = exam_generators(job)
    preset = job.preset
    phantom = build_phantom(preset.grid, preset.spacing, SubjectParams.sample(subject_rng), ExamPose.sample(pose_rng))
    lesions = np.zeros(preset.grid, dtype=np.int32)
    mimics = np.zeros(preset.grid, dtype=np.uint8)
    lesion_findings: list[Finding] = []
    mimic_findings: list[Finding] = []
    if job.group == "patients":
        placer = Placer(phantom.bone, preset.spacing, placement_rng)
        kinds = lesion_kinds(job, placement_rng)
        lesion_findings = place_lesions(
            placer, lesions, list(job.lesion_volumes_ml), kinds, rib_max_ml=1.5 * preset.lesion_volume_scale
        )
        soft = phantom.tissue == T["visceral_fat"]
        mimic_findings = place_mimics(placer, mimics, dict(job.mimics), soft, scale=preset.lesion_volume_scale)
        difficulty = preset.difficulty
        if difficulty.low_contrast_fraction > 0 and lesion_findings:
            contrast_rng = difficulty_generators(job)[0]
            low = contrast_rng.random(len(lesion_findings)) < difficulty.low_contrast_fraction
            factors = contrast_rng.uniform(*difficulty.low_contrast_range, size=len(lesion_findings))
            for finding, is_low, factor in zip(lesion_findings, low, factors, strict=True):
                finding.contrast = round(float(factor), 3) if is_low else 1.0
    return PhantomExam(phantom, lesions, mimics, lesion_findings, mimic_findings)


def difficulty_maps(job: ExamJob, bone: np.ndarray, lesion_findings: list[Finding]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(lesion contrast per lesion id, marrow cellularity) for rendering; None where the feature is off."""
    difficulty = job.preset.difficulty
    contrast = None
    if difficulty.low_contrast_fraction > 0 and lesion_findings:
        contrast = np.ones(max(f.label for f in lesion_findings) + 1, dtype=np.float32)
        for finding in lesion_findings:
            contrast[finding.label] = finding.contrast
    cellularity = None
    if difficulty.marrow_variation > 0:
        cellularity = marrow_cellularity(bone, difficulty_generators(job)[1], difficulty.marrow_variation)
    return contrast, cellularity


def synthesize_exam(job: ExamJob) -> Exam:
    """Build one exam in memory (no files). Deterministic in ``job``."""
    if job.source is not None:
        from sap.data.synth.anatomy import synthesize_real_exam

        return synthesize_real_exam(job)
    labelled = phantom_exam(job)
    render_rng = exam_generators(job)[3]
    phantom, lesions, mimics = labelled.phantom, labelled.lesions, labelled.mimics
    lesion_findings, mimic_findings = labelled.lesion_findings, labelled.mimic_findings
    preset = job.preset
    contrast, cellularity = difficulty_maps(job, phantom.bone, lesion_findings)
    if job.modality == "ct":
        images = {"CT": render_ct(phantom.tissue, phantom.bone, phantom.cortex, lesions, [f.kind for f in lesion_findings],
                                  mimics, render_rng, contrast, cellularity)}
    else:
        t1, dwi = render_mr(phantom.tissue, phantom.bone, phantom.cortex, lesions, mimics, render_rng, contrast, cellularity)
        images = {"T1": t1, "b1000": dwi}
    return Exam(
        job=job,
        geometry=phantom_geometry(phantom.canvas, preset.spacing),
        images=images,
        skeleton=phantom.skeleton,
        lesions=lesions if job.group == "patients" else None,
        lesion_findings=lesion_findings,
        mimic_findings=mimic_findings,
    )


def _finding_record(finding: Finding, geometry: Geometry, voxel_ml: float, index: int, contrast: bool = False) -> dict:
    centroid = geometry.voxel_to_lps(np.asarray(finding.centroid_ijk))[0]
    extra = {"contrast": finding.contrast} if contrast else {}
    return extra | {
        "id": index,
        "kind": finding.kind,
        "volume_ml": round(finding.n_voxels * voxel_ml, 4),
        "n_voxels": finding.n_voxels,
        "region": finding.region,
        "centroid_lps_mm": [round(float(v), 2) for v in centroid],
    }


def write_exam(job: ExamJob, out: Path) -> dict:
    """Synthesise one exam, write its files under ``out/GROUP/CASE/`` and return its cohort.json record."""
    return write_synthesized(synthesize_exam(job), out)


def write_synthesized(exam: Exam, out: Path) -> dict:
    """Write an exam built in memory under ``out/GROUP/CASE/`` and return its cohort.json record."""
    job = exam.job
    folder = out / job.group / job.case_id
    for name, image in exam.images.items():
        write_image(image, exam.geometry, folder / f"{name}.nii.gz")
    write_image(exam.skeleton, exam.geometry, folder / "skeleton.nii.gz")
    if exam.lesions is not None:
        write_image((exam.lesions > 0).astype(np.uint8), exam.geometry, folder / "GT.nii.gz")
    voxel_ml = float(np.prod(exam.geometry.canonical_spacing)) / 1000.0
    record = {
        "case_id": job.case_id,
        "subject_id": job.subject_id,
        "group": job.group,
        "grid": list(exam.geometry.canonical_shape),
        "voxel_size_mm": [round(s, 4) for s in exam.geometry.canonical_spacing],
        "n_lesions": len(exam.lesion_findings),
        "lesions": [_finding_record(f, exam.geometry, voxel_ml, i, contrast=job.preset.difficulty.low_contrast_fraction > 0)
                    for i, f in enumerate(exam.lesion_findings, start=1)],
        "mimics": [_finding_record(f, exam.geometry, voxel_ml, i) for i, f in enumerate(exam.mimic_findings, start=1)],
    }
    if job.group == "patients":
        record["phenotype"] = job.phenotype
    if job.source is not None:
        record["anatomy_source"] = job.source.name
    return record


def plan_cohort(preset: Preset, modality: str, seed: int, sources: list[AnatomySource] | None = None) -> list[ExamJob]:
    """Every exam of the cohort, with cohort-level draws (burden, volumes, mimics) already made.

    Healthy subjects come first (``healthy_s01`` …), then one subject per patient; with real
    anatomy the sources are dealt to subjects in turn (so subjects share them when there are fewer).
    """
    rng = np.random.default_rng([seed, 0])
    jobs: list[ExamJob] = []

    def source_for(subject_number: int) -> AnatomySource | None:
        return None if not sources else sources[subject_number % len(sources)]

    for s, n_scans in enumerate(preset.scans_per_subject, start=1):
        for e in range(1, n_scans + 1):
            jobs.append(ExamJob(
                group="healthy", case_id=f"healthy_s{s:02d}_e{e}", subject_id=f"healthy_s{s:02d}",
                subject_index=s, exam_index=e, preset=preset, modality=modality, seed=seed,
                source=source_for(s - 1),
            ))
    counts = burden_plan(rng, preset.n_patients, preset.n_lesion_free, preset.max_lesions)
    volumes = split_volumes(sample_lesion_volumes(rng, sum(counts), preset.lesion_volume_scale), counts)
    mimics = mimic_plan(rng, preset.n_patients)
    if preset.difficulty.bone_mimics[1] > 0:
        # a generator of its own: the cohort's other draws do not depend on the feature
        in_bone = bone_mimic_plan(np.random.default_rng([seed, 15]), preset.n_patients, preset.difficulty.bone_mimics)
        mimics = [plan | extra for plan, extra in zip(mimics, in_bone, strict=True)]
    names, weights = zip(*CT_PHENOTYPES, strict=True)
    for p in range(1, preset.n_patients + 1):
        phenotype = str(rng.choice(names, p=weights)) if modality == "ct" else "metastasis"
        jobs.append(ExamJob(
            group="patients", case_id=f"patient_{p:03d}", subject_id=f"patient_{p:03d}",
            subject_index=p, exam_index=1, preset=preset, modality=modality, seed=seed,
            lesion_volumes_ml=tuple(volumes[p - 1]), phenotype=phenotype,
            mimics=tuple(sorted(mimics[p - 1].items())),
            source=source_for(len(preset.scans_per_subject) + p - 1),
        ))
    return jobs


def _run_jobs(jobs: list[ExamJob], out: Path, workers: int, writer=write_exam) -> Iterator[dict]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield writer(job, out)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        yield from pool.map(writer, jobs, [out] * len(jobs))


def cohort_files(meta: dict) -> set[str]:
    """Paths (relative, POSIX) of every file ``sap synth`` wrote into a cohort, from its
    ``cohort.json``: its ``files`` list, or for cohorts written before it was recorded, the files
    each case record implies (channels, skeleton, GT) and the ``subjects.csv`` of each group."""
    if isinstance(meta.get("files"), list):
        listed = {str(f) for f in meta["files"]}
    else:
        listed = set()
        channels = [str(c) for c in meta.get("channels", [])]
        for record in meta.get("cases", []):
            group, case = record.get("group"), record.get("case_id")
            names = [*channels, "skeleton"] + (["GT"] if group == "patients" else [])
            listed |= {f"{group}/{case}/{name}.nii.gz" for name in names}
        listed |= {f"{g}/subjects.csv" for g in GROUP_CODES}
    return listed | {"cohort.json"}


def _foreign_files(out: Path) -> list[Path]:
    """Entries of an existing cohort folder that ``sap synth`` did not write (its cache aside)."""
    from sap.data.cache import CACHE_NAME

    try:
        meta = json.loads((out / "cohort.json").read_text())
    except (OSError, ValueError) as exc:
        raise SapError(f"{out / 'cohort.json'}: cannot read it ({exc}); refusing to replace {out}") from exc
    listed = cohort_files(meta if isinstance(meta, dict) else {})
    folders = {str(Path(f).parent.as_posix()) for f in listed}
    folders |= {str(Path(f).parent.parent.as_posix()) for f in listed}
    foreign = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel == CACHE_NAME or rel.startswith(CACHE_NAME + "/"):
            continue  # sap's preprocessing cache of this cohort: stale once the cohort is replaced
        if path.is_dir() and not path.is_symlink():
            if rel not in folders:
                foreign.append(path)
        elif rel not in listed:
            foreign.append(path)
    # report a foreign folder once, not every file inside it
    return [p for p in foreign if not any(q in p.parents for q in foreign)]


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SapError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SapError(f"{out}: output folder exists and is not empty; pass --overwrite to replace it")
        if not (out / "cohort.json").is_file():
            raise SapError(f"{out}: not a sap cohort (no cohort.json); refusing to replace it, choose another --out")
        foreign = _foreign_files(out)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise SapError(f"{foreign[0]}: not written by sap synth (not listed in {out / 'cohort.json'}){more}; "
                           "--overwrite replaces only a cohort holding nothing else: move it away or choose "
                           "another --out")


def make_cohort(
    out: str | Path,
    preset: str = "demo",
    modality: str = "mr",
    anatomy: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    followup: bool = False,
    difficulty: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Write a synthetic cohort to ``out`` and return its path.

    ``preset``: tiny | demo | paper (see :data:`sap.data.synth.presets.PRESETS`). ``modality``: mr
    (T1 + b1000) or ct. ``anatomy``: a folder of real scans with TotalSegmentator labels instead of
    the procedural phantom. ``workers``: processes (default: up to 4, never more than the CPUs);
    results do not depend on it. ``followup``: each patient becomes a baseline and a follow-up
    exam (``patient_001_t0``, ``patient_001_t1``) with known lesion correspondences
    (:mod:`sap.data.synth.followup`, phantom only); the truth goes under ``followup`` in
    cohort.json. ``difficulty``: the difficulty features to keep switched on (a subset of the
    preset's, :data:`sap.data.synth.presets.DIFFICULTY_FEATURES`; ``[]`` for none; None: the
    preset's), for measuring what each feature does. Raises :class:`SapError` on bad arguments or
    an existing, non-empty ``out`` without ``overwrite``.
    """
    out = Path(out)
    chosen = get_preset(preset)
    if difficulty is not None:
        missing = sorted(set(difficulty) - set(chosen.difficulty.features))
        chosen = dataclasses.replace(chosen, difficulty=chosen.difficulty.only(list(difficulty)))
        if missing:
            raise SapError(f"--difficulty {','.join(missing)}: preset {chosen.name} has no such feature "
                           f"(its features: {', '.join(get_preset(preset).difficulty.features) or 'none'})")
    if chosen.difficulty.features and (anatomy is not None or followup):
        raise SapError(f"preset {chosen.name}: the difficulty features ({', '.join(chosen.difficulty.features)}) work "
                       "with the phantom cohort only, not with --anatomy or --followup; pass --difficulty none")
    if anatomy is not None and chosen.lesion_volume_scale != 1:
        # the scale compensates the phantom's coarse grid; real scans keep their own voxels
        chosen = dataclasses.replace(chosen, lesion_volume_scale=1.0)
    if modality not in CHANNELS:
        raise SapError(f"--modality {modality!r}: choose one of {', '.join(CHANNELS)}")
    if seed < 0:
        raise SapError(f"--seed {seed}: must be a non-negative integer")
    if anatomy is not None:
        from sap.files import check_not_input

        check_not_input([out], [anatomy], replaced_folder=True)
    _prepare_output(out, overwrite)
    sources = None
    if anatomy is not None:
        from sap.data.synth.anatomy import discover_sources, load_source

        sources = discover_sources(Path(anatomy), modality)
        for source in sources:
            # read and convert every source now: bad files fail before anything is written, and
            # forked workers inherit the loaded arrays instead of reading them again
            load_source(source)
    if followup and anatomy is not None:
        raise SapError("--followup works with the procedural phantom only (not with --anatomy)")
    jobs = plan_cohort(chosen, modality, seed, sources)
    writer = write_exam
    if followup:
        from sap.data.synth.followup import pair_jobs, write_any

        jobs, writer = pair_jobs(jobs), write_any
    n_subjects = len({job.subject_id for job in jobs})
    shared = bool(sources) and len(sources) < n_subjects
    if shared:
        warnings.warn(
            f"{anatomy}: {len(sources)} source scan(s) for {n_subjects} subjects; subjects share anatomy "
            "(recorded as shared_anatomy in cohort.json)",
            stacklevel=2,
        )
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise SapError(f"--workers {workers}: must be at least 1")

    # the finished cohort replaces an old one only once it is complete
    with staged_folder(out) as tmp:
        from tqdm.auto import tqdm

        records = list(tqdm(_run_jobs(jobs, tmp, workers, writer), total=len(jobs), desc="sap synth", unit="exam", disable=not progress))
        pairs = []
        if followup:
            pairs = [r["pair"] for r in records if "pair" in r]
            records = [exam for r in records for exam in r.get("exams", [r])]
        for group in GROUP_CODES:
            rows = [f"{r['case_id']},{r['subject_id']}" for r in records if r["group"] == group]
            atomic_write_text(tmp / group / "subjects.csv", "case_id,subject_id\n" + "".join(row + "\n" for row in rows))
        first = records[0]
        same_grid = all(r["grid"] == first["grid"] and r["voxel_size_mm"] == first["voxel_size_mm"] for r in records)
        cohort = {
            "preset": chosen.name,
            "modality": modality,
            "channels": list(CHANNELS[modality]),
            "seed": seed,
            "synthetic": True,
            "lesion_volume_scale": chosen.lesion_volume_scale,
            "sap_version": __version__,
            "voxel_size_mm": first["voxel_size_mm"] if same_grid else None,
            "grid": first["grid"] if same_grid else None,
            "anatomy": "phantom" if anatomy is None else str(Path(anatomy).resolve()),
            "shared_anatomy": shared,
            "n_healthy": sum(r["group"] == "healthy" for r in records),
            "n_patients": sum(r["group"] == "patients" for r in records),
            "n_lesions": sum(r["n_lesions"] for r in records),
            "cases": records,
            # every file written: --overwrite replaces a cohort only when it holds nothing else
            "files": sorted(
                [f"{g}/subjects.csv" for g in GROUP_CODES]
                + [p.relative_to(tmp).as_posix() for p in tmp.rglob("*.nii.gz")]
            ),
        }
        if followup:
            cohort["followup"] = pairs
        if chosen.difficulty.features or difficulty is not None:
            cohort["difficulty"] = chosen.difficulty.record()
        atomic_write_text(tmp / "cohort.json", json.dumps(cohort, indent=1, sort_keys=True) + "\n")
        _prepare_output(out, overwrite)  # re-check: someone may have written there meanwhile
    return out
