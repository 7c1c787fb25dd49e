"""Lesion fine-tuning (SPEC §7): one Swin UNETR per (initialisation, test fold).

The stage composes the shared layers; it owns no loop of its own:

- data: ``sap.data`` (cohort, ``RUN/splits.json``, the memory-mapped cache);
- patches: :class:`sap.sampling.InstanceBalancedSampler` (or the ``posneg`` ablation) through a
  resumable :class:`sap.sampling.EpochCursor`;
- network, weights, schedule, loop, logs: ``sap.models`` (``build_swin_unetr``, ``load_weights``,
  ``warmup_cosine_schedule``, ``train_loop``, ``RunLogger``);
- validation: the shared sliding-window engine, scored with ``sap.metrics`` (per-case F2 and
  sensitivity at threshold 0.5, SPEC E3) and voxel Dice.

Initialisations and learning rates (config keys ``finetune.lr_*``):

=========  ================================================  ==========================
init       weights                                           learning rates
=========  ================================================  ==========================
scratch    random                                            one group: ``lr_scratch``
ssl        ``swinViT.*`` from the SSL checkpoint             encoder ``lr_ssl_encoder``,
                                                             decoder ``lr_ssl_decoder``
sap        everything but the ``out`` head from the          encoder ``lr_sap_encoder``,
           skeletal checkpoint (new random 2-class head)     decoder ``lr_sap_decoder``
=========  ================================================  ==========================

Encoder/decoder follow ``model.encoder_patterns`` (``swinViT.`` and the ``encoder*`` skip blocks).
Exact resume: every optimiser step re-seeds torch from ``(seed, step, rank)`` before drawing its
batch, and the sampler's position is stored, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sap.config import Config, save_config
from sap.data.cache import CachedCase, cache_cases
from sap.data.cases import discover_cohort
from sap.data.io import atomic_write_text
from sap.data.splits import load_or_create_splits
from sap.errors import SapError

INITS = ("scratch", "ssl", "sap")
#: method folder per init (``baseline`` and ``scratch`` are aliases, SPEC §1)
METHOD_OF_INIT = {"scratch": "baseline", "baseline": "baseline", "ssl": "ssl", "sap": "sap"}
#: pretraining stage whose ``best.pt`` an init starts from
STAGE_OF_INIT = {"ssl": "ssl", "sap": "skeletal"}
LOG_COLUMNS = (
    "lr",
    "lr_decoder",
    "loss",
    "loss_dice",
    "loss_ce",
    "epoch",
    "val_f2",
    "val_sensitivity",
    "val_dice",
    "val_fp",
    "val_cases",
)
N_CLASSES = 2
KIND = "lesion"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    init: str
    method: str
    fold: int
    out_dir: Path
    steps: int
    best_step: int
    best_f2: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def best(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"


def canonical_init(init: str) -> str:
    """``scratch``/``baseline`` → ``scratch``; ``ssl``; ``sap``; anything else is an error."""
    if init in ("scratch", "baseline"):
        return "scratch"
    if init in INITS:
        return init
    raise SapError(f"--init {init!r} is not one of scratch (alias baseline), ssl, sap")


def method_dir(cfg: Config, init: str, fold: int) -> Path:
    """``RUN/{baseline|ssl|sap}/fold_{fold}``."""
    if not cfg.out:
        raise SapError("no run folder: pass --out RUN (or set out in the config)")
    return Path(cfg.out) / METHOD_OF_INIT[canonical_init(init)] / f"fold_{fold}"


def default_pretrained(cfg: Config, init: str) -> Path | None:
    """``RUN/pretrain/{skeletal|ssl}/best.pt`` for the sap/ssl inits; None for scratch."""
    init = canonical_init(init)
    if init == "scratch":
        return None
    if not cfg.out:
        raise SapError("no run folder: pass --out RUN (or set out in the config)")
    return Path(cfg.out) / "pretrain" / STAGE_OF_INIT[init] / "best.pt"


def learning_rates(cfg: Config, init: str) -> tuple[float, float]:
    """(encoder, decoder) learning rates of an init (scratch: the same rate twice)."""
    f = cfg.finetune
    init = canonical_init(init)
    if init == "scratch":
        return f.lr_scratch, f.lr_scratch
    if init == "ssl":
        return f.lr_ssl_encoder, f.lr_ssl_decoder
    return f.lr_sap_encoder, f.lr_sap_decoder


def build_optimizer(model: torch.nn.Module, cfg: Config, init: str) -> torch.optim.AdamW:
    """AdamW (weight decay ``finetune.weight_decay``): one parameter group for scratch, else
    encoder (group 0) and decoder (group 1) with the init's learning rates."""
    from sap.models.swin import parameter_groups

    init = canonical_init(init)
    encoder_lr, decoder_lr = learning_rates(cfg, init)
    if init == "scratch":
        groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": encoder_lr, "name": "all"}]
    else:
        encoder, decoder = parameter_groups(model, cfg.model.encoder_patterns)
        groups = [
            {"params": encoder, "lr": encoder_lr, "name": "encoder"},
            {"params": decoder, "lr": decoder_lr, "name": "decoder"},
        ]
    return torch.optim.AdamW(groups, lr=decoder_lr, weight_decay=cfg.finetune.weight_decay)


