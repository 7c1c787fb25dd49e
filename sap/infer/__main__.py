"""``python -m sap.infer …`` is ``sap infer …``."""

from sap.cli import run_module

run_module("infer")
