"""Finding the exams to predict: a case folder, a file, a DICOM series folder or a folder of those.

Channels are matched by the names stored with the model (``T1``, ``b1000``, ``CT`` …): a case
folder holds ``T1.nii.gz`` and ``b1000.nii.gz`` (any image suffix, or a DICOM series folder of that
name; names compared case-insensitively). A single image file or a bare DICOM series folder is a
case only for single-channel models. In a folder of cases, nnU-Net style files
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` … are grouped into one case by channel index.

Discovery reads no voxel data. A sub-folder that is not a usable case becomes a failed
:class:`InputCase` (reported, the others still run); a top-level input that is unusable is a
:class:`SapError`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from sap.data.cases import Case, broken_link
from sap.data.io import IMAGE_SUFFIXES, strip_image_suffix
from sap.errors import SapError

#: output files that a folder of inputs may hold from an earlier run; never inputs
OUTPUT_SUFFIXES = ("_prob", "_lesions", "_skeleton")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


@dataclass
class InputCase:
    """One exam to predict: a :class:`Case`, or the reason it cannot be read (``error``).

    ``dicom_series`` is the DICOM series folder of the (single-channel) input, used for
    ``--dicom-seg``; ``skeleton`` a skeleton label file given for region attribution.
    """

    case_id: str
    case: Case | None = None
    error: str | None = None
    dicom_series: Path | None = None
    skeleton: Path | None = None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(IMAGE_SUFFIXES)


def is_dicom_series(folder: Path) -> bool:
    """True when ``folder`` directly holds the files of a DICOM series (GDCM finds one)."""
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files or any(p.name.endswith(IMAGE_SUFFIXES) for p in files):
        return False
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on folders without a series
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def find_channel(folder: Path, name: str) -> Path | None:
    """``folder/name.<image suffix>`` or the DICOM series folder ``folder/name/`` (case-insensitive)."""
    wanted = name.lower()
    exact, loose = None, None
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        stem = strip_image_suffix(path.name) if path.is_file() or broken_link(path) else path.name
        if broken_link(path) and stem.lower() == wanted:
            raise SapError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
        usable = _is_image_file(path) or (path.is_dir() and is_dicom_series(path))
        if not usable:
            continue
        if stem == name:
            exact = exact or path
        elif stem.lower() == wanted:
            loose = loose or path
    return exact or loose


def _folder_case(folder: Path, channels: list[str], case_id: str) -> InputCase:
    """A case folder (channels by name), or a bare DICOM series for single-channel models."""
    try:
        found = {name: find_channel(folder, name) for name in channels}
    except SapError as exc:  # a broken link: this case fails, the others still run
        return InputCase(case_id, error=str(exc))
    if all(found.values()):
        series = next((p for p in found.values() if p is not None and p.is_dir()), None)
        return InputCase(
            case_id,
            Case(case_id=case_id, subject_id=case_id, group="patients", channels=found),  # type: ignore[arg-type]
            dicom_series=series if len(channels) == 1 else None,
        )
    if len(channels) == 1 and is_dicom_series(folder):
        case = Case(case_id=case_id, subject_id=case_id, group="patients", channels={channels[0]: folder})
        return InputCase(case_id, case, dicom_series=folder)
    missing = [name for name, path in found.items() if path is None]
    present = sorted(strip_image_suffix(p.name) for p in folder.iterdir() if not p.name.startswith("."))
    return InputCase(
        case_id,
        error=(
            f"{folder}: missing channel {', '.join(missing)} (found: {', '.join(present) or 'nothing'}; "
            f"the model expects {', '.join(channels)})"
        ),
    )


def _file_case(path: Path, channels: list[str]) -> InputCase:
    case_id = strip_image_suffix(path.name)
    if len(channels) != 1:
        return InputCase(
            case_id,
            error=(
                f"{path}: a single image, but the model expects {len(channels)} channels "
                f"({', '.join(channels)}); pass a case folder with one file per channel"
            ),
        )
    return InputCase(case_id, Case(case_id=case_id, subject_id=case_id, group="patients", channels={channels[0]: path}))


def _is_output(name: str) -> bool:
    return strip_image_suffix(name).endswith(OUTPUT_SUFFIXES)


def _collection(folder: Path, channels: list[str]) -> list[InputCase]:
    cases: list[InputCase] = []
    grouped: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if any(p for p in path.iterdir() if not p.name.startswith(".")):
                cases.append(_folder_case(path, channels, path.name))
            continue
        if not _is_image_file(path) or _is_output(path.name):
            continue
        match = _NNUNET_CHANNEL.match(strip_image_suffix(path.name))
        if match and len(channels) > 1:
            grouped.setdefault(match["case"], {})[int(match["index"])] = path
        else:
            cases.append(_file_case(path, channels))
    for case_id, files in sorted(grouped.items()):
        if sorted(files) != list(range(len(channels))):
            cases.append(
                InputCase(
                    case_id,
                    error=(
                        f"{folder}: case {case_id} has channel files {sorted(files)}, expected "
                        f"0…{len(channels) - 1} for {', '.join(channels)}"
                    ),
                )
            )
        else:
            mapping = {name: files[i] for i, name in enumerate(channels)}
            cases.append(InputCase(case_id, Case(case_id=case_id, subject_id=case_id, group="patients", channels=mapping)))
    return cases


def discover_inputs(path: str | Path, channels: list[str]) -> list[InputCase]:
    """The cases under ``path`` for a model with input ``channels`` (in order).

    Raises :class:`SapError` when ``path`` does not exist, holds no case at all, a single input
    does not fit the model, or two inputs share a case id.
    """
    path = Path(path)
    if not path.exists():
        raise SapError(f"{path}: input not found")
    if path.is_file():
        if not _is_image_file(path):
            raise SapError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)")
        single = _file_case(path, channels)
        if single.error:
            raise SapError(single.error)
        return [single]
    as_case = _folder_case(path, channels, path.name)
    if as_case.case is not None:
        return [as_case]
    if len(channels) > 1 and any(find_channel(path, name) is not None for name in channels):
        # a case folder holding some channels but not all: one error for the case, not one
        # "single image" failure per file
        raise SapError(as_case.error or f"{path}: missing channels")
    cases = _collection(path, channels)
    if not cases:
        raise SapError(
            f"{path}: no cases found (expected a case folder with {', '.join(channels)}, an image, a DICOM "
            "series folder, or a folder of those)"
        )
    seen: dict[str, InputCase] = {}
    for item in cases:
        if item.case_id in seen:
            raise SapError(f"{path}: case id collision: {item.case_id!r} appears twice (a file and a folder?)")
        seen[item.case_id] = item
    return cases


def attach_skeletons(cases: list[InputCase], skeleton: str | Path) -> None:
    """Give each case its skeleton label file from ``skeleton``.

    ``skeleton`` is a label file (one input case only) or a folder holding ``CASE.nii.gz``,
    ``CASE_skeleton.nii.gz`` or ``CASE/skeleton.nii.gz`` (any image suffix) per case; the input
    folder itself works when its case folders hold ``skeleton.nii.gz``. A case without one fails
    (reported) rather than silently losing its regions.
    """
    skeleton = Path(skeleton)
    if not skeleton.exists():
        raise SapError(f"{skeleton}: skeleton labels not found")
    if skeleton.is_file() or is_dicom_series(skeleton):
        if len(cases) != 1:
            raise SapError(f"{skeleton}: one skeleton file for {len(cases)} cases; pass a folder with one per case")
        cases[0].skeleton = skeleton
        return
    for item in cases:
        if item.case is None:
            continue
        candidates = [skeleton / f"{item.case_id}{s}" for s in IMAGE_SUFFIXES]
        candidates += [skeleton / f"{item.case_id}_skeleton{s}" for s in IMAGE_SUFFIXES]
        candidates += [skeleton / item.case_id / f"skeleton{s}" for s in IMAGE_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            item.error = f"{skeleton}: no skeleton for case {item.case_id} ({item.case_id}.nii.gz or {item.case_id}/skeleton.nii.gz)"
            item.case = None
        else:
            item.skeleton = found
