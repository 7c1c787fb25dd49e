"""The one sliding-window engine (SPEC §8), shared by validation, fine-tuning and ``sap infer``.

Tiling and blending are MONAI's (:func:`monai.inferers.sliding_window_inference`): the same
window grid (:func:`monai.data.utils.dense_patch_slices`, overlap 0.5 by default), the same
Gaussian importance map (:func:`monai.data.utils.compute_importance_map`), volumes smaller than
the window padded with zeros around their centre. The stitching loop is sap's, for the memory
rules of whole-body volumes (SPEC §12): the network runs on the GPU when there is one
(``sw_device``) but the stitched output lives on the CPU; each window is reduced to the
channel(s) asked for *before* stitching, so the default output is one float32
foreground-probability volume; and the sum of weights that normalises the blend is built slab by
slab at the end instead of as a second full-size volume (MONAI's count map). Per voxel the sums
run over the same windows in the same order as MONAI's, so the result is MONAI's to the bit.
Peak memory is the input plus the output plus one batch of windows. Optional mirror test-time
augmentation averages each window's prediction over flips (nnU-Net's per-window scheme, so no
extra full-size volumes are held).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch import nn

from sap.errors import SapError

OUTPUTS = ("foreground", "probabilities", "logits")
#: voxels per slab of the weight sum built at the end (float32: 16 MiB)
_SLAB_VOXELS = 1 << 22


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _flip_sets(tta: bool | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial flip sets (tensor dims 2, 3, 4) to average over; ``()`` is the unflipped input."""
    if tta is False or tta is None:
        return [()]
    if tta is True:
        axes = (2, 3, 4)
        return [combo for r in range(4) for combo in itertools.combinations(axes, r)]
    return [tuple(int(a) for a in flips) for flips in tta]


class _WindowPredictor(nn.Module):
    """Network + softmax + channel selection (+ flips) applied to one batch of windows."""

    def __init__(self, network: nn.Module, output: str, flips: list[tuple[int, ...]], amp: bool) -> None:
        super().__init__()
        self.network = network
        self.output = output
        self.flips = flips
        self.amp = amp

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=self.amp and x.device.type == "cuda"):
            logits = self.network(x)
        logits = logits.float()
        if self.output == "logits":
            return logits
        probs = torch.softmax(logits, dim=1)
        return probs[:, 1:2] if self.output == "foreground" else probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for flips in self.flips:
            xin = torch.flip(x, flips) if flips else x
            y = self._one(xin)
            y = torch.flip(y, flips) if flips else y
            total = y if total is None else total + y
        return total / len(self.flips)


