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

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sap.config import Config
from sap.data.cache import CachedCase, cache_cases
from sap.data.cases import discover_cohort
from sap.data.splits import load_or_create_splits
from sap.errors import SapError
from sap.models.training import StageContext, StageParts, StageResult, StageSpec, run_stage
from sap.run_layout import FOLD_SECTIONS, METHOD_OF_INIT, PRETRAIN_OF, RunDir

INITS = ("scratch", "ssl", "sap")
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


def canonical_init(init: str) -> str:
    """``scratch``/``baseline`` → ``scratch``; ``ssl``; ``sap``; anything else is an error."""
    if init in ("scratch", "baseline"):
        return "scratch"
    if init in INITS:
        return init
    raise SapError(f"--init {init!r} is not one of scratch (alias baseline), ssl, sap")


def method_dir(cfg: Config, init: str, fold: int) -> Path:
    """``RUN/{baseline|ssl|sap}/fold_{fold}``."""
    return RunDir.of(cfg.out).fold(METHOD_OF_INIT[canonical_init(init)], fold)


def default_pretrained(cfg: Config, init: str) -> Path | None:
    """``RUN/pretrain/{skeletal|ssl}/best.pt`` for the sap/ssl inits; None for scratch."""
    init = canonical_init(init)
    return None if init == "scratch" else RunDir.of(cfg.out).pretrained(str(PRETRAIN_OF[METHOD_OF_INIT[init]]))


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
    load_weights(model, check_pretrained(init, pretrained), expect=init, verbose=verbose)
    return model


def check_pretrained(init: str, pretrained: str | Path | None) -> Path:
    """The pretrained checkpoint an ``ssl``/``sap`` init starts from; an error when it is missing."""
    if pretrained is None:
        raise SapError(f"--init {init} needs pretrained weights (--pretrained CKPT)")
    path = Path(pretrained)
    if not path.is_file():
        stage = PRETRAIN_OF[METHOD_OF_INIT[init]]
        raise SapError(
            f"{path}: pretrained checkpoint not found; run `sap pretrain --stage {stage}` into this run "
            "folder first, or pass --pretrained CKPT"
        )
    return path


def check_fold_run(cfg: Config, init: str, fold: int, pretrained: str | Path | None, resume: bool = False) -> None:
    """Everything a fine-tuning run can refuse, checked before anything is written (no folder,
    no ``splits.json``): the test fold, the cohort and its lesion masks, the pretrained weights,
    and a pretrained checkpoint that is one of this run's outputs (not needed to ``resume``)."""
    k = cfg.cv.k
    if not 1 <= fold < k:
        raise SapError(f"--fold {fold}: test folds are 1…{k - 1} (fold 0 is the threshold-tuning fold; cv.k = {k})")
    _labelled_patients(cfg)
    if canonical_init(init) != "scratch" and not resume:
        path = check_pretrained(init, pretrained)
        from sap.files import check_not_input
        from sap.run_layout import STAGE_FILES

        out = method_dir(cfg, init, fold)
        check_not_input([out / name for name in STAGE_FILES], [path])


