"""Host memory of whole-body inference (SPEC §12): the stages hold what they must and no more.

Numbers of the whole pipeline on whole-body volumes are in BENCHMARKS.md (``bench_infer.py``);
these tests pin the mechanisms on small volumes, in units of one float32 volume, with margins
wide enough for allocator noise: numpy's own allocations are counted with ``tracemalloc`` (exact),
the engine's torch buffers with the peak RSS (``VmHWM`` reset before the call).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sap.data.preprocess as preprocess
from sap.config import DataConfig
from sap.data.cases import Case
from sap.data.io import make_geometry
from sap.memory import release_freed_memory
from sap.models.engine import sliding_window_predict

SHAPE = (48, 56, 120)
VOLUME = int(np.prod(SHAPE)) * 4  # bytes of one float32 volume


def _body_case(rng: np.random.Generator) -> list[np.ndarray]:
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    body = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1)[..., None]
    return [(body * level + rng.normal(0, 1, SHAPE)).astype(np.float32) for level in (100.0, 60.0)]


def test_load_case_holds_the_result_and_no_stacked_copy(monkeypatch):
    """Reading a 2-channel case allocates its (C, X, Y, Z) result, not per-channel copies that are
    then stacked (which held 4 volumes): each file's array goes straight into its slot."""
    geometry = make_geometry(SHAPE, (2.0, 2.0, 2.0), axcodes="LPS")  # LPS: a flipped, strided view
    channels = _body_case(np.random.default_rng(0))
    sources = {f"c{i}.nii.gz": channel[::-1, ::-1].copy() for i, channel in enumerate(channels)}
    # the reader is replaced by arrays allocated before counting: only load_case's own allocations count
    monkeypatch.setattr(preprocess, "read_source_array", lambda path, *options: (sources[Path(path).name], geometry))
    case = Case("c", "c", "patients", {"T1": Path("c0.nii.gz"), "b1000": Path("c1.nii.gz")})
    tracemalloc.start()
    try:
        loaded = preprocess.load_case(case, DataConfig(channels=["T1", "b1000"], modality="mr"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for got, expected in zip(loaded.image, channels, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert peak < 2.4 * VOLUME, f"load_case peak {peak / VOLUME:.2f} float32 volumes"


def test_body_mask_and_normalisation_stay_near_one_extra_volume():
    """Body mask (percentile copy, morphology, largest component) and in-place percentile
    normalisation of both channels: at most ~1.5 float32 volumes beyond the input."""
    data = DataConfig(channels=["T1", "b1000"], modality="mr")
    image = np.stack(_body_case(np.random.default_rng(1)))
    tracemalloc.start()
    try:
        body = preprocess.body_mask(image, "mr")
        for c in range(image.shape[0]):
            preprocess.normalise(image[c : c + 1], body, data, out=image[c : c + 1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.2 < body.astype(bool).mean() < 0.6  # the ellipse, not the whole box
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert peak < 1.6 * VOLUME, f"body mask + normalisation peak {peak / VOLUME:.2f} float32 volumes"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_engine_holds_one_output_volume_and_no_weight_map():
    """The engine's peak beyond its input is the output plus a few windows: the blend weights are
    summed slab by slab, never as a second full-size volume (MONAI's count map: ≥ 2 volumes)."""
    torch.manual_seed(0)
    net = nn.Conv3d(2, 2, 1)
    image = np.random.default_rng(0).random((2, 128, 128, 512), dtype=np.float32)  # 32 MiB a channel
    sliding_window_predict(net, image[:, :40, :40, :40], (32, 32, 32), sw_device="cpu")  # first calls
    release_freed_memory()
    base = _status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    out = sliding_window_predict(net, image, (32, 32, 32), sw_batch_size=2, sw_device="cpu")
    ratio = (_status_bytes("VmHWM:") - base) / out.nbytes
    assert ratio < 1.75, f"engine peak {ratio:.2f} output volumes beyond the input"
