"""Patch geometry and reading: where a patch may start, and slicing it out of (memory-mapped) arrays.

A patch is the box ``[start, start + size)`` in voxel indices. Where a volume is at least as large
as the patch along an axis, patches stay inside the volume (``0 <= start <= dim - size``); where it
is smaller, the patch covers the whole axis (``dim - size <= start <= 0``) and the outside is padded.
Reading never touches more of a memory-mapped array than the patch itself.
"""

from __future__ import annotations

import numpy as np


def start_bounds(
    shape: np.ndarray | tuple[int, ...], size: np.ndarray | tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed patch start per axis (both inclusive), as int64 arrays."""
    shape = np.asarray(shape, np.int64)
    size = np.asarray(size, np.int64)
    room = shape - size
    return np.minimum(room, 0), np.maximum(room, 0)


def start_around(
    centre: np.ndarray, shape: np.ndarray | tuple[int, ...], size: np.ndarray | tuple[int, ...]
) -> np.ndarray:
    """Start of the patch centred on ``centre``, shifted (like MONAI) so it fits the volume.

    The centre voxel always stays inside the patch.
    """
    size = np.asarray(size, np.int64)
    low, high = start_bounds(shape, size)
    return np.clip(np.asarray(centre, np.int64) - size // 2, low, high)


def read_patch(
    array: np.ndarray,
    start: np.ndarray,
    size: np.ndarray | tuple[int, ...],
    pad_value: float = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Copy the box ``[start, start + size)`` of the last three axes of ``array``.

    Args:
        array: ``(..., X, Y, Z)`` array, typically memory-mapped; leading axes (channels) are kept.
        start: patch start per spatial axis (may be negative or run past the end).
        size: patch size per spatial axis.
        pad_value: value of voxels outside the volume.
        out: optional destination of shape ``(..., *size)`` (e.g. one slot of a batch array), so
            the patch is copied once, straight from the memory map into the batch.

    Returns:
        ``out`` when given, else a new contiguous array of shape ``(..., *size)`` and ``array``'s dtype.
    """
    start = np.asarray(start, np.int64)
    size = np.asarray(size, np.int64)
    shape = np.asarray(array.shape[-3:], np.int64)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, shape)
    src = (Ellipsis, *(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))
    inside = bool(np.all(lo == start) and np.all(hi == start + size))
    if out is None:
        if inside:
            return np.array(array[src])
        out = np.empty((*array.shape[:-3], *size.tolist()), dtype=array.dtype)
    if not inside:
        out[...] = pad_value
    if np.all(hi > lo):
        dst = (Ellipsis, *(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start, strict=True)))
        out[dst] = array[src]
    return out
