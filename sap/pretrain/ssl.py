"""``sap pretrain --stage ssl``: the self-supervised baseline of Tang et al. 2022 (SPEC §6).

Same healthy exams as the skeletal stage, labels unused; ``pretrain.ssl.max_steps`` (default:
``pretrain.max_steps``) optimiser steps. Each step takes
``max(pretrain.ssl.crops_per_batch, pretrain.batch_size)`` (at least two) crops centred on body
voxels, makes two rotated, block-masked views of each (:func:`sap.models.ssl.make_ssl_batch`) and
sums inpainting L1, rotation cross-entropy and the in-batch contrastive loss. Validation computes
the same losses on fixed crops of the validation exams with fixed views; ``best.pt`` keeps the
lowest validation loss. Checkpoints hold the encoder (``swinViT.*``) as their state dict, the form
``load_weights(…, expect="ssl")`` reads for ``sap finetune --init ssl``; ``last.pt`` adds the
heads and training state for ``--resume``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from sap.config import Config
from sap.errors import SapError
from sap.models.ssl import SSLModel, make_ssl_batch, ssl_losses
from sap.models.swin import build_swin_unetr, set_patch_merging
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
from sap.models.weights import load_checkpoint, make_checkpoint, save_checkpoint
from sap.pretrain.common import (
    PretrainResult,
    load_stage_data,
    save_resolved_config,
    seed_everything,
    stage_dir,
    write_summary,
)
from sap.sampling import ClassBalancedSampler, EpochCursor, SamplingCase
from sap.sampling.torch_data import batch_stream

STAGE = "ssl"
LOSS_NAMES = ("loss", "loss_reconstruction", "loss_rotation", "loss_contrastive")
VAL_SEED = 20220607  #: fixed views for validation, independent of the training stream


def ssl_steps(cfg: Config) -> int:
    """Length of the SSL stage: ``pretrain.ssl.max_steps`` when set, else ``pretrain.max_steps``."""
    return cfg.pretrain.ssl.max_steps or cfg.pretrain.max_steps


def crops_per_batch(cfg: Config) -> int:
    return max(2, cfg.pretrain.ssl.crops_per_batch, cfg.pretrain.batch_size)


def build_ssl_model(cfg: Config, in_channels: int) -> SSLModel:
    """Swin ViT encoder (the ``swinViT`` of a Swin UNETR built from ``cfg.model``) + SSL heads."""
    backbone = build_swin_unetr(cfg.model, in_channels, 2)
    return SSLModel(backbone.swinViT, cfg.model.feature_size, in_channels)


def body_sampler(cases: list[Any], cfg: Config, batch_size: int, world_size: int, seed: int) -> ClassBalancedSampler:
    """Crops centred on random body voxels (class-balanced over the body mask's one class)."""
    wrapped = [SamplingCase.from_cached(case, label_map="body") for case in cases]
    return ClassBalancedSampler(
        wrapped, cfg.model.patch_size, seed=seed, batch_size=batch_size, world_size=world_size, include_background=False
    )


def validation_batches(cases: list[Any], cfg: Config, n_batches: int = 2) -> list[torch.Tensor]:
    """Fixed validation crops: ``n_batches`` batches of the body sampler's first epoch."""
    batch = crops_per_batch(cfg)
    sampler = body_sampler(cases, cfg, batch, 1, seed=VAL_SEED)
    planned: list[tuple[Any, int]] = []
    epoch = 0
    while len(planned) < n_batches * batch:
        planned += [(request, epoch) for request in sampler.plan(epoch)]
        epoch += 1
    out = []
    for i in range(n_batches):
        patches = [sampler.resolve(r, e) for r, e in planned[i * batch : (i + 1) * batch]]
        images, _ = sampler.read_batch(patches)
        out.append(torch.from_numpy(images))
    return out


@torch.no_grad()
def validate_ssl(model: SSLModel, batches: list[torch.Tensor], cfg: Config, device: torch.device) -> dict[str, float]:
    """Mean SSL losses over fixed crops with fixed views (same numbers for the same weights)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(VAL_SEED)
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    ssl = cfg.pretrain.ssl
    for crops in batches:
        batch = make_ssl_batch(crops.to(device), rng, ssl.mask_ratio, ssl.mask_block_fraction)
        losses = ssl_losses(model, batch, ssl.temperature).as_floats()
        for key in LOSS_NAMES:
            sums[key] += losses[key]
    model.train(was_training)
    return {f"val_{k}": v / max(1, len(batches)) for k, v in sums.items()}


def train_ssl(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> PretrainResult:
    """Run (or resume) SSL pretraining; outputs in ``RUN/pretrain/ssl``."""
    started = time.perf_counter()
    out = stage_dir(cfg, STAGE)
    # train_loop(reuse_memory=...) stays off here: with four views the attention buffers fragment a never-trimmed
    # heap and resident memory keeps growing (4.5 → 9.6 GB in three demo steps, measured).
    accelerator = make_accelerator(cfg.pretrain.amp)
    main = accelerator.is_main_process
    if main:
        prepare_out_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    data = load_stage_data(cfg, need_skeleton=False, progress=progress and main)
    generator = seed_everything(cfg.pretrain.seed)
    in_channels = len(data.channels)
    ssl = cfg.pretrain.ssl
    batch_size = crops_per_batch(cfg)

    model = build_ssl_model(cfg, in_channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, ssl_steps(cfg), cfg.pretrain.warmup_fraction)
    sampler = body_sampler(data.train, cfg, batch_size, accelerator.num_processes, cfg.pretrain.seed)
    cursor = EpochCursor()
    loop = LoopState()
    if resume:
        checkpoint = load_checkpoint(out / "last.pt")
        if checkpoint.get("kind") != STAGE or "training" not in checkpoint:
            raise SapError(f"{out / 'last.pt'}: not a resumable SSL checkpoint")
        set_patch_merging(model, checkpoint["patch_merging"])
        model.load_state_dict({**checkpoint["state_dict"], **checkpoint["ssl_heads"]}, strict=True)
        loop = restore_training_state(checkpoint["training"], optimizer, scheduler, accelerator, generator)
        cursor.load_state_dict(checkpoint["training"]["cursor"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        save_resolved_config(cfg, out)
    logger = RunLogger(
        out, ["lr", *LOSS_NAMES, *[f"val_{k}" for k in LOSS_NAMES]], resume_step=loop.step if resume else None, enabled=main
    )
    device = accelerator.device
    # one fixed batch per validation exam, at most four: stable numbers without a long pause
    val_batches = validation_batches(data.val, cfg, n_batches=min(4, len(data.val))) if main else []
    stream = batch_stream(sampler, cursor, rank=accelerator.process_index, num_workers=cfg.pretrain.num_workers)

    def draw_batch() -> Any:
        crops = next(stream)["image"].to(device)
        return make_ssl_batch(crops, generator, ssl.mask_ratio, ssl.mask_block_fraction)

    def step_fn(net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        losses = ssl_losses(net, batch, ssl.temperature)
        return losses.total, losses.as_floats()

    last_scores: dict[str, float] = {}

    def checkpoint(extra_state: bool, metrics: dict[str, float]) -> dict[str, Any]:
        net: SSLModel = accelerator.unwrap_model(model)
        extra: dict[str, Any] = {"stage": STAGE, "step": loop.step, "metrics": metrics}
        if extra_state:
            state = training_state(optimizer, scheduler, accelerator, loop, generator)
            state["cursor"] = cursor.state_dict()
            extra["training"] = state
            extra["ssl_heads"] = {k: v.detach().cpu() for k, v in net.state_dict().items() if k.startswith("heads.")}
        return make_checkpoint(
            net,
            config=cfg.to_dict(),
            channels=data.channels,
            kind=STAGE,
            out_channels=0,
            state_dict=net.encoder_state_dict(),
            **extra,
        )

    def validate(state: LoopState) -> dict[str, float]:
        values: dict[str, float] = {}
        if main:
            values = validate_ssl(accelerator.unwrap_model(model), val_batches, cfg, device)
            metric = -values["val_loss"]  # higher is better everywhere in LoopState
            if math.isfinite(metric) and metric > state.best_metric:
                state.best_metric, state.best_step = metric, state.step
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
            max_steps=ssl_steps(cfg),
            callbacks=[every(cfg.pretrain.val_every_steps, validate)],
            logger=logger,
            desc="pretrain ssl",
            stop_after=stop_after,
            progress=progress,
        )
    finally:
        logger.close()
    summary = {
        "stage": STAGE,
        "steps": loop.step,
        "best_step": loop.best_step,
        "best_val_loss": -loop.best_metric,
        "final": last_scores,
        "crops_per_batch": batch_size,
        "validation_cases": [c.case_id for c in data.val],
        "validation_is_training_data": data.val_is_train,
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    if main:
        write_summary(out, summary)
    return PretrainResult(STAGE, out, loop.step, loop.best_step, loop.best_metric, dict(last_scores), summary, main)
