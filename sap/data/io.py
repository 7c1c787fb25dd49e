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

from dataclasses import dataclass
from pathlib import Path

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


def read_sitk(path: str | Path) -> sitk.Image:
    """Read a file or DICOM series folder with SimpleITK; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise SapError(f"{path}: file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(series_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except SapError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with multi-line ITK text
        reason = str(exc).strip().splitlines()
        short = next((line for line in reversed(reason) if line.strip()), "unknown reason")
        raise SapError(f"{path}: cannot read image ({short.strip()[:160]})") from exc
    if image.GetDimension() != 3:
        raise SapError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SapError(f"{path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
    return image


def _read_source(path: Path) -> tuple[np.ndarray, Geometry]:
    """Voxel data in source (x, y, z) index order, and the geometry.

    NIfTI voxel data is decoded with nibabel: SimpleITK's NIfTI reader silently turns NaN into 0
    and zero-fills truncated files, and both must be reported (SPEC §13). The geometry always
    comes from SimpleITK, so every format shares one convention.
    """
    if is_nifti(path):
        geometry = read_geometry(path)
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
    image = read_sitk(path)
    geometry = geometry_of(image)
    try:
        source_zyx = sitk.GetArrayFromImage(image)
    except Exception as exc:
        raise SapError(f"{path}: cannot read image data ({exc})") from exc
    return source_zyx.transpose(2, 1, 0), geometry


def read_source_array(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Voxel data in the file's own (x, y, z) index order, without the reorientation copy.

    For orientation-independent work on large volumes (lesion evaluation): no canonical copy is
    made. Spacing of these axes is ``geometry.spacing``. Same checks and errors as :func:`read_image`.
    """
    return _read_source(Path(path))


def read_image(path: str | Path, dtype: np.dtype | type | None = None) -> Image:
    """Read any supported image into a canonical RAS+ array.

    Raises :class:`SapError` naming the file when it is missing, unreadable or not 3D scalar.
    ``dtype`` converts the array (labels are usually read as-is and checked by the caller).
    """
    path = Path(path)
    source_xyz, geometry = _read_source(path)
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


def read_geometry(path: str | Path) -> Geometry:
    """Header-only geometry of a file (fast: no voxel data decoded), or a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return geometry_of(read_sitk(path))
    if not path.exists():
        raise SapError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise SapError(f"{path}: cannot read image header") from exc
    if reader.GetDimension() != 3:
        raise SapError(f"{path}: expected a 3D image, got {reader.GetDimension()}D")
    return geometry_of(reader)


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
    path = Path(path)
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
