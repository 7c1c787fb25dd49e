"""Zero-shot SAM/MedSAM on 2D slices: one image embedding per slice, prompts, masks (papers 001, 003).

:class:`SamPrompter` wraps a ``transformers`` ``SamModel``:

* ``family="sam"``: SAM's own preprocessing: the longest side resized to the encoder size (aspect
  kept), values scaled to 0–255 and normalised with SAM's pixel mean/std, zero-padded to a square.
* ``family="medsam"``: MedSAM's preprocessing: resized to the square encoder size, values min-max
  scaled to [0, 1], no mean/std. MedSAM takes box prompts only.

:meth:`SamPrompter.embed` runs the image encoder once; :meth:`SamPrompter.predict` runs the prompt
encoder and mask decoder for a list of per-component prompts (one decoder call, one mask per
component, single-mask output) and returns their union at the slice's size. The embedding is
reused for every strategy and class of the slice, as paper 001 times it.

The detector → SAM hybrid of paper 003 (:func:`refine_with_sam`): boxes of detected components
(a 2D model's mask, or the 3D lesion model's components cut per slice), expanded by a factor, are
refined by SAM, either on the whole slice or — as paper 003 does — on a crop around each box
(``crop_factor``), and the masks are pasted back into the slice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from sap.slice2d.prompts import Prompt, label_components, tight_box

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
FAMILIES = ("sam", "medsam")


@dataclass
class SliceEmbedding:
    """The image embedding of one slice and the geometry to map prompts and masks."""

    embeddings: torch.Tensor  #: (1, D, E, E)
    shape: tuple[int, int]  #: slice (H, W)
    scale: tuple[float, float]  #: (row, col) factors slice → encoder input
    resized: tuple[int, int]  #: (rows, cols) of the resized slice inside the encoder input
    seconds: float  #: wall time of preprocessing + image encoder


class SamPrompter:
    """Prompted SAM/MedSAM inference on 2D slices in [0, 1] (bone window)."""

    def __init__(self, model: torch.nn.Module, family: str = "sam", device: str | torch.device = "cpu") -> None:
        if family not in FAMILIES:
            raise ValueError(f"SAM family {family!r}: choose one of {', '.join(FAMILIES)}")
        self.model = model.to(device).eval()
        self.family = family
        self.device = torch.device(device)
        self.image_size = int(model.config.vision_config.image_size)

    # ------------------------------------------------------------------------- image side
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[float, float], tuple[int, int]]:
        """(H, W) slice in [0, 1] → (1, 3, S, S) encoder input, (row, col) scale, resized size."""
        h, w = image.shape
        s = self.image_size
        x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32, device=self.device)[None, None]
        if self.family == "medsam":
            lo, hi = x.min(), x.max()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            return x.expand(-1, 3, -1, -1), (s / h, s / w), (s, s)
        factor = s / max(h, w)
        rows, cols = int(round(h * factor)), int(round(w * factor))
        x = F.interpolate(x, size=(rows, cols), mode="bilinear", align_corners=False) * 255.0
        mean = torch.tensor(SAM_PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD, device=self.device).view(1, 3, 1, 1)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        x = F.pad(x, (0, s - cols, 0, s - rows))
        return x, (rows / h, cols / w), (rows, cols)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> SliceEmbedding:
        """Run the image encoder once for a slice."""
        start = time.perf_counter()
        pixels, scale, resized = self.preprocess(image)
        embeddings = self.model.get_image_embeddings(pixels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # GPU work is asynchronous: time it when done
        return SliceEmbedding(embeddings, tuple(image.shape), scale, resized, time.perf_counter() - start)

    # ------------------------------------------------------------------------- prompt side
    def _prompt_tensors(self, emb: SliceEmbedding, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        sy, sx = emb.scale
        n = len(prompts)
        tensors: dict[str, torch.Tensor] = {}
        with_box = [p.box is not None for p in prompts]
        if any(with_box):
            if not all(with_box):
                raise ValueError("either every component prompt has a box or none has")
            boxes = np.array([[p.box[1] * sx, p.box[0] * sy, p.box[3] * sx, p.box[2] * sy] for p in prompts])
            tensors["input_boxes"] = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)[None]
        most = max(len(p.points) for p in prompts)
        if most:
            if self.family == "medsam":
                raise ValueError("MedSAM takes box prompts only")
            points = np.zeros((n, most, 2), dtype=np.float64)
            labels = np.full((n, most), -10, dtype=np.int64)  # -10: padding, ignored by the prompt encoder
            for i, p in enumerate(prompts):
                m = len(p.points)
                points[i, :m, 0] = p.points[:, 1] * sx  # SAM points are (x, y) = (col, row)
                points[i, :m, 1] = p.points[:, 0] * sy
                labels[i, :m] = p.labels
            tensors["input_points"] = torch.as_tensor(points, dtype=torch.float32, device=self.device)[None]
            tensors["input_labels"] = torch.as_tensor(labels, device=self.device)[None]
        return tensors

    @torch.no_grad()
    def predict_logits(self, emb: SliceEmbedding, prompts: list[Prompt]) -> torch.Tensor:
        """Mask logits (n, H, W) at the slice's size, one per component prompt."""
        tensors = self._prompt_tensors(emb, prompts)
        out = self.model(image_embeddings=emb.embeddings, multimask_output=False, **tensors)
        low = out.pred_masks[0, :, 0]  # (n, 4E, 4E)
        s = self.image_size
        up = F.interpolate(low[:, None], size=(s, s), mode="bilinear", align_corners=False)
        up = up[..., : emb.resized[0], : emb.resized[1]]
        return F.interpolate(up, size=emb.shape, mode="bilinear", align_corners=False)[:, 0]

    def predict(self, emb: SliceEmbedding, prompts: list[Prompt]) -> np.ndarray:
        """Union of the component masks (H, W) bool; empty when there is no prompt."""
        if not prompts:
            return np.zeros(emb.shape, dtype=bool)
        return (self.predict_logits(emb, prompts) > 0).any(dim=0).cpu().numpy()