def build_model(
    cfg: Config, init: str, in_channels: int, pretrained: str | Path | None, verbose: bool = True
) -> torch.nn.Module:
    """The 2-class Swin UNETR of an init with its pretrained part loaded (checked, never silent)."""
    from sap.models.swin import build_swin_unetr
    from sap.models.weights import load_weights

    init = canonical_init(init)
    model = build_swin_unetr(cfg.model, in_channels, N_CLASSES)
    if init == "scratch":
        return model
    if pretrained is None:
        raise SapError(f"--init {init} needs pretrained weights (--pretrained CKPT)")
    path = Path(pretrained)
    if not path.is_file():
        stage = STAGE_OF_INIT[init]
        raise SapError(
            f"{path}: pretrained checkpoint not found; run `sap pretrain --stage {stage}` into this run "
            "folder first, or pass --pretrained CKPT"
        )
    load_weights(model, path, expect=init, verbose=verbose)
    return model


def lesion_class_counts(cases: list[CachedCase]) -> np.ndarray:
    """(background, lesion) voxel counts over the cached lesion masks of ``cases``."""
    lesion = sum(int(np.count_nonzero(np.asarray(c.lesions))) for c in cases if c.lesions is not None)
    total = sum(int(np.prod(c.shape)) for c in cases)
    return np.array([total - lesion, lesion], np.int64)


@dataclass
class FoldData:
    """Cached training and validation exams of one test fold."""

    train: list[CachedCase]
    val: list[CachedCase]
    channels: list[str]


def load_fold_data(cfg: Config, fold: int, progress: bool = True) -> FoldData:
    """Patients → ``RUN/splits.json`` (created when missing) → training/validation cases → cache.

    Validation cases come from the training folds, grouped by subject (SPEC §4); the test fold is
    never read here.
    """
    cohort = discover_cohort(cfg.data, require=("patients",))
    unlabelled = [c.case_id for c in cohort.patients if c.lesions is None]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (" …" if len(unlabelled) > 5 else "")
        raise SapError(f"{cfg.data.root}: patient exams without a lesion mask: {shown}")
    splits = load_or_create_splits(Path(cfg.out), cohort, cfg)
    if fold not in splits.test_folds:
        raise SapError(
            f"--fold {fold}: test folds are {splits.test_folds[0]}…{splits.test_folds[-1]} "
            f"(fold {splits.tuning_fold} is the threshold-tuning fold)"
        )
    by_id = cohort.by_id()
    train_ids = splits.training_cases(fold)
    val_ids = splits.validation_cases(fold)
    if not train_ids:
        raise SapError(f"{Path(cfg.out) / 'splits.json'}: fold {fold} leaves no training cases")
    cached = cache_cases([by_id[c] for c in train_ids + val_ids], cfg.data, progress=progress)
    return FoldData(
        train=cached[: len(train_ids)], val=cached[len(train_ids) :], channels=list(cfg.data.channels)
    )


