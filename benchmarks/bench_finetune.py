"""Fine-tuning throughput on a GPU (SPEC §12): sap's training step against a plain MONAI loop.

Both rows train the same paper-scale Swin UNETR (feature_size 48, 96³ patches, batch 2, 2 channels,
2 classes) with the same loss (``DiceCELoss(include_background=False)``), optimiser (AdamW, weight
decay 1e-5) and the same synthetic whole-body cases (``sampling_data.py``), AMP on and off:

- ``sap``: :class:`sap.sampling.InstanceBalancedSampler` over the memory-mapped ``.npy`` cache,
  :func:`sap.sampling.torch_data.batch_stream` (batches read straight into pinned memory by
  DataLoader workers), :func:`sap.models.training.make_accelerator`, the encoder/decoder groups of
  ``sap.finetune`` (``--init sap`` learning rates);
- ``monai``: ``CacheDataset(LoadImaged → EnsureChannelFirstd → FgBgToIndicesd)`` then
  ``RandCropByPosNegLabeld(num_samples=2, fg_indices_key=…)``, a ``DataLoader`` with the same number
  of workers and ``list_data_collate``, ``torch.autocast`` + ``GradScaler``: the loop of MONAI's
  tutorials.

Reported per row: optimiser steps/s (after ``--warmup`` steps, over ``--steps`` steps, median of
``--repeats`` runs), peak GPU memory (``torch.cuda.max_memory_allocated``) and mean GPU utilisation
(``nvidia-smi`` sampled every 200 ms over the timed steps). Each run is its own process.

    python benchmarks/bench_finetune.py                      # on a GPU machine; prints a Markdown table
    python benchmarks/bench_finetune.py --device cpu --feature-size 12 --patch 64 --steps 2 --warmup 1 \\
        --repeats 1 --shape 96 96 192                        # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class GpuSampler:
    """Mean ``utilization.gpu`` from nvidia-smi, sampled in a background thread."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=5,
                )  # fmt: skip
                self.values.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")


def _model_and_optimizer(args: argparse.Namespace, device):
    import torch

    from sap.config import load_config
    from sap.finetune.train import build_optimizer
    from sap.models.swin import build_swin_unetr

    cfg = load_config("paper")
    cfg.model.feature_size = args.feature_size
    torch.manual_seed(0)
    model = build_swin_unetr(cfg.model, 2, 2).to(device)
    return model, build_optimizer(model, cfg, "sap")


def run_row(args: argparse.Namespace, cases: list[dict]) -> dict:
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    device = torch.device(args.device)
    amp = args.amp == "on" and device.type == "cuda"
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    model, optimizer = _model_and_optimizer(args, device)
    patch = (args.patch,) * 3
    if args.row == "sap":
        from sap.models.training import make_accelerator
        from sap.sampling import EpochCursor, InstanceBalancedSampler, SamplingCase
        from sap.sampling.torch_data import batch_stream

        accelerator = make_accelerator(amp)
        model, optimizer = accelerator.prepare(model, optimizer)
        sampling_cases = [
            SamplingCase(
                f"case{i}",
                np.load(c["image"], mmap_mode="r"),
                np.load(c["lesions"], mmap_mode="r"),
                np.load(c["body"], mmap_mode="r"),
            )
            for i, c in enumerate(cases)
        ]
        sampler = InstanceBalancedSampler(sampling_cases, patch, seed=0, batch_size=2)
        stream = batch_stream(
            sampler, EpochCursor(), num_workers=args.workers, pin_memory=device.type == "cuda"
        )

        def step() -> float:
            batch = next(stream)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True).long()
            with accelerator.autocast():
                loss = loss_fn(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            return float(loss.detach())
    else:
        from bench_sampling import _monai_transform
        from monai.data import CacheDataset, DataLoader, list_data_collate
        from monai.utils import set_determinism

        set_determinism(0)
        data = [{"image": c["image_nii"], "label": c["label_nii"]} for c in cases]
        dataset = CacheDataset(data, transform=_monai_transform(args.patch), cache_rate=1.0, progress=False)
        loader = DataLoader(
            dataset, batch_size=1, shuffle=True, num_workers=args.workers, collate_fn=list_data_collate,
            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        )  # fmt: skip
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def batches():
            while True:
                yield from loader

        source = batches()

        def step() -> float:
            batch = next(source)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True).long()
            with torch.autocast(device_type=device.type, enabled=amp):
                loss = loss_fn(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return float(loss.detach())

    model.train()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() if device.type == "cuda" else _Null() as gpu:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {
        "row": args.row,
        "amp": args.amp,
        "steps_per_s": args.steps / seconds,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan"),
        "gpu_util": gpu.mean,
    }


class _Null:
    mean = float("nan")

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu (smoke test)")
    parser.add_argument("--feature-size", type=int, default=48, help="Swin UNETR feature_size")
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels")
    parser.add_argument("--steps", type=int, default=50, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimiser steps first")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for both rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--cases", type=int, default=3, help="whole-body cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 128, 576], help="voxels per case")
    parser.add_argument(
        "--lesions", type=int, nargs="+", default=[60, 15, 0], help="lesions per case, in turn"
    )
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sap_bench_sampling"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--row", choices=("sap", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--amp", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from sampling_data import write_cases

    cases = write_cases(Path(args.workdir), args.cases, tuple(args.shape), 2.0, args.lesions, 0)
    if args.row:
        print(json.dumps(run_row(args, cases)))
        return 0
    base = [
        sys.executable, __file__, "--device", args.device, "--feature-size", str(args.feature_size),
        "--patch", str(args.patch), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--workers", str(args.workers), "--cases", str(args.cases), "--shape", *map(str, args.shape),
        "--lesions", *map(str, args.lesions), "--workdir", args.workdir,
    ]  # fmt: skip
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for amp in ("on", "off"):
            for row in ("sap", "monai"):
                out = subprocess.run(
                    [*base, "--row", row, "--amp", amp], capture_output=True, text=True, check=True
                )
                results.setdefault((row, amp), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{row} amp {amp}: {results[(row, amp)][-1]}", file=sys.stderr)
    gpu = "cpu"
    if args.device == "cuda":
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        gpu = query.stdout.strip().splitlines()[0] if query.stdout.strip() else "cuda"
    lines = [
        f"Machine: {gpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}; Swin UNETR feature_size "
        f"{args.feature_size}, {args.patch}³ patches, batch 2, {args.workers} DataLoader workers, "
        f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} runs.",
        "",
        "| loop | AMP | steps/s | peak GPU memory (MB) | GPU utilisation (%) |",
        "|---|---|---|---|---|",
    ]
    for (row, amp), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("steps_per_s", "peak_gpu_mb", "gpu_util")}
        name = (
            "sap (instance sampler, memory-mapped cache)"
            if row == "sap"
            else "plain MONAI (CacheDataset + RandCropByPosNegLabeld)"
        )
        lines.append(
            f"| {name} | {amp} | {med['steps_per_s']:.2f} | {med['peak_gpu_mb']:.0f} | {med['gpu_util']:.0f} |"
        )
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{r}-{a}": v for (r, a), v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
