"""The cross-validated study (``sap cv``), its report (``sap report``) and ``sap demo`` (SPEC §10).

The only package that calls stages (through :mod:`sap.cv.stages`). Python API::

    from sap.cv import run_study, build_report
    run_study(load_config("demo", ...), methods="baseline,sap")
"""

from sap.cv.report import build_report
from sap.cv.study import finalize_run, run_study

__all__ = ["build_report", "finalize_run", "run_study"]
