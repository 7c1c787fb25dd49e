"""``sap pretrain --stage skeletal``: supervised anatomical pretraining (SPEC §6).

A 10-class Swin UNETR (background + nine skeleton regions), its output bias set to the log class
frequencies of the training exams (:func:`sap.models.swin.init_output_prior`), is trained on the
healthy cohort with Dice+CE on class-balanced patches (:class:`sap.sampling.ClassBalancedSampler`: a class drawn
uniformly among those present, then a voxel of it as patch centre). Every
``pretrain.val_every_steps`` and after the last step the validation exams are predicted whole with
the sliding-window engine and scored (per-class Dice, whole-skeleton Dice); ``best.pt`` keeps the
highest mean per-class Dice, ``last.pt`` also carries the training state for ``--resume``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from sap.config import Config
from sap.models.engine import sliding_window_predict
from sap.models.swin import build_swin_unetr, init_output_prior
from sap.models.training import StageContext, StageParts, StageResult, StageSpec, run_stage
from sap.pretrain.common import data_summary, load_stage_data, stage_dir
from sap.pretrain.validation import N_CLASSES, SkeletalScores, intensity_threshold_baseline, score_cases
from sap.run_layout import PRETRAIN_SECTIONS
from sap.sampling import ClassBalancedSampler, EpochCursor, SamplingCase
from sap.sampling.torch_data import batch_stream

STAGE = "skeletal"


def predict_skeleton(model: torch.nn.Module, image: np.ndarray, cfg: Config) -> np.ndarray:
    """Skeleton label map ``(X, Y, Z)`` uint8 of one ``(C, X, Y, Z)`` volume (argmax of the
    Gaussian-blended class probabilities)."""
    probs = sliding_window_predict(
        model,
        image,
        cfg.model.patch_size,
        overlap=cfg.infer.overlap,
        sw_batch_size=cfg.infer.sw_batch_size,
        output="probabilities",
        amp=cfg.pretrain.amp,
    )
    return np.argmax(probs, axis=0).astype(np.uint8)


def validate_skeleton(model: torch.nn.Module, cases: list[Any], cfg: Config) -> SkeletalScores:
    """Per-class and whole-skeleton Dice of ``model`` over cached validation exams."""
    preds = [predict_skeleton(model, case.image, cfg) for case in cases]
    return score_cases(preds, [np.asarray(case.skeleton) for case in cases])


def skeleton_class_counts(cases: list[Any]) -> np.ndarray:
    """Voxels per class 0-9 over the cached skeleton label maps of ``cases``."""
    counts = np.zeros(N_CLASSES, np.int64)
    for case in cases:
        counts += np.bincount(np.asarray(case.skeleton).ravel(), minlength=N_CLASSES)[:N_CLASSES]
    return counts


def log_columns() -> list[str]:
    from sap.data.labels import SKELETON_CLASSES

    return [
        "lr",
        "loss",
        "val_skeleton_dice",
        "val_mean_class_dice",
        *[f"val_dice_{name}" for name in SKELETON_CLASSES[1:]],
    ]


def train_skeletal(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_memory: bool = True,
) -> StageResult:
    """Run (or resume) skeletal pretraining; outputs in ``RUN/pretrain/skeletal``.

    ``stop_after`` ends the run after that many steps as if it had been killed (tests of
    ``--resume``). ``keep_memory`` keeps freed memory for reuse during the CPU training loop
    (faster steps, more resident memory; :func:`sap.models.training.reused_memory`).
    """
    p = cfg.pretrain
    spec = StageSpec(
        kind=STAGE, out_dir=stage_dir(cfg, STAGE), config=cfg, max_steps=p.max_steps, val_every=p.val_every_steps,
        metric="val_mean_class_dice", columns=log_columns(), warmup_fraction=p.warmup_fraction, amp=p.amp,
        seed=p.seed, desc="pretrain skeletal", sections=PRETRAIN_SECTIONS, ignore=("pretrain.ssl",),
        info={"stage": STAGE}, channels=cfg.data.channels, out_channels=N_CLASSES, reuse_memory=keep_memory,
    )  # fmt: skip
    return run_stage(
        spec, partial(_setup, cfg), resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after
    )


def _setup(cfg: Config, ctx: StageContext) -> StageParts:
    """Model (output bias at the training exams' label prior), class-balanced patches, Dice+CE."""
    data = load_stage_data(cfg, need_skeleton=True, progress=ctx.progress)
    model = build_swin_unetr(cfg.model, len(data.channels), N_CLASSES)
    init_output_prior(model, skeleton_class_counts(data.train))  # --resume overwrites it
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    sampler = ClassBalancedSampler(
        [SamplingCase.from_cached(case, label_map="skeleton") for case in data.train],
        cfg.model.patch_size,
        seed=cfg.pretrain.seed,
        batch_size=cfg.pretrain.batch_size,
        world_size=ctx.world_size,
    )
    cursor = EpochCursor()
    stream = batch_stream(sampler, cursor, rank=ctx.rank, num_workers=cfg.pretrain.num_workers)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(stream)
        return batch["image"].to(ctx.device), batch["label"].to(ctx.device).long()

    def step(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        image, label = batch
        loss = loss_fn(net(image), label)
        return loss, {"loss": float(loss.detach())}

    def summary() -> dict[str, Any]:
        baseline = intensity_threshold_baseline(
            [(c.image, c.body, np.asarray(c.skeleton)) for c in data.train],
            [(c.image, c.body, np.asarray(c.skeleton)) for c in data.val],
        )
        return {**data_summary(data), "intensity_threshold_baseline": baseline.as_dict()}

    return StageParts(
        model, optimizer, draw_batch, step, lambda net: validate_skeleton(net, data.val, cfg).as_dict(),
        cursor=cursor, summary=summary,
    )  # fmt: skip
