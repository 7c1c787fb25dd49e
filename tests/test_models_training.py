"""Shared training pieces: schedule, RNG capture, CSV logger, the loop (no Swin UNETR: fast)."""

from __future__ import annotations

import csv
import math
import os
import random
import sys

import numpy as np
import pytest
import torch

from sap.errors import SapError
from sap.memory import glibc
from sap.models.training import (
    LoopState,
    RunLogger,
    capture_rng,
    every,
    make_accelerator,
    restore_rng,
    restore_training_state,
    reused_memory,
    train_loop,
    training_state,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)


def test_warmup_then_cosine():
    max_steps, warmup = 40, 4
    factors = [warmup_cosine_factor(s, max_steps, warmup) for s in range(max_steps + 1)]
    assert factors[:warmup] == sorted(factors[:warmup]) and 0 < factors[0] < factors[warmup - 1] < 1
    assert factors[warmup] == pytest.approx(1.0)
    after = factors[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    # halfway through the cosine the factor is one half
    assert warmup_cosine_factor(warmup + (max_steps - warmup) // 2, max_steps, warmup) == pytest.approx(0.5)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, max_steps, warmup_fraction=0.1)
    seen = []
    for _ in range(max_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(seen, [2.0 * f for f in factors[:max_steps]])
    with pytest.raises(SapError):
        warmup_cosine_schedule(optimizer, 0, 0.1)


def test_rng_capture_restores_every_stream():
    generator = np.random.default_rng(5)
    state = capture_rng(generator)
    first = (torch.rand(3), random.random(), generator.random(2))
    restore_rng(state, generator)
    second = (torch.rand(3), random.random(), generator.random(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])


def test_logger_truncates_on_resume(tmp_path):
    logger = RunLogger(tmp_path, ["loss", "val_dice"], tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, **({"val_dice": 0.5} if step % 2 == 0 else {})})
    with pytest.raises(SapError, match="not columns"):
        logger.log(6, {"other": 1.0})
    logger.close()
    resumed = RunLogger(tmp_path, ["loss", "val_dice"], resume_step=2, tensorboard=False)
    resumed.log(3, {"loss": 0.25})
    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[1]["val_dice"] == "0.5" and rows[2]["val_dice"] == "" and float(rows[2]["loss"]) == 0.25


def _tiny_run(stop_after=None, state=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = warmup_cosine_schedule(optimizer, 6, 0.2)
    accelerator = make_accelerator(amp=False)
    generator = np.random.default_rng(1)
    loop = LoopState()
    if state is not None:
        model.load_state_dict(state["model"])
        loop = restore_training_state(state["training"], optimizer, scheduler, accelerator, generator)
    checkpoints = {}

    def draw():
        x = torch.from_numpy(generator.normal(size=(4, 3))).float()
        return x, x.sum(1, keepdim=True)

    def step_fn(net, batch):
        loss = torch.nn.functional.mse_loss(net(batch[0]), batch[1])
        return loss, {"loss": float(loss.detach())}

    def save(current):
        checkpoints["last"] = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "training": training_state(optimizer, scheduler, accelerator, current, generator),
        }
        return {"saved": 1.0}

    calls = []
    loop = train_loop(
        model=model, draw_batch=draw, step_fn=step_fn, optimizer=optimizer, scheduler=scheduler,
        accelerator=accelerator, loop=loop, max_steps=6, callbacks=[every(3, save), lambda s, last: calls.append(last)],
        stop_after=stop_after, progress=False,
    )
    return model, loop, checkpoints, calls


def test_loop_resumes_to_the_same_weights():
    full, loop, _, calls = _tiny_run()
    assert loop.step == 6 and calls == [False] * 5 + [True]
    _, stopped, checkpoints, _ = _tiny_run(stop_after=3)
    assert stopped.step == 3 and checkpoints["last"]["training"]["step"] == 3
    resumed, loop2, _, _ = _tiny_run(state=checkpoints["last"])
    assert loop2.step == 6
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loop_refuses_a_diverged_loss():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SapError, match="loss became"):
        train_loop(
            model=model, draw_batch=lambda: None, step_fn=lambda net, b: (torch.tensor(math.nan, requires_grad=True), {}),
            optimizer=optimizer, scheduler=warmup_cosine_schedule(optimizer, 2, 0.0),
            accelerator=make_accelerator(False), loop=LoopState(), max_steps=2, progress=False,
        )


def test_prepare_out_dir_refuses_replaces_and_resumes(tmp_path):
    from sap.errors import SapError
    from sap.models.training import prepare_out_dir

    out = tmp_path / "stage"
    prepare_out_dir(out, resume=False, overwrite=False)  # new folder: fine
    (out / "last.pt").write_bytes(b"weights")
    (out / "tensorboard").mkdir()
    with pytest.raises(SapError, match="outputs exist \\(last.pt\\)"):
        prepare_out_dir(out, resume=False, overwrite=False)
    assert (out / "last.pt").read_bytes() == b"weights"
    prepare_out_dir(out, resume=True, overwrite=False)  # resume keeps everything
    assert (out / "last.pt").exists()
    prepare_out_dir(out, resume=False, overwrite=True)
    assert not (out / "last.pt").exists() and not (out / "tensorboard").exists()
    with pytest.raises(SapError, match="nothing to resume"):
        prepare_out_dir(out, resume=True, overwrite=False)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or glibc() is None, reason="glibc malloc only")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training only: a GPU run keeps glibc's defaults")
def test_reused_memory_keeps_freed_memory_then_hands_it_back():
    size = 256 * 2**20
    with reused_memory() as applied:
        assert applied
        block = np.ones(size, np.uint8)  # touched: resident
        before_free = _rss_bytes()
        del block
        kept = _rss_bytes()
        # heap-served and never trimmed: the freed pages stay resident for the next step
        assert kept > before_free - size // 2
    # restored: the kept heap is trimmed back to the OS
    assert _rss_bytes() < kept - size // 2