def validate_lesions(
    model: torch.nn.Module, cases: list[CachedCase], cfg: Config, device: torch.device, threshold: float = 0.5
) -> dict[str, float]:
    """Sliding-window prediction of each validation case, scored per case and averaged.

    Returns ``val_f2`` and ``val_sensitivity`` (means over cases with lesions, SPEC E3 via
    ``sap.metrics.detection_counts``; NaN when no case has a lesion), ``val_dice`` (voxel Dice at
    ``threshold``, mean over cases where it is defined), ``val_fp`` (mean false-positive
    components per case) and ``val_cases``.
    """
    from sap.metrics import detection_counts, dice
    from sap.models.engine import sliding_window_predict

    f2s, sens, dices, fps = [], [], [], []
    for case in cases:
        prob = sliding_window_predict(
            model,
            case.image,
            cfg.model.patch_size,
            overlap=cfg.infer.overlap,
            sw_batch_size=cfg.infer.sw_batch_size,
            amp=cfg.finetune.amp,
            sw_device=device,
        )
        # a writable copy: the cache is a read-only memory map and cc3d needs a writable buffer
        gt = np.array(case.lesions) if case.lesions is not None else np.zeros(prob.shape, np.uint8)
        counts = detection_counts(
            prob, gt, case.spacing, threshold=threshold, connectivity=cfg.evaluate.connectivity
        )
        f2s.append(counts.f2)
        sens.append(counts.sensitivity)
        fps.append(counts.fp)
        dices.append(dice(gt > 0, prob >= threshold))

    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        "val_f2": mean(f2s),
        "val_sensitivity": mean(sens),
        "val_dice": mean(dices),
        "val_fp": mean(fps),
        "val_cases": float(len(cases)),
    }


#: keys that may differ on resume: where things are, not what is computed
_RESUME_FREE = ("out", "data.root", "data.healthy", "data.patients", "data.cache_dir", "finetune.num_workers")


