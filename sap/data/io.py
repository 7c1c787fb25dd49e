"""Image reading and writing: one reader, one writer, canonical arrays, source geometry kept.

Every image enters sap through :func:`read_image` and leaves through :func:`write_image`.

* Reading uses SimpleITK, so NIfTI, NRRD, MHA and DICOM series folders all work.
* Arrays are held in nibabel's canonical RAS+ orientation (index along axis 0 increases towards
  the patient's Right, axis 1 towards Anterior, axis 2 towards Superior), the same array
  :func:`nibabel.as_closest_canonical` gives; ``spacing`` is in that array's axis order
  (SimpleITK reports spacing in x, y, z order of its own axes, which a reorientation permutes).
* Writing maps the array back to the source grid (orientation, spacing, origin, direction), so a
  prediction overlays the input in any viewer.
* Writes are atomic (temporary name, then rename) and deterministic: the same array and geometry
  give byte-identical files (SimpleITK's gzip header carries no time stamp).

The grid and its orientation are :mod:`sap.data.geometry`, the ``.nii.gz`` fast path
:mod:`sap.data.nifti` and DICOM series :mod:`sap.data.dicom`; ``Geometry``, ``make_geometry`` and
``from_canonical`` stay importable from here for their many callers.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from sap.data.dicom import series_files
from sap.data.geometry import Geometry as Geometry
from sap.data.geometry import from_canonical as from_canonical
from sap.data.geometry import geometry_of, to_canonical
from sap.data.geometry import make_geometry as make_geometry
from sap.data.nifti import is_nifti, read_nifti_gz
from sap.errors import SapError
from sap.files import atomic_write, check_writable

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: deflate (gzip) never compresses better than about 1032:1, so a .nii.gz of n bytes cannot hold
#: more than this many times n bytes of voxel data
_DEFLATE_MAX_RATIO = 1100


@dataclass(frozen=True)
class ReadOptions:
    """What a reader accepts (``data.max_voxels``, ``data.dicom_series``, ``data.dicom_slice_tolerance``)."""

    max_voxels: int = 1_000_000_000
    dicom_series: str | None = None
    dicom_slice_tolerance: float = 0.01

    @classmethod
    def of(cls, data: Any) -> ReadOptions:
        """The options of a :class:`sap.config.DataConfig`."""
        return cls(int(data.max_voxels), data.dicom_series, float(data.dicom_slice_tolerance))


DEFAULT_READ = ReadOptions()


@dataclass
class Image:
    """A canonical (RAS+) array with its spacing (array axis order, mm) and source geometry."""

    array: np.ndarray
    geometry: Geometry
    path: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.canonical_spacing

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def read_sitk(path: str | Path, options: ReadOptions | None = None) -> sitk.Image:
    """Read a file or DICOM series folder with SimpleITK; errors name the file.

    The header is checked first (:func:`read_geometry`): sizes beyond ``options.max_voxels`` or
    larger than the file can hold, and impossible spacing or direction, are refused before any
    voxel memory is allocated.
    """
    path = Path(path)
    options = options or DEFAULT_READ
    if not path.exists():
        raise SapError(f"{path}: file not found")
    try:
        if path.is_dir():
            files = series_files(path, options.dicom_series, options.dicom_slice_tolerance)
            _check_voxels(path, _series_size(files), options)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            read_geometry(path, options)
            image = sitk.ReadImage(str(path))
    except SapError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with multi-line ITK text
        raise SapError(f"{path}: cannot read image ({_itk_reason(exc)})") from exc
    if image.GetDimension() != 3:
        raise SapError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SapError(f"{path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
    check_grid(path, image)
    return image


def _itk_reason(exc: Exception) -> str:
    """The last non-empty line of SimpleITK's multi-line error text, shortened."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_grid(path: Path, image: Any) -> None:
    """Refuse a grid no voxel can lie on: zero, negative or non-finite spacing, and a direction
    that is not a finite orthonormal matrix (``image``: a SimpleITK image or header reader)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise SapError(
            f"{path}: voxel spacing {_fmt(spacing)} mm must be finite and positive; fix the header "
            "(pixdim / spacings) of the file"
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)):
        raise SapError(f"{path}: the direction (orientation) in the header holds NaN/Inf values; fix the header")
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-3:
        raise SapError(f"{path}: the direction {_fmt(direction.ravel())} is not orthonormal (sheared or "
                       "scaled axes); resample the image onto an orthogonal grid")


def _nifti_header(path: Path) -> Any:
    """The raw NIfTI header, unchecked (nibabel's checks would hide zero and NaN pixdims)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:  # type: ignore[operator]
            raw = handle.read(540)
        sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
        if 348 in sizes:
            return nib.Nifti1Header.from_fileobj(BytesIO(raw), check=False)
        if 540 in sizes:
            return nib.Nifti2Header.from_fileobj(BytesIO(raw), check=False)
        return None
    except Exception:
        return None


def _check_nifti_header(path: Path) -> None:
    """NIfTI spacing as stored: ITK reads a zero or NaN pixdim as 1 mm without a word. Negative
    pixdims are accepted as nibabel does (their absolute value)."""
    header = _nifti_header(path)
    if header is None:
        return
    checked = []
    if int(header["qform_code"]) > 0 or int(header["sform_code"]) == 0:
        checked.append(("pixdim", np.asarray(header["pixdim"][1:4], dtype=np.float64)))
    if int(header["sform_code"]) > 0:
        sform = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        checked.append(("sform", np.sqrt((sform[:, :3] ** 2).sum(axis=0))))
    for field, zooms in checked:
        if not np.all(np.isfinite(zooms)) or np.any(zooms == 0):
            raise SapError(
                f"{path}: voxel spacing ({field}) {_fmt(zooms)} mm must be finite and non-zero; fix the header"
            )


def _itemsize(pixel_id: int, components: int) -> int:
    return int(np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id)).dtype).itemsize) * max(1, components)


