"""The three trainable 2D models of paper 000 (SPEC §11), built from a serialisable :class:`ModelSpec`.

* ``unet``: an nnU-Net-style 2D U-Net (MONAI ``DynUNet``: 3×3 convolutions, stride-2
  down-sampling until the bottleneck is at least 4 px, features doubling from ``base`` to at most
  ``max``, instance norm, leaky ReLU), two output channels, batch Dice + CE (softmax; :func:`make_loss`).
* ``foundation``: a ViT encoder from ``transformers`` (DINOv3 ``DINOv3ViTModel`` or DINOv2
  ``Dinov2Model``) with a light head of three Conv-BN-ReLU blocks and a 1×1 output convolution on
  the patch-token grid, up-sampled to the input size; encoder frozen or fine-tuned; Dice + BCE.
* ``sam``: prompt-free SAM/MedSAM: ``transformers`` ``SamModel`` image encoder and mask decoder;
  a small CNN adapter (three stride-2 Conv-BN-ReLU blocks) turns the image into the sparse and
  dense prompt embeddings in place of the prompt encoder; Dice + BCE.

Every model takes ``(B, 1, S, S)`` bone-windowed slices in [0, 1] and returns logits
``(B, C, S, S)`` (C = 2 for the U-Net, 1 otherwise); :func:`foreground_probability` maps them to
``(B, S, S)`` probabilities. Weights come only from local paths (a Hugging Face model folder read
with ``local_files_only=True``, or a model folder written by ``sap slice2d train``); tests build tiny
random configs of the same classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sap.errors import SapError

MODEL_KINDS = ("unet", "foundation", "sam")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model without its pretrained source (stored with the weights)."""

    kind: str
    image_size: int
    arch: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] → (B, 3, H, W) with ImageNet mean/std (what ViT/SAM encoders expect)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


# ----------------------------------------------------------------------------------- U-Net
def unet_filters(image_size: int, base: int = 32, maximum: int = 512, max_stages: int = 8) -> list[int]:
    """nnU-Net's rule of thumb: halve the resolution until the bottleneck is >= 4 px (at most 8 stages)."""
    stages = 1
    while stages < max_stages and image_size // 2**stages >= 4:
        stages += 1
    return [min(base * 2**i, maximum) for i in range(stages)]


def build_unet(filters: list[int]) -> nn.Module:
    from monai.networks.nets import DynUNet

    n = len(filters)
    return DynUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=filters,
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=False,
    )


