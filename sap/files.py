"""Publishing outputs: atomic files and folders, and JSON with NaN written as null.

The bottom layer every writer of sap uses (stdlib and numpy only, no torch), so the two
conventions live in one place:

* a file is written to a hidden temporary sibling and renamed into place (:func:`atomic_write`);
  a kill never leaves half a file and a failed write leaves neither a temporary file nor a
  damaged target. Folders are built in a hidden staging folder and swapped in whole
  (:func:`staged_folder`, :func:`publish_folder`), or their files moved in one by one
  (:func:`publish_files`);
* JSON never holds ``NaN``/``Infinity`` (not JSON): non-finite floats become ``null`` and numpy
  scalars plain Python numbers (:func:`nan_to_none`, :func:`write_json`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sap.errors import SapError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    return 0o666 & ~_umask()


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


def staging_folder(folder: str | Path, parent: str | Path | None = None) -> Path:
    """A new hidden, empty folder to build ``folder`` in: a sibling of it, or inside ``parent``;
    as readable as any folder the user creates (umask respected)."""
    folder = Path(folder)
    where = Path(parent) if parent is not None else folder.parent
    where.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=where))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private
    return staging


def publish_folder(staging: str | Path, folder: str | Path, replace: bool = True) -> bool:
    """Swap a finished ``staging`` folder in as ``folder``.

    An earlier ``folder`` is moved aside first and removed after the swap, so at every moment
    ``folder`` is the old or the new one, never a mixture. With ``replace=False`` an existing
    ``folder`` wins (another process published the same content first): ``staging`` stays for the
    caller to remove and the result is False.
    """
    staging, folder = Path(staging), Path(folder)
    if not replace:
        try:
            os.rename(staging, folder)  # fails when folder exists and is not empty
        except OSError:
            if not folder.exists():
                raise
            return False
        return True
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        shutil.rmtree(old)
    else:
        os.replace(staging, folder)
    return True


@contextlib.contextmanager
def staged_folder(folder: str | Path, replace: bool = True) -> Iterator[Path]:
    """Build ``folder`` in a staging folder (yielded) and publish it when the block succeeds
    (:func:`publish_folder`); on an error, or when another process won, the staging folder goes."""
    staging = staging_folder(folder)
    try:
        yield staging
        publish_folder(staging, folder, replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_files(staging: str | Path, names: Iterable[str], folder: str | Path) -> list[Path]:
    """Move finished files ``names`` from ``staging`` into ``folder`` (each rename atomic)."""
    out = []
    for name in names:
        os.replace(Path(staging) / name, Path(folder) / name)
        out.append(Path(folder) / name)
    return out


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
