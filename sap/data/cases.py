"""Cases and cohorts: finding exams in the three accepted layouts (SPEC §2).

A :class:`Case` is one exam: ids, ordered channel files, optional lesion mask and skeleton.
A :class:`Cohort` holds healthy exams (skeletal pretraining) and patient exams (lesions).

Layouts, auto-detected per group folder or forced with ``data.layout``:

1. ``case_folders``: ``CASE/{T1,b1000}.nii.gz`` (names from ``data.channels``), ``GT.nii.gz``,
   ``skeleton.nii.gz``; optional ``subjects.csv`` (``case_id,subject_id``). Any channel may also be
   NRRD/MHA or a DICOM series folder of that name.
2. ``nnunet``: ``imagesTr/CASE_0000.nii.gz …``, ``labelsTr/CASE.nii.gz``, ``dataset.json``;
   ``data.label_kind`` says whether labels are lesions or skeletons.
3. ``datalist``: a MONAI datalist JSON ``{"training": [{"image": [...], "label": ...}]}``.

Discovery reads no voxel data; :mod:`sap.data.check` validates contents.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap.config import DataConfig
from sap.data.io import IMAGE_SUFFIXES, strip_image_suffix
from sap.errors import SapError

COHORT_FILE = "cohort.json"  #: what ``sap synth`` writes into every cohort it makes
LESION_NAMES = ("GT",)
SKELETON_NAMES = ("skeleton",)


def read_cohort_json(root: str | Path | None, strict: bool = True) -> dict[str, Any] | None:
    """``ROOT/cohort.json`` without its per-case records and file list; None when the cohort has none.

    An unreadable file is a :class:`SapError`, or None when not ``strict`` (a report still builds).
    """
    if not root:
        return None
    path = Path(root) / COHORT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        if not strict:
            return None
        raise SapError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        if not strict:
            return None
        raise SapError(f"{path}: not a JSON object")
    return {k: v for k, v in meta.items() if k not in ("cases", "files")}


@dataclass
class Case:
    """One exam. ``channels`` keeps the configured channel order."""

    case_id: str
    subject_id: str
    group: str  #: "healthy" | "patients"
    channels: dict[str, Path]
    lesions: Path | None = None
    skeleton: Path | None = None

    @property
    def files(self) -> list[Path]:
        """Every file of the case (channels, then labels)."""
        return [*self.channels.values(), *(p for p in (self.lesions, self.skeleton) if p is not None)]


@dataclass
class Cohort:
    healthy: list[Case] = field(default_factory=list)
    patients: list[Case] = field(default_factory=list)
    root: Path | None = None

    @property
    def cases(self) -> list[Case]:
        return [*self.healthy, *self.patients]

    def by_id(self) -> dict[str, Case]:
        return {case.case_id: case for case in self.cases}


def check_case_id(case_id: str, source: str | Path) -> str:
    """A case id becomes file and folder names (cache entries, predictions, outputs): it must be
    one path component. Refuses empty ids, ``.``/``..``, path separators and control characters,
    naming ``source`` (the file or folder the id came from)."""
    text = str(case_id)
    shown = text if len(text) <= 80 else text[:77] + "…"
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text or any(ord(ch) < 32 for ch in text):
        raise SapError(
            f"{source}: case id {shown!r} is not usable as a file name (one path component: no '/', '\\', "
            "'..' or control characters)"
        )
    return text


def broken_link(path: Path) -> bool:
    """True for a symbolic link whose target does not exist."""
    return path.is_symlink() and not path.exists()


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<any image suffix>`` or a DICOM series folder ``folder/stem/``.

    A broken symbolic link of that name is an error naming the link and its target.
    """
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
        if broken_link(candidate):
            raise SapError(f"{candidate}: broken symbolic link (its target {os.readlink(candidate)} does not exist)")
    candidate = folder / stem
    if candidate.is_dir():
        return candidate
    return None


def read_subjects(folder: Path) -> dict[str, str]:
    """``subjects.csv`` (``case_id,subject_id``) of a group folder; empty when absent."""
    path = folder / "subjects.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"case_id", "subject_id"} <= set(reader.fieldnames):
            raise SapError(f"{path}: needs the columns case_id,subject_id")
        mapping: dict[str, str] = {}
        for row in reader:
            if row["case_id"] in mapping and mapping[row["case_id"]] != row["subject_id"]:
                raise SapError(f"{path}: case {row['case_id']} listed with two subjects")
            mapping[row["case_id"]] = row["subject_id"]
    return mapping


def detect_layout(folder: Path) -> str:
    if (folder / "imagesTr").is_dir():
        return "nnunet"
    if folder.is_file() and folder.suffix == ".json":
        return "datalist"
    if any(p.suffix == ".json" and p.name != COHORT_FILE and _is_datalist(p) for p in folder.glob("*.json")):
        return "datalist"
    return "case_folders"


def _is_datalist(path: Path) -> bool:
    try:
        return "training" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def _case_folders(folder: Path, group: str, channels: list[str]) -> list[Case]:
    subjects = read_subjects(folder)
    cases = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = {name: find_image(case_dir, name) for name in channels}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            present = sorted(strip_image_suffix(p.name) for p in case_dir.iterdir())
            raise SapError(
                f"{case_dir}: missing channel {', '.join(missing)} (found: {', '.join(present) or 'nothing'}; "
                f"configured channels: {', '.join(channels)})"
            )
        lesions = next((p for p in (find_image(case_dir, n) for n in LESION_NAMES) if p), None)
        skeleton = next((p for p in (find_image(case_dir, n) for n in SKELETON_NAMES) if p), None)
        cases.append(
            Case(
                case_id=case_dir.name,
                subject_id=subjects.get(case_dir.name, case_dir.name),
                group=group,
                channels={name: path for name, path in found.items() if path is not None},
                lesions=lesions,
                skeleton=skeleton,
            )
        )
    return cases


