"""Lesion fine-tuning (SPEC §7): inits, learning rates, schedule, outputs, resume, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sap.config import load_config
from sap.data.io import make_geometry, write_image
from sap.errors import SapError
from sap.finetune.train import build_model, build_optimizer, learning_rates, run_finetune
from sap.models.swin import build_swin_unetr, parameter_groups
from sap.models.training import warmup_cosine_schedule
from sap.models.weights import load_checkpoint, make_checkpoint, save_checkpoint

SHAPE = (32, 32, 96)


def micro_cohort(root: Path, n_patients: int = 6) -> Path:
    """Patients of 32×32×96 voxels (4 mm), two channels, cubic lesions in the lower third (so 64³
    patches have room to avoid them); the last exam lesion-free."""
    rng = np.random.default_rng(0)
    geometry = make_geometry(SHAPE, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), "RAS")
    for number in range(n_patients):
        folder = root / "patients" / f"p{number}"
        folder.mkdir(parents=True)
        lesions = np.zeros(SHAPE, np.uint8)
        for _ in range(0 if number == n_patients - 1 else 1 + number % 3):
            corner = rng.integers(4, (SHAPE[0] - 8, SHAPE[1] - 8, 24))
            edge = rng.integers(2, 5)
            lesions[tuple(slice(c, c + edge) for c in corner)] = 1
        body = np.zeros(SHAPE, np.float32)
        body[2:-2, 2:-2, 2:-2] = 1
        t1 = (body * (0.6 + 0.1 * rng.random(SHAPE)) - 0.4 * lesions).astype(np.float32) * 1000
        b1000 = (body * 0.2 * rng.random(SHAPE) + 0.7 * lesions).astype(np.float32) * 1000
        write_image(t1, geometry, folder / "T1.nii.gz")
        write_image(b1000, geometry, folder / "b1000.nii.gz")
        write_image(lesions, geometry, folder / "GT.nii.gz")
    return root


def tiny_config(root: Path, out: Path, **finetune):
    overrides = [
        "model.patch_size=[64,64,64]",
        "finetune.batch_size=1",
        "finetune.max_steps=3",
        "finetune.val_every_steps=2",
        "finetune.val_fraction=0.34",
        "cv.k=3",
        "infer.overlap=0.0",
        *[f"finetune.{k}={v}" for k, v in finetune.items()],
    ]
    cfg = load_config("tiny", overrides)
    cfg.data.root = str(root)
    cfg.out = str(out)
    return cfg


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return micro_cohort(tmp_path_factory.mktemp("cohort"))


def skeletal_checkpoint(cfg, path: Path) -> Path:
    """A 10-class model saved as sap's skeletal pretraining would save it."""
    torch.manual_seed(123)
    model = build_swin_unetr(cfg.model, 2, 10)
    checkpoint = make_checkpoint(
        model, config=cfg.to_dict(), channels=["T1", "b1000"], kind="skeletal", out_channels=10
    )
    return save_checkpoint(checkpoint, path)


def ssl_checkpoint(cfg, path: Path) -> Path:
    """Encoder-only weights (``swinViT.*``), as the SSL stage saves them."""
    torch.manual_seed(321)
    model = build_swin_unetr(cfg.model, 2, 2)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("swinViT.")}
    checkpoint = make_checkpoint(
        model, config=cfg.to_dict(), channels=["T1", "b1000"], kind="ssl", out_channels=0, state_dict=encoder
    )
    return save_checkpoint(checkpoint, path)


def test_sap_init_loads_encoder_and_decoder_but_not_the_head(tmp_path):
    cfg = load_config("tiny")
    source = skeletal_checkpoint(cfg, tmp_path / "skeletal.pt")
    stored = load_checkpoint(source)["state_dict"]
    model = build_model(cfg, "sap", 2, source, verbose=False)
    state = model.state_dict()
    body = [k for k in state if not k.startswith("out.")]
    assert body and all(torch.equal(state[k], stored[k]) for k in body)
    head = [k for k in state if k.startswith("out.")]
    assert head and all(state[k].shape[0] == 2 and stored[k].shape[0] == 10 for k in head)
    # a freshly built model differs from the checkpoint: the equality above is the load's doing
    fresh = build_swin_unetr(cfg.model, 2, 2).state_dict()
    assert not torch.equal(
        fresh["swinViT.patch_embed.proj.weight"], stored["swinViT.patch_embed.proj.weight"]
    )


def test_ssl_init_loads_the_swin_encoder_only(tmp_path):
    cfg = load_config("tiny")
    source = ssl_checkpoint(cfg, tmp_path / "ssl.pt")
    stored = load_checkpoint(source)["state_dict"]
    torch.manual_seed(321)  # the full source model, skip blocks included
    full_source = build_swin_unetr(cfg.model, 2, 2).state_dict()
    torch.manual_seed(999)
    model = build_model(cfg, "ssl", 2, source, verbose=False)
    state = model.state_dict()
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())
    # the convolutional skip blocks and the decoder stay random (SPEC §5)
    for key in ("encoder1.layer.conv1.conv.weight", "decoder1.conv_block.conv1.conv.weight"):
        assert key not in stored and not torch.equal(state[key], full_source[key])


