"""What both pretraining stages share: their folder and their data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sap.config import Config
from sap.data.cache import CachedCase, cache_cases
from sap.data.cases import discover_cohort
from sap.data.splits import pretrain_split
from sap.errors import SapError
from sap.run_layout import PRETRAIN_STAGES, RunDir

STAGES = PRETRAIN_STAGES


def stage_dir(cfg: Config, stage: str) -> Path:
    """``RUN/pretrain/<stage>``; ``RUN`` is ``--out`` (config key ``out``)."""
    if stage not in STAGES:  # before asking for the run folder: the stage is the first mistake
        raise SapError(f"unknown pretraining stage {stage!r}; choose skeletal or ssl")
    return RunDir.of(cfg.out).pretrain(stage)


@dataclass
class StageData:
    """Cached training and validation exams of the healthy cohort, and the channel names."""

    train: list[CachedCase]
    val: list[CachedCase]
    channels: list[str]
    val_is_train: bool


def load_stage_data(cfg: Config, need_skeleton: bool, progress: bool = True) -> StageData:
    """Healthy exams → subject-grouped train/validation split (``pretrain.val_fraction``) → cache.

    With a single subject there is no held-out validation and the training exams are scored
    instead (said in the summary). ``need_skeleton`` refuses exams without skeleton labels,
    listing them, before any training starts.
    """
    cohort = discover_cohort(cfg.data, require=("healthy",))
    healthy = cohort.healthy
    if need_skeleton:
        unlabelled = [c.case_id for c in healthy if c.skeleton is None]
        if unlabelled:
            shown = ", ".join(unlabelled[:5]) + (" …" if len(unlabelled) > 5 else "")
            raise SapError(f"{cfg.data.root}: healthy exams without skeleton labels: {shown}")
    train_cases, val_cases = pretrain_split(healthy, cfg.pretrain.val_fraction, cfg.pretrain.seed)
    cached = cache_cases(train_cases + val_cases, cfg.data, progress=progress)
    train, val = cached[: len(train_cases)], cached[len(train_cases) :]
    val_is_train = not val
    return StageData(train=train, val=val or list(train), channels=list(cfg.data.channels), val_is_train=val_is_train)


def data_summary(data: StageData) -> dict[str, object]:
    """The ``summary.json`` entries both stages write about their validation exams."""
    return {"validation_cases": [c.case_id for c in data.val], "validation_is_training_data": data.val_is_train}
