"""Pretraining stages (SPEC §6): ``skeletal`` (supervised anatomical) and ``ssl`` (Tang et al.).

``sap pretrain --stage skeletal|ssl`` and ``python -m sap.pretrain`` call
:func:`run_pretrain`; both stages also run under ``accelerate launch -m sap.pretrain``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sap.config import Config
    from sap.models.training import StageResult


def run_pretrain(
    cfg: Config,
    stage: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_memory: bool = True,
) -> StageResult:
    """Run one pretraining stage with a validated config; outputs in ``RUN/pretrain/<stage>``.

    ``keep_memory`` (skeletal stage, CPU only) keeps freed memory for reuse during the training
    loop: faster steps, more resident memory; see :func:`sap.models.training.reused_memory`.
    """
    from sap.errors import SapError

    if stage == "skeletal":
        from sap.pretrain.skeletal import train_skeletal

        return train_skeletal(
            cfg, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after, keep_memory=keep_memory
        )
    if stage == "ssl":
        from sap.pretrain.ssl import train_ssl

        return train_ssl(cfg, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after)
    raise SapError(f"unknown pretraining stage {stage!r}; choose skeletal or ssl")
