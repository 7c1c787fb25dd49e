"""The direct .nii.gz reader (``sap.data.nifti``, used by ``sap.data.io``) gives exactly nibabel's array, or steps aside."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

import sap.data.nifti as sio
from sap.data.io import read_image, read_source_array
from sap.errors import SapError

INFLATERS = ["default", "stdlib"]


@pytest.fixture(params=INFLATERS)
def inflater(request, monkeypatch):
    """Run each test with the installed fast inflater and with the standard-library fallback."""
    if request.param == "stdlib":
        monkeypatch.setattr(sio, "_inflater", lambda: zlib)
    return request.param


def _nibabel(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def _same(fast, ref):
    assert fast is not None
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    assert fast.flags.f_contiguous == ref.flags.f_contiguous and fast.flags.writeable
    np.testing.assert_array_equal(fast, ref)


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("dtype", ["u1", "<i2", ">i2", "<f4", ">f4", "<f8", "<u2"])
def test_same_array_as_nibabel(tmp_path, inflater, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((17, 9, 5)) * 100).astype(dtype)
    path = _save(array, tmp_path / "a.nii.gz")
    _same(sio.read_nifti_gz(path), _nibabel(path))


def test_nan_singleton_4d_and_extensions(tmp_path, inflater):
    rng = np.random.default_rng(1)
    array = rng.random((8, 7, 6, 1)).astype(np.float32)
    array[1, 1, 1, 0] = np.nan  # NaN must survive (SimpleITK would make it 0)
    path = _save(array, tmp_path / "a.nii.gz")
    _same(sio.read_nifti_gz(path), _nibabel(path))
    image = nib.Nifti1Image(rng.random((5, 6, 7)).astype(np.float32), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 5000))
    nib.save(image, str(tmp_path / "ext.nii.gz"))
    _same(sio.read_nifti_gz(tmp_path / "ext.nii.gz"), _nibabel(tmp_path / "ext.nii.gz"))


def test_concatenated_gzip_members(tmp_path, inflater):
    source = _save(np.arange(4000, dtype=np.float32).reshape(20, 20, 10), tmp_path / "a.nii.gz")
    raw = gzip.decompress(source.read_bytes())
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:5000]) + gzip.compress(raw[5000:]))
    _same(sio.read_nifti_gz(path), _nibabel(path))


def test_scaled_data_is_left_to_nibabel(tmp_path, inflater):
    image = nib.Nifti1Image(np.arange(210, dtype=np.int16).reshape(5, 6, 7), np.eye(4))
    image.header.set_slope_inter(2.0, 1.0)
    nib.save(image, str(tmp_path / "s.nii.gz"))
    assert sio.read_nifti_gz(tmp_path / "s.nii.gz") is None
    data, _ = read_source_array(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(data, _nibabel(tmp_path / "s.nii.gz"))


def test_truncated_and_corrupt_files_are_reported(tmp_path, inflater):
    source = _save(np.ones((30, 30, 30), np.float32), tmp_path / "a.nii.gz")
    raw = gzip.decompress(source.read_bytes())
    bad = {
        "short.nii.gz": gzip.compress(raw[: len(raw) // 2]),  # a complete stream of half the voxels
        "cut.nii.gz": source.read_bytes()[:-40],  # a stream cut off
        "junk.nii.gz": b"not an image at all",
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        assert sio.read_nifti_gz(tmp_path / name) is None
        with pytest.raises(SapError, match="cannot read"):
            read_image(tmp_path / name)


def test_real_files_match_nibabel(shared_data, inflater):
    for path in sorted(shared_data.rglob("*.nii.gz"))[:12]:
        fast = sio.read_nifti_gz(path)
        if fast is not None:  # scaled CT is left to nibabel
            _same(fast, _nibabel(path))