def _check_voxels(path: Path, size: tuple[int, ...], options: ReadOptions) -> int:
    voxels = math.prod(int(s) for s in size)
    if voxels > options.max_voxels:
        raise SapError(
            f"{path}: header declares {'×'.join(map(str, size))} = {voxels} voxels, more than data.max_voxels "
            f"({options.max_voxels}); a corrupt header, or raise the limit (--set data.max_voxels=N)"
        )
    return voxels


def _check_declared_size(path: Path, reader: sitk.ImageFileReader, options: ReadOptions) -> None:
    """The declared image must fit the voxel limit and, for NIfTI, the file itself (raw: exactly;
    gzip: within deflate's best ratio), before anything is allocated."""
    size = tuple(reader.GetSize())
    voxels = _check_voxels(path, size, options)
    if not is_nifti(path):
        return
    needed = voxels * _itemsize(reader.GetPixelID(), reader.GetNumberOfComponents())
    on_disk = path.stat().st_size
    if path.name.endswith(".gz"):
        if needed > _DEFLATE_MAX_RATIO * on_disk:
            raise SapError(
                f"{path}: header declares {'×'.join(map(str, size))} voxels ({needed} bytes), more than a "
                f"{on_disk}-byte gzip file can hold; the header is corrupt"
            )
    elif needed > on_disk:
        raise SapError(
            f"{path}: header declares {'×'.join(map(str, size))} voxels ({needed} bytes) but the file holds "
            f"{on_disk} bytes; the file is truncated or its header corrupt"
        )


def _series_size(files: list[str]) -> tuple[int, int, int]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    width, height = reader.GetSize()[:2]
    return (int(width), int(height), len(files))


def _read_source(path: Path, options: ReadOptions | None = None) -> tuple[np.ndarray, Geometry]:
    """Voxel data in source (x, y, z) index order, and the geometry.

    NIfTI voxel data is decoded with nibabel: SimpleITK's NIfTI reader silently turns NaN into 0
    and zero-fills truncated files, and both must be reported (SPEC §13). The geometry always
    comes from SimpleITK, so every format shares one convention.
    """
    if is_nifti(path):
        geometry = read_geometry(path, options)
        fast = read_nifti_gz(path) if path.name.endswith(".gz") else None
        try:
            data = fast if fast is not None else np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as exc:  # truncated gzip streams, short payloads
            raise SapError(f"{path}: cannot read image data ({type(exc).__name__}: {str(exc)[:120]})") from exc
        data = np.asarray(data)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.shape != geometry.size:
            raise SapError(f"{path}: cannot read image data (shape {data.shape} vs header {geometry.size})")
        return data, geometry
    image = read_sitk(path, options)
    geometry = geometry_of(image)
    try:
        source_zyx = sitk.GetArrayFromImage(image)
    except Exception as exc:
        raise SapError(f"{path}: cannot read image data ({exc})") from exc
    return source_zyx.transpose(2, 1, 0), geometry


def read_source_array(path: str | Path, options: ReadOptions | None = None) -> tuple[np.ndarray, Geometry]:
    """Voxel data in the file's own (x, y, z) index order, without the reorientation copy.

    For orientation-independent work on large volumes (lesion evaluation): no canonical copy is
    made. Spacing of these axes is ``geometry.spacing``. Same checks and errors as :func:`read_image`.
    """
    return _read_source(Path(path), options)


