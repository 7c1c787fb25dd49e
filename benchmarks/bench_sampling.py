"""Patch-sampling benchmark (SPEC §12): sap's samplers against MONAI's positive/negative cropping.

Rows, all on the same synthetic whole-body cases (``sampling_data.py``), 96³ × 2-channel patches:

- ``sap instance``: :class:`sap.sampling.InstanceBalancedSampler` reading the memory-mapped ``.npy``
  cache (set-up time: one sequential read of the files into the page cache, like CacheDataset's
  fill, plus the one-off index build);
- ``sap posneg``: :class:`sap.sampling.PosNegSampler` (the voxel-uniform ablation) on the same cache;
- ``MONAI CacheDataset``: ``LoadImaged`` → ``EnsureChannelFirstd`` → ``FgBgToIndicesd`` cached
  (set-up time), then ``RandCropByPosNegLabeld(fg_indices_key=…, bg_indices_key=…, num_samples=2)``
  per item;
- the same with ``CacheDataset(copy_cache=False)`` (MONAI's default deep-copies the cached item,
  whole volume included, before every random crop; safe to skip here as no transform works in place);
- ``MONAI LoadImaged``: the same transforms without the cache (every item decodes the NIfTI files).

Each row runs in its own process (peak RSS = ``ru_maxrss`` of that process; "above imports" subtracts
the RSS after importing the libraries), one torch thread, no DataLoader workers; the median of
``--repeats`` runs is reported. A last part counts, over many epochs, which lesion each positive patch
is centred on and reports the share of positive patches per lesion-size bin for the three samplers
next to the share of lesions in the bin (the instance-balanced sampler should match the lesion share;
voxel-uniform sampling favours large lesions).

    python benchmarks/bench_sampling.py                      # full run, prints a Markdown table
    python benchmarks/bench_sampling.py --shape 96 96 192 --patches 20 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("sap-instance", "sap-posneg", "monai-cache", "monai-cache-nocopy", "monai-load")
LABELS = {
    "sap-instance": "sap InstanceBalancedSampler (memory-mapped cache)",
    "sap-posneg": "sap PosNegSampler (memory-mapped cache)",
    "monai-cache": "MONAI CacheDataset + FgBgToIndicesd + RandCropByPosNegLabeld",
    "monai-cache-nocopy": "the same, CacheDataset(copy_cache=False)",
    "monai-load": "MONAI LoadImaged + FgBgToIndicesd + RandCropByPosNegLabeld (no cache)",
}
BIN_EDGES_ML = (0.1, 0.5, 1.0, 5.0)
BIN_NAMES = ("< 0.1 mL", "0.1–0.5 mL", "0.5–1 mL", "1–5 mL", "≥ 5 mL")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sap_cases(cases: list[dict]) -> list:
    from sap.sampling import SamplingCase

    return [
        SamplingCase(
            f"case{i}",
            np.load(c["image"], mmap_mode="r"),
            np.load(c["lesions"], mmap_mode="r"),
            np.load(c["body"], mmap_mode="r"),
        )
        for i, c in enumerate(cases)
    ]


def _monai_transform(patch: int, keys: tuple[str, ...] = ("image", "label"), num_samples: int = 2):
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        FgBgToIndicesd,
        LoadImaged,
        RandCropByPosNegLabeld,
    )

    image_key = "image" if "image" in keys else None
    return Compose(
        [
            LoadImaged(keys=list(keys), image_only=True),
            EnsureChannelFirstd(keys=list(keys)),
            FgBgToIndicesd(keys="label", image_key=image_key, image_threshold=0.0),
            RandCropByPosNegLabeld(
                keys=list(keys),
                label_key="label",
                spatial_size=(patch,) * 3,
                pos=1.0,
                neg=1.0,
                num_samples=num_samples,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
        ]
    )


def run_worker(mode: str, cases: list[dict], patch: int, n_patches: int, seed: int) -> dict:
    """Time one row in this process; returns patches/s, set-up seconds and memory."""
    import torch

    torch.set_num_threads(1)
    if mode.startswith("sap"):
        from sap.sampling import InstanceBalancedSampler, PosNegSampler
    else:
        import monai  # noqa: F401
        from monai.data import CacheDataset, Dataset
        from monai.utils import set_determinism

        set_determinism(seed)
    rss_imports = _rss_mb()
    t0 = time.perf_counter()
    checksum = 0.0
    if mode.startswith("sap"):
        sampling_cases = _sap_cases(cases)
        # Set-up makes the data resident, as CacheDataset's fill does: one sequential read of each
        # memory-mapped file into the page cache (a long training run has it there after epoch 1).
        for case in sampling_cases:
            for array in (case.image, case.lesions, case.body):
                checksum += float(np.asarray(array).sum(dtype=np.float64)) * 0.0
        cls = InstanceBalancedSampler if mode == "sap-instance" else PosNegSampler
        sampler = cls(sampling_cases, (patch,) * 3, neg_ratio=1.0, seed=seed, batch_size=2)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        done, epoch = 0, 0
        while done < n_patches:
            plan = sampler.plan(epoch)
            for first in range(0, len(plan) - 1, 2):  # batches of two, as in training
                patches = [sampler.resolve(r, epoch) for r in plan[first : first + 2]]
                images, labels = sampler.read_batch(patches)
                batch = {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)[:, None]}
                checksum += float(batch["image"][0, 0, 0, 0, 0]) + float(batch["label"][0, 0, 0, 0, 0])
                done += len(patches)
                if done >= n_patches:
                    break
            epoch += 1
    else:
        from monai.data import list_data_collate

        data = [{"image": c["image_nii"], "label": c["label_nii"]} for c in cases]
        transform = _monai_transform(patch)
        if mode.startswith("monai-cache"):
            dataset = CacheDataset(
                data,
                transform=transform,
                cache_rate=1.0,
                num_workers=0,
                progress=False,
                copy_cache=mode == "monai-cache",  # the default deep-copies each cached item per draw
            )
        else:
            dataset = Dataset(data, transform=transform)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        done, item = 0, 0
        while done < n_patches:
            samples = dataset[item % len(data)]  # num_samples=2 crops: one batch
            batch = list_data_collate(samples)
            assert tuple(batch["image"].shape) == (2, 2, patch, patch, patch)
            checksum += float(batch["image"][0, 0, 0, 0, 0]) + float(batch["label"][0, 0, 0, 0, 0])
            done += len(samples)
            item += 1
    seconds = time.perf_counter() - t1
    return {
        "mode": mode,
        "patches": done,
        "seconds": seconds,
        "patches_per_s": done / seconds,
        "setup_s": setup,
        "peak_rss_mb": _rss_mb(),
        "rss_after_imports_mb": rss_imports,
        "checksum": checksum,
    }


def positive_shares(cases: list[dict], patch: int, epochs: int, monai_patches: int, seed: int) -> dict:
    """Share of positive patches per lesion-size bin for the three samplers, and of lesions.

    A positive patch is attributed to the lesion its centre lies in. So that no sampler has to
    shift a patch away from the volume border (which moves its centre off the chosen voxel), the
    label maps are padded by half a patch here; no image is read (the choice of centres is what
    differs between samplers, not the reading).
    """
    import torch
    from monai.transforms import RandCropByPosNegLabeld
    from monai.utils import set_determinism

    from sap.sampling import InstanceBalancedSampler, PosNegSampler, SamplingCase, lesion_size_bins

    torch.set_num_threads(1)
    half = patch // 2
    pad = [(half, half)] * 3
    instances = [np.pad(np.load(c["instances"]).astype(np.int16), pad) for c in cases]
    bodies = [np.pad(np.load(c["body"]), pad) for c in cases]
    voxel_ml = cases[0]["voxel_ml"]
    volume = [np.bincount(inst.ravel()) * voxel_ml for inst in instances]  # index = instance id
    lesion_bins = np.concatenate([lesion_size_bins(v[1:], BIN_EDGES_ML) for v in volume])
    counts = {name: np.zeros(len(BIN_NAMES), int) for name in ("sap-instance", "sap-posneg", "monai")}

    def count(name: str, case: int, centre: np.ndarray) -> None:
        lesion = int(instances[case][tuple(np.asarray(centre))])
        if lesion:
            counts[name][lesion_size_bins([volume[case][lesion]], BIN_EDGES_ML)[0]] += 1

    no_image = np.zeros((1, 1, 1, 1), np.float32)
    sampling_cases = [
        SamplingCase(f"case{i}", np.broadcast_to(no_image, (1, *inst.shape)), (inst > 0).view(np.uint8), body)
        for i, (inst, body) in enumerate(zip(instances, bodies, strict=True))
    ]
    instance = InstanceBalancedSampler(sampling_cases, (patch,) * 3, seed=seed)
    posneg = PosNegSampler(sampling_cases, (patch,) * 3, seed=seed)
    for epoch in range(epochs):
        for request in instance.plan(epoch):
            if request.kind == "pos":  # the request names its lesion
                count(
                    "sap-instance",
                    request.case,
                    instance.indices[request.case].lesion_voxels(request.target)[0],
                )
        for request in posneg.plan(epoch):
            if request.kind == "pos":
                count("sap-posneg", request.case, posneg.resolve(request, epoch).start + half)
    set_determinism(seed)
    crop = RandCropByPosNegLabeld(
        keys=["label"],
        label_key="label",
        spatial_size=(patch,) * 3,
        pos=1.0,
        neg=0.0,
        num_samples=50,
        fg_indices_key="fg",
        bg_indices_key="bg",
    )
    drawn = 0
    while drawn < monai_patches:
        for case, inst in enumerate(instances):
            # MONAI crops the label; the crop's corner (from its affine) gives the centre.
            item = {
                "label": torch.from_numpy(inst[None]),
                "fg": np.flatnonzero(inst),
                "bg": np.zeros(1, np.int64),
            }
            for sample in crop(item):
                corner = np.rint(sample["label"].affine[:3, 3].numpy()).astype(np.int64)
                count("monai", case, corner + half)
                drawn += 1
    lesion_share = np.bincount(lesion_bins, minlength=len(BIN_NAMES)) / len(lesion_bins)
    return {
        "bins": list(BIN_NAMES),
        "lesions": np.bincount(lesion_bins, minlength=len(BIN_NAMES)).tolist(),
        "lesion_share": lesion_share.tolist(),
        **{f"{k}_positives": v.tolist() for k, v in counts.items()},
        **{f"{k}_share": (v / max(1, v.sum())).tolist() for k, v in counts.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="whole-body cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 128, 576], help="voxels per case")
    parser.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm")
    parser.add_argument(
        "--lesions", type=int, nargs="+", default=[60, 15, 0], help="lesions per case, in turn (repeated)"
    )
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels")
    parser.add_argument("--patches", type=int, default=200, help="patches timed per cached row")
    parser.add_argument("--load-patches", type=int, default=12, help="patches timed for the LoadImaged row")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs for the lesion-size shares")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sap_bench_sampling"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=(*MODES, "shares"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from sampling_data import write_cases

    cases = write_cases(
        Path(args.workdir), args.cases, tuple(args.shape), args.spacing, args.lesions, args.seed
    )
    if args.worker == "shares":
        n_pos = 2 * args.epochs * sum(args.lesions[i % len(args.lesions)] for i in range(args.cases))
        print(json.dumps(positive_shares(cases, args.patch, args.epochs, n_pos, args.seed)))
        return 0
    if args.worker:
        n = args.load_patches if args.worker == "monai-load" else args.patches
        print(json.dumps(run_worker(args.worker, cases, args.patch, n, args.seed)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        __file__,
        "--workdir",
        args.workdir,
        "--cases",
        str(args.cases),
        "--shape",
        *map(str, args.shape),
        "--spacing",
        str(args.spacing),
        "--lesions",
        *map(str, args.lesions),
        "--patch",
        str(args.patch),
        "--patches",
        str(args.patches),
        "--load-patches",
        str(args.load_patches),
        "--seed",
        str(args.seed),
        "--epochs",
        str(args.epochs),
    ]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            out = subprocess.run(
                [*base, "--worker", mode], capture_output=True, text=True, env=env, check=True
            )
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {repeat + 1} {mode}: {runs[mode][-1]['patches_per_s']:.2f} patches/s",
                file=sys.stderr,
            )
    shares_out = subprocess.run(
        [*base, "--worker", "shares"], capture_output=True, text=True, env=env, check=True
    )
    shares = json.loads(shares_out.stdout.strip().splitlines()[-1])

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    ref = med("monai-cache", "patches_per_s")
    voxels = int(np.prod(args.shape))
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {args.cases} cases of {'×'.join(map(str, args.shape))} voxels "
        f"({voxels / 1e6:.1f} M, {args.spacing} mm), {'/'.join(map(str, args.lesions))} lesions, patches "
        f"{args.patch}³ × 2 channels, median of {args.repeats} runs, one thread, no workers.",
        "",
        "| sampler | patches/s | vs MONAI CacheDataset | set-up (s) | peak RSS (MB) | above imports (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rate = med(mode, "patches_per_s")
        lines.append(
            f"| {LABELS[mode]} | {rate:.1f} | {rate / ref:.2f}× | {med(mode, 'setup_s'):.1f} | "
            f"{med(mode, 'peak_rss_mb'):.0f} | {med(mode, 'peak_rss_mb') - med(mode, 'rss_after_imports_mb'):.0f} |"
        )
    lines += [
        "",
        f"Share of positive patches per lesion-size bin ({args.epochs} epochs of each sap sampler; MONAI "
        "positives = crops centred on a lesion voxel):",
        "",
        "| lesion volume | lesions | share of lesions | sap instance | sap posneg | MONAI RandCropByPosNegLabeld |",
        "|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(shares["bins"]):
        lines.append(
            f"| {name} | {shares['lesions'][i]} | {100 * shares['lesion_share'][i]:.1f} % | "
            f"{100 * shares['sap-instance_share'][i]:.1f} % | {100 * shares['sap-posneg_share'][i]:.1f} % | "
            f"{100 * shares['monai_share'][i]:.1f} % |"
        )
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "shares": shares, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
