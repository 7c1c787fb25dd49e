"""Training of the 2D slice models (``sap slice2d train``) and the shared batch/predict helpers.

Training goes through the stage runner (:func:`sap.models.training.run_stage`), like the 3D
stages. A model folder holds ``best.pt`` (the weights with the best validation Dice, or the
latest when there is no validation subject), ``last.pt``, ``config.yaml`` (the resolved config),
``log.csv`` (step, learning rate, loss and its terms, validation Dice/IoU) with TensorBoard,
``summary.json``, ``split.json`` (patient-level split) and ``train_summary.json``. Each checkpoint
carries the :class:`~sap.slice2d.models.ModelSpec` (under ``run``), so prediction rebuilds the
network without the pretrained source folder; ``model.pt`` folders of earlier versions still load.

Optimisers: the U-Net uses nnU-Net's SGD (Nesterov momentum 0.99, weight decay 3e-5, polynomial
decay with exponent 0.9, ``slice2d.unet_lr``); the foundation and SAM models use AdamW
(``slice2d.lr``, ``slice2d.weight_decay``) with cosine decay, as paper 000 trains them.
Augmentation (``slice2d.augment``, :func:`augment_batch`) follows paper 000 without its elastic
deformation: random rotation ±20° and scaling 0.9–1.1 (p 0.7), brightness/contrast jitter (p 0.8).
The U-Net (:func:`augment_settings`) is mirrored left-right (p 0.5, ``slice2d.unet_mirror``), as
nnU-Net's default augmentation that paper 000 trained it with, and is not jittered
(``slice2d.unet_intensity_jitter``): CT numbers are calibrated, and a shift of up to ±180 HU makes a
bone island (1000 HU) look like a blastic lesion. Its loss is paper 000's Dice + CE;
``slice2d.unet_ce_topk_percent`` averages the CE over the hardest k % of pixels instead (nnU-Net's
Dice + top-k variant, :func:`sap.slice2d.models.make_loss`), with which the demo U-Net learns
lytic lesions beside blastic ones.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from sap.config import Config, Slice2DConfig
from sap.errors import SapError
from sap.files import write_json
from sap.models.training import StageContext, StageParts, StageSpec, check_out_dir, run_stage
from sap.models.weights import load_checkpoint
from sap.slice2d.data import SliceSet, split_by_patient, target_mask
from sap.slice2d.metrics import score_slice, summarise
from sap.slice2d.models import (
    ModelSpec,
    build_model,
    foreground_probability,
    hf_config_dict,
    init_output_prior,
    load_hf_model,
    make_loss,
    unet_filters,
)

#: what the weights are, in the checkpoints' ``kind``
CHECKPOINT_KIND = "slice2d"
#: log.csv columns besides ``step``: learning rate, the loss and its Dice and CE terms per step;
#: validation every ``slice2d.val_every_steps``
LOG_COLUMNS = ["lr", "loss", "loss_dice", "loss_ce", "val_dice", "val_iou", "val_dice_pooled"]


# ----------------------------------------------------------------------------------- models
def create_model(kind: str, settings: Slice2DConfig) -> tuple[torch.nn.Module, ModelSpec]:
    """A new model of ``kind`` from the config; foundation/SAM weights from their local folders."""
    size = settings.image_size
    if kind == "unet":
        spec = ModelSpec("unet", size, {"filters": unet_filters(size, settings.unet_base_filters, settings.unet_max_filters)})
        return build_model(spec), spec
    if kind == "foundation":
        if not settings.foundation_checkpoint:
            raise SapError(
                "--model foundation needs a local DINOv3/DINOv2 folder: --checkpoint DIR "
                "(or slice2d.foundation_checkpoint); weights are never downloaded"
            )
        encoder = load_hf_model(settings.foundation_checkpoint, "foundation encoder")
        patch = int(encoder.config.patch_size)
        if size % patch:
            raise SapError(f"slice2d.image_size {size} is not a multiple of the encoder's patch size {patch}")
        arch = {
            "encoder_config": hf_config_dict(encoder),
            "head_channels": list(settings.foundation_head_channels),
            "freeze_encoder": settings.freeze_encoder,
        }
        spec = ModelSpec("foundation", size, arch)
        return build_model(spec, pretrained=encoder), spec
    if kind == "sam":
        if not settings.sam_checkpoint:
            raise SapError(
                "--model sam needs a local SAM/MedSAM folder in transformers format: --checkpoint DIR "
                "(or slice2d.sam_checkpoint); weights are never downloaded"
            )
        sam = load_hf_model(settings.sam_checkpoint, "sam")
        # SAM/MedSAM work at their encoder's input size (1024 for the published weights, as paper 000
        # trains them); slices are resized to it directly rather than to slice2d.image_size
        size = int(sam.config.vision_config.image_size)
        arch = {
            "sam_config": hf_config_dict(sam),
            "adapter_channels": list(settings.sam_adapter_channels),
            "n_tokens": settings.sam_prompt_tokens,
            "freeze_encoder": settings.freeze_encoder,
        }
        spec = ModelSpec("sam", size, arch)
        return build_model(spec, pretrained=sam), spec
    raise SapError(f"--model {kind!r}: choose one of unet, foundation, sam")


def make_optimizer(
    kind: str, model: torch.nn.Module, settings: Slice2DConfig, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """nnU-Net SGD + poly decay for the U-Net; AdamW + cosine decay for the others."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = max(1, max_steps)
    if kind == "unet":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=settings.unet_lr, momentum=0.99, nesterov=True, weight_decay=3e-5
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, steps - 1) / steps) ** 0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


