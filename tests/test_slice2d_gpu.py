"""sap.slice2d on a CUDA device: AMP training steps, fit with checkpoints, SAM prompting equal to the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _models_test_module():
    """The tiny configs and fixed batch of test_slice2d_models (loaded by path: any pytest import mode)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_slice2d_models.py")
    spec = importlib.util.spec_from_file_location("slice2d_models_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["unet", "foundation", "sam"])
def test_amp_training_overfits_on_gpu(kind):
    helpers = _models_test_module()
    SPECS, disc_batch = helpers.SPECS, helpers.disc_batch  # noqa: N806

    from sap.config import Slice2DConfig
    from sap.slice2d.metrics import dice_iou
    from sap.slice2d.models import build_model, foreground_probability, make_loss
    from sap.slice2d.train import make_optimizer, training_step

    make_spec, steps, lr = SPECS[kind]
    torch.manual_seed(0)
    model = build_model(make_spec()).cuda()
    images, masks = disc_batch()
    x = torch.as_tensor(np.stack(images))[:, None].cuda()
    y = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None].cuda()
    optimizer, schedule = make_optimizer(kind, model, Slice2DConfig(lr=lr, unet_lr=lr), 2 * steps)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(2 * steps):
        losses.append(training_step(model, make_loss(kind), optimizer, x, y, scaler))
        schedule.step()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), torch.autocast("cuda"):
        prob = foreground_probability(kind, model(x)).float().cpu().numpy()
    assert np.mean([dice_iou(prob[i] >= 0.5, masks[i])[0] for i in range(len(masks))]) >= 0.8


def test_fit_on_gpu_with_amp_writes_a_loadable_model(tmp_path):
    disc_batch = _models_test_module().disc_batch

    from sap.config import Slice2DConfig
    from sap.slice2d.data import SliceSet
    from sap.slice2d.models import ModelSpec, build_model, unet_filters
    from sap.slice2d.predict import load_model_dir
    from sap.slice2d.train import fit, predict_slices

    images, masks = disc_batch(6)
    train, val = SliceSet(), SliceSet()
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        side = val if i >= 4 else train
        side.images.append(im.astype(np.float16))
        side.masks.append(m)
    spec = ModelSpec("unet", 64, {"filters": unet_filters(64, 8, 32)})
    settings = Slice2DConfig(image_size=64, max_steps=6, val_every_steps=3, batch_size=2, amp=True)
    result = fit(build_model(spec), spec, train, val, settings, tmp_path, "lesions", progress=False)  # the runner puts it on the GPU
    assert result["best_step"] in (3, 6)
    loaded = load_model_dir(tmp_path, device="cuda")
    probs = predict_slices(loaded.model, "unet", images, 64, device="cuda")
    assert len(probs) == 6 and probs[0].shape == (64, 64) and np.isfinite(probs[0]).all()


def test_sam_prompting_on_gpu_matches_the_cpu():
    helpers = _models_test_module()
    disc_batch, tiny_sam = helpers.disc_batch, helpers.tiny_sam

    from sap.slice2d import prompts as p
    from sap.slice2d.sam import SamPrompter

    images, masks = disc_batch(1, size=48)
    prims = p.class_primitives(masks[0].astype(bool), np.random.default_rng(0))
    prompts = p.prompts_for_strategy(prims, "box+center_1C")
    logits = {}
    for device in ("cpu", "cuda"):
        prompter = SamPrompter(tiny_sam(0), device=device)
        emb = prompter.embed(images[0])
        assert emb.seconds > 0
        logits[device] = prompter.predict_logits(emb, prompts).cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-3, rtol=1e-3)