def _nnunet(folder: Path, group: str, channels: list[str], label_kind: str) -> list[Case]:
    images = folder / "imagesTr"
    labels = folder / "labelsTr"
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        stem = strip_image_suffix(path.name)
        if "_" not in stem or not stem.rsplit("_", 1)[1].isdigit():
            continue
        case_id, index = stem.rsplit("_", 1)
        by_case.setdefault(case_id, {})[int(index)] = path
    subjects = read_subjects(folder)
    cases = []
    for case_id, files in sorted(by_case.items()):
        if sorted(files) != list(range(len(channels))):
            raise SapError(
                f"{images}: case {case_id} has channel files {sorted(files)}, expected 0…{len(channels) - 1} "
                f"for channels {', '.join(channels)}"
            )
        label = find_image(labels, case_id) if labels.is_dir() else None
        cases.append(
            Case(
                case_id=case_id,
                subject_id=subjects.get(case_id, case_id),
                group=group,
                channels={name: files[i] for i, name in enumerate(channels)},
                lesions=label if label_kind == "lesions" else None,
                skeleton=label if label_kind == "skeleton" else None,
            )
        )
    return cases


def _datalist(path: Path, group: str, channels: list[str], label_kind: str) -> list[Case]:
    if path.is_dir():
        path = next(p for p in sorted(path.glob("*.json")) if _is_datalist(p))
    try:
        entries = json.loads(path.read_text())["training"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise SapError(f"{path}: not a MONAI datalist ({exc})") from exc
    cases = []
    for index, entry in enumerate(entries):
        images = entry.get("image")
        images = [images] if isinstance(images, str) else images
        if not images or len(images) != len(channels):
            raise SapError(f"{path}: entry {index} has {len(images or [])} images, expected {len(channels)}")
        resolved = [(path.parent / p).resolve() for p in images]
        case_id = entry.get("case_id") or strip_image_suffix(Path(images[0]).name).removesuffix("_0000")
        check_case_id(str(case_id), f"{path} (entry {index})")
        label = (path.parent / entry["label"]).resolve() if entry.get("label") else None
        cases.append(
            Case(
                case_id=str(case_id),
                subject_id=str(entry.get("subject_id", case_id)),
                group=group,
                channels=dict(zip(channels, resolved, strict=True)),
                lesions=label if label_kind == "lesions" else None,
                skeleton=label if label_kind == "skeleton" else None,
            )
        )
    return cases


def discover_group(folder: Path, group: str, cfg: DataConfig) -> list[Case]:
    """Cases of one group folder in the configured (or detected) layout."""
    if not folder.exists():
        raise SapError(f"{folder}: folder not found")
    layout = detect_layout(folder) if cfg.layout == "auto" else cfg.layout
    # Healthy scans carry skeletons, patients lesions: that is what nnU-Net/datalist labels mean
    # unless the config says otherwise.
    label_kind = "skeleton" if group == "healthy" and cfg.label_kind == "lesions" else cfg.label_kind
    if layout == "case_folders":
        return _case_folders(folder, group, cfg.channels)
    if layout == "nnunet":
        return _nnunet(folder, group, cfg.channels, label_kind)
    return _datalist(folder, group, cfg.channels, label_kind)


def check_ids(cases: list[Case]) -> None:
    """Case ids that are not one path component, and case-id collisions, are errors before any
    work starts (SPEC §13)."""
    seen: dict[str, Case] = {}
    for case in cases:
        check_case_id(case.case_id, next(iter(case.channels.values()), case.case_id))
        if case.case_id in seen:
            first = seen[case.case_id]
            raise SapError(
                f"case id collision: {case.case_id!r} in {first.channels[next(iter(first.channels))].parent} "
                f"and {case.channels[next(iter(case.channels))].parent}"
            )
        seen[case.case_id] = case


def discover_cohort(cfg: DataConfig, require: tuple[str, ...] = ()) -> Cohort:
    """Find the healthy and patient exams of a cohort (no voxel data read).

    ``require`` names groups that must be present (``"healthy"``, ``"patients"``).
    """
    root = Path(cfg.root) if cfg.root else None
    healthy_dir = Path(cfg.healthy) if cfg.healthy else (root / "healthy" if root else None)
    patients_dir = Path(cfg.patients) if cfg.patients else (root / "patients" if root else None)
    if root is None and healthy_dir is None and patients_dir is None:
        raise SapError("no data: pass --data COHORT (or set data.root / data.healthy / data.patients)")
    if root is not None and not root.exists():
        raise SapError(f"{root}: cohort folder not found")
    cohort = Cohort(root=root)
    if healthy_dir is not None and healthy_dir.exists():
        cohort.healthy = discover_group(healthy_dir, "healthy", cfg)
    if patients_dir is not None and patients_dir.exists():
        cohort.patients = discover_group(patients_dir, "patients", cfg)
    for group in require:
        if not getattr(cohort, group):
            where = healthy_dir if group == "healthy" else patients_dir
            raise SapError(f"{where}: no {group} cases found")
    if not cohort.cases:
        raise SapError(f"{root}: no cases found (expected healthy/ and/or patients/ folders)")
    check_ids(cohort.cases)
    return cohort
