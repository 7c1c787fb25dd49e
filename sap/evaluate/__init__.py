"""``sap evaluate``: lesion evaluation of prediction files against ground-truth files (SPEC §9).

The rules live in :mod:`sap.metrics`; this stage finds and reads the files, runs cases in
parallel and writes ``patients.csv``, ``lesions.csv`` and ``summary.json``.
"""

from sap.evaluate.api import CasePair, evaluate_folders, find_case_pairs
from sap.evaluate.compare import compare_runs

__all__ = ["CasePair", "compare_runs", "evaluate_folders", "find_case_pairs"]
