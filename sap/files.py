"""Publishing outputs: atomic files and folders, and JSON with NaN written as null.

The bottom layer every writer of sap uses (stdlib and numpy only, no torch), so the two
conventions live in one place:

* a file is written to a hidden temporary sibling and renamed into place (:func:`atomic_write`);
  a kill never leaves half a file and a failed write leaves neither a temporary file nor a
  damaged target. Folders are built under a temporary sibling and swapped in
  (:func:`publish_folder`);
* JSON never holds ``NaN``/``Infinity`` (not JSON): non-finite floats become ``null`` and numpy
  scalars plain Python numbers (:func:`nan_to_none`, :func:`write_json`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sap.errors import SapError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file into place with the usual permissions.

    ``mkstemp`` creates files readable by their owner only; outputs should be as readable as any
    file the user creates (umask respected).
    """
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise SapError(f"{path}: output exists; pass --overwrite to replace it")


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Run ``write(temporary_path)`` on a hidden sibling of ``path``, then rename it into place.

    ``suffix`` keeps the extension that writers choose their format by (``.tmp.nii.gz`` for
    SimpleITK).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write text through a temporary sibling and a rename (no half-written files)."""
    path = Path(path)
    check_writable(path, overwrite)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def publish_folder(staging: str | Path, folder: str | Path) -> Path:
    """Swap a finished ``staging`` folder in as ``folder`` (an earlier ``folder`` is replaced).

    The earlier folder is moved aside first, so at every moment ``folder`` is either the old or
    the new one, never a mixture.
    """
    staging, folder = Path(staging), Path(folder)
    if folder.exists():
        backup = folder.with_name(f".{folder.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(folder, backup)
        os.replace(staging, folder)
        shutil.rmtree(backup)
    else:
        os.replace(staging, folder)
    return folder


def staging_folder(folder: str | Path) -> Path:
    """A new hidden temporary sibling of ``folder`` to build it in (see :func:`publish_folder`)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))


# ------------------------------------------------------------------------------------ JSON
def nan_to_none(value: Any) -> Any:
    """JSON-ready copy: NaN/inf → None, numpy scalars → Python scalars, tuples → lists,
    recursing into dicts and sequences."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any, indent: int = 1) -> str:
    """``value`` as JSON text (NaN as null, trailing newline); refuses anything else non-JSON."""
    return json.dumps(nan_to_none(value), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | Path, value: Any, indent: int = 1, overwrite: bool = True) -> Path:
    """Write ``value`` as JSON (NaN as null), atomically."""
    return atomic_write_text(path, json_text(value, indent), overwrite=overwrite)
