"""``python -m sap.track`` is ``sap track``."""

from sap.cli import run_module

run_module("track")
