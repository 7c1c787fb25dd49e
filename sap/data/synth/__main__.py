"""``python -m sap.data.synth`` = ``sap synth``."""

from sap.cli import run_module

run_module("synth")
