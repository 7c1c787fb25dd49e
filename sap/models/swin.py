"""Swin UNETR construction, the legacy patch-merging layout and encoder/decoder parameter groups.

The network is MONAI's :class:`monai.networks.nets.SwinUNETR` (SPEC §5); sap only adds what the
study needs on top of it:

* :func:`build_swin_unetr` builds it from the ``model`` section of the config (MONAI ≥ 1.5 takes
  no ``img_size``; inputs must be divisible by 32 along every axis).
* :class:`LegacyPatchMerging` reproduces the patch merging of MONAI < 1.5. MONAI #8285 ("Fix
  PatchMerging duplicate merging") changed which sub-voxels of each 2×2×2 block are concatenated;
  the weight shapes did not change, so weights trained before MONAI 1.5 (MONAI's published SSL
  encoder, the reference SAP code) load silently into the new layout and compute something else.
  :func:`set_patch_merging` switches a built model between the two layouts without touching weights.
* :func:`parameter_groups` splits parameters into encoder and decoder by name patterns
  (``model.encoder_patterns``; default: ``swinViT.`` and the ``encoder*`` skip blocks, the
  reference code's rule; everything else, ``decoder*`` and ``out``, is the decoder).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2
from torch import nn

from sap.errors import SapError

#: Layouts a model can compute patch merging with.
LAYOUTS = ("legacy", "current")

# Sub-voxel offsets (along the three spatial axes) concatenated by each layout, in order.
# MONAI < 1.5 took (0,1,0) and (0,0,1) twice and never (1,1,0) or (0,1,1).
LEGACY_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class LegacyPatchMerging(PatchMergingV2):
    """Patch merging as MONAI computed it before 1.5 (MONAI #8284/#8285), for 3-D inputs.

    Same parameters (``reduction``, ``norm``) and shapes as MONAI's :class:`PatchMerging`, so a
    state dict moves freely between the two; only the concatenated sub-voxels differ.
    Input ``(B, D, H, W, C)`` channels-last; output ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # 2-D merging never changed
            return super().forward(x)
        if x.dim() != 5:
            raise ValueError(f"expecting a 5-D tensor, got shape {tuple(x.shape)}")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, -1)))


def _merging_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every patch-merging module of a Swin UNETR."""
    found = []
    for parent in model.modules():
        child = getattr(parent, "downsample", None)
        if isinstance(child, PatchMergingV2):
            found.append((parent, "downsample", child))
    return found


def has_patch_merging(model: nn.Module) -> bool:
    """True for a model with Swin patch merging (a Swin UNETR, its encoder, the SSL model)."""
    return bool(_merging_modules(model))


def patch_merging_layout(model: nn.Module) -> str:
    """``"legacy"`` or ``"current"``: the layout the model's patch merging computes."""
    modules = _merging_modules(model)
    if not modules:
        raise SapError("model has no Swin patch-merging modules")
    legacy = {isinstance(m, LegacyPatchMerging) for _, _, m in modules}
    if len(legacy) != 1:
        raise SapError("model mixes legacy and current patch-merging modules")
    return "legacy" if legacy.pop() else "current"


