"""Self-supervised heads and losses of Tang et al. 2022 (the study's SSL baseline, SPEC §6).

The encoder is exactly the ``swinViT`` of a Swin UNETR (same module, same key names), so its
weights load into a segmentation model with ``load_weights(…, expect="ssl")``. Three proxy tasks
share it, with losses summed at weight 1:

* **inpainting**: blocks of each view are replaced by noise (:func:`random_block_mask`: at most
  ``mask_ratio`` of the crop, each block at most ``mask_block_fraction`` of each axis) and the
  reconstruction head recovers the unmasked, rotated view (L1);
* **rotation**: each view is rotated by 0/90/180/270° in the axial plane and the rotation head
  classifies the angle (cross-entropy);
* **contrastive**: two views of every crop are positives, the other crops of the batch negatives
  (NT-Xent at temperature 0.5), so a batch needs at least two crops.

Where Tang reads the first stage-4 tokens for the rotation and contrastive heads, sap pools all
stage-4 tokens (global mean), the same feature the t-SNE figure uses *(ours)*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sap.errors import SapError

ROTATIONS = 4  #: 0, 90, 180, 270 degrees
ROTATION_DIMS = (2, 3)  #: tensor dims of the axial plane (RAS array axes 0 and 1)


class ReconstructionHead(nn.Module):
    """Stage-4 features ``(B, 16f, X/32, Y/32, Z/32)`` → image ``(B, C, X, Y, Z)``: five ×2
    upsampling stages, each halving the channels, then a 1×1×1 convolution."""

    def __init__(self, in_features: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_features
        for _ in range(5):
            nxt = max(channels // 2, 8)
            layers += [
                nn.Conv3d(channels, nxt, kernel_size=3, padding=1),
                nn.InstanceNorm3d(nxt),
                nn.LeakyReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
            channels = nxt
        layers.append(nn.Conv3d(channels, out_channels, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class SSLHeads(nn.Module):
    """Rotation classifier, contrastive projection and reconstruction head over stage-4 features."""

    def __init__(self, feature_size: int, in_channels: int, projection_dim: int = 512) -> None:
        super().__init__()
        dim = 16 * feature_size
        self.rotation = nn.Linear(dim, ROTATIONS)
        self.contrastive = nn.Linear(dim, projection_dim)
        self.reconstruction = ReconstructionHead(dim, in_channels)

    def forward(self, stage4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = stage4.mean(dim=(2, 3, 4))
        return self.rotation(pooled), self.contrastive(pooled), self.reconstruction(stage4)


class SSLModel(nn.Module):
    """Swin ViT encoder (``swinViT``, as in Swin UNETR) plus the three SSL heads.

    ``forward(x)`` with ``x`` ``(B, C, X, Y, Z)`` (sizes divisible by 32) returns rotation logits
    ``(B, 4)``, contrastive embeddings ``(B, 512)`` and the reconstruction ``(B, C, X, Y, Z)``.
    """

    def __init__(self, swin_vit: nn.Module, feature_size: int, in_channels: int) -> None:
        super().__init__()
        self.swinViT = swin_vit
        self.heads = SSLHeads(feature_size, in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stage4 = self.swinViT(x, True)[4]
        return self.heads(stage4)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``swinViT.*`` tensors only: what ``--init ssl`` loads."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("swinViT.")}


# ------------------------------------------------------------------------------------ views
def random_block_mask(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    max_fraction: float = 0.3,
    max_block_fraction: float = 0.25,
    max_tries: int = 200,
    blocks: list[tuple[slice, slice, slice]] | None = None,
) -> np.ndarray:
    """Boolean mask of rectangular blocks covering at most ``max_fraction`` of ``shape``.

    Each block spans 1 … ``max_block_fraction`` × the axis length along each axis (at least one
    voxel). Blocks are added while the union stays within the budget; the result covers between
    a few blocks' worth and ``max_fraction`` of the volume, never more. Pass a list as ``blocks``
    to receive the blocks used.
    """
    if not 0 < max_fraction <= 1 or not 0 < max_block_fraction <= 1:
        raise SapError(f"SSL masking fractions must lie in (0, 1], got {max_fraction}, {max_block_fraction}")
    mask = np.zeros(shape, dtype=bool)
    budget = int(max_fraction * mask.size)
    covered = 0
    limits = [max(1, int(max_block_fraction * s)) for s in shape]
    for _ in range(max_tries):
        size = [int(rng.integers(1, lim + 1)) for lim in limits]
        start = [int(rng.integers(0, s - b + 1)) for s, b in zip(shape, size, strict=True)]
        block = tuple(slice(a, a + b) for a, b in zip(start, size, strict=True))
        new = int(np.count_nonzero(~mask[block]))
        if covered + new > budget:
            continue
        mask[block] = True
        covered += new
        if blocks is not None:
            blocks.append(block)
        if covered >= 0.95 * budget:
            break
    return mask


def rotate_views(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample of ``(B, C, X, Y, Z)`` by a random multiple of 90° in the axial plane
    (needs X == Y); returns (rotated batch, labels 0–3)."""
    if x.shape[ROTATION_DIMS[0]] != x.shape[ROTATION_DIMS[1]]:
        raise SapError(f"SSL rotation needs square axial patches, got {tuple(x.shape[2:])}")
    labels = rng.integers(0, ROTATIONS, size=x.shape[0])
    rotated = torch.stack([torch.rot90(x[i], int(k), dims=(1, 2)) for i, k in enumerate(labels)])
    return rotated, torch.as_tensor(labels, dtype=torch.long, device=x.device)


