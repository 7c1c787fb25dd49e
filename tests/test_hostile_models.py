"""Issue 14, validation items on checkpoints, inference and training runs (5, 17a/b/d/e/g).

Through the real commands (``sap infer``, ``sap finetune``) in-process: exit code, one error line
naming the file, nothing changed (md5 before/after). A tiny Swin UNETR checkpoint (feature_size 12,
64³) is saved once per module; the non-finite output rule runs a stand-in network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sap.config import DataConfig, load_config
from sap.data.io import make_geometry, write_image
from sap.infer import InferenceModel, InferOptions, run_inference
from sap.models.swin import build_swin_unetr
from sap.models.weights import make_checkpoint, save_checkpoint
from tests.hostile_helpers import md5_tree, refuse


def _checkpoint(feature_size: int = 12) -> dict:
    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.model.feature_size = feature_size
    network = build_swin_unetr(cfg.model, 2, 2)
    return make_checkpoint(network, config=cfg.to_dict(), channels=["T1", "b1000"], kind="lesion", out_channels=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "lesion.pt"
    save_checkpoint(_checkpoint(), path)
    return path


def _case(folder: Path, shape=(16, 16, 16)) -> Path:
    rng = np.random.default_rng(0)
    geometry = make_geometry(shape, (3.0, 3.0, 3.0))
    for name in ("T1", "b1000"):
        write_image(rng.normal(100, 20, size=shape).astype(np.float32), geometry, folder / f"{name}.nii.gz")
    return folder


def _infer(case: Path, out: Path, model: Path, *extra) -> list:
    return ["infer", "-i", case, "-o", out, "--model", model, "--quiet", *extra]


# ------------------------------------------------------------------------------------ item 5
def test_item5_nan_weights_refused_at_load(tmp_path, capsys):
    ckpt = _checkpoint()
    key = "swinViT.layers1.0.blocks.0.mlp.linear1.weight"
    ckpt["state_dict"][key][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_checkpoint(ckpt, bad)
    case = _case(tmp_path / "in" / "c1")
    refuse(_infer(case, tmp_path / "out", bad), capsys, [tmp_path], "infer", str(bad), "NaN/Inf", key)
    assert not (tmp_path / "out").exists()


def test_item5_non_finite_network_output_fails_the_case(tmp_path):
    """A network that outputs NaN (weights that passed loading, an overflow) fails the case, naming
    the model; nothing of the case is written."""
    conv = nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(1e38)  # finite weights, overflowing output
    model = InferenceModel.from_module(conv, ["CT"], DataConfig(channels=["CT"], modality="ct", normalization="none"),
                                       roi_size=(16, 16, 16))
    model.source = "overflow-model.pt"
    image = np.full((12, 12, 12), 1e3, np.float32)
    write_image(image, make_geometry((12, 12, 12), (1.0, 1.0, 1.0)), tmp_path / "in" / "c1.nii.gz")
    before = md5_tree(tmp_path / "in")
    report = run_inference(tmp_path / "in" / "c1.nii.gz", tmp_path / "out", model, InferOptions(progress=False))
    assert [r.case_id for r in report.failed] == ["c1"]
    assert "overflow-model.pt" in report.failed[0].error and "NaN/Inf" in report.failed[0].error
    assert not list((tmp_path / "out").glob("c1*"))
    assert md5_tree(tmp_path / "in") == before


# ------------------------------------------------------------------------------------ item 17
def test_item17a_random_bytes_checkpoint(tmp_path, capsys):
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    case = _case(tmp_path / "in" / "c1")
    line = refuse(_infer(case, tmp_path / "out", junk), capsys, [tmp_path], "infer", str(junk), "not a PyTorch checkpoint")
    assert "allow_pickle" not in line


def test_item17b_architecture_mismatch_names_the_file(tmp_path, capsys):
    ckpt = _checkpoint()
    ckpt["config"]["model"]["feature_size"] = 24  # the weights are feature_size 12; channels match
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(ckpt, wrong)
    case = _case(tmp_path / "in" / "c1")
    line = refuse(_infer(case, tmp_path / "out", wrong), capsys, [tmp_path], "infer", str(wrong),
                  "shape-mismatched", "model.feature_size")
    assert "adapt" not in line and "data.channels" not in line


def test_item17d_case_folder_missing_a_channel_is_one_error(tmp_path, capsys, model_file):
    case = _case(tmp_path / "in" / "c1")
    (case / "b1000.nii.gz").unlink()
    line = refuse(_infer(case, tmp_path / "out", model_file), capsys, [tmp_path], "infer", str(case),
                  "missing channel b1000")
    assert "single image" not in line


def test_item17e_bad_device_before_reading_any_case(tmp_path, capsys, model_file):
    case = _case(tmp_path / "in" / "c1")
    (case / "T1.nii.gz").write_bytes(b"unreadable")  # reading the case first would fail on this instead
    refuse(_infer(case, tmp_path / "out", model_file, "--device", "banana"), capsys, [tmp_path], "infer",
           "--device 'banana'", "cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


def test_item17g_run_killed_before_its_first_checkpoint(tmp_path, capsys):
    """A fold folder with config.yaml and log.csv but no checkpoint: the rerun tells to use
    --overwrite (not --resume, which cannot help), and --resume says the same."""
    fold = tmp_path / "run" / "baseline" / "fold_1"
    fold.mkdir(parents=True)
    (fold / "config.yaml").write_text("scale: tiny\n")
    (fold / "log.csv").write_text("step,loss\n")
    from tests.test_finetune import micro_cohort

    data = micro_cohort(tmp_path / "patients")  # valid data: the folder check is what refuses
    base = ["finetune", "--config", "tiny", "--data", data, "--out", tmp_path / "run",
            "--init", "scratch", "--fold", "1", "--no-progress"]
    line = refuse(base, capsys, [tmp_path], "finetune", str(fold), "stopped before its first checkpoint", "--overwrite")
    assert "--resume" not in line
    refuse([*base, "--resume"], capsys, [tmp_path], "finetune", "last.pt", "nothing to resume", "--overwrite")


def test_item17_broken_link_in_infer_input_is_named(tmp_path, capsys, model_file):
    """(17c for ``sap infer``) a dangling channel link is named as such, not a missing channel."""
    case = _case(tmp_path / "in" / "c1")
    (case / "b1000.nii.gz").unlink()
    os.symlink(tmp_path / "gone.nii.gz", case / "b1000.nii.gz")
    line = refuse(_infer(case, tmp_path / "out", model_file), capsys, [tmp_path], "infer", "b1000.nii.gz",
                  "broken symbolic link")
    assert "missing channel" not in line
