"""Publishing outputs: atomic files and folders, publishing units, locks, JSON with NaN as null.

The bottom layer every writer of sap uses (stdlib and numpy only, no torch), so the conventions
live in one place:

* a file is written to a hidden temporary sibling and renamed into place (:func:`atomic_write`);
  a kill never leaves half a file and a failed write leaves neither a temporary file nor a
  damaged target. Folders are built in a hidden staging folder and swapped in whole
  (:func:`staged_folder`, :func:`publish_folder`), or the files of one unit written into a staging
  folder and moved in together (:func:`publish_together`);
* a failed write (full disk, no permission, read-only file system) is one
  :class:`sap.errors.WriteError` naming the output and the reason, never a traceback
  (:func:`write_error`);
* an output that is one of the command's inputs is refused before any work
  (:func:`check_not_input`);
* the main process of a command holds an exclusive lock file (pid, host) on the unit it
  publishes (:func:`folder_lock`); a second run into the same unit is refused, a stale lock is
  reported with how to remove it;
* JSON never holds ``NaN``/``Infinity`` (not JSON): non-finite floats become ``null`` and numpy
  scalars plain Python numbers (:func:`nan_to_none`, :func:`write_json`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sap.errors import SapError, WriteError


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


# ------------------------------------------------------------------------------------ write errors
_HINTS = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some space or choose another output folder",
    errno.EACCES: "check the folder's permissions or choose another output folder",
    errno.EPERM: "check the folder's permissions or choose another output folder",
    errno.EROFS: "the file system is read-only; choose another output folder",
}


def _reason(exc: BaseException) -> tuple[str, str]:
    """(reason, hint) of a failed write, in the system's words."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno), _HINTS.get(exc.errno, "")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0][:200] if lines else type(exc).__name__), ""


