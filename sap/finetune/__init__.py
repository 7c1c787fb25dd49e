"""Lesion fine-tuning (SPEC §7): ``sap finetune --init scratch|ssl|sap --fold K``.

``sap finetune``, ``python -m sap.finetune`` and ``accelerate launch -m sap.finetune`` call
:func:`run_finetune` (in :mod:`sap.finetune.train`), which notebooks and ``sap cv`` call too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sap.models.training import StageResult


def run_finetune(*args: Any, **kwargs: Any) -> StageResult:
    """See :func:`sap.finetune.train.run_finetune` (imported lazily: torch loads on first call)."""
    from sap.finetune.train import run_finetune as _run

    return _run(*args, **kwargs)


__all__ = ["run_finetune"]
