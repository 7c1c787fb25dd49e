"""The fast path for ``.nii.gz``: single-file NIfTI-1 voxel data inflated straight into the final
array, a bounded chunk of compressed input at a time (SPEC §12: reading a volume costs the volume).
Anything irregular steps aside (None) for nibabel, which also words the errors.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def is_nifti(path: Path) -> bool:
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


def read_nifti_gz(path: Path) -> np.ndarray | None:
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