def _disk_full(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < 1 << 20
    return False


def write_error(path: str | Path, exc: BaseException) -> WriteError:
    """The one-line error for a failed write of ``path`` (raise it ``from exc``)."""
    if isinstance(exc, WriteError):
        return WriteError(path, exc.reason, exc.hint)
    reason, hint = _reason(exc)
    return WriteError(path, reason, hint)


def make_folder(folder: str | Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created (outermost first).

    A failure (no permission, full disk, a file in the way) is a :class:`WriteError`.
    """
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from exc
    return list(reversed(missing))


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` (created by this run, outermost first) that are still empty."""
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:
            return


def _write_temporary(write: Callable[[str], Any], tmp: str) -> None:
    """Run one writer on its temporary file (the single place every output's bytes go through;
    tests inject full-disk and permission faults here)."""
    write(tmp)


def atomic_write(path: str | Path, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Run ``write(temporary_path)`` on a hidden sibling of ``path``, then rename it into place.

    ``suffix`` keeps the extension that writers choose their format by (``.tmp.nii.gz`` for
    SimpleITK). A failed write (full disk, no permission …) raises :class:`WriteError` naming
    ``path``; the temporary file is removed and an earlier ``path`` stays as it was.
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        _write_temporary(write, tmp)
        publish(tmp, path)
    except WriteError as exc:  # a nested writer: name this output
        raise write_error(path, exc) from exc
    except OSError as exc:
        raise write_error(path, exc) from exc
    except RuntimeError as exc:  # SimpleITK and torch.save wrap the system error
        if not _disk_full(path.parent):
            raise
        raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write text (UTF-8, whatever the locale) through a temporary sibling and a rename (no
    half-written files)."""
    path = Path(path)
    check_writable(path, overwrite)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def staging_folder(folder: str | Path, parent: str | Path | None = None) -> Path:
    """A new hidden, empty folder to build ``folder`` in: a sibling of it, or inside ``parent``;
    as readable as any folder the user creates (umask respected)."""
    folder = Path(folder)
    where = Path(parent) if parent is not None else folder.parent
    make_folder(where)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=where))
    except OSError as exc:
        raise write_error(folder, exc) from exc
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
        except OSError as exc:
            if not folder.exists():
                raise write_error(folder, exc) from exc
            return False
        return True
    try:
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(old)
        else:
            os.replace(staging, folder)
    except OSError as exc:
        raise write_error(folder, exc) from exc
    return True


@contextlib.contextmanager
def staged_folder(folder: str | Path, replace: bool = True) -> Iterator[Path]:
    """Build ``folder`` in a staging folder (yielded) and publish it when the block succeeds
    (:func:`publish_folder`); on an error, or when another process won, the staging folder goes.
    A write that fails inside the block names the file under ``folder``, not the staging name."""
    folder = Path(folder)
    staging = staging_folder(folder)
    try:
        try:
            yield staging
        except WriteError as exc:
            if exc.path.is_relative_to(staging):
                raise write_error(folder / exc.path.relative_to(staging), exc) from exc
            raise
        except OSError as exc:  # a writer that wrote into the staging folder directly
            name = Path(exc.filename) if isinstance(exc.filename, str) else None
            shown = folder / name.relative_to(staging) if name is not None and name.is_relative_to(staging) else folder
            raise write_error(shown, exc) from exc
        publish_folder(staging, folder, replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_files(staging: str | Path, names: Iterable[str], folder: str | Path) -> list[Path]:
    """Move finished files ``names`` from ``staging`` into ``folder`` (each rename atomic).

    When a rename fails, the files moved so far go back and the earlier files are restored, so
    ``folder`` holds either the whole new set or the old one.
    """
    staging, folder = Path(staging), Path(folder)
    names = list(names)
    backup = staging / ".replaced"
    backup.mkdir(exist_ok=True)
    done: list[str] = []
    try:
        for name in names:
            if (folder / name).exists():
                os.replace(folder / name, backup / name)
            os.replace(staging / name, folder / name)
            done.append(name)
    except OSError as exc:
        for name in names:
            with contextlib.suppress(OSError):
                if name in done:
                    os.replace(folder / name, staging / name)
                if (backup / name).exists():
                    os.replace(backup / name, folder / name)
        raise write_error(folder / names[len(done)], exc) from exc
    return [folder / name for name in names]


def publish_together(
    folder: str | Path, writers: Mapping[str, Callable[[Path], Any]], overwrite: bool = False
) -> list[Path]:
    """Publish the files of one unit (a case of ``sap infer``, the tables of ``sap evaluate``)
    all or nothing.

    Every ``writers[name](path)`` writes into a hidden staging folder inside ``folder``; only when
    all succeeded are they renamed into place (:func:`publish_files`). A failed write (a
    :class:`WriteError` naming ``folder/name``) leaves ``folder`` as it was, without temporaries.
    Other files in ``folder`` are never touched; existing files of the unit are replaced only with
    ``overwrite`` (checked before and again right before the renames).
    """
    folder = Path(folder)
    names = list(writers)

    def refuse() -> None:
        existing = [n for n in names if (folder / n).exists()]
        if existing and not overwrite:
            raise SapError(f"{folder / existing[0]}: output exists ({len(existing)} of the {len(names)} files "
                           "written together); pass --overwrite to replace them")

    refuse()
    staging = staging_folder(folder / (Path(names[0]).stem if names else "unit"), parent=folder)
    try:
        for name, write in writers.items():
            try:
                write(staging / name)
            except (WriteError, OSError) as exc:
                raise write_error(folder / name, exc) from exc
        refuse()
        return publish_files(staging, names, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------ inputs
def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_not_input(
    outputs: Iterable[str | Path], inputs: Iterable[str | Path | None], replaced_folder: bool = False
) -> None:
    """Refuse an output that is one of the command's inputs (the same file after resolving links).

    With ``replaced_folder`` the outputs are folders that are replaced whole: an input inside one
    of them is refused too. Raised before any work, naming both paths.
    """
    given = [Path(p) for p in inputs if p is not None]
    for output in map(Path, outputs):
        for source in given:
            clash = _same_file(output, source)
            if not clash and replaced_folder:
                clash = source.resolve().is_relative_to(output.resolve())
            if clash:
                same = "is" if output.resolve() == source.resolve() or not replaced_folder else "holds"
                raise SapError(f"{output}: the output {same} an input of this command ({source}); "
                               "choose another output path")


# ------------------------------------------------------------------------------------ locks
#: name of the lock file inside a locked publishing unit
LOCK_NAME = ".sap.lock"
_HELD: dict[Path, int] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def read_lock(lock: Path) -> dict[str, Any]:
    """The record of a lock file (empty when unreadable)."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def lock_is_stale(record: Mapping[str, Any]) -> bool:
    """True when the lock was taken on this host by a process that no longer runs."""
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _lock_refusal(lock: Path, folder: Path) -> SapError:
    record = read_lock(lock)
    who = f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {record.get('started', '?')}"
    if lock_is_stale(record):
        return SapError(f"{lock}: stale lock of a sap run that no longer runs ({who}); if no other sap run "
                        f"writes {folder}, remove it (rm {lock}) and run again")
    return SapError(f"{folder}: in use by another sap run ({who}; lock file {lock}); wait for it to finish or "
                    f"choose another output folder (if that run is gone, rm {lock})")


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait: bool = False, poll_s: float = 5.0,
                on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of the publishing unit ``folder`` (``folder/.sap.lock``).

    The lock file is created with ``O_EXCL`` and holds the pid, host, start time and command; it
    is removed when the block ends. ``folder`` (and missing parents) is created here, when work
    starts, and removed again at the end when the run left it empty (a refused or failed run
    changes nothing). Taken again by the same process it is shared (``sap cv`` locks a fold, then
    the stage runner inside it does). Held by another run: refused naming it, or, with ``wait``,
    polled every ``poll_s`` seconds (``on_wait`` gets the message once) until it is free. A stale
    lock (this host, process gone) is refused with how to remove it, even with ``wait``. Only the
    main process of a command locks (accelerate's other ranks do not).
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder / LOCK_NAME
        finally:
            _HELD[key] -= 1
        return
    created = make_folder(folder)
    lock = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["sap", *sys.argv[1:]])[:500]}
    told = False
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
            break
        except FileExistsError:
            refusal = _lock_refusal(lock, folder)
            if not wait or lock_is_stale(read_lock(lock)):
                remove_empty(created)
                raise refusal from None
            if not told and on_wait is not None:
                on_wait(f"waiting: {refusal}")
                told = True
            time.sleep(poll_s)
        except OSError as exc:
            remove_empty(created)
            raise write_error(lock, exc) from exc
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        lock.unlink(missing_ok=True)
        remove_empty(created)
        raise write_error(lock, exc) from exc
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)
        remove_empty(created)


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
