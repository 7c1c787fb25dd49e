"""Helpers of the hostile-input tests (issue 14): run a command in-process, fingerprint folders,
write files with broken headers and DICOM series with SimpleITK directly (not through sap)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from sap.cli import main


def md5_tree(*roots: Path) -> dict[str, str]:
    """Every file (and empty folder) under ``roots``: path → md5 (folders → "dir")."""
    found: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                found[str(path)] = "link->" + str(path.readlink())
            elif path.is_file():
                found[str(path)] = hashlib.md5(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "dir"
    return found


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``sap ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, prog: str) -> str:
    """The one ``sap PROG: error: …`` line of stderr (asserts there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"sap {prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def refuse(argv: list[str], capsys, watched: list[Path], prog: str, *needles: str, code: int = 2) -> str:
    """Run a command that must be refused: exit ``code``, one error line holding every needle,
    and no file under ``watched`` created, changed or removed. Returns the error line."""
    before = md5_tree(*watched)
    rc, _, err = run(argv, capsys)
    line = error_line(err, prog)
    assert rc == code, (rc, err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert md5_tree(*watched) == before, "a refused command changed files"
    return line


def patch_nifti(path: Path, pixdim=None, sform=None) -> None:
    """Rewrite header fields of an uncompressed NIfTI-1 file in place (nibabel would fix them)."""
    raw = bytearray(path.read_bytes())
    if pixdim is not None:
        for i, value in enumerate(pixdim):
            struct.pack_into("<f", raw, 76 + 4 * i, float(value))  # pixdim[0] (qfac) first
        struct.pack_into("<h", raw, 252, 1)  # qform_code: pixdim in use
        struct.pack_into("<h", raw, 254, 0)
    if sform is not None:
        struct.pack_into("<h", raw, 252, 0)
        struct.pack_into("<h", raw, 254, 1)  # sform_code
        for i, value in enumerate(np.asarray(sform, dtype=np.float64).ravel()):
            struct.pack_into("<f", raw, 280 + 4 * i, float(value))
    path.write_bytes(bytes(raw))


def nifti_header_only(shape: tuple[int, int, int], payload: int = 64) -> bytes:
    """A NIfTI-1 file whose header declares ``shape`` float32 voxels but holds ``payload`` bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4 + b"\x00" * payload


def write_dicom_series(folder: Path, volume_zyx: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1", skip: tuple[int, ...] = ()) -> Path:
    """One CT DICOM file per slice (SimpleITK, axial, LPS), slices ``skip`` left out."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume_zyx.shape[0]):
        if z in skip:
            continue
        image = sitk.GetImageFromArray(volume_zyx[z : z + 1].astype(np.int16))
        image.SetSpacing([spacing[0], spacing[1], spacing[2]])
        position = (origin[0], origin[1], origin[2] + z * spacing[2])
        image.SetOrigin(position)
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{z + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing[2]:.4f}",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{z:03d}.dcm"))
        writer.Execute(image)
    return folder
