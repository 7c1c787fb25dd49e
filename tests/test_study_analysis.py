"""Tools that look into a finished study (issue 15): weight drift during fine-tuning, the start
weights of a fine-tuning rebuilt from its seed, and one fold model's operating point."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sap.cv.drift import block_of, change_by_block, relative_change


def test_blocks_follow_the_swin_unetr_parts():
    assert block_of("swinViT.layers3.0.blocks.1.attn.qkv.weight") == "swinViT.layers3"
    assert block_of("swinViT.patch_embed.proj.weight") == "swinViT.patch_embed"
    assert block_of("module.encoder10.layer.conv1.conv.weight") == "encoder10"
    assert block_of("out.conv.conv.bias") == "out"


def test_relative_change_by_hand():
    start = {"swinViT.layers1.w": np.array([3.0, 4.0]), "encoder1.w": np.array([0.0, 0.0]),
             "decoder1.w": np.array([1.0]), "out.b": np.array([2.0])}
    end = {"swinViT.layers1.w": np.array([3.0, 5.0]), "encoder1.w": np.array([0.0, 2.0]),
           "decoder1.w": np.array([1.0]), "out.b": np.array([-2.0])}
    r = change_by_block(start, end)
    assert r["swinViT.layers1"]["relative"] == pytest.approx(1 / 5)
    assert np.isnan(r["encoder1"]["relative"]) and r["encoder1"]["absolute"] == pytest.approx(2.0)
    assert r["decoder1"]["relative"] == 0.0
    assert r["swinViT"]["relative"] == pytest.approx(1 / 5)
    # the group pools values: sqrt(1 + 4) / sqrt(9 + 16 + 0)
    assert r["encoder"]["relative"] == pytest.approx(np.sqrt(5) / 5) and r["encoder"]["n_values"] == 4
    assert r["decoder"]["relative"] == 0.0 and r["decoder"]["n_values"] == 1  # the head is not decoder
    assert r["out"]["relative"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        relative_change(start, {**end, "decoder1.w": np.ones(2)}, ["decoder1.w"])
    with pytest.raises(KeyError):
        relative_change(start, {}, ["decoder1.w"])


def test_fine_tuning_start_is_the_start_of_the_real_fine_tuning(tmp_path):
    """A one-step fine-tuning at a learning rate of 1e-12 ends where it started: the rebuilt start
    must equal its checkpoint to ~1e-9, while another seed's start differs at order 1."""
    from sap.cv.stages import fine_tuning_start
    from sap.finetune.train import run_finetune
    from sap.models.weights import load_checkpoint
    from tests.test_finetune import micro_cohort, tiny_config

    cohort = micro_cohort(tmp_path / "cohort")
    cfg = tiny_config(cohort, tmp_path / "run", lr_scratch=1e-12, max_steps=1, val_every_steps=1, seed=7)
    run_finetune(cfg, "scratch", 1, progress=False)
    end = load_checkpoint(tmp_path / "run" / "baseline" / "fold_1" / "last.pt")["state_dict"]
    start = fine_tuning_start(cfg, "scratch", None)
    moved = change_by_block(start, end, cfg.model.encoder_patterns)
    assert moved["encoder"]["relative"] < 1e-6 and moved["decoder"]["relative"] < 1e-6
    other = fine_tuning_start(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, seed=8)),
                              "scratch", None)
    assert change_by_block(other, end, cfg.model.encoder_patterns)["encoder"]["relative"] > 0.1


def test_fine_tuning_start_of_sap_holds_the_skeletal_weights(tmp_path):
    from sap.cv.stages import fine_tuning_start
    from sap.models.weights import load_checkpoint
    from tests.test_finetune import skeletal_checkpoint, tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "run")
    path = skeletal_checkpoint(cfg, tmp_path / "skeletal.pt")
    skeletal = load_checkpoint(path)["state_dict"]
    start = fine_tuning_start(cfg, "sap", path)
    moved = change_by_block(start, skeletal, cfg.model.encoder_patterns,
                            names=[n for n in start if not n.startswith("out.")])
    assert moved["encoder"]["relative"] == 0.0 and moved["decoder"]["relative"] == 0.0


def test_tune_fold_is_the_per_fold_operating_point(tmp_path):
    from tests.cv_fixtures import make_fake_study

    s = make_fake_study(tmp_path, methods=("sap",), threshold_mode="per_fold")
    record = s.tune("sap")
    for fold in s.splits.test_folds:
        assert s.tune_fold("sap", fold) == record["folds"][str(fold)]
