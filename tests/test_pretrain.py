"""Pretraining stages (SPEC §6): skeletal and SSL runs, outputs, --resume, SSL losses, validation.

Runs on a hand-made cohort of three small healthy exams (40 × 40 × 64 voxels) with
32 × 32 × 64 patches and feature_size 12, so every run is a few seconds on one CPU thread.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice

from sap.cli import main as sap_main
from sap.config import load_config
from sap.data.io import make_geometry, write_image
from sap.errors import SapError
from sap.models.ssl import SSLModel, contrastive_loss, make_ssl_batch, random_block_mask, ssl_losses
from sap.models.swin import build_swin_unetr
from sap.models.weights import load_checkpoint, load_weights
from sap.pretrain import run_pretrain
from sap.pretrain.common import load_stage_data
from sap.pretrain.skeletal import validate_skeleton
from sap.pretrain.validation import dice, intensity_threshold_baseline, per_class_dice, score_cases

SHAPE = (40, 40, 64)
PATCH = [32, 32, 64]


def _write_exam(folder, rng):
    """Body ellipsoid with nine bright 'bones', one per skeleton region, stacked along z."""
    folder.mkdir(parents=True)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = ((x - 20) / 17.0) ** 2 + ((y - 20) / 15.0) ** 2 <= 1.0
    skeleton = np.zeros(SHAPE, np.uint8)
    offset = int(rng.integers(-2, 3))
    for label in range(1, 10):
        z0 = 2 + 6 * (label - 1) + offset
        skeleton[16 + label % 3 : 24 + label % 3, 15:25, max(0, z0) : z0 + 5] = label
    t1 = np.where(body, 0.3, 0.0) + np.where(skeleton > 0, 0.5, 0.0) + rng.normal(0, 0.03, SHAPE) * body
    b1000 = np.where(body, 0.4, 0.0) - np.where(skeleton > 0, 0.3, 0.0) + rng.normal(0, 0.03, SHAPE) * body
    geometry = make_geometry(SHAPE, (4.0, 4.0, 4.0))
    write_image(t1.astype(np.float32), geometry, folder / "T1.nii.gz")
    write_image(b1000.astype(np.float32), geometry, folder / "b1000.nii.gz")
    write_image(skeleton, geometry, folder / "skeleton.nii.gz")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    for i in range(3):
        _write_exam(root / "healthy" / f"h{i}", rng)
    return root


def _cfg(cohort, out, **overrides):
    sets = [
        f"model.patch_size={PATCH}",
        "pretrain.max_steps=3",
        "pretrain.val_every_steps=2",
        "pretrain.batch_size=1",
        "pretrain.val_fraction=0.34",
        "pretrain.lr=0.001",
        "infer.overlap=0.25",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("tiny", sets)
    cfg.data.root = str(cohort)
    cfg.out = str(out)
    return cfg


def _state(path):
    return load_checkpoint(path)["state_dict"]


# ------------------------------------------------------------------------------------ skeletal
def test_skeletal_steps_lower_loss_on_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_swin_unetr(cfg.model, 2, 10)
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 10, (1, 1, 8, 8, 16))).repeat_interleave(4, 2).repeat_interleave(4, 3)
    label = label.repeat_interleave(4, 4)
    image = torch.cat([label.float() / 9, 1 - label.float() / 9], 1) + 0.05 * torch.randn(1, 2, 32, 32, 64)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = loss_fn(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_skeletal_run_outputs_resume_and_reload(cohort, tmp_path):
    full = run_pretrain(_cfg(cohort, tmp_path / "full"), "skeletal", progress=False)
    folder = full.out_dir
    for name in ("last.pt", "best.pt", "log.csv", "config.yaml", "summary.json"):
        assert (folder / name).is_file(), name
    assert any((folder / "tensorboard").iterdir())
    assert full.steps == 3 and full.final_metrics["val_skeleton_dice"] >= 0
    with (folder / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[1]["val_skeleton_dice"] and not rows[0]["val_skeleton_dice"]
    meta = load_checkpoint(folder / "last.pt")
    assert meta["kind"] == "skeletal" and meta["channels"] == ["T1", "b1000"] and meta["out_channels"] == 10
    assert meta["config"]["model"]["patch_size"] == PATCH and meta["threshold"] == 0.5

    # interrupted after step 2, then resumed: same weights as the uninterrupted run
    cfg = _cfg(cohort, tmp_path / "split")
    run_pretrain(cfg, "skeletal", progress=False, stop_after=2)
    assert load_checkpoint(cfg_out(cfg, "skeletal") / "last.pt")["step"] == 2
    with pytest.raises(SapError, match="outputs exist"):
        run_pretrain(cfg, "skeletal", progress=False)
    resumed = run_pretrain(cfg, "skeletal", progress=False, resume=True)
    assert resumed.steps == 3
    a, b = _state(folder / "last.pt"), _state(resumed.out_dir / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    with (resumed.out_dir / "log.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3]

    # a saved checkpoint reloads into a fresh model that scores the validation exams exactly as
    # the trained model did when it wrote the checkpoint
    fresh = build_swin_unetr(cfg.model, 2, 10).eval()
    load_weights(fresh, folder / "last.pt", expect="full", verbose=False)
    val_cases = load_stage_data(cfg, need_skeleton=True, progress=False).val
    rescored = validate_skeleton(fresh, val_cases, cfg).as_dict()
    stored = meta["metrics"]
    assert rescored.keys() == stored.keys()
    for key, value in stored.items():
        assert (np.isnan(value) and np.isnan(rescored[key])) or rescored[key] == pytest.approx(value, abs=1e-9), key
    # and is what `finetune --init sap` reads: everything but the 10-class head
    lesion_model = build_swin_unetr(cfg.model, 2, 2)
    report = load_weights(lesion_model, folder / "best.pt", expect="sap", verbose=False)
    assert report.complete and len(report.skipped) == 2


def cfg_out(cfg, stage):
    from pathlib import Path

    return Path(cfg.out) / "pretrain" / stage


def test_pretrain_cli_refusals(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    folder = out / "pretrain" / "skeletal"
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(b"earlier result")
    args = ["pretrain", "--config", "tiny", "--stage", "skeletal", "--data", str(cohort), "--out", str(out)]
    assert sap_main(args) == 2
    assert "outputs exist" in capsys.readouterr().err
    assert (folder / "best.pt").read_bytes() == b"earlier result"
    assert sap_main([*args[:-2], "--out", str(tmp_path / "other"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert sap_main(["pretrain", "--config", "tiny", "--stage", "ssl", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ SSL
def test_ssl_losses_finite_and_every_head_gets_gradient():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    swin = build_swin_unetr(cfg.model, 2, 2).swinViT
    model = SSLModel(swin, cfg.model.feature_size, 2)
    crops = torch.rand(2, 2, 32, 32, 64)
    batch = make_ssl_batch(crops, np.random.default_rng(0))
    assert batch.inputs.shape == (4, 2, 32, 32, 64) and batch.rotations.shape == (4,)
    losses = ssl_losses(model, batch, temperature=0.5)
    for value in (losses.total, losses.reconstruction, losses.rotation, losses.contrastive):
        assert torch.isfinite(value)
    torch.testing.assert_close(losses.total, losses.reconstruction + losses.rotation + losses.contrastive)
    losses.total.backward()
    for name in ("heads.rotation", "heads.contrastive", "heads.reconstruction", "swinViT.patch_embed", "swinViT.layers4"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert any(float(g.abs().sum()) > 0 for g in grads), name
    with pytest.raises(SapError, match="two crops"):
        make_ssl_batch(crops[:1], np.random.default_rng(0))


def test_contrastive_loss_matches_explicit_formula():
    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.normal(size=(6, 5))).float()
    t = 0.5
    zn = z / z.norm(dim=1, keepdim=True)
    n = 3
    terms = []
    for i in range(6):
        j = (i + n) % 6
        sims = [float(zn[i] @ zn[k]) / t for k in range(6) if k != i]
        terms.append(-(float(zn[i] @ zn[j]) / t - np.log(np.sum(np.exp(sims)))))
    assert float(contrastive_loss(z, t)) == pytest.approx(np.mean(terms), rel=1e-5)
    # aligned views give a lower loss than unrelated ones
    aligned = torch.cat([z[:3], z[:3] + 0.01])
    assert float(contrastive_loss(aligned, t)) < float(contrastive_loss(z, t))


@pytest.mark.parametrize("seed", range(5))
def test_block_mask_respects_limits(seed):
    shape = (32, 48, 64)
    blocks: list = []
    mask = random_block_mask(shape, np.random.default_rng(seed), 0.3, 0.25, blocks=blocks)
    assert 0 < mask.mean() <= 0.3
    assert blocks
    for block in blocks:
        for sl, size in zip(block, shape, strict=True):
            assert 1 <= sl.stop - sl.start <= int(0.25 * size)
    union = np.zeros(shape, bool)
    for block in blocks:
        union[block] = True
    assert np.array_equal(union, mask)


def test_ssl_run_resume_and_encoder_loads_for_init_ssl(cohort, tmp_path):
    # pretrain.ssl.max_steps sets the SSL length when given (the demo preset keeps SSL short)
    sets = {"pretrain.ssl.crops_per_batch": 2, "pretrain.max_steps": 50, "pretrain.ssl.max_steps": 3}
    full = run_pretrain(_cfg(cohort, tmp_path / "full", **sets), "ssl", progress=False)
    assert full.steps == 3 and np.isfinite(full.final_metrics["val_loss"])
    best = load_checkpoint(full.best)
    assert best["kind"] == "ssl" and all(k.startswith("swinViT.") for k in best["state_dict"])
    model = build_swin_unetr(_cfg(cohort, tmp_path).model, 2, 2)
    report = load_weights(model, full.best, expect="ssl", verbose=False)
    assert report.complete and report.source_format == "sap"
    assert len(report.loaded) == sum(k.startswith("swinViT.") for k in model.state_dict())

    cfg = _cfg(cohort, tmp_path / "split", **sets)
    run_pretrain(cfg, "ssl", progress=False, stop_after=2)
    resumed = run_pretrain(cfg, "ssl", progress=False, resume=True)
    a, b = _state(full.last), _state(resumed.last)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit


# ------------------------------------------------------------------------------------ validation
def test_per_class_dice_matches_monai():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 10, (12, 14, 16))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 10, gt.shape))
    pred[pred == 9] = 0  # class 9 predicted nowhere: Dice 0
    ours = per_class_dice(pred, gt)
    onehot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a), 10).permute(3, 0, 1, 2)[None]  # noqa: E731
    theirs = compute_dice(onehot(pred), onehot(gt), include_background=False)[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert dice(pred > 0, gt > 0) == pytest.approx(
        float(compute_dice(torch.from_numpy(pred > 0)[None, None], torch.from_numpy(gt > 0)[None, None])[0, 0])
    )
    scores = score_cases([pred, gt], [gt, gt])
    np.testing.assert_allclose(scores.class_dice, (ours + 1) / 2, rtol=1e-6)
    assert np.isnan(per_class_dice(np.zeros((3, 3, 3), int), np.zeros((3, 3, 3), int))).all()


def test_intensity_baseline_tunes_on_training_cases():
    rng = np.random.default_rng(2)
    cases = []
    for _ in range(3):
        skeleton = (rng.random((10, 10, 10)) < 0.2).astype(np.uint8) * rng.integers(1, 10)
        image = np.stack([np.where(skeleton > 0, 0.8, 0.2), rng.random((10, 10, 10))]).astype(np.float32)
        cases.append((image, None, skeleton))
    baseline = intensity_threshold_baseline(cases[:2], cases[2:])
    assert baseline.channel == 0 and baseline.above and 0.2 < baseline.threshold <= 0.8
    assert baseline.train_dice == pytest.approx(1.0) and baseline.val_dice == pytest.approx(1.0)