def _window_grid(
    shape: Sequence[int], roi: Sequence[int], overlap: float
) -> tuple[list[int], list[tuple[slice, ...]]]:
    """MONAI's window grid: the per-axis zero padding before the volume (volumes smaller than the
    window are centred in it) and the windows' slices on that padded grid, in MONAI's order."""
    padded = [max(s, r) for s, r in zip(shape, roi, strict=True)]
    pad_before = [(p - s) // 2 for p, s in zip(padded, shape, strict=True)]
    interval = [r if r == p else max(int(r * (1 - overlap)), 1) for r, p in zip(roi, padded, strict=True)]
    return pad_before, dense_patch_slices(padded, roi, interval)


def _clip(window: tuple[slice, ...], pad_before: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of a padded-grid window that lies in the volume: (slices in the volume, slices in
    the window)."""
    inside, local = [], []
    for w, p, n in zip(window, pad_before, shape, strict=True):
        lo, hi = max(w.start - p, 0), min(w.stop - p, n)
        inside.append(slice(lo, hi))
        local.append(slice(lo + p - w.start, hi + p - w.start))
    return tuple(inside), tuple(local)


@torch.no_grad()
def _normalise_by_weights(
    out: torch.Tensor,
    clipped: list[tuple[tuple[slice, ...], tuple[slice, ...]]],
    weight: torch.Tensor,
) -> None:
    """Divide the blended sums by the sum of window weights, slab by slab along the first axis.

    ``clipped`` holds every window as :func:`_clip` gives it. Each slab's weight sum adds the
    windows that touch it in the windows' order, exactly as MONAI's full-size count map would,
    without holding that map."""
    shape = out.shape[1:]
    plane = max(1, shape[1] * shape[2])
    step = max(1, min(_SLAB_VOXELS // plane, shape[0] // 8))  # a slab is at most 1/8 of the volume
    buffer = torch.empty((step, *shape[1:]), dtype=out.dtype)  # one slab, reused
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        total = buffer[: stop - start].zero_()
        for inside, local in clipped:
            lo, hi = max(inside[0].start, start), min(inside[0].stop, stop)
            if lo >= hi:
                continue
            offset = local[0].start - inside[0].start
            total[lo - start : hi - start, inside[1], inside[2]] += weight[lo + offset : hi + offset, local[1], local[2]]
        out[:, start:stop] /= total


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    output: str = "foreground",
    tta: bool | Sequence[Sequence[int]] = False,
    amp: bool = True,
    sw_device: torch.device | str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Predict a whole volume window by window.

    Args:
        model: network mapping ``(B, C, *roi_size)`` to logits ``(B, K, *roi_size)``; put in eval
            mode here and moved to ``sw_device``.
        image: ``(C, X, Y, Z)`` float array (a memory-mapped cache array is fine); any size,
            volumes smaller than ``roi_size`` are padded with zeros (as MONAI does) window by window.
        roi_size: window size, each divisible by 32 for Swin UNETR.
        overlap: fraction of overlap between neighbouring windows (SPEC default 0.5).
        output: ``foreground`` = softmax channel 1, shape ``(X, Y, Z)``, for 2-class lesion models;
            ``probabilities`` = all softmax channels ``(K, X, Y, Z)``; ``logits`` = raw ``(K, …)``.
        tta: ``True`` averages over all 8 mirror combinations of the three axes; a list of flip
            sets (tensor dims 2–4) picks some; ``False`` none.
        amp: float16 autocast for the network, used only on CUDA.
        sw_device: where the network runs (default: CUDA when present, else CPU). Stitching is
            always on the CPU, so GPU memory holds windows only.

    Returns a float32 numpy array on the CPU, Gaussian-blended across windows (equal to
    MONAI's ``sliding_window_inference(..., mode="gaussian")`` of the same predictor).
    """
    if output not in OUTPUTS:
        raise SapError(f"sliding window output {output!r} is not one of {', '.join(OUTPUTS)}")
    if not 0.0 <= overlap < 1.0:
        raise SapError(f"window overlap {overlap} is outside [0, 1)")
    if torch.is_tensor(image):
        array = image.detach().cpu()
    else:
        with warnings.catch_warnings():  # read-only memory maps are only read here
            warnings.simplefilter("ignore", UserWarning)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if array.dim() != 4:
        raise SapError(f"sliding window input must be (C, X, Y, Z), got shape {tuple(array.shape)}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3:
        raise SapError(f"window size must have three values, got {roi_size}")
    shape = tuple(int(s) for s in array.shape[1:])
    sw_device = torch.device(sw_device) if sw_device is not None else default_device()
    pad_before, windows = _window_grid(shape, roi, overlap)
    clipped_windows = [_clip(w, pad_before, shape) for w in windows]
    # float32 like MONAI's map for float32 input; computed where the network runs, as MONAI does
    weight_sw = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=sw_device, dtype=torch.float32)
    weight = weight_sw.cpu()
    was_training = model.training
    model.eval()
    model.to(sw_device)
    predictor = _WindowPredictor(model, output, _flip_sets(tta), amp)
    batch = torch.empty((min(sw_batch_size, len(windows)), array.shape[0], *roi), dtype=torch.float32)
    out: torch.Tensor | None = None
    starts = range(0, len(windows), sw_batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, unit="batch")
    try:
        for first in starts:
            clipped = clipped_windows[first : first + sw_batch_size]
            # one reused input buffer; windows reaching into the padding see zeros there
            for b, (inside, local) in enumerate(clipped):
                if any(sl.stop - sl.start != r for sl, r in zip(inside, roi, strict=True)):
                    batch[b].zero_()
                batch[b][(slice(None), *local)].copy_(array[(slice(None), *inside)])
            pred = predictor(batch[: len(clipped)].to(sw_device))
            if tuple(pred.shape[2:]) != roi:
                raise SapError(f"the network's output {tuple(pred.shape[2:])} is not the window size {roi}")
            pred *= weight_sw
            pred = pred.to("cpu")
            if out is None:
                out = torch.zeros((pred.shape[1], *shape), dtype=torch.float32)
            for b, (inside, local) in enumerate(clipped):
                out[(slice(None), *inside)] += pred[b][(slice(None), *local)]
            del pred
    finally:
        model.train(was_training)
    assert out is not None
    _normalise_by_weights(out, clipped_windows, weight)
    result = out[0] if output == "foreground" else out
    return result.numpy()
