"""Fine-tuning learns (issue 12): the stage's own pieces overfit one tiny-preset exam.

No fine-tuned model of this project had ever detected a lesion; this test is the smallest proof
that the pieces the stage composes (instance-balanced patches from the cache, the prior-initialised
head, the optimiser, SPEC §7's loss, sliding-window validation scored with ``sap.metrics``) learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from sap.config import load_config
from sap.data.cache import cache_cases
from sap.data.cases import discover_cohort
from sap.data.synth import make_cohort
from sap.finetune.train import LesionLoss, build_model, build_optimizer, lesion_class_counts, validate_lesions
from sap.models.swin import init_output_prior
from sap.sampling import EpochCursor, SamplingCase, build_sampler
from sap.sampling.torch_data import batch_stream


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("learn") / "tiny", preset="tiny", seed=0, workers=1, progress=False)


def test_lesion_loss_equals_monai_dice_ce_when_every_patch_holds_lesion():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, 8)
    label = (torch.rand(3, 1, 8, 8, 8) > 0.9).long()
    assert all(label[i].any() for i in range(3))
    total, dice_term, ce_term = LesionLoss().terms(logits, label)
    peer = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    assert float(total) == pytest.approx(float(peer(logits, label)), rel=1e-5)
    assert float(total) == pytest.approx(float(dice_term + ce_term))
    assert 0 < float(dice_term) < 1 and float(ce_term) > 0


def test_lesion_free_patch_has_no_dice_term_and_the_loss_can_fall():
    """MONAI scores a lesion-free patch Dice loss 1 whatever is predicted (the logged loss stayed at
    1.000 in the issue's probe); here it has CE only, so predicting nothing there scores ~0."""
    loss = LesionLoss()
    empty = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    confident = torch.zeros(1, 2, 8, 8, 8)
    confident[:, 0] = 12.0  # background everywhere
    total, dice_term, ce_term = loss.terms(confident, empty)
    assert float(dice_term) == 0.0 and float(total) == pytest.approx(float(ce_term)) and float(total) < 1e-4
    monai_peer = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    assert float(monai_peer(confident, empty)) > 0.99
    # a batch of one positive and one negative: the Dice term is the positive patch's alone
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, 8)
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, 2:5, 2:5, 2:5] = 1
    _, dice_pair, _ = loss.terms(logits, label)
    _, dice_positive, _ = loss.terms(logits[:1], label[:1])
    assert float(dice_pair) == pytest.approx(float(dice_positive), rel=1e-6)


def test_fine_tuning_overfits_one_tiny_exam(tiny_cohort):
    cfg = load_config("tiny", ["finetune.lr_scratch=2e-3", "infer.overlap=0.0"])  # the demo's rate
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
        loss_fn = LesionLoss()
        losses, best_f2 = [], 0.0
        for step in range(1, 61):
            model.train()
            batch = next(stream)
            loss = loss_fn(model(batch["image"]), batch["label"].long())
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