def set_patch_merging(model: nn.Module, layout: str) -> nn.Module:
    """Switch every patch-merging module of ``model`` to ``layout`` in place, keeping its weights."""
    if layout not in LAYOUTS:
        raise SapError(f"patch merging layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    target = LegacyPatchMerging if layout == "legacy" else PatchMerging
    for parent, attr, module in _merging_modules(model):
        if type(module) is target:
            continue
        replacement = target.__new__(target)
        nn.Module.__init__(replacement)
        replacement.dim = module.dim
        replacement.reduction = module.reduction
        replacement.norm = module.norm
        replacement.train(module.training)
        setattr(parent, attr, replacement)
    return model


def resolve_layout(setting: str, source_layout: str | None = None) -> str:
    """The layout to build with: an explicit ``legacy``/``current`` wins; ``auto`` follows the
    weights' layout when known, else ``current`` (what this MONAI trains with)."""
    if setting in LAYOUTS:
        return setting
    if setting != "auto":
        raise SapError(f"model.patch_merging: {setting!r} is not one of auto, legacy, current")
    return source_layout or "current"


def build_swin_unetr(
    model_cfg: Any,
    in_channels: int,
    out_channels: int,
    patch_merging: str | None = None,
) -> SwinUNETR:
    """Swin UNETR from the ``model`` config section.

    ``model_cfg`` needs ``feature_size`` (multiple of 12), ``num_heads``, ``drop_rate``,
    ``attn_drop_rate``, ``dropout_path_rate``, ``use_checkpoint`` and ``patch_merging`` (auto |
    legacy | current).
    ``patch_merging`` (the argument) overrides the config's ``auto``: pass the layout of the
    weights about to be loaded. Inputs are ``(B, in_channels, X, Y, Z)`` with X, Y, Z divisible
    by 32; outputs are logits ``(B, out_channels, X, Y, Z)``.
    """
    if in_channels < 1 or out_channels < 1:
        raise SapError(f"Swin UNETR needs at least one input and output channel, got {in_channels}/{out_channels}")
    if model_cfg.feature_size % 12:
        raise SapError(f"model.feature_size: {model_cfg.feature_size} must be a multiple of 12")
    heads = list(model_cfg.num_heads)  # a ModelConfig: older stored configs get its default
    widths = [model_cfg.feature_size * 2**stage for stage in range(4)]
    if len(heads) != 4 or any(h < 1 or w % h for h, w in zip(heads, widths, strict=False)):
        raise SapError(
            f"model.num_heads: {heads} must be four positive counts dividing the stage widths {widths}"
        )
    model = SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=model_cfg.feature_size,
        num_heads=tuple(heads),
        drop_rate=model_cfg.drop_rate,
        attn_drop_rate=model_cfg.attn_drop_rate,
        dropout_path_rate=model_cfg.dropout_path_rate,
        use_checkpoint=model_cfg.use_checkpoint,
        spatial_dims=3,
        downsample="merging",
    )
    setting = model_cfg.patch_merging
    layout = resolve_layout(setting if setting != "auto" else (patch_merging or "auto"))
    return set_patch_merging(model, layout)


def is_encoder_parameter(name: str, patterns: Sequence[str]) -> bool:
    """A parameter belongs to the encoder when its name starts with one of ``patterns``.

    ``"swinViT."`` matches the transformer; ``"encoder"`` matches ``encoder1`` … ``encoder10``
    (the convolutional skip blocks, which the reference code counts as encoder).
    """
    return any(name.startswith(p) for p in patterns)


def parameter_groups(
    model: nn.Module, patterns: Sequence[str] = ("swinViT.", "encoder")
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, decoder parameters) of a Swin UNETR, split by name ``patterns``.

    Works on a wrapped model too (``module.`` prefixes are ignored). Raises :class:`SapError`
    when either group is empty, which means the patterns do not fit the model.
    """
    encoder, decoder = [], []
    for name, param in model.named_parameters():
        bare = name.removeprefix("module.")
        (encoder if is_encoder_parameter(bare, patterns) else decoder).append(param)
    if not encoder or not decoder:
        raise SapError(
            f"model.encoder_patterns {list(patterns)} split the model into {len(encoder)} encoder and "
            f"{len(decoder)} decoder tensors; both groups must be non-empty"
        )
    return encoder, decoder


def init_output_prior(model: SwinUNETR, class_counts: Sequence[float], floor: float = 1e-4) -> torch.Tensor:
    """Set the output convolution's bias to the log class frequencies (``floor`` for absent ones).

    The untrained network then predicts the label prior instead of uniform classes. With a
    skeleton at 2 % of the voxels, Adam moves the bias by about ``lr`` per step, so starting from
    zero the first few hundred demo steps only learn the prior; from the prior they learn bone
    (demo cohort, step 50: whole-skeleton Dice 0.33 instead of 0.01). Returns the bias set.
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    conv = model.out.conv.conv
    if counts.numel() != conv.out_channels or float(counts.sum()) <= 0:
        raise SapError(f"class prior: {counts.numel()} counts for {conv.out_channels} output channels")
    bias = torch.log(torch.clamp(counts / counts.sum(), min=floor)).to(conv.bias.dtype)
    with torch.no_grad():
        conv.bias.copy_(bias)
    return bias


def encoder_features(model: SwinUNETR, x: torch.Tensor) -> torch.Tensor:
    """Global mean of the Swin ViT stage-4 output: ``(B, 16 × feature_size)`` (SPEC §10 t-SNE)."""
    hidden = model.swinViT(x, model.normalize)
    return hidden[4].mean(dim=(2, 3, 4))


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
