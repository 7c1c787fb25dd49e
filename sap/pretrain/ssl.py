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

from functools import partial
from typing import Any

import numpy as np
import torch

from sap.config import Config
from sap.metrics import CumulativeMean
from sap.models.ssl import SSLModel, make_ssl_batch, ssl_losses
from sap.models.swin import build_swin_unetr
from sap.models.training import StageContext, StageParts, StageResult, StageSpec, run_stage
from sap.pretrain.common import data_summary, load_stage_data, stage_dir
from sap.run_layout import PRETRAIN_SECTIONS
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
    means = CumulativeMean()
    ssl = cfg.pretrain.ssl
    for crops in batches:
        batch = make_ssl_batch(crops.to(device), rng, ssl.mask_ratio, ssl.mask_block_fraction)
        losses = ssl_losses(model, batch, ssl.temperature).as_floats()
        means.append(**{f"val_{k}": losses[k] for k in LOSS_NAMES})
    model.train(was_training)
    return {k: float(v) for k, v in means.aggregate().items()}


def train_ssl(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    """Run (or resume) SSL pretraining; outputs in ``RUN/pretrain/ssl``.

    ``reuse_memory`` stays off here: with four views the attention buffers fragment a
    never-trimmed heap and resident memory keeps growing (4.5 → 9.6 GB in three demo steps,
    measured).
    """
    p = cfg.pretrain
    spec = StageSpec(
        kind=STAGE, out_dir=stage_dir(cfg, STAGE), config=cfg, max_steps=ssl_steps(cfg), val_every=p.val_every_steps,
        metric="val_loss", lower_is_better=True, columns=["lr", *LOSS_NAMES, *[f"val_{k}" for k in LOSS_NAMES]],
        warmup_fraction=p.warmup_fraction, amp=p.amp, seed=p.seed, desc="pretrain ssl",
        sections=PRETRAIN_SECTIONS, info={"stage": STAGE}, channels=cfg.data.channels, out_channels=0,
    )  # fmt: skip
    return run_stage(
        spec, partial(_setup, cfg), resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after
    )


def _setup(cfg: Config, ctx: StageContext) -> StageParts:
    """Encoder + SSL heads, body-centred crops made into two masked, rotated views each."""
    data = load_stage_data(cfg, need_skeleton=False, progress=ctx.progress)
    ssl = cfg.pretrain.ssl
    batch_size = crops_per_batch(cfg)
    model = build_ssl_model(cfg, len(data.channels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    sampler = body_sampler(data.train, cfg, batch_size, ctx.world_size, cfg.pretrain.seed)
    cursor = EpochCursor()
    stream = batch_stream(sampler, cursor, rank=ctx.rank, num_workers=cfg.pretrain.num_workers)
    # one fixed batch per validation exam, at most four: stable numbers without a long pause
    val_batches = validation_batches(data.val, cfg, n_batches=min(4, len(data.val))) if ctx.main else []

    def draw_batch() -> Any:
        crops = next(stream)["image"].to(ctx.device)
        return make_ssl_batch(crops, ctx.generator, ssl.mask_ratio, ssl.mask_block_fraction)

    def step(net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        losses = ssl_losses(net, batch, ssl.temperature)
        return losses.total, losses.as_floats()

    return StageParts(
        model, optimizer, draw_batch, step, lambda net: validate_ssl(net, val_batches, cfg, ctx.device),
        cursor=cursor, export=lambda net: net.encoder_state_dict(),
        summary=lambda: {"crops_per_batch": batch_size, **data_summary(data)},
    )  # fmt: skip