# ----------------------------------------------------------------------------------- foundation
class FoundationSegmenter(nn.Module):
    """ViT encoder (patch tokens) + three Conv-BN-ReLU blocks + 1×1 conv, up-sampled to the input."""

    def __init__(self, encoder: nn.Module, head_channels: list[int], freeze_encoder: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = int(encoder.config.patch_size)
        self.freeze_encoder = freeze_encoder
        if len(head_channels) != 3:
            raise ValueError("the head has three Conv-BN-ReLU blocks: give three channel counts")
        c = int(encoder.config.hidden_size)
        blocks = []
        for width in head_channels:
            blocks.append(conv_bn_relu(c, width))
            c = width
        self.head = nn.Sequential(*blocks, nn.Conv2d(c, 1, 1))
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> FoundationSegmenter:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its dropout/norm statistics fixed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            tokens = self.encoder(pixel_values=imagenet_normalise(x)).last_hidden_state
        # CLS (and DINOv3 register) tokens come first; the patch grid is the last gh·gw tokens
        grid = tokens[:, -gh * gw :].transpose(1, 2).reshape(b, -1, gh, gw)
        return F.interpolate(self.head(grid), size=(h, w), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------- prompt-free SAM
class PromptAdapter(nn.Module):
    """Image → (sparse (B, 1, T, D), dense (B, D, E, E)) prompt embeddings, replacing SAM's prompt encoder."""

    def __init__(self, channels: list[int], hidden: int, embedding_size: int, n_tokens: int) -> None:
        super().__init__()
        layers, c = [], 1
        for width in channels:
            layers.append(conv_bn_relu(c, width, stride=2))
            c = width
        self.features = nn.Sequential(*layers)
        self.dense = nn.Conv2d(c, hidden, 1)
        self.sparse = nn.Linear(c, n_tokens * hidden)
        self.embedding_size = embedding_size
        self.n_tokens = n_tokens
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        dense = self.dense(F.adaptive_avg_pool2d(f, self.embedding_size))
        sparse = self.sparse(f.mean(dim=(2, 3))).view(x.shape[0], 1, self.n_tokens, self.hidden)
        return sparse, dense


class PromptFreeSam(nn.Module):
    """SAM image encoder + mask decoder with a CNN adapter instead of prompts (paper 000)."""

    def __init__(self, sam: nn.Module, adapter_channels: list[int], n_tokens: int, freeze_encoder: bool) -> None:
        super().__init__()
        self.sam = sam
        self.image_size = int(sam.config.vision_config.image_size)
        self.adapter = PromptAdapter(
            adapter_channels,
            hidden=int(sam.config.mask_decoder_config.hidden_size),
            embedding_size=int(sam.config.prompt_encoder_config.image_embedding_size),
            n_tokens=n_tokens,
        )
        self.freeze_encoder = freeze_encoder
        # the prompt encoder is replaced: keep its weights (for saving) but never train them
        self.sam.prompt_encoder.requires_grad_(False)
        if freeze_encoder:
            self.sam.vision_encoder.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        pixels = imagenet_normalise(x)
        if (h, w) != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            embeddings = self.sam.vision_encoder(pixels).last_hidden_state
        sparse, dense = self.adapter(x)
        positional = self.sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
        masks, _ = self.sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return F.interpolate(masks[:, 0], size=(h, w), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------- build / load
def _check_hf_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SapError(
            f"{path}: not a local Hugging Face model folder (no config.json) for the {what}; "
            "weights are read only from local paths, never downloaded"
        )
    return path


def load_hf_model(path: str | Path, what: str) -> nn.Module:
    """A pretrained ``transformers`` model from a local folder (no network access).

    Fails, with the counts, when any weight of the model is missing from the folder or has another
    shape: ``from_pretrained`` alone would initialise those randomly and only log it.
    """
    folder = _check_hf_folder(path, what)
    try:
        if what == "sam":
            from transformers import SamModel

            model, info = SamModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        else:
            from transformers import AutoModel

            model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, AttributeError …
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SapError(f"{folder}: cannot load the {what} weights ({reason})") from exc
    missing, mismatched = list(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise SapError(
            f"{folder}: the {what} weights do not fit a {type(model).__name__} (missing {len(missing)}, "
            f"shape-mismatched {len(mismatched)}, unexpected {len(info.get('unexpected_keys', []))}); wrong folder?"
        )
    if what != "sam" and not hasattr(model.config, "patch_size"):
        raise SapError(f"{folder}: {type(model).__name__} is not a ViT encoder (DINOv3/DINOv2 expected)")
    return model


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    return model.config.to_dict()


def hf_model_from_config(config: dict[str, Any], what: str) -> nn.Module:
    """Rebuild a randomly initialised ``transformers`` model from its config dict."""
    if what == "sam":
        from transformers import SamConfig, SamModel

        return SamModel(SamConfig(**config))
    from transformers import AutoConfig, AutoModel

    config = dict(config)
    model_type = config.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


def build_model(spec: ModelSpec, pretrained: nn.Module | None = None) -> nn.Module:
    """The network of ``spec``; ``pretrained`` (a transformers model) replaces the random encoder."""
    a = spec.arch
    if spec.kind == "unet":
        return build_unet(list(a["filters"]))
    if spec.kind == "foundation":
        encoder = pretrained if pretrained is not None else hf_model_from_config(a["encoder_config"], "encoder")
        return FoundationSegmenter(encoder, list(a["head_channels"]), bool(a["freeze_encoder"]))
    if spec.kind == "sam":
        sam = pretrained if pretrained is not None else hf_model_from_config(a["sam_config"], "sam")
        return PromptFreeSam(sam, list(a["adapter_channels"]), int(a["n_tokens"]), bool(a["freeze_encoder"]))
    raise SapError(f"--model {spec.kind!r}: choose one of {', '.join(MODEL_KINDS)}")


def foreground_probability(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) logits → (B, H, W) foreground probability."""
    if kind == "unet":
        return torch.softmax(logits, dim=1)[:, 1]
    return torch.sigmoid(logits[:, 0])


def make_loss(kind: str, ce_topk_percent: float | None = None) -> nn.Module:
    """Dice + CE (softmax, two channels) for the U-Net; Dice + BCE (sigmoid) for the others.

    The soft Dice is nnU-Net's: the foreground channel only, summed over the whole batch ("batch
    Dice"), so a slice without foreground adds no Dice term of its own. MONAI's default (a Dice per
    slice and channel, background included, smoothing 1e-5) scores an empty slice 1 - 1e-5/(1e-5 +
    predicted area): a loss that only reaches 0 when the predicted foreground of the whole slice is
    below 1e-5 pixel. Half of a balanced batch is such slices, so the U-Net learned to predict
    probability ~1e-12 everywhere, where the softmax saturates and the lesion slices' Dice gradient
    vanishes (demo CT cohort: validation Dice 0.000 after 300 steps, training loss 0.000 on every
    all-negative batch). The Dice and CE terms of the last call are kept in ``last_terms``.

    ``ce_topk_percent`` (U-Net only): the CE term is the mean over the hardest k % of the batch's
    pixels (nnU-Net's Dice + top-k loss variant) instead of over all of them. With the plain mean a
    lesion kind the network has once called background with confidence stays background: its
    pixels' Dice gradient vanishes in the saturated softmax, and their CE is divided by every easy
    pixel of the batch (a lytic lesion's few dozen pixels among the 16 384 of a demo batch). On the
    demo CT cohort the U-Net then never segmented one lytic lesion (Dice 0.000 on 91 training
    slices after 4000 steps) while it learns them alone; top-k lifts those pixels' CE weight
    1/(k %) times, and the U-Net learns both kinds. It is off by default
    (``slice2d.unet_ce_topk_percent``): on the demo's two validation patients it did not raise the
    Dice across cohorts (benchmarks/slice2d_learning.md, round 5).
    """
    if kind == "unet":
        return DiceCE(to_onehot_y=True, softmax=True, include_background=False, batch=True, ce_topk_percent=ce_topk_percent)
    return DiceCE(sigmoid=True, batch=True)


def _dice_ce_class() -> type:
    from monai.losses import DiceCELoss

    class _DiceCE(DiceCELoss):
        """MONAI's ``DiceCELoss`` that also records its two terms (``last_terms``: dice, ce) and can
        average its softmax CE over the hardest ``ce_topk_percent`` % of pixels only."""

        last_terms: tuple[float, float] = (math.nan, math.nan)

        def __init__(self, ce_topk_percent: float | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if ce_topk_percent is not None and not 0.0 < ce_topk_percent <= 100.0:
                raise ValueError(f"ce_topk_percent must be in (0, 100], got {ce_topk_percent}")
            self.ce_topk_percent = ce_topk_percent

        def topk_ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            per_pixel = F.cross_entropy(input, target[:, 0].long(), reduction="none").flatten()
            k = max(1, math.ceil(per_pixel.numel() * self.ce_topk_percent / 100.0))
            return per_pixel.topk(k, sorted=False).values.mean()

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            dice = self.dice(input, target)
            if input.shape[1] == 1:
                ce = self.bce(input, target)
            elif self.ce_topk_percent is not None:
                ce = self.topk_ce(input, target)
            else:
                ce = self.ce(input, target)
            self.last_terms = (float(dice.detach()), float(ce.detach()))
            return self.lambda_dice * dice + self.lambda_ce * ce

    return _DiceCE


def DiceCE(**kwargs: Any) -> nn.Module:  # noqa: N802 - a class factory (MONAI is imported lazily)
    """A MONAI ``DiceCELoss(**kwargs)`` recording its Dice and CE terms (see :func:`make_loss`)."""
    return _dice_ce_class()(**kwargs)


def output_layer(model: nn.Module, kind: str) -> nn.Conv2d | None:
    """The convolution that produces the logits (None for SAM, whose masks have no output bias)."""
    if kind == "unet":
        return model.output_block.conv.conv
    if kind == "foundation":
        return model.head[-1]
    return None


def init_output_prior(model: nn.Module, kind: str, foreground_fraction: float, floor: float = 1e-4) -> torch.Tensor | None:
    """Start the output bias at the foreground prior (as :func:`sap.models.swin.init_output_prior`).

    U-Net (softmax): bias = (log(1 - f), log f); foundation (sigmoid): bias = logit f, with f the
    foreground pixel fraction of the training slices (at least ``floor``). The untrained network
    then predicts the label prior instead of 50 % foreground everywhere; from 50 % the first,
    large SGD steps (momentum 0.99) overshoot far past the prior into the saturated softmax.
    SAM's mask decoder has no output bias: returns None and changes nothing.
    """
    conv = output_layer(model, kind)
    if conv is None or conv.bias is None:
        return None
    f = min(max(float(foreground_fraction), floor), 1.0 - floor)
    if conv.out_channels == 2:
        bias = torch.tensor([math.log1p(-f), math.log(f)])
    elif conv.out_channels == 1:
        bias = torch.tensor([math.log(f) - math.log1p(-f)])
    else:
        raise SapError(f"output prior: {conv.out_channels} output channels (1 or 2 expected)")
    with torch.no_grad():
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return bias


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly; a mismatch is a one-line error with the counts (SPEC §13)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise SapError(
            f"{source}: checkpoint does not fit the model (loaded {len(own) - len(missing) - len(mismatched)}, "
            f"missing {len(missing)}, unexpected {len(unexpected)}, shape-mismatched {len(mismatched)})"
        )
    model.load_state_dict(state, strict=True)
