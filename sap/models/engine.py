"""The one sliding-window engine (SPEC §8), shared by validation, fine-tuning and ``sap infer``.

MONAI's :func:`monai.inferers.sliding_window_inference` does the tiling (overlap 0.5 by default,
Gaussian blending). sap adds the memory rules of whole-body volumes: the network runs on the GPU
when there is one (``sw_device``), but the stitched output lives on the CPU (``device``), and
each window is reduced to the channel(s) asked for *before* stitching, so the default output is a
single float32 foreground-probability channel. Peak memory is then the input volume plus two
float32 volumes (output and MONAI's weight map), within SPEC §12's 3 × channels × voxels × 4 bytes
for 2-channel inputs. Optional mirror test-time augmentation averages each window's prediction
over flips (nnU-Net's per-window scheme, so no extra full-size volumes are held).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from sap.errors import SapError

OUTPUTS = ("foreground", "probabilities", "logits")


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
            volumes smaller than ``roi_size`` are padded and cropped back by MONAI.
        roi_size: window size, each divisible by 32 for Swin UNETR.
        overlap: fraction of overlap between neighbouring windows (SPEC default 0.5).
        output: ``foreground`` = softmax channel 1, shape ``(X, Y, Z)``, for 2-class lesion models;
            ``probabilities`` = all softmax channels ``(K, X, Y, Z)``; ``logits`` = raw ``(K, …)``.
        tta: ``True`` averages over all 8 mirror combinations of the three axes; a list of flip
            sets (tensor dims 2–4) picks some; ``False`` none.
        amp: float16 autocast for the network, used only on CUDA.
        sw_device: where the network runs (default: CUDA when present, else CPU). Stitching is
            always on the CPU, so GPU memory holds windows only.

    Returns a float32 numpy array on the CPU, Gaussian-blended across windows.
    """
    if output not in OUTPUTS:
        raise SapError(f"sliding window output {output!r} is not one of {', '.join(OUTPUTS)}")
    if torch.is_tensor(image):
        array = image
    else:
        with warnings.catch_warnings():  # read-only memory maps are only read here
            warnings.simplefilter("ignore", UserWarning)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if array.dim() != 4:
        raise SapError(f"sliding window input must be (C, X, Y, Z), got shape {tuple(array.shape)}")
    sw_device = torch.device(sw_device) if sw_device is not None else default_device()
    was_training = model.training
    model.eval()
    model.to(sw_device)
    predictor = _WindowPredictor(model, output, _flip_sets(tta), amp)
    try:
        result = sliding_window_inference(
            array[None].float(),
            roi_size=tuple(int(r) for r in roi_size),
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            sw_device=sw_device,
            device=torch.device("cpu"),
            progress=progress,
        )
    finally:
        model.train(was_training)
    result = result[0]
    if output == "foreground":
        result = result[0]
    return result.numpy().astype(np.float32, copy=False)