# ----------------------------------------------------------------------------------- hybrid
def expand_box(box: tuple[int, int, int, int], factor: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Scale an inclusive (r0, c0, r1, c1) box about its centre by ``factor``, clipped to the image."""
    r0, c0, r1, c1 = box
    cr, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    hr, hc = (r1 - r0 + 1) * factor / 2.0, (c1 - c0 + 1) * factor / 2.0
    return (
        max(0, int(np.floor(cr - hr + 0.5))),
        max(0, int(np.floor(cc - hc + 0.5))),
        min(shape[0] - 1, int(np.ceil(cr + hr - 0.5))),
        min(shape[1] - 1, int(np.ceil(cc + hc - 0.5))),
    )


def boxes_from_mask(mask: np.ndarray, min_pixels: int = 1) -> list[tuple[int, int, int, int]]:
    """Tight boxes of the 4-connected components of a 2D detector mask (at least ``min_pixels``)."""
    labels, count = label_components(mask)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return [tight_box(labels == i) for i in range(1, count + 1) if areas[i] >= min_pixels]


def boxes_from_instances(instances: np.ndarray) -> list[tuple[int, int, int, int]]:
    """One box per instance label present in a 2D cut of a 3D instance map (the 3D model's components)."""
    return [tight_box(instances == v) for v in np.unique(instances) if v != 0]


def refine_with_sam(
    prompter: SamPrompter,
    image: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
    expansion: float = 1.0,
    crop_factor: float | None = None,
) -> np.ndarray:
    """SAM masks for detector boxes, pasted back into an (H, W) bool mask.

    ``expansion`` scales each box about its centre before prompting. With ``crop_factor`` (paper
    003's local refinement) each box is prompted on its own crop of the slice (the expanded box
    scaled by ``crop_factor``), embedded separately, and the crop's mask is pasted back; without it
    one embedding of the whole slice serves every box.
    """
    out = np.zeros(image.shape, dtype=bool)
    if not boxes:
        return out
    grown = [expand_box(b, expansion, image.shape) for b in boxes]
    if crop_factor is None:
        emb = prompter.embed(image)
        return prompter.predict(emb, [Prompt(box=b, points=np.zeros((0, 2)), labels=np.zeros(0, int)) for b in grown])
    for box in grown:
        r0, c0, r1, c1 = expand_box(box, crop_factor, image.shape)
        crop = image[r0 : r1 + 1, c0 : c1 + 1]
        local = (box[0] - r0, box[1] - c0, box[2] - r0, box[3] - c0)
        emb = prompter.embed(crop)
        mask = prompter.predict(emb, [Prompt(box=local, points=np.zeros((0, 2)), labels=np.zeros(0, int))])
        out[r0 : r1 + 1, c0 : c1 + 1] |= mask
    return out