def config_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (paths and worker counts ignored)."""
    keys = sorted(set(stored) | set(current))
    out: list[str] = []
    for key in keys:
        dotted = f"{prefix}{key}"
        if dotted in _RESUME_FREE:
            continue
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append(dotted)
    return out


class LesionLoss(torch.nn.Module):
    """SPEC §7's Dice + CE, with the soft-Dice term only where it is defined.

    The Dice term is MONAI's ``DiceLoss(include_background=False)`` per patch, averaged over the
    patches of the batch that hold lesion voxels; CE (``torch.nn.CrossEntropyLoss``) covers every
    patch. A lesion-free patch has no Dice (0/0): ``monai.losses.DiceCELoss`` scores it a constant
    1 with no gradient, so half of every instance-balanced epoch logged a loss of 1 whatever the
    model had learned. Here such a patch teaches through CE alone, as it did before, and the logged
    loss falls as the model learns. With lesions in every patch the value equals ``DiceCELoss``.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")
        self.cross_entropy = torch.nn.CrossEntropyLoss()

    def terms(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, Dice term, CE term) for logits ``(B, 2, X, Y, Z)`` and labels ``(B, 1, X, Y, Z)``."""
        batch = logits.shape[0]
        per_patch = self.dice(logits, label).reshape(batch, -1).mean(dim=1)
        has_lesion = label.reshape(batch, -1).any(dim=1).to(per_patch.dtype)
        dice_term = (per_patch * has_lesion).sum() / has_lesion.sum().clamp(min=1.0)
        ce_term = self.cross_entropy(logits, label[:, 0].long())
        return dice_term + ce_term, dice_term, ce_term

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.terms(logits, label)[0]


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of torch's generator for one optimiser step of one rank (exact resume, DDP-safe)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_finetune(
    cfg: Config,
    init: str,
    fold: int,
    *,
    pretrained: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_memory: bool = True,
) -> FinetuneResult:
    """Fine-tune one lesion model; outputs in ``RUN/{baseline|ssl|sap}/fold_{fold}``.

    Args:
        cfg: validated config; ``cfg.out`` is the run folder, ``cfg.data.root`` the cohort.
        init: ``scratch`` (alias ``baseline``), ``ssl`` or ``sap``.
        fold: test fold (1 … k-1); the model trains on the other folds (SPEC §4).
        pretrained: checkpoint for ``ssl``/``sap``; default ``RUN/pretrain/{ssl|skeletal}/best.pt``.
        resume: continue from ``last.pt`` (weights, optimiser, schedule, AMP scaler, sampler
            position, loop position); the resolved config must match the one stored.
        overwrite: replace earlier outputs of this (method, fold).
        stop_after: end after that many steps as if killed (tests of ``--resume``).
        keep_memory: on CPU, keep freed memory for reuse during the training loop (steps about
            25 % faster, more resident memory; :func:`sap.models.training.reused_memory`).

    Writes ``last.pt`` (with training state) and ``best.pt`` (highest mean validation F2)
    atomically at every validation (every ``finetune.val_every_steps`` steps and after the last),
    ``log.csv`` (+ TensorBoard), the resolved ``config.yaml`` and ``summary.json``.
    """
    from sap.models.swin import init_output_prior
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
    from sap.sampling import EpochCursor, SamplingCase, build_sampler
    from sap.sampling.torch_data import batch_stream

    started = time.perf_counter()
    init = canonical_init(init)
    method = METHOD_OF_INIT[init]
    out = method_dir(cfg, init, fold)
    f = cfg.finetune
    accelerator = make_accelerator(f.amp)
    main = accelerator.is_main_process
    if main:
        prepare_out_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    with accelerator.main_process_first():  # one process writes splits.json and the cache
        data = load_fold_data(cfg, fold, progress=progress and main)
        sampling_cases = [SamplingCase.from_cached(case) for case in data.train]

    torch.manual_seed(f.seed)  # identical initial weights on every rank
    if pretrained is None:
        pretrained = default_pretrained(cfg, init)
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint = load_checkpoint(out / "last.pt")
        if checkpoint.get("kind") != KIND or "training" not in checkpoint:
            raise SapError(f"{out / 'last.pt'}: not a resumable lesion checkpoint")
        if checkpoint.get("init") != init or checkpoint.get("fold") != fold:
            raise SapError(
                f"{out / 'last.pt'}: was trained with --init {checkpoint.get('init')} --fold "
                f"{checkpoint.get('fold')}, not --init {init} --fold {fold}"
            )
        changed = config_differences(checkpoint.get("config", {}), cfg.to_dict())
        if changed:
            raise SapError(
                f"{out / 'last.pt'}: the config differs from the one this run started with "
                f"({', '.join(changed[:6])}); resume with the same config or start over with --overwrite"
            )
        model = build_model(cfg, "scratch", len(data.channels), None)
        load_weights(model, checkpoint, expect="full", verbose=False)
    else:
        model = build_model(cfg, init, len(data.channels), pretrained, verbose=main)
        # the new 2-class head starts at the lesion prior, equally for every init: from zero it
        # predicts 50 % lesion everywhere and Adam needs hundreds of steps only to unlearn that
        if f.prior_head:
            init_output_prior(model, lesion_class_counts(data.train))
    optimizer = build_optimizer(model, cfg, init)
    scheduler = warmup_cosine_schedule(optimizer, f.max_steps, f.warmup_fraction)
    sampler = build_sampler(
        f.sampler,
        sampling_cases,
        cfg.model.patch_size,
        neg_ratio=f.neg_ratio,
        seed=f.seed,
        batch_size=f.batch_size,
        world_size=accelerator.num_processes,
    )
    cursor = EpochCursor()
    loop = LoopState()
    if checkpoint is not None:
        loop = restore_training_state(checkpoint["training"], optimizer, scheduler, accelerator)
        cursor.load_state_dict(checkpoint["training"]["cursor"])
    # The scheduler stays unprepared: it counts optimiser steps, not steps × processes.
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        save_config(cfg, out / "config.yaml")
    logger = RunLogger(out, LOG_COLUMNS, resume_step=loop.step if resume else None, enabled=main)

    device = accelerator.device
    rank = accelerator.process_index
    stream = batch_stream(
        sampler, cursor, rank=rank, num_workers=f.num_workers, pin_memory=device.type == "cuda"
    )
    loss_fn = LesionLoss()

    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(_step_seed(f.seed, loop.step, rank))
        batch = next(stream)
        return batch["image"].to(device, non_blocking=True), batch["label"].to(
            device, non_blocking=True
        ).long()

    def step_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        image, label = batch
        loss, dice_term, ce_term = loss_fn.terms(net(image), label)
        return loss, {
            "loss": float(loss.detach()),
            "loss_dice": float(dice_term.detach()),
            "loss_ce": float(ce_term.detach()),
            "epoch": float(cursor.epoch),
        }

    def decoder_lr(state: LoopState, last: bool) -> dict[str, float]:
        # after the scheduler step, like the loop's "lr" (the first group: encoder or all)
        return {"lr_decoder": optimizer.param_groups[-1]["lr"]}

    def make(extra_state: bool, metrics: dict[str, float]) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "init": init,
            "method": method,
            "fold": fold,
            "step": loop.step,
            "metrics": _clean(metrics),
            "pretrained": str(pretrained) if pretrained else None,
        }
        if extra_state:
            state = training_state(optimizer, scheduler, accelerator, loop)
            state["cursor"] = cursor.state_dict()
            extra["training"] = state
        return make_checkpoint(
            accelerator.unwrap_model(model),
            config=cfg.to_dict(),
            channels=data.channels,
            kind=KIND,
            out_channels=N_CLASSES,
            threshold=0.5,
            min_volume_ml=0.0,
            **extra,
        )

    final: dict[str, float] = {}

    def validate(state: LoopState) -> dict[str, float]:
        values: dict[str, float] = {}
        if main:
            if data.val:
                values = validate_lesions(accelerator.unwrap_model(model), data.val, cfg, device)
            score = values.get("val_f2", float("nan"))
            # best.pt: highest mean F2; a run whose validation has no finite F2 yet still writes one.
            if (math.isfinite(score) and score > state.best_metric) or state.best_step < 0:
                if math.isfinite(score):
                    state.best_metric = score
                state.best_step = state.step
                save_checkpoint(make(True, values), out / "best.pt")
            save_checkpoint(make(True, values), out / "last.pt")
            final.clear()
            final.update(values)
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
            max_steps=f.max_steps,
            callbacks=[decoder_lr, every(f.val_every_steps, validate)],
            logger=logger,
            desc=f"finetune {method} fold {fold}",
            stop_after=stop_after,
            reuse_memory=keep_memory,
        )
    finally:
        logger.close()
    seconds = time.perf_counter() - started
    if main:
        summary = {
            "init": init,
            "method": method,
            "fold": fold,
            "steps": loop.step,
            "best_step": loop.best_step,
            "best_val_f2": loop.best_metric,
            "final": final,
            "pretrained": str(pretrained) if pretrained else None,
            "training_cases": [c.case_id for c in data.train],
            "validation_cases": [c.case_id for c in data.val],
            "sampler": f.sampler,
            "patches_per_epoch": sampler.epoch_length() * accelerator.num_processes,
            "processes": accelerator.num_processes,
            "seconds": seconds,
        }
        atomic_write_text(out / "summary.json", json.dumps(_clean(summary), indent=1) + "\n")
    accelerator.wait_for_everyone()
    return FinetuneResult(
        init=init,
        method=method,
        fold=fold,
        out_dir=out,
        steps=loop.step,
        best_step=loop.best_step,
        best_f2=loop.best_metric,
        final_metrics=dict(final),
        seconds=seconds,
    )