def read_image(path: str | Path, dtype: np.dtype | type | None = None, options: ReadOptions | None = None) -> Image:
    """Read any supported image into a canonical RAS+ array.

    Raises :class:`SapError` naming the file when it is missing, unreadable or not 3D scalar.
    ``dtype`` converts the array (labels are usually read as-is and checked by the caller).
    """
    path = Path(path)
    source_xyz, geometry = _read_source(path, options)
    canonical = to_canonical(source_xyz, geometry)
    canonical = np.ascontiguousarray(canonical if dtype is None else canonical.astype(dtype, copy=False))
    return Image(array=canonical, geometry=geometry, path=str(path))


def to_sitk(canonical: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of a canonical array on its source grid (for resampling, N4, writing)."""
    if canonical.dtype == bool:
        canonical = canonical.astype(np.uint8)
    source_xyz = from_canonical(canonical, geometry)
    image = sitk.GetImageFromArray(np.ascontiguousarray(source_xyz.transpose(2, 1, 0)))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def from_sitk(image: sitk.Image, geometry: Geometry) -> np.ndarray:
    """Canonical array of a SimpleITK image that lies on ``geometry``'s grid."""
    return np.ascontiguousarray(to_canonical(sitk.GetArrayFromImage(image).transpose(2, 1, 0), geometry))


def read_geometry(path: str | Path, options: ReadOptions | None = None) -> Geometry:
    """Header-only geometry of a file (fast: no voxel data decoded), or a DICOM series.

    Refuses (naming the file) sizes beyond ``options.max_voxels`` or beyond what the file can
    hold, zero / negative / non-finite spacing and directions that are not orthonormal.
    """
    path = Path(path)
    options = options or DEFAULT_READ
    if path.is_dir():
        return geometry_of(read_sitk(path, options))
    if not path.exists():
        raise SapError(f"{path}: file not found")
    if path.is_file() and is_nifti(path):
        _check_nifti_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        reason = _itk_reason(exc)
        if "orthonormal" in reason:
            raise SapError(
                f"{path}: the direction in the header is not orthonormal (sheared, scaled or zero-length axes); "
                "ITK cannot place its voxels: fix the header or resample the image onto an orthogonal grid"
            ) from exc
        raise SapError(f"{path}: cannot read image header ({reason})") from exc
    if reader.GetDimension() != 3:
        raise SapError(f"{path}: expected a 3D image, got {reader.GetDimension()}D")
    if is_nifti(path) and any(s < 0 for s in reader.GetSpacing()):
        # nibabel's rule for a negative pixdim: its absolute value (ITK keeps the sign)
        return _geometry_abs_spacing(path, reader, options)
    check_grid(path, reader)
    _check_declared_size(path, reader, options)
    return geometry_of(reader)


class _AbsSpacing:
    """A header reader whose spacing is made positive (nibabel's handling of negative pixdims)."""

    def __init__(self, reader: sitk.ImageFileReader) -> None:
        self.reader = reader

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802 - SimpleITK's spelling
        return tuple(abs(s) for s in self.reader.GetSpacing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def _geometry_abs_spacing(path: Path, reader: sitk.ImageFileReader, options: ReadOptions) -> Geometry:
    fixed = _AbsSpacing(reader)
    check_grid(path, fixed)
    _check_declared_size(path, reader, options)
    return geometry_of(fixed)


def check_image_name(path: str | Path) -> Path:
    """An output path whose suffix names an image format sap writes (checked before any work)."""
    path = Path(path)
    if not path.name.endswith(IMAGE_SUFFIXES) or path.name in IMAGE_SUFFIXES:
        raise SapError(f"{path}: not an image file name; end it in one of {', '.join(IMAGE_SUFFIXES)}")
    return path


def write_image(
    array: np.ndarray,
    geometry: Geometry,
    path: str | Path,
    overwrite: bool = True,
    compress: bool = True,
) -> Path:
    """Write a canonical array onto its source grid, atomically and deterministically.

    The array must have the canonical shape of ``geometry``. bool arrays are written as uint8.
    """
    path = check_image_name(path)
    check_writable(path, overwrite)
    if tuple(array.shape) != tuple(geometry.canonical_shape):
        raise SapError(f"{path}: array shape {array.shape} does not fit the grid {geometry.canonical_shape}")
    image = to_sitk(array, geometry)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), path.suffix)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress), f".tmp{suffix}")


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
