"""The one exception type users see: a one-line, actionable message (SPEC §13)."""


class SapError(Exception):
    """Bad input or a refused action. The CLI prints ``sap: error: <message>`` and exits 2."""
