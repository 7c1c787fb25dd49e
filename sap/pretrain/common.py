"""What both pretraining stages share: output folder rules, data, checkpoint writing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sap.config import Config, save_config
from sap.data.cache import CachedCase, cache_cases
from sap.data.cases import discover_cohort
from sap.data.io import atomic_write_text
from sap.data.splits import pretrain_split
from sap.errors import SapError

STAGES = ("skeletal", "ssl")


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    stage: str
    out_dir: Path
    steps: int
    best_step: int
    best_metric: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True  #: False on the other ranks under ``accelerate launch``

    @property
    def best(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"


def stage_dir(cfg: Config, stage: str) -> Path:
    """``RUN/pretrain/<stage>``; ``RUN`` is ``--out`` (config key ``out``)."""
    if stage not in STAGES:
        raise SapError(f"unknown pretraining stage {stage!r}; choose skeletal or ssl")
    if not cfg.out:
        raise SapError("no run folder: pass --out RUN (or set out in the config)")
    return Path(cfg.out) / "pretrain" / stage


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


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and Python; return the numpy generator the stage draws its own randomness from."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def write_summary(folder: Path, summary: dict[str, Any]) -> Path:
    """``summary.json`` with NaN written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return None if not math.isfinite(float(value)) else float(value)
        if isinstance(value, (np.integer,)):
            return int(value)
        return value

    return atomic_write_text(folder / "summary.json", json.dumps(clean(summary), indent=1) + "\n")


def save_resolved_config(cfg: Config, folder: Path) -> None:
    save_config(cfg, folder / "config.yaml")
