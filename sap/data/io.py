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
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from sap.errors import SapError
from sap.files import atomic_write, check_writable
from sap.files import atomic_write_text as atomic_write_text  # writers not yet on sap.files (slice2d)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a source image lie: enough to write an array back onto that grid.

    ``size``, ``spacing``, ``origin`` and ``direction`` are SimpleITK's (x, y, z order, LPS world).
    ``ornt`` is the nibabel orientation transform from the source array (x, y, z index order)
    to the canonical RAS+ array.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    ornt: tuple[tuple[float, float], ...]

    @property
    def source_affine_ras(self) -> np.ndarray:
        """Voxel (x, y, z source index) → RAS world millimetres."""
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS → RAS

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        ornt = np.asarray(self.ornt)
        shape = [0, 0, 0]
        for src_axis, (dst_axis, _) in enumerate(ornt):
            shape[int(dst_axis)] = self.size[src_axis]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Canonical array index → RAS world millimetres (what nibabel's canonical image holds)."""
        inv = nib.orientations.inv_ornt_aff(np.asarray(self.ornt), self.size)
        return self.source_affine_ras @ inv

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore

    @property
    def axcodes(self) -> str:
        """Orientation of the source image, e.g. ``"LPS"`` (nibabel's convention: RAS = +x is Right)."""
        return "".join(nib.orientations.aff2axcodes(self.source_affine_ras))

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> str | None:
        """Name the first field that differs from ``other`` (None when the grids agree).

        Grids are compared in canonical space, so a label stored with flipped axes over the
        same voxels (e.g. LAS beside an LPS DICOM series) is the same grid.
        """
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        if self.canonical_shape != other.canonical_shape:
            return f"size {self.canonical_shape} vs {other.canonical_shape}"
        a, b = self.affine, other.affine
        spacing_a, spacing_b = np.asarray(self.canonical_spacing), np.asarray(other.canonical_spacing)
        if np.max(np.abs(spacing_a - spacing_b)) > tol:
            return f"spacing {fmt(spacing_a)} vs {fmt(spacing_b)}"
        if np.max(np.abs(a[:3, :3] / spacing_a - b[:3, :3] / spacing_b)) > tol:
            return f"direction {fmt(np.asarray(self.direction))} vs {fmt(np.asarray(other.direction))}"
        if np.max(np.abs(a[:3, 3] - b[:3, 3])) > tol:
            return f"origin {fmt(self.origin)} vs {fmt(other.origin)}"
        return None

    def voxel_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Canonical array indices (N, 3) → LPS world millimetres (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        ras = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return ras * np.array([-1.0, -1.0, 1.0])


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


def _canonical_ornt(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction.reshape(3, 3) * spacing[None, :]
    affine[:3, 3] = origin
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    current = nib.orientations.io_orientation(affine_ras)
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))


def _dicom_series(folder: Path) -> list[str]:
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise SapError(f"{folder}: folder holds no DICOM series")
    # The series with the most files is the image; others are often localisers.
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len)
    return list(files)


def read_sitk(path: str | Path) -> sitk.Image:
    """Read a file or DICOM series folder with SimpleITK; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise SapError(f"{path}: file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series(path))
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


def geometry_of(image: sitk.Image) -> Geometry:
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    ornt = _canonical_ornt(direction, spacing, origin)
    return Geometry(
        size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction),
        ornt=tuple((float(a), float(f)) for a, f in ornt),
    )


def to_canonical(source_xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Source array in (x, y, z) index order → canonical RAS+ array (a view where possible)."""
    return nib.orientations.apply_orientation(source_xyz, np.asarray(geometry.ornt))


def from_canonical(canonical: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    inverse = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), _source_ornt(geometry)
    )
    return nib.orientations.apply_orientation(canonical, inverse)


def _source_ornt(geometry: Geometry) -> np.ndarray:
    return nib.orientations.io_orientation(geometry.source_affine_ras)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz"))


def _inflater():  # noqa: ANN202 - a zlib-compatible module
    """zlib-ng inflates 5–10× faster than the standard zlib, which dominates reading whole-body
    .nii.gz volumes; the standard module is the fallback where zlib-ng is not installed."""
    try:
        from zlib_ng import zlib_ng

        return zlib_ng
    except ImportError:
        import zlib

        return zlib


_CHUNK = 4 << 20  # inflate in cache-sized pieces copied straight into the final array


_IN_CHUNK = 1 << 20  # compressed input handed to the inflater at a time