def _labelled_patients(cfg: Config):
    cohort = discover_cohort(cfg.data, require=("patients",))
    unlabelled = [c.case_id for c in cohort.patients if c.lesions is None]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (" …" if len(unlabelled) > 5 else "")
        raise SapError(f"{cfg.data.root}: patient exams without a lesion mask: {shown}")
    return cohort


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
    cohort = _labelled_patients(cfg)
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
        raise SapError(f"{RunDir.of(cfg.out).splits}: fold {fold} leaves no training cases")
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
    from sap.metrics import CumulativeMean, detection_counts, dice
    from sap.models.engine import sliding_window_predict

    scores = CumulativeMean()
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
        scores.append(
            val_f2=counts.f2, val_sensitivity=counts.sensitivity, val_dice=dice(gt > 0, prob >= threshold), val_fp=counts.fp
        )
    return {**{k: float(v) for k, v in scores.aggregate().items()}, "val_cases": float(len(scores))}


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
) -> StageResult:
    """Fine-tune one lesion model; outputs in ``RUN/{baseline|ssl|sap}/fold_{fold}``.

    Args:
        cfg: validated config; ``cfg.out`` is the run folder, ``cfg.data.root`` the cohort.
        init: ``scratch`` (alias ``baseline``), ``ssl`` or ``sap``.
        fold: test fold (1 … k-1); the model trains on the other folds (SPEC §4).
        pretrained: checkpoint for ``ssl``/``sap``; default ``RUN/pretrain/{ssl|skeletal}/best.pt``.
        resume: continue from ``last.pt`` (weights, optimiser, schedule, AMP scaler, sampler
            position, loop position); the init, fold and fine-tuning settings must match.
        overwrite: replace earlier outputs of this (method, fold).
        stop_after: end after that many steps as if killed (tests of ``--resume``).
        keep_memory: on CPU, keep freed memory for reuse during the training loop (steps about
            25 % faster, more resident memory; :func:`sap.models.training.reused_memory`).

    The stage runner (:func:`sap.models.training.run_stage`) writes ``last.pt`` and ``best.pt``
    (highest mean validation F2) at every validation (every ``finetune.val_every_steps`` steps and
    after the last), ``log.csv`` (+ TensorBoard), the resolved ``config.yaml`` and ``summary.json``.
    """
    init = canonical_init(init)
    method = METHOD_OF_INIT[init]
    out = method_dir(cfg, init, fold)
    if pretrained is None:
        pretrained = default_pretrained(cfg, init)
    check_fold_run(cfg, init, fold, pretrained, resume)  # refuse before anything is written
    f = cfg.finetune
    spec = StageSpec(
        kind=KIND, out_dir=out, config=cfg, max_steps=f.max_steps, val_every=f.val_every_steps, metric="val_f2",
        columns=LOG_COLUMNS, warmup_fraction=f.warmup_fraction, amp=f.amp, seed=f.seed,
        desc=f"finetune {method} fold {fold}", sections=FOLD_SECTIONS, identity={"init": init, "fold": fold},
        info={"method": method, "pretrained": str(pretrained) if pretrained else None},
        channels=cfg.data.channels, out_channels=N_CLASSES, reuse_memory=keep_memory,
    )  # fmt: skip
    setup = partial(_setup, cfg, init, fold, pretrained)
    return run_stage(spec, setup, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after)


def _setup(cfg: Config, init: str, fold: int, pretrained: str | Path | None, ctx: StageContext) -> StageParts:
    """The init's model (its new head at the lesion prior), lesion-balanced patches, Dice+CE, and
    validation on whole exams. Every optimiser step re-seeds torch from (seed, step, rank)."""
    from sap.models.swin import init_output_prior
    from sap.sampling import EpochCursor, SamplingCase, build_sampler
    from sap.sampling.torch_data import batch_stream

    f = cfg.finetune
    with ctx.accelerator.main_process_first():  # one process writes splits.json and the cache
        data = load_fold_data(cfg, fold, progress=ctx.progress)
        sampling_cases = [SamplingCase.from_cached(case) for case in data.train]
    if ctx.resuming:  # the weights come from last.pt
        model = build_model(cfg, "scratch", len(data.channels), None)
    else:
        model = build_model(cfg, init, len(data.channels), pretrained, verbose=ctx.main)
        # the new 2-class head starts at the lesion prior, equally for every init: from zero it
        # predicts 50 % lesion everywhere and Adam needs hundreds of steps only to unlearn that
        if f.prior_head:
            init_output_prior(model, lesion_class_counts(data.train))
    optimizer = build_optimizer(model, cfg, init)
    sampler = build_sampler(
        f.sampler,
        sampling_cases,
        cfg.model.patch_size,
        neg_ratio=f.neg_ratio,
        seed=f.seed,
        batch_size=f.batch_size,
        world_size=ctx.world_size,
    )
    cursor = EpochCursor()
    device = ctx.device
    stream = batch_stream(sampler, cursor, rank=ctx.rank, num_workers=f.num_workers, pin_memory=device.type == "cuda")
    loss_fn = LesionLoss()

    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(_step_seed(f.seed, ctx.loop.step, ctx.rank))
        batch = next(stream)
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True).long()

    def step(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        image, label = batch
        loss, dice_term, ce_term = loss_fn.terms(net(image), label)
        return loss, {
            "loss": float(loss.detach()),
            "loss_dice": float(dice_term.detach()),
            "loss_ce": float(ce_term.detach()),
            "epoch": float(cursor.epoch),
        }

    def decoder_lr(state: Any, last: bool) -> dict[str, float]:
        # after the scheduler step, like the loop's "lr" (the first group: encoder or all)
        return {"lr_decoder": optimizer.param_groups[-1]["lr"]}

    def summary() -> dict[str, Any]:
        return {
            "training_cases": [c.case_id for c in data.train],
            "validation_cases": [c.case_id for c in data.val],
            "sampler": f.sampler,
            "patches_per_epoch": sampler.epoch_length() * ctx.world_size,
        }

    return StageParts(
        model, optimizer, draw_batch, step, lambda net: validate_lesions(net, data.val, cfg, device) if data.val else {},
        cursor=cursor, callbacks=[decoder_lr], summary=summary,
    )  # fmt: skip