def mask_views(
    x: torch.Tensor, rng: np.random.Generator, max_fraction: float, max_block_fraction: float
) -> torch.Tensor:
    """Replace random blocks of each sample with uniform noise in [0, 1) (the images' range)."""
    out = x.clone()
    for i in range(x.shape[0]):
        mask = torch.from_numpy(random_block_mask(tuple(x.shape[2:]), rng, max_fraction, max_block_fraction))
        mask = mask.to(x.device)
        noise = torch.from_numpy(rng.random(x.shape[1:], dtype=np.float32)).to(x.device, x.dtype)
        out[i] = torch.where(mask[None], noise, out[i])
    return out


@dataclass
class SSLBatch:
    """Inputs and targets of one SSL step built from ``n`` crops: ``2n`` views."""

    inputs: torch.Tensor  #: (2n, C, X, Y, Z) rotated and masked views
    targets: torch.Tensor  #: (2n, C, X, Y, Z) rotated views before masking
    rotations: torch.Tensor  #: (2n,) labels 0–3


def make_ssl_batch(
    crops: torch.Tensor, rng: np.random.Generator, max_fraction: float = 0.3, max_block_fraction: float = 0.25
) -> SSLBatch:
    """Two rotated, masked views of every crop; view ``i`` and ``i + n`` come from crop ``i``."""
    if crops.shape[0] < 2:
        raise SapError("an SSL batch needs at least two crops (contrastive negatives are in-batch)")
    first, rot1 = rotate_views(crops, rng)
    second, rot2 = rotate_views(crops, rng)
    targets = torch.cat([first, second])
    inputs = mask_views(targets, rng, max_fraction, max_block_fraction)
    return SSLBatch(inputs=inputs, targets=targets, rotations=torch.cat([rot1, rot2]))


# ------------------------------------------------------------------------------------ losses
def contrastive_loss(embeddings: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over ``2n`` embeddings where rows ``i`` and ``i + n`` are positives and every other
    row is a negative (SimCLR; Tang et al. with temperature 0.5)."""
    n2 = embeddings.shape[0]
    if n2 < 4 or n2 % 2:
        raise SapError(f"contrastive loss needs an even number ≥ 4 of views, got {n2}")
    z = F.normalize(embeddings.float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    n = n2 // 2
    positives = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


@dataclass
class SSLLosses:
    total: torch.Tensor
    reconstruction: torch.Tensor
    rotation: torch.Tensor
    contrastive: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_reconstruction": float(self.reconstruction.detach()),
            "loss_rotation": float(self.rotation.detach()),
            "loss_contrastive": float(self.contrastive.detach()),
        }


def ssl_losses(model: SSLModel, batch: SSLBatch, temperature: float = 0.5) -> SSLLosses:
    """The three SSL losses of one batch, summed with weight 1 each."""
    rot_logits, embeddings, reconstruction = model(batch.inputs)
    rec = F.l1_loss(reconstruction.float(), batch.targets.float())
    rot = F.cross_entropy(rot_logits.float(), batch.rotations)
    con = contrastive_loss(embeddings, temperature)
    return SSLLosses(total=rec + rot + con, reconstruction=rec, rotation=rot, contrastive=con)
