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

import math
import time
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from sap.config import Config
from sap.errors import SapError
from sap.models.engine import sliding_window_predict
from sap.models.swin import build_swin_unetr, init_output_prior
from sap.models.training import (
    LoopState,
    RunLogger,
    every,
    make_accelerator,
    prepare_out_dir,
    restore_training_state,
    train_loop,
    training_state,
    warmup_cosine_schedule,
)
from sap.models.weights import load_checkpoint, load_weights, make_checkpoint, save_checkpoint
from sap.pretrain.common import (
    PretrainResult,
    load_stage_data,
    save_resolved_config,
    seed_everything,
    stage_dir,
    write_summary,
)
from sap.pretrain.validation import N_CLASSES, SkeletalScores, intensity_threshold_baseline, score_cases
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
) -> PretrainResult:
    """Run (or resume) skeletal pretraining; outputs in ``RUN/pretrain/skeletal``.

    ``stop_after`` ends the run after that many steps as if it had been killed (tests of
    ``--resume``); the outputs then hold the last checkpoint written before it. ``keep_memory``
    keeps freed memory for reuse during the CPU training loop (faster steps, more resident
    memory; :func:`sap.models.training.reused_memory`).
    """
    started = time.perf_counter()
    out = stage_dir(cfg, STAGE)
    accelerator = make_accelerator(cfg.pretrain.amp)
    main = accelerator.is_main_process
    if main:
        prepare_out_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    data = load_stage_data(cfg, need_skeleton=True, progress=progress and main)
    generator = seed_everything(cfg.pretrain.seed)
    in_channels = len(data.channels)

    model = build_swin_unetr(cfg.model, in_channels, N_CLASSES)
    # start from the label prior of the training exams (same on every rank; --resume overwrites it)
    init_output_prior(model, skeleton_class_counts(data.train))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, cfg.pretrain.max_steps, cfg.pretrain.warmup_fraction)
    sampler = ClassBalancedSampler(
        [SamplingCase.from_cached(case, label_map="skeleton") for case in data.train],
        cfg.model.patch_size,
        seed=cfg.pretrain.seed,
        batch_size=cfg.pretrain.batch_size,
        world_size=accelerator.num_processes,
    )
    cursor = EpochCursor()
    loop = LoopState()
    if resume:
        checkpoint = load_checkpoint(out / "last.pt")
        if checkpoint.get("kind") != STAGE or "training" not in checkpoint:
            raise SapError(f"{out / 'last.pt'}: not a resumable skeletal checkpoint")
        load_weights(model, checkpoint, expect="full", verbose=False)
        loop = restore_training_state(checkpoint["training"], optimizer, scheduler, accelerator, generator)
        cursor.load_state_dict(checkpoint["training"]["cursor"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        save_resolved_config(cfg, out)
    logger = RunLogger(out, log_columns(), resume_step=loop.step if resume else None, enabled=main)

    baseline = None
    if main:
        baseline = intensity_threshold_baseline(
            [(c.image, c.body, np.asarray(c.skeleton)) for c in data.train],
            [(c.image, c.body, np.asarray(c.skeleton)) for c in data.val],
        )
    stream = batch_stream(sampler, cursor, rank=accelerator.process_index, num_workers=cfg.pretrain.num_workers)
    device = accelerator.device

    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(stream)
        return batch["image"].to(device), batch["label"].to(device).long()

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        image, label = batch
        loss = loss_fn(net(image), label)
        return loss, {"loss": float(loss.detach())}

    last_scores: dict[str, float] = {}

    def checkpoint(extra_state: bool, metrics: dict[str, float]) -> dict[str, Any]:
        net = accelerator.unwrap_model(model)
        extra: dict[str, Any] = {"stage": STAGE, "step": loop.step, "metrics": metrics}
        if extra_state:
            state = training_state(optimizer, scheduler, accelerator, loop, generator)
            state["cursor"] = cursor.state_dict()
            extra["training"] = state
        return make_checkpoint(
            net, config=cfg.to_dict(), channels=data.channels, kind=STAGE, out_channels=N_CLASSES, **extra
        )

    def validate(state: LoopState) -> dict[str, float]:
        values: dict[str, float] = {}
        if main:
            scores = validate_skeleton(accelerator.unwrap_model(model), data.val, cfg)
            values = scores.as_dict()
            metric = scores.mean_class_dice
            if math.isfinite(metric) and metric > state.best_metric:
                state.best_metric, state.best_step = metric, state.step
                save_checkpoint(checkpoint(False, values), out / "best.pt")
            elif state.best_step < 0 and not (out / "best.pt").exists():
                state.best_step = state.step  # nothing finite yet: best.pt must still exist
                save_checkpoint(checkpoint(False, values), out / "best.pt")
            save_checkpoint(checkpoint(True, values), out / "last.pt")
            last_scores.clear()
            last_scores.update(values)
        accelerator.wait_for_everyone()
        return values

    try:
        loop = train_loop(
            model=model,
            draw_batch=draw_batch,
            step_fn=step_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            accelerator=accelerator,
            loop=loop,
            max_steps=cfg.pretrain.max_steps,
            callbacks=[every(cfg.pretrain.val_every_steps, validate)],
            logger=logger,
            desc="pretrain skeletal",
            stop_after=stop_after,
            progress=progress,
            reuse_memory=keep_memory,
        )
    finally:
        logger.close()
    summary = {
        "stage": STAGE,
        "steps": loop.step,
        "best_step": loop.best_step,
        "best_mean_class_dice": loop.best_metric,
        "final": last_scores,
        "validation_cases": [c.case_id for c in data.val],
        "validation_is_training_data": data.val_is_train,
        "intensity_threshold_baseline": baseline.as_dict() if baseline else None,
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    if main:
        write_summary(out, summary)
    return PretrainResult(STAGE, out, loop.step, loop.best_step, loop.best_metric, dict(last_scores), summary, main)