@pytest.mark.parametrize(("init", "expected"), [("sap", (2e-6, 1e-5)), ("ssl", (5e-6, 1e-5))])
def test_two_parameter_groups_follow_the_schedule(init, expected):
    cfg = load_config("paper")  # the paper's learning rates
    cfg.model.feature_size = 12
    cfg.finetune.max_steps = 40
    assert learning_rates(cfg, init) == expected
    model = build_swin_unetr(cfg.model, 2, 2)
    optimizer = build_optimizer(model, cfg, init)
    assert [g["lr"] for g in optimizer.param_groups] == list(expected)
    assert all(g["weight_decay"] == 1e-5 for g in optimizer.param_groups)
    encoder, decoder = parameter_groups(model, cfg.model.encoder_patterns)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in encoder}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in decoder}
    scheduler = warmup_cosine_schedule(optimizer, cfg.finetune.max_steps, cfg.finetune.warmup_fraction)
    warmup = round(cfg.finetune.warmup_fraction * cfg.finetune.max_steps)
    assert warmup == 1
    history = []
    for _ in range(cfg.finetune.max_steps):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    history = np.array(history)
    np.testing.assert_allclose(history[:, 0] / history[:, 1], expected[0] / expected[1])  # same factor
    assert history[0, 1] < expected[1] and history[warmup, 1] == pytest.approx(expected[1])  # warm-up
    after = history[warmup:, 1]
    assert np.all(np.diff(after) < 0) and after[-1] < 0.01 * expected[1]  # cosine decay towards 0
    # half way through the cosine the factor is 1/2
    middle = warmup + (cfg.finetune.max_steps - warmup) // 2
    assert history[middle, 1] == pytest.approx(expected[1] * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=0.1)


def test_scratch_has_one_learning_rate():
    cfg = load_config("paper")
    cfg.model.feature_size = 12
    optimizer = build_optimizer(build_swin_unetr(cfg.model, 2, 2), cfg, "baseline")
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def test_sap_fold_writes_checkpoints_and_resume_repeats_the_run(cohort, tmp_path):
    from sap.cli import main

    run = tmp_path / "run"
    cfg = tiny_config(cohort, run)
    skeletal = skeletal_checkpoint(cfg, run / "pretrain" / "skeletal" / "best.pt")
    assert skeletal.is_file()
    args = [
        "finetune", "--config", "tiny", "--data", str(cohort), "--out", str(run), "--init", "sap", "--fold", "1",
        "--set", "model.patch_size=[64,64,64]", "--set", "finetune.max_steps=3", "--set", "finetune.val_every_steps=2",
        "--set", "finetune.val_fraction=0.34", "--set", "cv.k=3", "--set", "infer.overlap=0.0", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    out = run / "sap" / "fold_1"
    assert (run / "splits.json").is_file()
    # the sampling index (lesion components) is stored once inside each training case's cache entry
    assert len(list((cohort / ".sap_cache").glob("*/sampling_index.npz"))) >= 3
    for name in ("last.pt", "best.pt", "log.csv", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    last = load_checkpoint(out / "last.pt")
    assert last["kind"] == "lesion" and last["threshold"] == 0.5 and last["out_channels"] == 2
    assert last["step"] == 3 and "optimizer" in last["training"]
    assert last["training"]["cursor"] == {"epoch": 0, "position": 3}  # three batches of one patch
    assert "optimizer" in load_checkpoint(out / "best.pt")["training"]
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[0]["val_cases"] == "" and rows[1]["val_cases"] == "1"  # validated at step 2 …
    assert rows[2]["val_cases"] == "1"  # … and after the last step, on one validation exam
    # the new head started at the lesion prior (lesions are a small share of voxels), not at 50 %
    head_bias = last["state_dict"]["out.conv.conv.bias"]
    assert float(head_bias[0] - head_bias[1]) > 3.0
    # the fine-tuned weights moved away from the skeletal ones
    assert not torch.equal(last["state_dict"]["decoder1.conv_block.conv1.conv.weight"],
                           _weights(skeletal)["decoder1.conv_block.conv1.conv.weight"])  # fmt: skip

    # outputs exist: refused without --overwrite or --resume
    assert main(args) == 2

    # killed after step 2, then resumed: the same weights as the uninterrupted run
    interrupted = run_finetune(cfg, "sap", 1, overwrite=True, progress=False, stop_after=2)
    assert interrupted.steps == 2 and load_checkpoint(out / "last.pt")["step"] == 2
    resumed = run_finetune(cfg, "sap", 1, resume=True, progress=False)
    assert resumed.steps == 3
    again = load_checkpoint(out / "last.pt")
    for key, value in last["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    rows_again = list(csv.DictReader((out / "log.csv").open()))
    assert [r["loss"] for r in rows_again] == [r["loss"] for r in rows]


def test_bad_input_is_refused_with_one_line(cohort, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(cohort, run)
    with pytest.raises(SapError, match="nothing to resume"):
        run_finetune(cfg, "scratch", 1, resume=True, progress=False)
    with pytest.raises(SapError, match="pretrained checkpoint not found.*sap pretrain --stage skeletal"):
        run_finetune(cfg, "sap", 1, progress=False)
    with pytest.raises(SapError, match="tuning fold"):
        run_finetune(cfg, "scratch", 0, overwrite=True, progress=False)
    with pytest.raises(SapError, match="not one of"):
        run_finetune(cfg, "imagenet", 1, progress=False)
    no_run = tiny_config(cohort, run)
    no_run.out = None
    with pytest.raises(SapError, match="--out"):
        run_finetune(no_run, "scratch", 1, progress=False)


def test_lesion_class_counts_over_cached_masks():
    from types import SimpleNamespace

    from sap.finetune.train import lesion_class_counts

    mask = np.zeros((4, 5, 6), np.uint8)
    mask[0, 0, :3] = 1
    cases = [
        SimpleNamespace(lesions=mask, shape=mask.shape),
        SimpleNamespace(lesions=None, shape=(2, 2, 2)),  # a lesion-free exam without a mask file
    ]
    assert lesion_class_counts(cases).tolist() == [120 + 8 - 3, 3]
