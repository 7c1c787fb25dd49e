"""Paper-scale pretraining step speed and peak GPU memory, AMP on and off (SPEC §12).

Swin UNETR with feature_size 48, 96³ patches, batch 2, 2 input channels, 10 classes (skeletal
stage, Dice+CE), plus the SSL step (2 crops → 4 views). Rows:

* ``sap skeletal``: :func:`sap.models.training.train_loop` with an ``accelerate`` Accelerator
  (what ``sap pretrain --stage skeletal`` runs), fed in-memory batches;
* ``monai loop`` (the peer): a plain PyTorch/MONAI loop (``torch.autocast`` + ``GradScaler``) on
  the same model and batches;
* ``sap ssl``: one SSL step of ``sap pretrain --stage ssl``.

Each configuration: warm-up steps, then ``--repeats`` timed runs of ``--steps`` steps; the table
gives the median steps/s and the peak memory (``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_pretrain_gpu.py [--steps 20] [--repeats 3] [--json out.json]

Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _batches(n: int, patch: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        image = torch.rand(batch, 2, patch, patch, patch, generator=g)
        label = torch.randint(0, 10, (batch, 1, patch, patch, patch), generator=g)
        out.append((image.to(device), label.to(device)))
    return out


def _model(cfg):
    from sap.models.swin import build_swin_unetr

    torch.manual_seed(0)
    return build_swin_unetr(cfg.model, 2, 10)


def run_sap_skeletal(cfg, amp: bool, steps: int, warmup: int, batches) -> tuple[float, int]:
    from monai.losses import DiceCELoss

    from sap.models.training import LoopState, make_accelerator, train_loop, warmup_cosine_schedule

    accelerator = make_accelerator(amp)
    model = _model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-5)
    scheduler = warmup_cosine_schedule(optimizer, 10**6, 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    counter = {"i": 0}

    def draw():
        counter["i"] += 1
        return batches[counter["i"] % len(batches)]

    def step_fn(net, batch):
        loss = loss_fn(net(batch[0]), batch[1])
        return loss, {"loss": 0.0}  # no .item() sync inside the timed loop

    loop = LoopState()
    train_loop(
        model=model,
        draw_batch=draw,
        step_fn=step_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        loop=loop,
        max_steps=warmup,
        desc="warm-up",
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_loop(
        model=model,
        draw_batch=draw,
        step_fn=step_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        loop=loop,
        max_steps=warmup + steps,
        desc="timed",
    )
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


def run_monai_loop(cfg, amp: bool, steps: int, warmup: int, batches) -> tuple[float, int]:
    from monai.losses import DiceCELoss

    model = _model(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def one(i: int) -> None:
        image, label = batches[i % len(batches)]
        with torch.autocast("cuda", enabled=amp):
            loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    for i in range(warmup):
        one(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        one(i)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


def run_sap_ssl(cfg, amp: bool, steps: int, warmup: int, batches) -> tuple[float, int]:
    import numpy as np

    from sap.models.ssl import SSLModel, make_ssl_batch, ssl_losses
    from sap.models.swin import build_swin_unetr
    from sap.models.training import make_accelerator

    accelerator = make_accelerator(amp)
    torch.manual_seed(0)
    model = SSLModel(build_swin_unetr(cfg.model, 2, 2).swinViT, cfg.model.feature_size, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = np.random.default_rng(0)

    def one(i: int) -> None:
        batch = make_ssl_batch(batches[i % len(batches)][0], rng)
        with accelerator.autocast():
            loss = ssl_losses(model, batch).total
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()

    for i in range(warmup):
        one(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        one(i)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_pretrain_gpu: needs a CUDA GPU; none found", file=sys.stderr)
        return 2
    from sap.config import load_config

    cfg = load_config("paper")  # feature_size 48, 96³, batch 2, drop rates 0.1
    patch, batch = cfg.model.patch_size[0], cfg.pretrain.batch_size
    batches = _batches(4, patch, batch, torch.device("cuda"))
    rows = []
    for name, fn in (
        ("sap skeletal", run_sap_skeletal),
        ("monai loop", run_monai_loop),
        ("sap ssl", run_sap_ssl),
    ):
        for amp in (True, False):
            speeds, peaks = [], []
            for _ in range(args.repeats):
                speed, peak = fn(cfg, amp, args.steps, args.warmup, batches)
                speeds.append(speed)
                peaks.append(peak)
                torch.cuda.empty_cache()
            row = {
                "row": name,
                "amp": amp,
                "steps_per_s": statistics.median(speeds),
                "runs": speeds,
                "peak_gib": max(peaks) / 2**30,
            }
            rows.append(row)
            print(
                f"{name:13s} amp={'on ' if amp else 'off'} {row['steps_per_s']:.2f} steps/s "
                f"(runs {', '.join(f'{s:.2f}' for s in speeds)}), peak {row['peak_gib']:.2f} GiB",
                flush=True,
            )
    print(
        f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
        f"feature_size {cfg.model.feature_size}, patch {patch}³, batch {batch} (SSL: {batch} crops → {2 * batch} views)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
