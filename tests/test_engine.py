"""The sliding-window engine (SPEC §8): blending, output channels, TTA, CPU stitching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sap.errors import SapError
from sap.models.engine import sliding_window_predict

CPU = "cpu"  # exact comparisons with whole-volume CPU predictions


class Pointwise(nn.Module):
    """1×1×1 convolution: every window predicts the same value for a voxel, so any correct
    blending must reproduce the whole-volume prediction exactly."""

    def __init__(self, in_channels=2, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_channels, classes, 1)

    def forward(self, x):
        return self.conv(x)


class Lopsided(nn.Module):
    """Not mirror-symmetric: mixes each voxel with its neighbour along every axis."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(2, 2, (2, 2, 2), padding=0)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1, 0, 1), mode="replicate"))


def _whole(model, image):
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(image)[None]), 1)[0].numpy()


@pytest.mark.parametrize("shape", [(40, 70, 50), (20, 24, 30)])  # larger and smaller than the window
def test_blending_reproduces_whole_volume_prediction(shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    model = Pointwise()
    whole = _whole(model, image)
    probs = sliding_window_predict(model, image, (32, 32, 32), output="probabilities", sw_batch_size=3, sw_device=CPU)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, whole, atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    fg = sliding_window_predict(model, image, (32, 32, 32), output="foreground", overlap=0.25, sw_device=CPU)
    assert fg.shape == shape
    np.testing.assert_allclose(fg, whole[1], atol=1e-5)
    logits = sliding_window_predict(model, image, (32, 32, 32), output="logits", sw_device=CPU)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(image)[None])[0].numpy(), atol=1e-5)


def test_gaussian_blending_weights_window_centres():
    """A model that outputs its window's position (constant per window) shows the weighting:
    where two windows overlap, the voxel nearer one window's centre leans to that window."""

    class WindowId(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            value = float(x[0, 0, 0, 0, 0])  # the window's first voxel tells where it is
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1] = value
            return logits

    image = np.zeros((1, 32, 32, 48), dtype=np.float32)
    image[0, :, :, :] = np.arange(48, dtype=np.float32)[None, None, :] / 4.0  # ramp along z
    out = sliding_window_predict(WindowId(), image, (32, 32, 32), output="logits", overlap=0.5, sw_batch_size=1, sw_device=CPU)
    profile = out[1, 16, 16, :]
    # first window starts at z=0 (value 0), second at z=16 (value 4): monotone blend in between
    assert profile[0] == pytest.approx(0.0, abs=1e-5) and profile[-1] == pytest.approx(4.0, abs=1e-5)
    inner = profile[16:32]
    assert np.all(np.diff(inner) > 0) and 0 < inner[0] < 2 < inner[-1] < 4


def test_tta_averages_mirrored_predictions():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 32, 32, 32)).astype(np.float32)
    model = Lopsided()
    plain = sliding_window_predict(model, image, (32, 32, 32), sw_device=CPU)
    tta = sliding_window_predict(model, image, (32, 32, 32), tta=True, sw_device=CPU)
    x = torch.from_numpy(image)[None]
    expected = []
    with torch.no_grad():
        for flips in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
            y = torch.softmax(model(torch.flip(x, flips) if flips else x), 1)
            expected.append((torch.flip(y, flips) if flips else y)[0, 1].numpy())
    np.testing.assert_allclose(tta, np.mean(expected, 0), atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-4)
    one_axis = sliding_window_predict(model, image, (32, 32, 32), tta=[(), (4,)], sw_device=CPU)
    np.testing.assert_allclose(one_axis, (expected[0] + expected[3]) / 2, atol=1e-5)


def test_memory_mapped_input_and_training_mode_restored(tmp_path):
    image = np.random.default_rng(2).normal(size=(2, 33, 34, 35)).astype(np.float32)
    np.save(tmp_path / "img.npy", image)
    mapped = np.load(tmp_path / "img.npy", mmap_mode="r")
    model = Pointwise().train()
    out = sliding_window_predict(model, mapped, (32, 32, 32), sw_device=CPU)
    assert model.training
    np.testing.assert_allclose(out, _whole(model, image)[1], atol=1e-5)
    with pytest.raises(SapError, match="C, X, Y, Z"):
        sliding_window_predict(model, image[0], (32, 32, 32), sw_device=CPU)
    with pytest.raises(SapError, match="output"):
        sliding_window_predict(model, image, (32, 32, 32), output="argmax", sw_device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_on_gpu_output_on_cpu():
    image = np.random.default_rng(3).normal(size=(2, 40, 40, 40)).astype(np.float32)
    model = Pointwise()
    out = sliding_window_predict(model, image, (32, 32, 32), sw_device="cuda", amp=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, _whole(model.cpu(), image)[1], atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swin_unetr_amp_on_gpu_matches_cpu_float32():
    from sap.config import load_config
    from sap.models.swin import build_swin_unetr

    torch.manual_seed(0)
    model = build_swin_unetr(load_config("tiny").model, 2, 2)
    image = np.random.default_rng(4).random((2, 40, 36, 70)).astype(np.float32)
    cpu = sliding_window_predict(model, image, (32, 32, 64), sw_device=CPU, tta=[(), (2,)])
    gpu = sliding_window_predict(model, image, (32, 32, 64), sw_device="cuda", amp=True, tta=[(), (2,)])
    assert gpu.shape == cpu.shape == image.shape[1:]
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)


@pytest.mark.parametrize(
    "shape, roi, overlap, batch, output, tta",
    [
        ((40, 70, 50), (32, 32, 32), 0.5, 3, "probabilities", False),
        ((20, 24, 30), (32, 32, 32), 0.5, 2, "foreground", False),  # padded on every axis
        ((33, 17, 64), (32, 32, 32), 0.25, 1, "logits", False),
        ((70, 45, 100), (32, 32, 48), 0.5, 4, "foreground", [(), (3,)]),
        ((100, 31, 80), (32, 32, 32), 0.7, 5, "probabilities", False),
    ],
)
def test_stitching_equals_monai_sliding_window_inference(shape, roi, overlap, batch, output, tta):
    """sap stitches windows itself (no full-size weight map) but must give MONAI's result to the
    bit: the same windows, Gaussian weights and per-voxel summation order."""
    from monai.inferers import sliding_window_inference

    from sap.models.engine import _flip_sets, _WindowPredictor

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval()
    image = np.random.default_rng(5).normal(size=(2, *shape)).astype(np.float32)
    ours = sliding_window_predict(
        model, image, roi, overlap=overlap, sw_batch_size=batch, output=output, tta=tta, sw_device=CPU
    )
    with torch.no_grad():
        reference = sliding_window_inference(
            torch.from_numpy(image)[None],
            roi,
            batch,
            _WindowPredictor(model, output, _flip_sets(tta), amp=False),
            overlap=overlap,
            mode="gaussian",
            sw_device=CPU,
            device=CPU,
        )[0]
    reference = (reference[0] if output == "foreground" else reference).numpy()
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)