# ----------------------------------------------------------------------------------- batches
class SliceSampler:
    """Batches of slice indices with a fixed share of slices that hold foreground.

    Each batch takes ``max(1, round(positive_fraction × batch))`` slices from the foreground slices
    and the rest from the others, each pool walked in its own seeded permutation (a fresh one
    when it runs out), as nnU-Net oversamples foreground. ``positive_fraction=None``, or a set
    without slices of both kinds, draws batches from one shuffled order of all slices (the
    epoch-wise order of earlier versions). A Dice term only learns from batches that hold
    foreground; a plain shuffle of a balanced set gives a batch of four no lesion 1 time in 16,
    and the ``all`` slice filter almost always.
    """

    def __init__(self, has_foreground: list[bool] | np.ndarray, batch_size: int, positive_fraction: float | None, rng: np.random.Generator) -> None:
        fg = np.asarray(has_foreground, dtype=bool)
        self.rng = rng
        self.batch_size = int(batch_size)
        pos, neg = np.flatnonzero(fg), np.flatnonzero(~fg)
        if positive_fraction is None or not len(pos) or not len(neg):
            self.pools, self.counts = [np.arange(fg.size)], [self.batch_size]
        else:
            n_pos = min(self.batch_size, max(1, round(positive_fraction * self.batch_size)))
            self.pools, self.counts = [pos, neg], [n_pos, self.batch_size - n_pos]
        self.orders = [rng.permutation(pool) for pool in self.pools]
        self.cursors = [0] * len(self.pools)

    def next_batch(self) -> np.ndarray:
        picked = []
        for k, n in enumerate(self.counts):
            for _ in range(n):
                if self.cursors[k] >= len(self.orders[k]):  # this pool's epoch ended: a fresh order
                    self.orders[k], self.cursors[k] = self.rng.permutation(self.pools[k]), 0
                picked.append(int(self.orders[k][self.cursors[k]]))
                self.cursors[k] += 1
        return np.asarray(picked, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"orders": [o.tolist() for o in self.orders], "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["orders"]) != len(self.pools):
            raise SapError("resume: the sampler state does not fit this training set (other slices or settings?)")
        self.orders = [np.asarray(o, dtype=np.int64) for o in state["orders"]]
        self.cursors = [int(c) for c in state["cursors"]]


def foreground_fraction(masks: list[np.ndarray]) -> float:
    """Share of foreground pixels over all slices (the label prior of the output bias)."""
    total = sum(int(m.size) for m in masks)
    return sum(int(np.count_nonzero(m)) for m in masks) / total if total else 0.0


def to_batch(
    images: list[np.ndarray], masks: list[np.ndarray] | None, size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slices of any size → (B, 1, S, S) images (bilinear) and masks (nearest), float32."""
    x = torch.stack(
        [F.interpolate(torch.as_tensor(im, dtype=torch.float32)[None, None], size=(size, size), mode="bilinear", align_corners=False)[0] for im in images]
    ).to(device)
    if masks is None:
        return x, None
    y = torch.stack(
        [F.interpolate(torch.as_tensor(m, dtype=torch.float32)[None, None], size=(size, size), mode="nearest")[0] for m in masks]
    ).to(device)
    return x, y


def augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    p_affine: float = 0.7,
    max_rotation_deg: float = 20.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    p_intensity: float = 0.8,
    jitter: float = 0.2,
    p_mirror: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper 000's augmentation, per sample: a random rotation and scaling (probability
    ``p_affine``; image bilinear, mask nearest, the same transform) and brightness/contrast jitter
    of the image (probability ``p_intensity``), clipped back to [0, 1]. Elastic deformation is not
    applied. ``p_mirror``: then a left-right mirror of image and mask (the display columns run
    from the patient's right to left). Random numbers come from ``generator`` (CPU), so runs and
    resumed runs repeat; with ``p_mirror`` 0 no number is drawn for it, so the other transforms
    draw the same numbers as without it.
    """
    b = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    use_affine = rand(b) < p_affine
    angle = (rand(b) * 2 - 1) * max_rotation_deg * torch.pi / 180
    scale = scale_range[0] + rand(b) * (scale_range[1] - scale_range[0])
    use_intensity = rand(b) < p_intensity
    gain = 1 + (rand(b) * 2 - 1) * jitter
    shift = (rand(b) * 2 - 1) * jitter / 2
    if use_affine.any():
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta[~use_affine] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if use_intensity.any():
        g = torch.where(use_intensity, gain, torch.ones(b)).to(x.device, x.dtype).view(b, 1, 1, 1)
        o = torch.where(use_intensity, shift, torch.zeros(b)).to(x.device, x.dtype).view(b, 1, 1, 1)
        x = torch.clamp(x * g + o, 0.0, 1.0)
    if p_mirror > 0:
        mirrored = (rand(b) < p_mirror).to(x.device)
        x = torch.where(mirrored.view(b, 1, 1, 1), x.flip(-1), x)
        y = torch.where(mirrored.view(b, 1, 1, 1), y.flip(-1), y)
    return x, y


def augment_settings(kind: str, settings: Slice2DConfig) -> dict[str, float]:
    """The :func:`augment_batch` probabilities for a model kind: paper 000's recipe for the
    foundation and SAM models; for the U-Net a left-right mirror (``unet_mirror``) and no
    intensity jitter unless ``unet_intensity_jitter``."""
    if kind != "unet":
        return {}
    probabilities = {"p_mirror": 0.5 if settings.unet_mirror else 0.0}
    if not settings.unet_intensity_jitter:
        probabilities["p_intensity"] = 0.0
    return probabilities


@torch.no_grad()
def predict_slices(
    model: torch.nn.Module, kind: str, images: list[np.ndarray], size: int, batch_size: int = 8, device: torch.device | str = "cpu"
) -> list[np.ndarray]:
    """Foreground probabilities (float32, each at its slice's own size) for display-oriented slices."""
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x, _ = to_batch(chunk, None, size, device)
        prob = foreground_probability(kind, model(x))[:, None]
        for p, im in zip(prob, chunk, strict=True):
            resized = F.interpolate(p[None], size=im.shape, mode="bilinear", align_corners=False)[0, 0]
            out.append(resized.float().cpu().numpy())
    return out


def validate(model: torch.nn.Module, kind: str, val: SliceSet, size: int, threshold: float, device: torch.device | str) -> dict:
    """Mean per-slice Dice/IoU (empty-slice rule, SPEC §11) of the model on a slice set, plus
    ``dice_pooled``: one Dice over all pixels of all slices (the set's foreground as a whole, so a
    lesion's 1-pixel end slice weighs by its pixel, not as much as a whole slice)."""
    probs = predict_slices(model, kind, val.images, size, device=device)
    scores, inter, total = [], 0, 0
    for p, m in zip(probs, val.masks, strict=True):
        pred, gt = p >= threshold, m > 0
        scores.append(score_slice(pred, gt, distances=False))
        inter += int(np.count_nonzero(pred & gt))
        total += int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return {**summarise(scores), "dice_pooled": 2.0 * inter / total if total else math.nan}


# ----------------------------------------------------------------------------------- cohort
def ct_data_config(cfg: Config):
    """The data section for one CT channel: the configured name when it is a single channel, else ``CT``."""
    channels = cfg.data.channels if cfg.data.modality == "ct" and len(cfg.data.channels) == 1 else ["CT"]
    return replace(cfg.data, modality="ct", channels=list(channels))


def load_slice_sets(
    cfg: Config, target: str, progress: bool = True
) -> tuple[SliceSet, SliceSet, dict[str, list[str]]]:
    """Train/validation slices of the cohort with a patient-level split."""
    from sap.data.cases import discover_cohort
    from sap.data.preprocess import load_case

    s = cfg.slice2d
    data_cfg = ct_data_config(cfg)
    cohort = discover_cohort(data_cfg)
    cases = [c for c in cohort.cases if (c.lesions if target == "lesions" else c.skeleton) is not None]
    if not cases:
        what = "lesion masks (GT)" if target == "lesions" else "skeleton label maps"
        raise SapError(f"{cohort.root}: no case with {what} for --target {target}")
    train_ids, val_ids = split_by_patient(
        [c.case_id for c in cases], [c.subject_id for c in cases], s.val_fraction, s.seed
    )
    rng = np.random.default_rng(s.seed)
    sets = {"train": SliceSet(), "val": SliceSet()}
    val_set = set(val_ids)
    for case in tqdm(cases, desc="slice2d: reading cases", unit="case", disable=not progress):
        loaded = load_case(case, data_cfg)
        mask = target_mask(loaded.lesions, loaded.skeleton, target, str(case.case_id))
        side = "val" if case.case_id in val_set else "train"
        sets[side].add_volume(
            case.case_id, loaded.image[0], mask, loaded.spacing, s.slice_filter, rng, s.window_level, s.window_width
        )
    if not len(sets["train"]):
        raise SapError(f"{cohort.root}: no training slices after the '{s.slice_filter}' slice filter")
    return sets["train"], sets["val"], {"train": train_ids, "val": val_ids}


# ----------------------------------------------------------------------------------- fit
class BatchOrder:
    """The position of the batch stream: the slice sampler and the augmentation generator.

    The stage runner saves it with ``last.pt`` (``StageParts.cursor``) and restores it on
    ``--resume``; the sampler's own numpy generator is the runner's, saved with the RNG state.
    """

    def __init__(self, sampler: SliceSampler, augment_rng: torch.Generator) -> None:
        self.sampler, self.augment_rng = sampler, augment_rng

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "augment_rng": self.augment_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" not in state:
            raise SapError("resume: last.pt holds no sampler state; train afresh with --overwrite")
        self.sampler.load_state_dict(state["sampler"])
        self.augment_rng.set_state(state["augment_rng"])


def batch_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch (the runner takes the optimiser step)."""
    return loss_fn(model(x), y)


def fit(
    model: torch.nn.Module,
    spec: ModelSpec,
    train: SliceSet,
    val: SliceSet | None,
    settings: Slice2DConfig,
    out_dir: Path,
    target: str,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    config: Config | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train for ``settings.max_steps`` steps through the stage runner
    (:func:`sap.models.training.run_stage`): ``best.pt`` (best validation Dice; the latest
    weights when there is no validation slice), ``last.pt``, ``log.csv``, ``config.yaml`` and
    ``summary.json`` in ``out_dir``, with the runner's ``--overwrite``/``--resume`` rules.

    ``model`` is the new network (``resume``: the network rebuilt from ``last.pt``'s spec, whose
    weights the runner restores). ``config`` is stored in the checkpoints and compared on
    ``--resume`` (default: the config with this ``slice2d`` section). Returns ``best_step``,
    ``best_val_dice`` (None without validation) and ``steps``.
    """
    cfg = config if config is not None else Config(slice2d=settings)
    kind = spec.kind
    stage = StageSpec(
        kind=CHECKPOINT_KIND, out_dir=Path(out_dir), config=cfg, max_steps=settings.max_steps,
        val_every=settings.val_every_steps, metric="val_dice", columns=LOG_COLUMNS, amp=settings.amp,
        seed=settings.seed, desc=f"slice2d: training {kind}", sections=("data", "slice2d"),
        identity={"model": kind, "target": target},
        info={"spec": spec.to_dict(), "window": [settings.window_level, settings.window_width],
              "slice2d_threshold": settings.threshold, "n_train_slices": len(train), "n_val_slices": len(val or ())},
        channels=list(ct_data_config(cfg).channels), out_channels=1,
    )  # fmt: skip

    def setup(ctx: StageContext) -> StageParts:
        if not ctx.resuming and settings.prior_head:
            init_output_prior(model, kind, foreground_fraction(train.masks))
        optimizer, schedule = make_optimizer(kind, model, settings, settings.max_steps)
        sampler = SliceSampler([bool(m.any()) for m in train.masks], settings.batch_size, settings.positive_fraction, ctx.generator)
        order = BatchOrder(sampler, torch.Generator().manual_seed(settings.seed))
        loss_fn = make_loss(kind, settings.unet_ce_topk_percent)  # the top-k share applies to the U-Net only
        augment_kwargs = augment_settings(kind, settings)

        def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
            idx = sampler.next_batch()
            x, y = to_batch([train.images[i] for i in idx], [train.masks[i] for i in idx], spec.image_size)
            if settings.augment:  # on the CPU, with the saved generator: resumed runs repeat
                x, y = augment_batch(x, y, order.augment_rng, **augment_kwargs)
            return x.to(ctx.device), y.to(ctx.device)

        def step(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            loss = batch_loss(net, loss_fn, *batch)
            dice, ce = getattr(loss_fn, "last_terms", (math.nan, math.nan))
            return loss, {"loss": float(loss.detach()), "loss_dice": float(dice), "loss_ce": float(ce)}

        def validate_model(net: torch.nn.Module) -> dict[str, float]:
            if val is None or not len(val):
                return {"val_dice": math.nan}
            scores = validate(net, kind, val, spec.image_size, settings.threshold, ctx.device)
            return {"val_dice": scores["dice"], "val_iou": scores["iou"], "val_dice_pooled": scores["dice_pooled"]}

        return StageParts(model, optimizer, draw_batch, step, validate_model, scheduler=schedule, cursor=order)

    result = run_stage(stage, setup, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after)
    best = result.best_metric if math.isfinite(result.best_metric) else None
    return {"best_step": result.best_step, "best_val_dice": best, "steps": result.steps}


def read_model_spec(path: Path) -> tuple[ModelSpec, str]:
    """The network spec and target stored in a ``sap slice2d train`` checkpoint (``--resume``)."""
    ckpt = load_checkpoint(path)
    run = ckpt.get("run") or {}
    if ckpt.get("kind") != CHECKPOINT_KIND or "spec" not in run:
        raise SapError(f"{path}: not a sap slice2d checkpoint (kind {ckpt.get('kind')!r})")
    return ModelSpec(**run["spec"]), str(run.get("target"))


def train_slice_model(
    cfg: Config,
    out_dir: str | Path,
    kind: str | None = None,
    target: str | None = None,
    checkpoint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """``sap slice2d train``: read the cohort, split by patient, train, write the model folder.

    ``resume`` continues from ``OUT/last.pt`` (the network is rebuilt from its stored spec).
    """
    s = cfg.slice2d
    kind = kind or s.model
    target = target or s.target
    if checkpoint:
        if kind == "foundation":
            s.foundation_checkpoint = checkpoint
        elif kind == "sam":
            s.sam_checkpoint = checkpoint
        else:
            raise SapError("--checkpoint is for --model foundation or sam (the U-Net trains from scratch)")
    s.model, s.target = kind, target
    out = Path(out_dir)
    check_out_dir(out, resume, overwrite)  # before reading any data
    if resume:
        spec, stored_target = read_model_spec(out / "last.pt")
        if spec.kind != kind or stored_target != target:
            raise SapError(f"{out / 'last.pt'}: holds a {spec.kind} model for {stored_target}, not {kind} for {target}")
        model = build_model(spec)
    else:
        torch.manual_seed(s.seed)  # the same seed gives the same initial weights
        model, spec = create_model(kind, s)  # before reading data: bad weights fail fast
    train, val, split = load_slice_sets(cfg, target, progress)
    cfg.out = str(out)
    result = fit(model, spec, train, val, s, out, target, progress, resume, overwrite, config=cfg)
    write_json(out / "split.json", {"level": "patient", **split})
    result.update(n_train_slices=len(train), n_val_slices=len(val), model_dir=str(out))
    write_json(out / "train_summary.json", result)
    return result
