"""The one exception type users see: a one-line, actionable message (SPEC §13)."""

from __future__ import annotations

from pathlib import Path


class SapError(Exception):
    """Bad input or a refused action. The CLI prints ``sap: error: <message>`` and exits 2."""


class WriteError(SapError):
    """An output could not be written (full disk, no permission, read-only file system …).

    ``path`` is the output the user asked for (never a hidden temporary name) and ``reason`` the
    system's words for the failure; the message is ``PATH: cannot write (REASON); HINT``.
    """

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path}: cannot write ({reason})" + (f"; {hint}" if hint else ""))
