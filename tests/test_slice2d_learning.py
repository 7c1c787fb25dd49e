"""sap.slice2d training learns lesions: the U-Net overfits a few slices of a tiny `sap synth` CT
cohort, batches hold their share of foreground slices, and the output starts at the label prior.

Before these fixes the U-Net predicted foreground probability ~1e-12 everywhere within a few dozen
steps (MONAI's per-slice Dice on empty slices, output starting at 50 %) and never left it.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from sap.cli import main
from sap.config import load_config
from sap.slice2d.data import SliceSet
from sap.slice2d.models import (
    ModelSpec,
    build_model,
    foreground_probability,
    init_output_prior,
    make_loss,
    unet_filters,
)
from sap.slice2d.train import SliceSampler, fit, foreground_fraction, load_slice_sets


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ct")
    assert main(["synth", "--out", str(root), "--preset", "tiny", "--modality", "ct"]) == 0
    return root


def few_slices(s: SliceSet, n_lesion: int, n_empty: int) -> SliceSet:
    """The n_lesion slices with the most lesion pixels and the first n_empty lesion-free slices."""
    area = np.array([int(m.sum()) for m in s.masks])
    keep = [int(i) for i in np.argsort(-area, kind="stable")[:n_lesion]] + [int(i) for i in np.flatnonzero(area == 0)[:n_empty]]
    out = SliceSet()
    for i in keep:
        out.images.append(s.images[i])
        out.masks.append(s.masks[i])
        out.case_ids.append(s.case_ids[i])
        out.slice_index.append(s.slice_index[i])
        out.spacing.append(s.spacing[i])
    return out


def test_unet_overfits_a_few_slices_of_a_tiny_ct_cohort(tiny_ct, tmp_path):
    """Four lesion slices and four without, as a balanced training set mixes them."""
    cfg = load_config("tiny", [f"data.root={tiny_ct}", "slice2d.slice_filter=balanced"])
    train, _, _ = load_slice_sets(cfg, "lesions", progress=False)
    few = few_slices(train, 4, 4)
    assert len(few) == 8 and min(int(m.sum()) for m in few.masks[:4]) >= 4
    settings = replace(cfg.slice2d, max_steps=100, val_every_steps=25, batch_size=4, augment=False, seed=0)
    torch.manual_seed(0)
    spec = ModelSpec("unet", settings.image_size, {"filters": unet_filters(settings.image_size, 8, 32)})
    result = fit(build_model(spec), spec, few, few, settings, tmp_path, "lesions", progress=False)
    # per-slice Dice (SPEC §11: a prediction on a lesion-free slice scores 0) on the slices it trained on
    assert result["best_val_dice"] >= 0.5, result
    with (tmp_path / "log.csv").open(newline="") as handle:
        log = list(csv.DictReader(handle))
    assert list(log[0]) == ["step", "lr", "loss", "loss_dice", "loss_ce", "val_dice", "val_iou", "val_dice_pooled"]
    losses = [float(row["loss"]) for row in log]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])  # the logged loss shows the learning


def test_batches_hold_their_share_of_foreground_slices_and_walk_every_slice():
    has_fg = np.array([True] * 5 + [False] * 40)
    sampler = SliceSampler(has_fg, 4, 0.5, np.random.default_rng(0))
    batches = [sampler.next_batch() for _ in range(30)]
    assert all(len(b) == 4 and has_fg[b].sum() == 2 for b in batches)
    assert set(np.concatenate(batches)) == set(range(45))  # every slice drawn within 30 batches
    # the state round trip continues the same sequence (the caller restores the rng, as fit does)
    state, rng_state = sampler.state_dict(), sampler.rng.bit_generator.state
    ahead = [sampler.next_batch() for _ in range(40)]
    resumed = SliceSampler(has_fg, 4, 0.5, np.random.default_rng(7))
    resumed.rng.bit_generator.state = rng_state
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(ahead, [resumed.next_batch() for _ in range(40)], strict=True))
    # at least one foreground slice per batch even for a small share; one pool without both kinds
    assert SliceSampler(has_fg, 4, 0.1, np.random.default_rng(0)).counts == [1, 3]
    plain = SliceSampler(np.zeros(6, bool), 4, 0.5, np.random.default_rng(0))
    assert sorted(np.concatenate([plain.next_batch() for _ in range(3)])[:6]) == list(range(6))
    assert SliceSampler(has_fg, 4, None, np.random.default_rng(0)).counts == [4]


@pytest.mark.parametrize("kind", ["unet", "foundation"])
def test_output_starts_at_the_foreground_prior(kind):
    if kind == "unet":
        spec = ModelSpec("unet", 32, {"filters": unet_filters(32, 4, 8)})
    else:
        from transformers import DINOv3ViTConfig

        enc = DINOv3ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                              patch_size=8, image_size=32, num_register_tokens=0)  # fmt: skip
        spec = ModelSpec("foundation", 32, {"encoder_config": enc.to_dict(), "head_channels": [8, 8, 8], "freeze_encoder": False})
    torch.manual_seed(0)
    model = build_model(spec)
    masks = [np.zeros((32, 32), np.uint8), np.pad(np.ones((4, 4), np.uint8), 14)]
    prior = foreground_fraction(masks)
    assert prior == pytest.approx(16 / 2048)
    init_output_prior(model, kind, prior)
    with torch.no_grad():  # the last layer's weights are small: the bias sets the level
        model.eval()
        prob = foreground_probability(kind, model(torch.rand(2, 1, 32, 32))).mean()
    assert 0.2 * prior < float(prob) < 5 * prior


def test_loss_gives_empty_slices_no_dice_of_their_own_and_keeps_its_terms():
    loss = make_loss("unet")
    logits = torch.zeros(2, 2, 8, 8)
    logits[:, 0] = 5.0  # confident background everywhere
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, 2:4, 2:4] = 1  # slice 0 holds a lesion, slice 1 none
    total = loss(logits, y)
    dice, ce = loss.last_terms
    assert float(total) == pytest.approx(dice + ce, rel=1e-5)
    # one Dice over the batch's foreground channel: the empty slice adds only its predicted
    # foreground, not a Dice of its own that is 0 only when it predicts (almost) nothing
    loss(logits[:1], y[:1])
    assert dice == pytest.approx(loss.last_terms[0], abs=0.02) and dice > 0.9


def per_pixel_ce(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Softmax cross-entropy of every pixel, written out: log-sum-exp minus the true class's logit."""
    z = logits.double().numpy()
    label = y[:, 0].long().numpy()
    log_sum = np.log(np.exp(z).sum(axis=1))
    true = np.take_along_axis(z, label[:, None], axis=1)[:, 0]
    return (log_sum - true).ravel()


