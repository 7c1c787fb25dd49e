"""Fine-tuning learns (issue 12): the stage's own pieces overfit one tiny-preset exam.

No fine-tuned model of this project had ever detected a lesion; this test is the smallest proof
that the pieces the stage composes (instance-balanced patches from the cache, the prior-initialised
head, the optimiser, SPEC §7's loss, sliding-window validation scored with ``sap.metrics``) learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sap.config import load_config
from sap.data.cache import cache_cases
from sap.data.cases import discover_cohort
from sap.data.synth import make_cohort
from sap.finetune.train import (
    build_model,
    build_optimizer,
    lesion_class_counts,
    lesion_loss,
    loss_terms,
    validate_lesions,
)
from sap.models.swin import init_output_prior
from sap.sampling import EpochCursor, SamplingCase, build_sampler
from sap.sampling.torch_data import batch_stream


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("learn") / "tiny", preset="tiny", seed=0, workers=1, progress=False)


def test_loss_terms_add_up_to_monai_dice_ce():
    cfg = load_config("tiny")
    loss_fn = lesion_loss(cfg)
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, 8)
    label = (torch.rand(2, 1, 8, 8, 8) > 0.9).long()
    label[1] = 0  # a negative patch
    total, dice_term, ce_term = loss_terms(loss_fn, logits, label)
    assert float(total) == pytest.approx(float(loss_fn(logits, label)), rel=1e-6)
    assert 0 < float(dice_term) < 1 and float(ce_term) > 0


@pytest.mark.parametrize("smooth", [1e-5, 1.0])
def test_dice_smooth_sets_what_a_negative_patch_teaches(smooth):
    """With MONAI's 1e-5 smoothing (the default) an empty patch scores Dice loss 1 whatever is
    predicted; with ``finetune.dice_smooth=1`` it falls towards 0 as predicted lesion voxels vanish."""
    loss_fn = lesion_loss(load_config("tiny", [f"finetune.dice_smooth={smooth}"]))
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    confident = torch.zeros(1, 2, 8, 8, 8)
    confident[:, 0] = 12.0  # background everywhere
    unsure = torch.zeros(1, 2, 8, 8, 8)  # 50 % lesion everywhere
    assert float(loss_fn.dice(unsure, label)) > 0.9
    if smooth < 1e-3:
        assert float(loss_fn.dice(confident, label)) > 0.9
    else:
        assert float(loss_fn.dice(confident, label)) < 0.1


def test_fine_tuning_overfits_one_tiny_exam(tiny_cohort):
    cfg = load_config("tiny", ["finetune.lr_scratch=1e-3", "infer.overlap=0.0"])
    cfg.data.root = str(tiny_cohort)
    cohort = discover_cohort(cfg.data, require=("patients",))
    # the exam with the most lesion voxels: the one a 60-step run can certainly see
    cached = cache_cases(cohort.patients, cfg.data, progress=False)
    case = max(cached, key=lambda c: int(np.count_nonzero(np.asarray(c.lesions))) if c.lesions is not None else 0)
    assert case.lesions is not None and np.count_nonzero(np.asarray(case.lesions)) > 0

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # CI has two cores and runs tests one at a time
    try:
        torch.manual_seed(cfg.finetune.seed)
        model = build_model(cfg, "scratch", len(cfg.data.channels), None, verbose=False)
        init_output_prior(model, lesion_class_counts([case]))
        optimizer = build_optimizer(model, cfg, "scratch")
        sampler = build_sampler("instance", [SamplingCase.from_cached(case)], cfg.model.patch_size, seed=0,
                                batch_size=1)
        stream = batch_stream(sampler, EpochCursor())
        loss_fn = lesion_loss(cfg)
        losses, best_f2 = [], 0.0
        for step in range(1, 61):
            model.train()
            batch = next(stream)
            loss, _, _ = loss_terms(loss_fn, model(batch["image"]), batch["label"].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if step % 10 == 0:
                model.eval()
                best_f2 = max(best_f2, validate_lesions(model, [case], cfg, torch.device("cpu"))["val_f2"])
                if best_f2 >= 0.5:
                    break
    finally:
        torch.set_num_threads(threads)
    assert best_f2 >= 0.5, f"F2 {best_f2:.2f} after {step} steps; losses {np.round(losses, 3).tolist()}"
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
