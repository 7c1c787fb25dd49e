"""Synthetic cohorts (``sap synth``, SPEC §3): a procedural whole-body phantom or real anatomy,
healthy and patient exams, MR (T1, b1000) or CT, lesions with the study's size distribution.

Modules: :mod:`~sap.data.synth.shapes` (vectorised primitives), :mod:`~sap.data.synth.phantom`
(anatomy), :mod:`~sap.data.synth.lesions` (lesions and mimics), :mod:`~sap.data.synth.intensity`
(MR/CT appearance), :mod:`~sap.data.synth.anatomy` (``--anatomy DIR``),
:mod:`~sap.data.synth.presets` and :mod:`~sap.data.synth.cohort` (the writer), and
:mod:`~sap.data.synth.followup` (baseline/follow-up pairs with known truth, ``--followup``).

The writer and its image I/O load on first use, so ``sap --help`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sap.data.synth.presets import PRESETS, Preset, get_preset

if TYPE_CHECKING:
    from sap.data.synth.cohort import make_cohort, plan_cohort, synthesize_exam

__all__ = ["PRESETS", "Preset", "get_preset", "make_cohort", "plan_cohort", "synthesize_exam"]
_LAZY = {"make_cohort", "plan_cohort", "synthesize_exam"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from sap.data.synth import cohort

        return getattr(cohort, name)
    raise AttributeError(f"module 'sap.data.synth' has no attribute {name!r}")