def test_topk_ce_averages_the_hardest_pixels_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 4, generator=gen) * 3
    y = (torch.rand(2, 1, 5, 4, generator=gen) < 0.3).float()
    ce = per_pixel_ce(logits, y)  # 40 pixels
    expected = {None: ce.mean(), 100.0: ce.mean(), 10.0: np.sort(ce)[-4:].mean(), 1.0: ce.max()}
    for percent, value in expected.items():
        loss = make_loss("unet", ce_topk_percent=percent)
        total = loss(logits, y)
        dice, term = loss.last_terms
        assert term == pytest.approx(value, rel=1e-5), percent
        assert float(total) == pytest.approx(dice + term, rel=1e-5)
    with pytest.raises(ValueError, match="ce_topk_percent"):
        make_loss("unet", ce_topk_percent=0.0)


def test_topk_ce_keeps_pulling_a_confidently_missed_lesion_pixel():
    """One lesion pixel the network calls background with confidence, among 63 easy background
    pixels: its softmax is saturated, so the Dice gradient is nearly nil, and the plain CE divides
    its pull by all 64 pixels; over the hardest 2 % (2 pixels) the pull is 32 times stronger."""
    logits = torch.zeros(1, 2, 8, 8)
    logits[:, 0] = 8.0  # background everywhere, p(lesion) ~ 3e-4
    y = torch.zeros(1, 1, 8, 8)
    y[0, 0, 3, 3] = 1
    pulls = {}
    for percent in (None, 2.0):
        x = logits.clone().requires_grad_(True)
        make_loss("unet", ce_topk_percent=percent)(x, y).backward()
        pulls[percent] = -float(x.grad[0, 1, 3, 3])  # gradient descent raises the lesion logit by this
    assert pulls[None] > 0 and pulls[2.0] > 20 * pulls[None]