class _GzipStream:
    """Inflates a (possibly multi-member) gzip file while reading its compressed bytes a bounded
    chunk at a time: neither the whole compressed file nor the inflater's copies of its unread
    remainder (``unconsumed_tail``) are ever held, so reading a volume costs the volume (SPEC §12)."""

    def __init__(self, handle: Any, zlib_mod: Any) -> None:
        self.handle, self.zlib_mod = handle, zlib_mod
        self.inflater = zlib_mod.decompressobj(31)  # 31: gzip wrapper
        self.pending = b""  # compressed bytes read from the file, not yet consumed

    def read_some(self, limit: int) -> bytes:
        """Between 1 and ``limit`` inflated bytes; EOFError where the input ends or stops progressing."""
        while True:
            if self.inflater.eof:  # concatenated gzip members
                self.pending = self.inflater.unused_data
                self.inflater = self.zlib_mod.decompressobj(31)
            if not self.pending:
                self.pending = self.handle.read(_IN_CHUNK)
                if not self.pending:
                    raise EOFError("gzip stream ends early")
            before = len(self.pending)
            piece = self.inflater.decompress(self.pending, limit)
            self.pending = self.inflater.unconsumed_tail
            if piece:
                return piece
            if not self.inflater.eof and len(self.pending) == before:
                raise EOFError("gzip stream makes no progress")

    def read(self, size: int) -> bytes:
        """Exactly ``size`` inflated bytes (EOFError otherwise)."""
        pieces, got = [], 0
        while got < size:
            pieces.append(self.read_some(size - got))
            got += len(pieces[-1])
        return b"".join(pieces)


def _read_nifti_gz(path: Path) -> np.ndarray | None:
    """Voxel data of a single-file NIfTI-1 .nii.gz, inflated straight into the final array.

    Returns the array nibabel's ``np.asanyarray(nib.load(path).dataobj)`` gives (same dtype, byte
    order, shape and Fortran order), or None where this reader does not apply or the stream is
    irregular (scaled data, NIfTI-2, truncated or corrupt streams): the caller then reads with
    nibabel, which also words the errors.
    """
    zlib_mod = _inflater()
    with open(path, "rb") as handle:
        try:
            stream = _GzipStream(handle, zlib_mod)
            head = stream.read(352)
            if int.from_bytes(head[:4], "little") not in (348, 348 << 24):
                return None  # not NIfTI-1 (NIfTI-2 headers are 540 bytes)
            byteorder = "little" if int.from_bytes(head[:4], "little") == 348 else "big"
            offset = int(np.frombuffer(head, "<f4" if byteorder == "little" else ">f4", 1, 108)[0])
            if offset < 352:
                return None
            head += stream.read(offset - len(head))
            header = nib.Nifti1Header.from_fileobj(io.BytesIO(head))
            slope, inter = header.get_slope_inter()
            if (slope not in (None, 1.0)) or (inter not in (None, 0.0)) or header.get_data_offset() != offset:
                return None
            dtype = header.get_data_dtype()
            shape = header.get_data_shape()
            out = np.empty(int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
            filled = 0
            while filled < out.size:
                piece = stream.read_some(min(_CHUNK, out.size - filled))
                out[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
                filled += len(piece)
        except Exception:  # any irregular file: nibabel reads it again and reports what is wrong
            return None
    return out.view(dtype).reshape(shape, order="F")


def _read_source(path: Path) -> tuple[np.ndarray, Geometry]:
    """Voxel data in source (x, y, z) index order, and the geometry.

    NIfTI voxel data is decoded with nibabel: SimpleITK's NIfTI reader silently turns NaN into 0
    and zero-fills truncated files, and both must be reported (SPEC §13). The geometry always
    comes from SimpleITK, so every format shares one convention.
    """
    if _is_nifti(path):
        geometry = read_geometry(path)
        fast = _read_nifti_gz(path) if path.name.endswith(".gz") else None
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
    spacing = np.asarray(reader.GetSpacing())
    origin = np.asarray(reader.GetOrigin())
    direction = np.asarray(reader.GetDirection())
    ornt = _canonical_ornt(direction, spacing, origin)
    return Geometry(
        size=tuple(int(s) for s in reader.GetSize()),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction),
        ornt=tuple((float(a), float(f)) for a, f in ornt),
    )


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


def make_geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    axcodes: str = "LPS",
) -> Geometry:
    """A geometry for arrays we create (synthetic cohorts): canonical ``shape`` and ``spacing``.

    ``axcodes`` is the orientation written to disk (``"LPS"`` is the identity direction in ITK).
    """
    ornt_target = nib.orientations.axcodes2ornt(axcodes)  # source axis → (RAS axis, flip)
    size = [0, 0, 0]
    src_spacing = [0.0, 0.0, 0.0]
    direction = np.zeros((3, 3))
    for src_axis, (ras_axis, flip) in enumerate(ornt_target):
        ras_axis = int(ras_axis)
        size[src_axis] = shape[ras_axis]
        src_spacing[src_axis] = spacing[ras_axis]
        lps_sign = -1.0 if ras_axis < 2 else 1.0  # RAS → LPS flips x and y
        direction[ras_axis, src_axis] = flip * lps_sign
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in src_spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(direction.flatten().tolist())
    return geometry_of(image)


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
